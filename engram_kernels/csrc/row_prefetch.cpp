// The prefetch worker for Engram tables in CPU memory without a row cache, as a native
// thread (offload/prefetch.py has the Python worker every other placement uses). A
// Python worker needs the GIL between its kernels, and it gets it only when the forward,
// running on the engine thread, gives it up: each hand-over stalls the forward, which on
// a batch-1 decode step cost more than gathering and projecting inline. This thread
// never touches Python: a step's jobs (per Engram layer: gather and decode the rows,
// project them with the layer's key and value weights) run here while the forward
// computes, and the engine thread waits for one layer's result with the GIL released.
// The per-layer parts (table, weights, shapes) are given once, at construction: a step
// hands over its row ids alone, which keeps the engine thread's share to one short call.
//
// The projection runs on this thread alone (linear_rows without torch's intra-op
// threads): the server leaves one core for this thread and the HTTP side.
#include "row_prefetch.h"

#include <c10/util/Exception.h>

#include <chrono>

#include "kernels.h"

namespace engram_kernels {

PrefetchTicket::PrefetchTicket(LayerJobs layers, std::vector<at::Tensor> rows)
    : layers_(std::move(layers)), rows_(std::move(rows)), results_(rows_.size()), errors_(rows_.size()),
      index_errors_(rows_.size()), seconds_(rows_.size()) {
  TORCH_CHECK(rows_.size() == layers_->size(), "a step needs row ids for each of the ", layers_->size(),
              " layers, got ", rows_.size());
}

void PrefetchTicket::run() {
  for (size_t i = 0; i < rows_.size(); ++i) {
    const auto start = std::chrono::steady_clock::now();
    const LayerJob& job = (*layers_)[i];
    const at::Tensor& ids = rows_[i];
    at::Tensor out;
    std::string error;
    bool index_error = false;
    try {
      if (job.weight.has_value()) {
        TORCH_CHECK(ids.dim() == 2, "rows to project must be [tokens, heads]");
        const at::Tensor rows = gather_rows(job.table, ids, job.dtype).view({ids.size(0), -1});
        out = linear_rows(rows, *job.weight, job.bias.value_or(at::Tensor()), /*parallel=*/false);
      } else {
        out = gather_rows(job.table, ids, job.dtype);
      }
      out = out.view(job.shape);
    } catch (const c10::IndexError& e) {
      error = e.what_without_backtrace();
      index_error = true;
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      results_[i] = std::move(out);
      errors_[i] = std::move(error);
      index_errors_[i] = index_error;
      seconds_[i] = took.count();
      done_ = i + 1;
    }
    cv_.notify_all();
  }
}

std::tuple<at::Tensor, double> PrefetchTicket::wait(int64_t i) {
  TORCH_CHECK(0 <= i && i < static_cast<int64_t>(rows_.size()), "this ticket has no layer ", i);
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return done_ > static_cast<size_t>(i); });
  TORCH_CHECK_INDEX(!index_errors_[i], errors_[i]);
  TORCH_CHECK(errors_[i].empty(), errors_[i]);
  return {results_[i], seconds_[i]};
}

RowPrefetcher::RowPrefetcher(std::vector<LayerJob> layers)
    : layers_(std::make_shared<const std::vector<LayerJob>>(std::move(layers))), worker_([this] { loop(); }) {}

RowPrefetcher::~RowPrefetcher() { close(); }

std::shared_ptr<PrefetchTicket> RowPrefetcher::submit(std::vector<at::Tensor> rows) {
  auto ticket = std::make_shared<PrefetchTicket>(layers_, std::move(rows));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!closed_, "submit() on a closed RowPrefetcher");
    queue_.push_back(ticket);
  }
  cv_.notify_one();
  return ticket;
}

void RowPrefetcher::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  cv_.notify_one();
  if (worker_.joinable()) worker_.join();
}

void RowPrefetcher::loop() {
  for (;;) {
    std::shared_ptr<PrefetchTicket> ticket;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closed, and everything queued has run
      ticket = std::move(queue_.front());
      queue_.pop_front();
    }
    ticket->run();
  }
}

}  // namespace engram_kernels
