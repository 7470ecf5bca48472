// The prefetch worker for Engram tables in CPU memory without a row cache, as a native
// thread (offload/prefetch.py has the Python worker every other placement uses). A
// Python worker needs the GIL between its kernels, and it gets it only when the forward,
// running on the engine thread, gives it up: each hand-over stalls the forward, which on
// a batch-1 decode step cost more than gathering and projecting inline. This thread
// never touches Python: a step's jobs (per Engram layer: gather and decode the rows,
// project them with the layer's key and value weights) run here while the forward
// computes, and the engine thread waits for one layer's result with the GIL released.
// The per-layer parts (table, weights, shapes) and the N-gram hash are given once, at
// construction: a decode step hands over its token ids alone and is hashed here (row ids
// depend on token ids alone), which keeps the engine thread's share to one short call.
//
// The projection runs on this thread alone (linear_rows without torch's intra-op
// threads): the server leaves one core for this thread and the HTTP side.
#include "row_prefetch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>

#include "kernels.h"

namespace engram_kernels {

namespace {

// Runs fn; its error as (message, whether it is an IndexError), or ("", false).
template <typename Fn>
std::pair<std::string, bool> caught(Fn&& fn) {
  try {
    fn();
  } catch (const c10::IndexError& e) {
    return {e.what_without_backtrace(), true};
  } catch (const c10::Error& e) {
    return {e.what_without_backtrace(), false};
  } catch (const std::exception& e) {
    return {e.what(), false};
  }
  return {"", false};
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

PrefetchTicket::PrefetchTicket(LayerJobs layers, Counters counters, std::shared_ptr<const RowHash> hash,
                               std::vector<std::vector<int64_t>> contexts, std::vector<int64_t> new_tokens,
                               std::vector<int64_t> slots)
    : layers_(std::move(layers)), counters_(std::move(counters)), hash_(std::move(hash)),
      contexts_(std::move(contexts)), new_tokens_(std::move(new_tokens)), slot_ids_(std::move(slots)),
      gates_(layers_->size()), rows_(layers_->size()), results_(layers_->size()), errors_(layers_->size()),
      index_errors_(layers_->size()) {
  TORCH_CHECK(!contexts_.empty() && contexts_.size() == new_tokens_.size(), "one new-token count per row");
}

void PrefetchTicket::hash_rows() {
  // the token windows [B, skip + T] (NgramHasher.step_rows), then ngram_rows
  const RowHash& h = *hash_;
  const int64_t B = contexts_.size(), T = *std::max_element(new_tokens_.begin(), new_tokens_.end());
  at::Tensor windows = at::full({B, h.skip + T}, h.window_pad, at::kLong);
  int64_t* w = windows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int64_t>& ctx = contexts_[b];
    const int64_t lead = h.skip + new_tokens_[b] - static_cast<int64_t>(ctx.size());
    TORCH_CHECK(0 <= lead && lead <= h.skip && new_tokens_[b] <= T, "row ", b, ": ", ctx.size(),
                " tokens cannot be ", new_tokens_[b], " new ones after up to ", h.skip, " before them");
    std::copy(ctx.begin(), ctx.end(), w + b * (h.skip + T) + lead);
  }
  const at::Tensor all = ngram_rows(windows, h.lookup, h.pad, h.multipliers, h.primes, h.offsets, h.skip);
  for (size_t i = 0; i < rows_.size(); ++i) rows_[i] = all[i].reshape({-1, all.size(-1)});
}

void PrefetchTicket::run() {
  auto start = std::chrono::steady_clock::now();  // the first layer's time includes the hash
  slots_ = at::tensor(slot_ids_, at::kLong);  // here rather than at submit, off the engine thread
  const auto [error, index_error] = caught([&] { hash_rows(); });
  if (!error.empty()) {  // no layer has rows: each reports the hash's error
    for (size_t i = 0; i < rows_.size(); ++i) finish(i, {}, "hashing the step's tokens: " + error, index_error, 0);
    return;
  }
  for (size_t i = 0; i < rows_.size(); ++i) {
    const LayerJob& job = (*layers_)[i];
    const at::Tensor& ids = rows_[i];
    at::Tensor out;
    auto [error, index_error] = caught([&] {
      const at::Tensor rows = gather_rows(job.table, ids, job.dtype).view({ids.size(0), -1});
      out = linear_rows(rows, job.weight, job.bias.value_or(at::Tensor()), /*parallel=*/false).view(job.shape);
    });
    finish(i, std::move(out), std::move(error), index_error, seconds_since(start));
    start = std::chrono::steady_clock::now();
  }
}

void PrefetchTicket::finish(size_t i, at::Tensor out, std::string error, bool index_error, double seconds) {
  const bool ok = error.empty();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    results_[i] = std::move(out);
    errors_[i] = std::move(error);
    index_errors_[i] = index_error;
    done_ = i + 1;
  }
  cv_.notify_all();
  // after the hand-over: marking the rows in a large table's bitmap is a cache miss per row,
  // which the forward waiting for layer i need not wait for
  if (ok) counters_->gathered(i, rows_[i], seconds);
}

at::Tensor PrefetchTicket::wait(int64_t i) {
  TORCH_CHECK(0 <= i && i < static_cast<int64_t>(rows_.size()), "this ticket has no layer ", i);
  const auto start = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return done_ > static_cast<size_t>(i); });
  counters_->waited(i, seconds_since(start));
  TORCH_CHECK_INDEX(!index_errors_[i], errors_[i]);
  TORCH_CHECK(errors_[i].empty(), errors_[i]);
  return results_[i];
}

