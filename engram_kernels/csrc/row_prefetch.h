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

#include "kernels.h"
#include "table_counters.h"

namespace engram_kernels {

// What the worker does with one layer's rows, fixed for the worker's life: gather them from
// `table` (gather_rows), then project them (flattened per token) @ weight.T + bias; the
// result is viewed as `shape`. With `mix`, a ticket's mix() runs
// engram_mix on the result with these weights and the layer's conv state `state` (updated in
// place). engram_kernels.LayerJob on the Python side; module.cpp converts it.
struct LayerJob {
  at::Tensor table, weight;
  std::optional<at::Tensor> bias;
  std::vector<int64_t> shape;
  at::ScalarType dtype;  // the rows are decoded into it (then projected in float32)
  at::Tensor state;
  std::optional<MixWeights> mix;
};
using LayerJobs = std::shared_ptr<const std::vector<LayerJob>>;

// NgramHasher.step_rows as data (NgramHasher.kernel_args, an engram_kernels.HashArgs):
// ngram_rows' arguments, layers in the jobs' order, offsets included (global row ids), then
// the raw pad id and N - 1. A step handed over as token ids is hashed on the worker.
struct RowHash {
  at::Tensor lookup;
  int64_t pad;
  at::Tensor multipliers, primes, offsets;
  int64_t window_pad, skip;
};

using Counters = std::shared_ptr<TableCounters>;

// One engine step, handed over as token ids: hashed into each layer's row ids, then per layer,
// in order, its job; wait(i) blocks until layer i is done. The worker's time per layer and
// each wait go to the worker's TableCounters.
class PrefetchTicket {
 public:
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
  RowPrefetcher(std::vector<LayerJob> layers, RowHash hash, Counters counters);
  ~RowPrefetcher();
  // a step as token ids, hashed on the worker; as the ticket's
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
