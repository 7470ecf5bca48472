// The kernels as a plain Python extension module. Called through pybind11 rather than
// registered as torch operators: torch.ops' Python-side dispatch took 46 us per call
// with cold caches (mid-forward, where these run) and 3.8 us warm, against 14 and 1.5
// for the same call from here, and a decode step makes a few hundred such calls.
// Each releases the GIL, as torch's own operators do, so the prefetch worker's Python
// runs while a kernel computes.
#include <torch/extension.h>

#include <chrono>

#include "kernels.h"
#include "row_prefetch.h"

namespace {

using Layer = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::vector<int64_t>,
                         at::ScalarType>;

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

  using engram_kernels::PrefetchTicket, engram_kernels::RowPrefetcher;
  pybind11::class_<PrefetchTicket, std::shared_ptr<PrefetchTicket>>(m, "PrefetchTicket")
      .def("wait", &PrefetchTicket::wait, nogil)
      // wait(i), then engram_mix on its result (the memory), as one call from a decode step's
      // forward: -> (out, gate, the worker's seconds for layer i, seconds waited here)
      .def("mix",
           [](PrefetchTicket& self, int64_t i, const at::Tensor& hidden, const at::Tensor& state,
              const at::Tensor& slots, const at::Tensor& key_scale, const at::Tensor& norm_weight,
              const at::Tensor& taps, int64_t dilation, double gate_eps, double conv_eps) {
             const auto start = std::chrono::steady_clock::now();
             const auto [memory, seconds] = self.wait(i);
             const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
             auto [out, gate] = engram_kernels::engram_mix(hidden, memory, key_scale, state, slots, norm_weight,
                                                           taps, dilation, gate_eps, conv_eps);
             return std::make_tuple(out, gate, seconds, waited.count());
           },
           nogil);
  pybind11::class_<RowPrefetcher>(m, "RowPrefetcher")
      .def(pybind11::init([](const std::vector<Layer>& layers) {  // (table, weight | None, bias | None,
             std::vector<engram_kernels::LayerJob> jobs;                // result shape, dtype) per layer
             jobs.reserve(layers.size());
             for (const auto& [table, weight, bias, shape, dtype] : layers) jobs.push_back({table, weight, bias, shape, dtype});
             return std::make_unique<RowPrefetcher>(std::move(jobs));
           }))
      .def("submit", &RowPrefetcher::submit)  // row ids per layer, in the constructor's order
      .def("close", &RowPrefetcher::close, nogil);
}
