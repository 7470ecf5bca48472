// x @ weight.T + bias for a matmul of a few rows, with float32 accumulation and output:
// an Engram layer's key and value projections of its gathered rows in a decode step
// (engram_runtime/engram.py, EngramLayer.memory, and the native prefetch worker,
// row_prefetch.cpp, which must give the same bits; PackedLinear, oneDNN's prepacked matmul,
// is the torch path the tests compare it with). With few rows the matmul is a read of the
// weight, and a cold oneDNN call (the backbone's weights have just left the caches) costs
// more than that read; this is the read, vectorised, with the bias and the cast to float32
// folded in, and each weight value used for four rows of x at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"
#include "bf16.h"

namespace engram_kernels {
namespace {

constexpr int64_t kGrain = 128;  // output features per parallel task

constexpr int64_t kFeatureBlock = 32;  // weight rows (64-128 KB) kept in L2 while every row of x passes them

// Output feature o (weight row wo, bias b) of the 4 rows of x from x0 on: each weight value
// loaded once for four independent sums.
template <typename w_t>
void dot4(const float* x0, const w_t* wo, int64_t K, float b, int64_t O, float* out) {
  const float *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < K; ++k) {
    const float wk = load_float(wo[k]);
    a0 += wk * x0[k];
    a1 += wk * x1[k];
    a2 += wk * x2[k];
    a3 += wk * x3[k];
  }
  out[0] = a0 + b;
  out[O] = a1 + b;
  out[2 * O] = a2 + b;
  out[3 * O] = a3 + b;
}

template <typename w_t>
float dot1(const float* xm, const w_t* wo, int64_t K, float b) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) acc += load_float(wo[k]) * xm[k];
  return acc + b;
}

// Output features [begin, end) of every row of x: the weight is read from memory once.
template <typename w_t, typename b_t>
void linear_features(const float* x, const w_t* w, const b_t* bias, int64_t M, int64_t K, int64_t O,
                     int64_t begin, int64_t end, float* out) {
  const auto bias_of = [bias](int64_t o) { return bias != nullptr ? load_float(bias[o]) : 0.f; };
  for (int64_t o0 = begin; o0 < end; o0 += kFeatureBlock) {
    const int64_t o1 = std::min(end, o0 + kFeatureBlock);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      for (int64_t o = o0; o < o1; ++o) dot4(x + m * K, w + o * K, K, bias_of(o), O, out + m * O + o);
    for (; m < M; ++m)
      for (int64_t o = o0; o < o1; ++o) out[m * O + o] = dot1(x + m * K, w + o * K, K, bias_of(o));
  }
}

template <typename w_t, typename b_t>
void small_linear_impl(const float* x, const w_t* w, const b_t* bias, int64_t M, int64_t K, int64_t O, bool parallel,
                       float* out) {
  if (!parallel) return linear_features(x, w, bias, M, K, O, 0, O, out);
  at::parallel_for(0, O, kGrain, [&](int64_t begin, int64_t end) {
    linear_features(x, w, bias, M, K, O, begin, end, out);
  });
}

template <typename w_t>
void dispatch_bias(const float* x, const w_t* w, const at::Tensor& bias, int64_t M, int64_t K, int64_t O,
                   bool parallel, float* out) {
  if (!bias.defined())
    small_linear_impl(x, w, static_cast<const float*>(nullptr), M, K, O, parallel, out);
  else if (bias.scalar_type() == at::kBFloat16)
    small_linear_impl(x, w, data_as<bf16>(bias), M, K, O, parallel, out);
  else
    small_linear_impl(x, w, bias.data_ptr<float>(), M, K, O, parallel, out);
}

}  // namespace

// x [M, K] float32 or bfloat16; weight [O, K] float32 or bfloat16; bias [O] of either
// dtype or undefined -> float32 [M, O]; on torch's intra-op threads if `parallel`.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool parallel) {
  check_cpu("small_linear", {&x, &weight, &bias});
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
    dispatch_bias(xf.data_ptr<float>(), data_as<bf16>(weight), bias, M, K, O, parallel, out.data_ptr<float>());
  else
    dispatch_bias(xf.data_ptr<float>(), weight.data_ptr<float>(), bias, M, K, O, parallel, out.data_ptr<float>());
  return out;
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear_rows(x, weight, bias.value_or(at::Tensor()), /*parallel=*/true);
}

}  // namespace engram_kernels
