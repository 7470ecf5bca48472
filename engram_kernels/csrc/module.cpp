// The kernels as a plain Python extension module. Called through pybind11 rather than
// registered as torch operators: torch.ops' Python-side dispatch took 46 us per call
// with cold caches (mid-forward, where these run) and 3.8 us warm, against 14 and 1.5
// for the same call from here, and a decode step makes a few hundred such calls.
// Each releases the GIL, as torch's own operators do, so the prefetch worker's Python
// runs while a kernel computes.
#include <torch/extension.h>

#include "kernels.h"
#include "row_prefetch.h"
#include "table_counters.h"

namespace {

// (table, weight | None, bias | None, result shape, dtype, mix | None) per layer; mix: (conv
// state, key scale, norm weight, taps, dilation, gate eps, conv eps)
using Mix = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, double, double>;
using Layer = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::vector<int64_t>,
                         at::ScalarType, std::optional<Mix>>;
// NgramHasher.kernel_args: ngram_rows' (lookup, pad, multipliers, primes, offsets) for those
// layers, the raw pad id, N - 1
using Hash = std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>;

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("decode_attention", &engram_kernels::decode_attention, nogil);
  m.def("rms_norm", &engram_kernels::rms_norm, nogil);
  m.def("add_rms_norm_", &engram_kernels::add_rms_norm_, nogil);
  m.def("silu_and_mul", &engram_kernels::silu_and_mul, nogil);
  m.def("engram_mix", &engram_kernels::engram_mix, nogil);
  m.def("ngram_rows", &engram_kernels::ngram_rows, nogil);
  m.def("gather_rows", &engram_kernels::gather_rows, nogil);
  m.def("small_linear", &engram_kernels::small_linear, nogil);

  using engram_kernels::PrefetchTicket, engram_kernels::RowPrefetcher, engram_kernels::TableCounters;
  pybind11::class_<TableCounters, std::shared_ptr<TableCounters>>(m, "TableCounters")
      .def(pybind11::init<const std::vector<int64_t>&, std::vector<double>>())  // rows per layer, bounds
      .def("read", &TableCounters::read);
  pybind11::class_<PrefetchTicket, std::shared_ptr<PrefetchTicket>>(m, "PrefetchTicket")
      .def("wait", &PrefetchTicket::wait, nogil)
      .def("mix", &PrefetchTicket::mix, nogil)
      .def("gate_means", &PrefetchTicket::gate_means);
  pybind11::class_<RowPrefetcher>(m, "RowPrefetcher")
      .def(pybind11::init([](const std::vector<Layer>& layers, const std::optional<Hash>& hash,
                             std::shared_ptr<TableCounters> counters) {
             std::vector<engram_kernels::LayerJob> jobs;
             jobs.reserve(layers.size());
             for (const auto& [table, weight, bias, shape, dtype, mix] : layers) {
               std::optional<engram_kernels::MixJob> mix_job;
               if (mix) {
                 const auto& [state, key_scale, norm_weight, taps, dilation, gate_eps, conv_eps] = *mix;
                 mix_job = engram_kernels::MixJob{state, key_scale, norm_weight, taps, dilation, gate_eps, conv_eps};
               }
               jobs.push_back({table, weight, bias, shape, dtype, std::move(mix_job)});
             }
             std::optional<engram_kernels::RowHash> row_hash;
             if (hash) {
               const auto& [lookup, pad, multipliers, primes, offsets, window_pad, skip] = *hash;
               row_hash = engram_kernels::RowHash{lookup, pad, multipliers, primes, offsets, window_pad, skip};
             }
             return std::make_unique<RowPrefetcher>(std::move(jobs), std::move(row_hash), std::move(counters));
           }))
      .def("submit", &RowPrefetcher::submit)  // row ids per layer, in the constructor's order
      .def("submit_tokens", &RowPrefetcher::submit_tokens)  // contexts, new token counts, slots
      .def("close", &RowPrefetcher::close, nogil);
}
