// One decode step of attention for a batch of sequences: RoPE, the KV-cache write and
// attention over the cache in one pass.
//
// Row r holds one new token of the sequence in cache slot slots[r], at position
// positions[r]. For every (row, KV head) pair the kernel rotates the token's query and
// key heads, writes its key and value into the cache, and attends the query heads that
// share the KV head over positions 0..positions[r], reading each cached key and value
// once. In torch the same step is a roll, two multiplies, two scatters, hundreds of tiny
// batched GEMMs, a mask add and a softmax per layer (see decode_attention in model.py,
// which this kernel must match).
//
// Inputs, cache and output are float32, or bfloat16 for bfloat16 models (half the bytes
// to read, and reading them is what the kernel waits on); the arithmetic is float32.
// Built with -ffast-math so that gcc vectorises expf: the inputs are finite scores
// (positions past a row's length are never read, so there is no -inf mask).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include "kernels.h"
#include "bf16.h"

namespace engram_kernels {
namespace {

template <typename cache_t>
inline float dot(const float* q, const cache_t* k, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += q[i] * load_float(k[i]);
  return s;
}

template <typename cache_t>
inline void axpy(float alpha, const cache_t* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * load_float(x[i]);
}

// Rotate-half RoPE: out = x * cos + roll(x, D/2) * signed_sin.
template <typename in_t, typename out_t>
inline void rope(const in_t* x, const float* cos, const float* ssin, out_t* out, int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i)
    store_float(load_float(x[i]) * cos[i] + load_float(x[i + half]) * ssin[i], out + i);
#pragma omp simd
  for (int64_t i = half; i < d; ++i)
    store_float(load_float(x[i]) * cos[i] + load_float(x[i - half]) * ssin[i], out + i);
}

// In place: p[0..n) <- softmax(p[0..n)).
inline void softmax(float* p, int64_t n) {
  float m = p[0], sum = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t t = 1; t < n; ++t) m = std::max(m, p[t]);
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) sum += (p[t] = std::exp(p[t] - m));
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) p[t] *= inv;
}

struct Dims {
  int64_t H, KV, G, L, D;  // query heads, kv heads, queries per kv head, cache length, head_dim
};

constexpr int64_t kMaxHeadDim = 256;

// One (row, kv head) pair per task, rows' heads adjacent: a task reads one contiguous
// block of keys and one of values. kD is the head_dim when known at compile time (0:
// read it from d), so that the common sizes get loops gcc unrolls and keeps in registers,
// faster than the same loops over a runtime head_dim (docs/performance.md).
template <typename scalar_t, int64_t kD>
void attend(const Dims& d, int64_t rows, const scalar_t* qkv, const float* cos, const float* sin,
            scalar_t* k_cache, scalar_t* v_cache, const int64_t* slot, const int64_t* pos, scalar_t* out) {
  const int64_t D = kD > 0 ? kD : d.D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, rows * d.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;  // one query's attention weights [n]
    float q[kMaxHeadDim], acc[kMaxHeadDim];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / d.KV, h = i % d.KV, n = pos[r] + 1;
      const scalar_t* row = qkv + r * (d.H + 2 * d.KV) * D;
      const float *c = cos + r * D, *s = sin + r * D;
      scalar_t* keys = k_cache + (slot[r] * d.KV + h) * d.L * D;
      scalar_t* values = v_cache + (slot[r] * d.KV + h) * d.L * D;
      if (i + 1 < end) {  // the next pair's keys and values: fetch them while this one computes
        const int64_t r2 = (i + 1) / d.KV, next = (slot[r2] * d.KV + (i + 1) % d.KV) * d.L * D;
        const int64_t lines = (pos[r2] + 1) * D * static_cast<int64_t>(sizeof(scalar_t)) / 64;
        for (int64_t b = 0; b < lines; ++b) {
          __builtin_prefetch(reinterpret_cast<const char*>(k_cache + next) + 64 * b);
          __builtin_prefetch(reinterpret_cast<const char*>(v_cache + next) + 64 * b);
        }
      }
      rope(row + (d.H + h) * D, c, s, keys + pos[r] * D, D);
      std::copy_n(row + (d.H + d.KV + h) * D, D, values + pos[r] * D);
      p.resize(n);
      for (int64_t g = 0; g < d.G; ++g) {  // the query heads sharing this kv head
        rope(row + (h * d.G + g) * D, c, s, q, D);
        for (int64_t j = 0; j < D; ++j) q[j] *= scale;
        for (int64_t t = 0; t < n; ++t) p[t] = dot(q, keys + t * D, D);
        softmax(p.data(), n);
        std::fill_n(acc, D, 0.f);
        for (int64_t t = 0; t < n; ++t) axpy(p[t], values + t * D, acc, D);
        scalar_t* o = out + (r * d.H + h * d.G + g) * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) store_float(acc[j], o + j);
      }
    }
  });
}

