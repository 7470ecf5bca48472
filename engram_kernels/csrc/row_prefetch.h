// The prefetch worker for Engram tables in CPU memory, as a native thread (row_prefetch.cpp
// says why); module.cpp binds both classes.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "table_counters.h"

namespace engram_kernels {

// A decode step's half of the Engram layer that needs the hidden state (engram_mix), as a
// ticket's mix() runs it: the layer's conv state (updated in place) and weights.
struct MixJob {
  at::Tensor state, key_scale, norm_weight, taps;
  int64_t dilation;
  double gate_eps, conv_eps;
};

// What the worker does with one layer's rows, fixed for the worker's life: gather them from
// `table` (gather_rows), then, if `weight` is given, project them (flattened per token)
// @ weight.T + bias; the result is viewed as `shape`. `mix`, if given, is what mix() does with it.
struct LayerJob {
  at::Tensor table;
  std::optional<at::Tensor> weight, bias;
  std::vector<int64_t> shape;
  at::ScalarType dtype;  // the rows are decoded into it (then projected in float32)
  std::optional<MixJob> mix;
};
using LayerJobs = std::shared_ptr<const std::vector<LayerJob>>;

// NgramHasher.step_rows as data (NgramHasher.kernel_args): ngram_rows' arguments, layers in
// the jobs' order, offsets included (global row ids), then the raw pad id and N - 1. A step
// handed over as token ids is hashed on the worker.
struct RowHash {
  at::Tensor lookup;
  int64_t pad;
  at::Tensor multipliers, primes, offsets;
  int64_t window_pad, skip;
};

using Counters = std::shared_ptr<TableCounters>;

// One engine step: per layer, in order, the row ids its job runs on (given, or hashed first
// from the step's token ids); wait(i) blocks until layer i is done. The worker's time per
// layer and each wait go to the worker's TableCounters.
class PrefetchTicket {
 public:
  PrefetchTicket(LayerJobs layers, Counters counters, std::vector<at::Tensor> rows);
  // contexts[b]: row b's new_tokens[b] new tokens after up to hash.skip before them (as
  // NgramHasher.step_rows); slots: the rows' conv state rows, for mix()
  PrefetchTicket(LayerJobs layers, Counters counters, std::shared_ptr<const RowHash> hash,
                 std::vector<std::vector<int64_t>> contexts, std::vector<int64_t> new_tokens,
                 std::vector<int64_t> slots);
  void run();
  // layer i's result; raises its error (IndexError for a bad row id)
  at::Tensor wait(int64_t i);
  // hidden + the layer's mix job on hidden [B, 1, D] and wait(i), one new token per row at the
  // ticket's slots -> [B, 1, D]; the gate [B, 1] is kept for gate_means()
  at::Tensor mix(int64_t i, const at::Tensor& hidden);
  // per layer, in order: each row's gate averaged over the branches (empty if not mixed)
  std::vector<std::vector<double>> gate_means();

 private:
  void hash_rows();
  void finish(size_t i, at::Tensor out, std::string error, bool index_error, double seconds);
  LayerJobs layers_;
  Counters counters_;
  std::shared_ptr<const RowHash> hash_;
  std::vector<std::vector<int64_t>> contexts_;
  std::vector<int64_t> new_tokens_;
  std::vector<int64_t> slot_ids_;
  at::Tensor slots_;  // slot_ids_, made by the worker; undefined: no mix()
  std::vector<at::Tensor> gates_;
  std::vector<at::Tensor> rows_;
  std::vector<at::Tensor> results_;
  std::vector<std::string> errors_;
  std::vector<bool> index_errors_;
  size_t done_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
};

class RowPrefetcher {
 public:
  // counters: where the tickets' statistics go (they outlive a worker: Python makes a new
  // one when the weights change)
  RowPrefetcher(std::vector<LayerJob> layers, std::optional<RowHash> hash, Counters counters);
  ~RowPrefetcher();
  // rows[i]: int64 row ids for layer i, [tokens, heads] (a projected layer needs two dimensions)
  std::shared_ptr<PrefetchTicket> submit(std::vector<at::Tensor> rows);
  // a step as token ids, hashed on the worker (needs the constructor's hash); as the ticket's
  std::shared_ptr<PrefetchTicket> submit_tokens(std::vector<std::vector<int64_t>> contexts,
                                                std::vector<int64_t> new_tokens, std::vector<int64_t> slots);
  void close();  // runs what is queued, then stops the thread

 private:
  void loop();
  void enqueue(std::shared_ptr<PrefetchTicket> ticket);
  LayerJobs layers_;
  std::shared_ptr<const RowHash> hash_;
  Counters counters_;
  std::deque<std::shared_ptr<PrefetchTicket>> queue_;
  bool closed_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::thread worker_;
};

}  // namespace engram_kernels
