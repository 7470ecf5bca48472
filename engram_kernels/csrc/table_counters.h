// Cumulative statistics of the native prefetch worker's layers (row_prefetch.h): rows
// gathered, the worker's and the engine thread's seconds as histograms, and each table's
// rows ever gathered as a bitmap. They are kept here, by the threads that measure them, and
// offload's TableStats reads them when someone asks (a scrape): handing each step's figures
// to Python instead would cost the engine thread time in every step (docs/performance.md).
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <tuple>
#include <vector>

namespace engram_kernels {

class TableCounters {
 public:
  // per layer, in the worker's order: (rows gathered, the gathers' seconds, their count per
  // bucket, the waits' seconds, their count per bucket, the touched-row bitmap: a copy)
  using Figures = std::tuple<int64_t, double, std::vector<int64_t>, double, std::vector<int64_t>, at::Tensor>;

  // num_rows: each layer's table rows; bounds: the histograms' ascending upper bounds in
  // seconds (a value equal to a bound counts in its bucket), then one bucket for the rest
  TableCounters(const std::vector<int64_t>& num_rows, std::vector<double> bounds);
  // the worker gathered `rows` (int64 row ids of the layer's table, in range) in `seconds`
  void gathered(size_t layer, const at::Tensor& rows, double seconds);
  void waited(size_t layer, double seconds);
  std::vector<Figures> read();
  size_t size() const { return layers_.size(); }

 private:
  struct Layer {
    int64_t rows = 0;
    double gather_seconds = 0, wait_seconds = 0;
    std::vector<int64_t> gather_counts, wait_counts;
    std::vector<uint8_t> touched;  // bit r of byte r / 8: row r was gathered
  };
  size_t bucket(double seconds) const;
  std::vector<double> bounds_;
  std::vector<Layer> layers_;
  std::mutex mutex_;
};

}  // namespace engram_kernels
