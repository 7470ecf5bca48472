#include "table_counters.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace engram_kernels {

TableCounters::TableCounters(const std::vector<int64_t>& num_rows, std::vector<double> bounds)
    : bounds_(std::move(bounds)), layers_(num_rows.size()) {
  TORCH_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()), "histogram bounds must be ascending");
  for (size_t i = 0; i < num_rows.size(); ++i) {
    layers_[i].gather_counts.assign(bounds_.size() + 1, 0);
    layers_[i].wait_counts.assign(bounds_.size() + 1, 0);
    layers_[i].touched.assign((num_rows[i] + 7) / 8, 0);
  }
}

size_t TableCounters::bucket(double seconds) const {
  return std::lower_bound(bounds_.begin(), bounds_.end(), seconds) - bounds_.begin();
}

void TableCounters::gathered(size_t layer, const at::Tensor& rows, double seconds) {
  const at::Tensor ids = rows.contiguous();
  const int64_t* r = ids.data_ptr<int64_t>();
  const size_t b = bucket(seconds);
  std::lock_guard<std::mutex> lock(mutex_);
  Layer& s = layers_.at(layer);
  s.rows += ids.numel();
  s.gather_seconds += seconds;
  s.gather_counts[b] += 1;
  for (int64_t k = 0; k < ids.numel(); ++k) s.touched[r[k] >> 3] |= static_cast<uint8_t>(1u << (r[k] & 7));
}

void TableCounters::waited(size_t layer, double seconds) {
  const size_t b = bucket(seconds);
  std::lock_guard<std::mutex> lock(mutex_);
  Layer& s = layers_.at(layer);
  s.wait_seconds += seconds;
  s.wait_counts[b] += 1;
}

std::vector<TableCounters::Figures> TableCounters::read() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Figures> out;
  for (const Layer& s : layers_) {
    at::Tensor touched = at::empty({static_cast<int64_t>(s.touched.size())}, at::kByte);
    std::memcpy(touched.data_ptr<uint8_t>(), s.touched.data(), s.touched.size());
    out.emplace_back(s.rows, s.gather_seconds, s.gather_counts, s.wait_seconds, s.wait_counts, std::move(touched));
  }
  return out;
}

}  // namespace engram_kernels
