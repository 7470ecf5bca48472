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
// Built with -ffast-math so that gcc vectorises expf: the inputs are finite scores
// (positions past a row's length are never read, so there is no -inf mask).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Rotate-half RoPE: out = x * cos + roll(x, D/2) * signed_sin.
inline void rope(const float* x, const float* cos, const float* ssin, float* out, int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * ssin[i];
#pragma omp simd
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * ssin[i];
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

// qkv [R, H + 2 KV, D]: query heads, then key heads, then value heads, before RoPE.
// cos, sin [R, D]: each row's RoPE factors (sin signed, see rope_tables in model.py).
// k_cache, v_cache [slots, KV, max_len, D]; slots, positions [R]. Returns [R, H, D].
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be [slots, kv_heads, len, head_dim]");
  const int64_t S = k_cache.size(0), KV = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == D && qkv.size(1) > 2 * KV, "qkv must be [rows, heads + 2 kv_heads, head_dim]");
  const int64_t R = qkv.size(0), H = qkv.size(1) - 2 * KV, G = H / KV;
  TORCH_CHECK(H % KV == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == R * D, "cos and sin must be [rows, head_dim]");
  for (const at::Tensor* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "decode_attention works on float32 tensors");
    TORCH_CHECK(t->is_contiguous(), "decode_attention needs contiguous tensors");
  }
  const at::Tensor slot_t = slots.to(at::kLong).contiguous(), pos_t = positions.to(at::kLong).contiguous();
  TORCH_CHECK(slot_t.numel() == R && pos_t.numel() == R, "one slot and one position per row");
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < S && pos[r] >= 0 && pos[r] < L, "slot or position outside the cache");

  at::Tensor out = at::empty({R, H, D}, qkv.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float *in = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *op = out.data_ptr<float>();

  at::parallel_for(0, R * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G * D), p;  // rotated, scaled queries [G, D]; attention weights [G, n]
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / KV, h = i % KV, n = pos[r] + 1;
      const float *row = in + r * (H + 2 * KV) * D, *c = cp + r * D, *s = sp + r * D;
      float* keys = kc + (slot[r] * KV + h) * L * D;
      float* values = vc + (slot[r] * KV + h) * L * D;
      rope(row + (H + h) * D, c, s, keys + pos[r] * D, D);
      std::copy_n(row + (H + KV + h) * D, D, values + pos[r] * D);
      for (int64_t g = 0; g < G; ++g) {
        rope(row + (h * G + g) * D, c, s, q.data() + g * D, D);
        for (int64_t j = 0; j < D; ++j) q[g * D + j] *= scale;
      }
      p.resize(G * n);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < G; ++g) p[g * n + t] = dot(q.data() + g * D, keys + t * D, D);
      for (int64_t g = 0; g < G; ++g) softmax(p.data() + g * n, n);
      float* o = op + (r * H + h * G) * D;
      std::fill_n(o, G * D, 0.f);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < G; ++g) axpy(p[g * n + t], values + t * D, o + g * D, D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(engram_serve, m) {
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(engram_serve, CPU, m) { m.impl("decode_attention", decode_attention); }
