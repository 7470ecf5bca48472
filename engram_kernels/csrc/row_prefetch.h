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

namespace engram_kernels {

// What the worker does with one layer's rows, fixed for the worker's life: gather them from
// `table` (gather_rows), then, if `weight` is given, project them (flattened per token)
// @ weight.T + bias; the result is viewed as `shape`.
struct LayerJob {
  at::Tensor table;
  std::optional<at::Tensor> weight, bias;
  std::vector<int64_t> shape;
  at::ScalarType dtype;  // the rows are decoded into it (then projected in float32)
};
using LayerJobs = std::shared_ptr<const std::vector<LayerJob>>;

// One engine step: per layer, in order, the row ids its job runs on; wait(i) blocks until
// layer i is done.
class PrefetchTicket {
 public:
  PrefetchTicket(LayerJobs layers, std::vector<at::Tensor> rows);
  void run();
  // layer i's result and how long the worker took for it; raises its error (IndexError for a bad row id)
  std::tuple<at::Tensor, double> wait(int64_t i);

 private:
  LayerJobs layers_;
  std::vector<at::Tensor> rows_;
  std::vector<at::Tensor> results_;
  std::vector<std::string> errors_;
  std::vector<bool> index_errors_;
  std::vector<double> seconds_;
  size_t done_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
};

class RowPrefetcher {
 public:
  explicit RowPrefetcher(std::vector<LayerJob> layers);
  ~RowPrefetcher();
  // rows[i]: int64 row ids for layer i, [tokens, heads] (a projected layer needs two dimensions)
  std::shared_ptr<PrefetchTicket> submit(std::vector<at::Tensor> rows);
  void close();  // runs what is queued, then stops the thread

 private:
  void loop();
  LayerJobs layers_;
  std::deque<std::shared_ptr<PrefetchTicket>> queue_;
  bool closed_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::thread worker_;
};

}  // namespace engram_kernels