template <typename scalar_t>
void attend_any_head_dim(const Dims& d, int64_t rows, const scalar_t* qkv, const float* cos, const float* sin,
                         scalar_t* k_cache, scalar_t* v_cache, const int64_t* slot, const int64_t* pos,
                         scalar_t* out) {
  switch (d.D) {
    case 64: return attend<scalar_t, 64>(d, rows, qkv, cos, sin, k_cache, v_cache, slot, pos, out);
    case 128: return attend<scalar_t, 128>(d, rows, qkv, cos, sin, k_cache, v_cache, slot, pos, out);
    default: return attend<scalar_t, 0>(d, rows, qkv, cos, sin, k_cache, v_cache, slot, pos, out);
  }
}

}  // namespace

// qkv [R, H + 2 KV, D]: query heads, then key heads, then value heads, before RoPE.
// cos, sin [R, D] float32: each row's RoPE factors (sin signed, see rope_tables in model.py).
// k_cache, v_cache [slots, KV, max_len, D]; slots, positions [R]. Returns [R, H, D].
// qkv, the caches and the result share one dtype, float32 or bfloat16: the model's.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions) {
  check_cpu("decode_attention", {&qkv, &cos, &sin, &k_cache, &v_cache, &slots, &positions});
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be [slots, kv_heads, len, head_dim]");
  const int64_t S = k_cache.size(0), KV = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == D && qkv.size(1) > 2 * KV, "qkv must be [rows, heads + 2 kv_heads, head_dim]");
  const int64_t R = qkv.size(0), H = qkv.size(1) - 2 * KV;
  TORCH_CHECK(H % KV == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(D % 2 == 0 && D <= kMaxHeadDim, "head_dim must be even and at most ", kMaxHeadDim);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == R * D, "cos and sin must be [rows, head_dim]");
  for (const at::Tensor* t : {&qkv, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->is_contiguous(), "decode_attention needs contiguous tensors");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos and sin must be float32");
  const at::ScalarType dtype = qkv.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "decode_attention: qkv and the caches must all be float32 or all bfloat16");
  const at::Tensor slot_t = slots.to(at::kLong).contiguous(), pos_t = positions.to(at::kLong).contiguous();
  TORCH_CHECK(slot_t.numel() == R && pos_t.numel() == R, "one slot and one position per row");
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < S && pos[r] >= 0 && pos[r] < L, "slot or position outside the cache");

  at::Tensor out = at::empty({R, H, D}, qkv.options());
  const Dims dims{H, KV, H / KV, L, D};
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  if (dtype == at::kFloat)
    attend_any_head_dim(dims, R, data_as<float>(qkv), c, s, data_as<float>(k_cache), data_as<float>(v_cache), slot,
                        pos, data_as<float>(out));
  else
    attend_any_head_dim(dims, R, data_as<bf16>(qkv), c, s, data_as<bf16>(k_cache), data_as<bf16>(v_cache), slot,
                        pos, data_as<bf16>(out));
  return out;
}

}  // namespace engram_kernels
