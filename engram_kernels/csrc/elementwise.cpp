// The decoder block's elementwise steps, each one pass over memory instead of the 4-7
// torch ops (and a dtype cast) they take otherwise; their torch equivalents are in
// engram_kernels/__init__.py, which the tests compare them with.
//
//   rms_norm(x, w, eps, dtype)            x * rsqrt(mean(x^2) + eps) * w, stored in dtype
//   add_rms_norm_(x, delta, w, eps, dtype) x += delta (in place), then rms_norm(x, ...)
//   silu_and_mul(gate_up, dtype)          silu(gate) * up for gate_up = [gate | up]
//
// x and w are float32 (the residual stream); delta and gate_up float32 or bfloat16;
// the output is float32 or bfloat16, the dtype of the matmul it feeds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "kernels.h"
#include "bf16.h"
#include "vec_math.h"

namespace engram_kernels {
namespace {

// Rows per parallel task: enough work per task that the thread hand-off stays small.
constexpr int64_t kGrain = 8;

template <typename out_t>
void norm_row(const float* x, const float* w, float eps, int64_t n, out_t* out) {
  const float inv = inv_rms(x, n, eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_float(x[i] * inv * w[i], out + i);
}

at::Tensor checked_out(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "output dtype must be float32 or bfloat16");
  return at::empty(sizes, like.options().dtype(dtype));
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w) {
  check_cpu("rms_norm", {&x, &w});
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: x and w must be float32");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: x and w must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.numel(), "rms_norm: w must match x's last dimension");
}

// Normalises x's rows (after adding delta's, if given) into a new tensor of `dtype`.
template <typename delta_t, typename out_t>
void norm_rows(float* x, const delta_t* delta, const float* w, float eps, int64_t rows, int64_t n, out_t* out) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = x + r * n;
      if (delta != nullptr) {
        const delta_t* dr = delta + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) xr[i] += load_float(dr[i]);
      }
      norm_row(xr, w, eps, n, out + r * n);
    }
  });
}

template <typename delta_t>
at::Tensor norm_dispatch(const at::Tensor& x, const delta_t* delta, const at::Tensor& w, double eps,
                         at::ScalarType dtype) {
  at::Tensor out = checked_out(x, x.sizes(), dtype);
  const int64_t n = w.numel(), rows = x.numel() / n;
  float* xp = x.data_ptr<float>();
  if (dtype == at::kFloat)
    norm_rows(xp, delta, w.data_ptr<float>(), static_cast<float>(eps), rows, n, out.data_ptr<float>());
  else
    norm_rows(xp, delta, w.data_ptr<float>(), static_cast<float>(eps), rows, n, data_as<bf16>(out));
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType dtype) {
  check_norm_args(x, w);
  return norm_dispatch<float>(x, nullptr, w, eps, dtype);
}

at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps,
                         at::ScalarType dtype) {
  check_norm_args(x, w);
  check_cpu("add_rms_norm_", {&delta});
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous(), "add_rms_norm_: delta must be contiguous, x's shape");
  if (delta.scalar_type() == at::kFloat) return norm_dispatch(x, delta.data_ptr<float>(), w, eps, dtype);
  TORCH_CHECK(delta.scalar_type() == at::kBFloat16, "add_rms_norm_: delta must be float32 or bfloat16");
  return norm_dispatch(x, data_as<bf16>(delta), w, eps, dtype);
}

namespace {

template <typename in_t, typename out_t>
void silu_mul_rows(const in_t* in, int64_t rows, int64_t n, out_t* out) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const in_t *gate = in + r * 2 * n, *up = gate + n;
      out_t* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        store_float(silu(load_float(gate[i])) * load_float(up[i]), o + i);
      }
    }
  });
}

template <typename in_t>
void silu_mul_dispatch(const at::Tensor& gate_up, int64_t rows, int64_t n, at::Tensor& out) {
  if (out.scalar_type() == at::kFloat)
    silu_mul_rows(data_as<in_t>(gate_up), rows, n, out.data_ptr<float>());
  else
    silu_mul_rows(data_as<in_t>(gate_up), rows, n, data_as<bf16>(out));
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& gate_up, at::ScalarType dtype) {
  check_cpu("silu_and_mul", {&gate_up});
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "silu_and_mul: gate_up must be contiguous with an even last dimension");
  std::vector<int64_t> sizes = gate_up.sizes().vec();
  const int64_t n = sizes.back() / 2, rows = gate_up.numel() / (2 * n);
  sizes.back() = n;
  at::Tensor out = checked_out(gate_up, sizes, dtype);
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_dispatch<float>(gate_up, rows, n, out);
  else if (gate_up.scalar_type() == at::kBFloat16)
    silu_mul_dispatch<bf16>(gate_up, rows, n, out);
  else
    TORCH_CHECK(false, "silu_and_mul: gate_up must be float32 or bfloat16");
  return out;
}

}  // namespace engram_kernels
