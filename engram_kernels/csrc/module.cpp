// The kernels as a plain Python extension module. Called through pybind11 rather than
// registered as torch operators: torch.ops' Python-side dispatch costs several times a
// pybind11 call with the cold caches of a mid-forward call, and a decode step makes a few
// hundred such calls. Each releases the GIL, as torch's own operators do, so the prefetch
// worker's Python runs while a kernel computes.
//
// Structures cross the boundary as the named Python dataclasses of engram_kernels
// (MixWeights, HashArgs, LayerJob), read here by attribute name, in this one place.
#include <torch/extension.h>

#include "kernels.h"
#include "row_prefetch.h"
#include "table_counters.h"

namespace {

namespace py = pybind11;

template <typename T>
T field(const py::handle& obj, const char* name) {
  return obj.attr(name).cast<T>();
}

engram_kernels::MixWeights mix_weights(const py::handle& w) {
  return {field<at::Tensor>(w, "key_scale"), field<at::Tensor>(w, "norm_weight"), field<at::Tensor>(w, "taps"),
          field<int64_t>(w, "dilation"),     field<double>(w, "gate_eps"),        field<double>(w, "conv_eps")};
}

engram_kernels::LayerJob layer_job(const py::handle& job) {
  const py::object mix = job.attr("mix"), state = job.attr("conv_state");
  return {field<at::Tensor>(job, "table"),
          field<at::Tensor>(job, "weight"),
          field<std::optional<at::Tensor>>(job, "bias"),
          field<std::vector<int64_t>>(job, "shape"),
          field<at::ScalarType>(job, "dtype"),
          state.is_none() ? at::Tensor() : state.cast<at::Tensor>(),
          mix.is_none() ? std::nullopt : std::optional<engram_kernels::MixWeights>(mix_weights(mix))};
}

engram_kernels::RowHash row_hash(const py::handle& h) {
  return {field<at::Tensor>(h, "lookup"),  field<int64_t>(h, "pad"),        field<at::Tensor>(h, "multipliers"),
          field<at::Tensor>(h, "primes"),  field<at::Tensor>(h, "offsets"), field<int64_t>(h, "window_pad"),
          field<int64_t>(h, "skip")};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("decode_attention", &engram_kernels::decode_attention, nogil);
  m.def("rms_norm", &engram_kernels::rms_norm, nogil);
  m.def("add_rms_norm_", &engram_kernels::add_rms_norm_, nogil);
  m.def("silu_and_mul", &engram_kernels::silu_and_mul, nogil);
  m.def("engram_mix", [](const at::Tensor& hidden, const at::Tensor& memory, const at::Tensor& state,
                         const at::Tensor& slots, const py::handle& weights) {
    const engram_kernels::MixWeights w = mix_weights(weights);
    py::gil_scoped_release released;
    return engram_kernels::engram_mix(hidden, memory, state, slots, w);
  });
  m.def("ngram_rows", &engram_kernels::ngram_rows, nogil);
  m.def("gather_rows", &engram_kernels::gather_rows, nogil);
  m.def("small_linear", &engram_kernels::small_linear, nogil);
  m.def("block_linear", &engram_kernels::block_linear, nogil);
  m.def("block_linear_bf16", &engram_kernels::block_linear_bf16, nogil);
  m.def("block_linear_bf16_built", &engram_kernels::block_linear_bf16_built);
  m.def("block_linear_isa", &engram_kernels::block_linear_isa);

  using engram_kernels::PrefetchTicket, engram_kernels::RowPrefetcher, engram_kernels::TableCounters;
  py::class_<TableCounters, std::shared_ptr<TableCounters>>(m, "TableCounters")
      .def(py::init<const std::vector<int64_t>&, std::vector<double>>())  // rows per layer, bounds
      .def("read", &TableCounters::read);
  py::class_<PrefetchTicket, std::shared_ptr<PrefetchTicket>>(m, "PrefetchTicket")
      .def("wait", &PrefetchTicket::wait, nogil)
      .def("mix", &PrefetchTicket::mix, nogil)
      .def("gate_means", &PrefetchTicket::gate_means);
  py::class_<RowPrefetcher>(m, "RowPrefetcher")
      .def(py::init([](const py::list& jobs, const py::handle& hash, std::shared_ptr<TableCounters> counters) {
             std::vector<engram_kernels::LayerJob> layers;
             for (const py::handle& job : jobs) layers.push_back(layer_job(job));
             return std::make_unique<RowPrefetcher>(std::move(layers), row_hash(hash), std::move(counters));
           }))
      .def("submit_tokens", &RowPrefetcher::submit_tokens)  // contexts, new token counts, slots
      .def("close", &RowPrefetcher::close, nogil);
}
