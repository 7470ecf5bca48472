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

// One layer's job: rows of `table` (gather_rows), then, if `weight` is given, their
// projection (rows flattened per token) @ weight.T + bias, viewed as `shape`.
struct PrefetchJob {
  at::Tensor table, rows;
  std::optional<at::Tensor> weight, bias;
  std::vector<int64_t> shape;
  at::ScalarType dtype;  // the rows are decoded into it (then projected in float32)
};

// One engine step's jobs, run in order by the worker; wait(i) blocks until job i is done.
class PrefetchTicket {
 public:
  explicit PrefetchTicket(std::vector<PrefetchJob> jobs);
  void run();
  // job i's result and how long the worker took for it; raises its error (IndexError for a bad row id)
  std::tuple<at::Tensor, double> wait(int64_t i);

 private:
  std::vector<PrefetchJob> jobs_;
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
  RowPrefetcher();
  ~RowPrefetcher();
  std::shared_ptr<PrefetchTicket> submit(std::vector<PrefetchJob> jobs);
  void close();  // runs what is queued, then stops the thread

 private:
  void loop();
  std::deque<std::shared_ptr<PrefetchTicket>> queue_;
  bool closed_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::thread worker_;
};

}  // namespace engram_kernels
