// x @ weight.T + bias for a matmul of a few rows, with float32 accumulation and output:
// an Engram layer's key and value projections of its gathered rows in a decode step at
// small batch (engram_runtime/engram.py, EngramLayer.memory; PackedLinear, oneDNN's
// prepacked matmul, is the torch path the tests compare it with). With so few rows the
// matmul is a read of the weight, and a cold oneDNN call (the backbone's weights have
// just left the caches) costs more than that read; this is the read, vectorised, with
// the bias and the cast to float32 folded in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "bf16.h"

namespace engram_kernels {
namespace {

constexpr int64_t kGrain = 128;  // output features per parallel task

template <typename w_t, typename b_t>
void small_linear_impl(const float* x, const w_t* w, const b_t* bias, int64_t M, int64_t K, int64_t O, float* out) {
  at::parallel_for(0, O, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const w_t* wo = w + o * K;  // read once from memory, then from L1 for every row of x
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += load_float(wo[k]) * xm[k];
        out[m * O + o] = acc + (bias != nullptr ? load_float(bias[o]) : 0.f);
      }
    }
  });
}

template <typename w_t>
void dispatch_bias(const float* x, const w_t* w, const at::Tensor& bias, int64_t M, int64_t K, int64_t O, float* out) {
  if (!bias.defined())
    small_linear_impl(x, w, static_cast<const float*>(nullptr), M, K, O, out);
  else if (bias.scalar_type() == at::kBFloat16)
    small_linear_impl(x, w, data_as<bf16>(bias), M, K, O, out);
  else
    small_linear_impl(x, w, bias.data_ptr<float>(), M, K, O, out);
}

}  // namespace

// x [M, K] float32 or bfloat16; weight [O, K] float32 or bfloat16; bias [O] of either
// dtype or None -> float32 [M, O].
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt) {
  const at::Tensor bias = bias_opt.value_or(at::Tensor());
  for (const at::Tensor* t : {&x, &weight, &bias}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "small_linear works on float32 and bfloat16 tensors");
    TORCH_CHECK(t->is_contiguous(), "small_linear needs contiguous tensors");
  }
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K] and weight [O, K]");
  const int64_t M = x.size(0), K = x.size(1), O = weight.size(0);
  TORCH_CHECK(!bias.defined() || bias.numel() == O, "bias must have one value per output feature");
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  if (weight.scalar_type() == at::kBFloat16)
    dispatch_bias(xf.data_ptr<float>(), data_as<bf16>(weight), bias, M, K, O, out.data_ptr<float>());
  else
    dispatch_bias(xf.data_ptr<float>(), weight.data_ptr<float>(), bias, M, K, O, out.data_ptr<float>());
  return out;
}

}  // namespace engram_kernels
