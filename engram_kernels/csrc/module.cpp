// The kernels as a plain Python extension module. Called through pybind11 rather than
// registered as torch operators: torch.ops' Python-side dispatch took 46 us per call
// with cold caches (mid-forward, where these run) and 3.8 us warm, against 14 and 1.5
// for the same call from here, and a decode step makes a few hundred such calls.
// Each releases the GIL, as torch's own operators do, so the prefetch worker's Python
// runs while a kernel computes.
#include <torch/extension.h>

#include "kernels.h"
#include "row_prefetch.h"

namespace {

using Job = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::vector<int64_t>,
                       at::ScalarType, at::Tensor>;

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
      .def("wait", &PrefetchTicket::wait, nogil);
  pybind11::class_<RowPrefetcher>(m, "RowPrefetcher")
      .def(pybind11::init<>())
      .def("submit",  // jobs: (table, weight | None, bias | None, result shape, dtype, rows) per layer
           [](RowPrefetcher& self, const std::vector<Job>& jobs) {
             std::vector<engram_kernels::PrefetchJob> native;
             native.reserve(jobs.size());
             for (const auto& [table, weight, bias, shape, dtype, rows] : jobs)
               native.push_back({table, rows, weight, bias, shape, dtype});
             return self.submit(std::move(native));
           })
      .def("close", &RowPrefetcher::close, nogil);
}