at::Tensor PrefetchTicket::mix(int64_t i, const at::Tensor& hidden) {
  const at::Tensor memory = wait(i);
  const LayerJob& job = (*layers_)[i];
  TORCH_CHECK(job.mix.has_value() && slots_.defined(), "mix() needs the layer's mix weights and the step's slots");
  auto [out, gate] = engram_mix(hidden, memory, job.state, slots_, *job.mix);
  gates_[i] = std::move(gate);  // the engine thread's alone: wait() is what the worker shares
  // the residual add as a loop here rather than a torch op in Python (engram_mix has checked
  // that hidden is contiguous float32, the shape of out)
  float* o = out.data_ptr<float>();
  const float* h = hidden.data_ptr<float>();
  for (int64_t k = 0; k < out.numel(); ++k) o[k] += h[k];
  return out;
}

std::vector<std::vector<double>> PrefetchTicket::gate_means() {
  std::vector<std::vector<double>> out;
  for (const at::Tensor& gate : gates_) {
    if (!gate.defined()) {
      out.push_back({});
      continue;
    }
    // a plain loop: at::mean's fixed cost is far above the loop's with the caches the forward left
    const int64_t rows = gate.size(0), branches = gate.size(1);
    const float* g = gate.data_ptr<float>();  // engram_mix's gate: [rows, branches], contiguous
    std::vector<double> means(rows);
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t k = 0; k < branches; ++k) sum += g[r * branches + k];
      means[r] = sum / branches;
    }
    out.push_back(std::move(means));
  }
  return out;
}

RowPrefetcher::RowPrefetcher(std::vector<LayerJob> layers, RowHash hash, Counters counters)
    : layers_(std::make_shared<const std::vector<LayerJob>>(std::move(layers))),
      hash_(std::make_shared<const RowHash>(std::move(hash))),
      counters_(std::move(counters)) {
  TORCH_CHECK(counters_ != nullptr && counters_->size() == layers_->size(), "the worker needs counters for its ",
              layers_->size(), " layers");
  for (const LayerJob& job : *layers_) check_cpu("RowPrefetcher", {&job.table, &job.weight, &job.state});
  worker_ = std::thread([this] { loop(); });
}

RowPrefetcher::~RowPrefetcher() { close(); }

std::shared_ptr<PrefetchTicket> RowPrefetcher::submit_tokens(std::vector<std::vector<int64_t>> contexts,
                                                             std::vector<int64_t> new_tokens,
                                                             std::vector<int64_t> slots) {
  auto ticket = std::make_shared<PrefetchTicket>(layers_, counters_, hash_, std::move(contexts), std::move(new_tokens),
                                                 std::move(slots));
  enqueue(ticket);
  return ticket;
}

void RowPrefetcher::enqueue(std::shared_ptr<PrefetchTicket> ticket) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!closed_, "submit() on a closed RowPrefetcher");
    queue_.push_back(std::move(ticket));
  }
  cv_.notify_one();
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
