// x @ W.T for a weight held in llama.cpp's 32-value blocks, read as such: a decode step of a
// few rows is a read of the weight, so reading 4.5-8.5 bits per value instead of 16 (bfloat16)
// or 32 is what makes it faster (engram_runtime/quantization.py packs the blocks, whose torch
// dequantisation the tests compare this with).
//
//   4 bits (Q4_0, Q4_1): qs uint8 [N, K/2], block b of row n is qs[n, 16b .. 16b+16): byte j holds
//     value j in its low nibble and value j+16 in its high one; w = scale * q + min.
//   8 bits (Q8_0): qs int8 [N, K]; w = scale * q.
//
// Activations stay float32 (nothing is quantised but the weight, so the result is the
// dequantised weight's matmul up to float32 rounding): sum_k w_k x_k over a block is
// scale * sum_k q_k x_k + min * sum_k x_k, the second from each block's sum of x.
// AVX-512 or AVX2 with FMA where the compiler targets it (-march=native on the machine that
// runs it), a plain loop elsewhere. Keeping x in float32 keeps a step's logits those of the dense float32
// matmul up to rounding, so a sequence decodes alike alone (blocks) and in a large batch (dense);
// rounding x to int8 for VNNI dot products, as llama.cpp does, did not keep that
// (docs/performance.md, "Quantized weights").
//
// block_linear_bf16 is the dense bfloat16 copy's matmul (each value scale * q + min rounded to
// bfloat16, x rounded to bfloat16, float32 sums) read from the blocks, with AVX-512 BF16 dot
// products: at 2-12 rows it does per row a third of the float kernel's arithmetic, where the float
// kernel does per row what oneDNN does for the whole batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <string>
#include <vector>

#include "kernels.h"

namespace engram_kernels {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGrain = 64;   // output features per parallel task
constexpr int64_t kMaxRows = 8;  // rows of x decoded against one pass over the weight

struct Weight {
  const uint8_t* qs;
  const float* scales;
  const float* mins;  // nullptr for 8-bit blocks
  int64_t bits, K, nb;
};

#if defined(__AVX512F__)
// The 32 values of block b of row n as two float vectors (values 0-15, 16-31).
inline void decode_block(const Weight& w, int64_t n, int64_t b, __m512& lo, __m512& hi) {
  if (w.bits == 4) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(w.qs + n * (w.K / 2) + b * (kBlock / 2))));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(z, _mm512_set1_epi32(0xF)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(z, 4));
  } else {
    const auto* q = reinterpret_cast<const __m128i*>(w.qs + n * w.K + b * kBlock);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
  }
}

// sum_k w[n, k] * x[r, k] without the min term, for the R rows of x from x0 on.
template <int R>
void scaled_dots(const Weight& w, int64_t n, const float* x0, float* dots) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const float* scale = w.scales + n * w.nb;
  for (int64_t b = 0; b < w.nb; ++b) {
    __m512 lo, hi;
    decode_block(w, n, b, lo, hi);
    const __m512 d = _mm512_set1_ps(scale[b]);
    for (int r = 0; r < R; ++r) {
      const float* xb = x0 + r * w.K + b * kBlock;
      const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
      acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(acc[r]);
}
#elif defined(__AVX2__) && defined(__FMA__)
// The 32 values of block b of row n as four float vectors of eight (values 0-7, 8-15, 16-23, 24-31).
inline void decode_block(const Weight& w, int64_t n, int64_t b, __m256 v[4]) {
  if (w.bits == 4) {
    const uint8_t* q = w.qs + n * (w.K / 2) + b * (kBlock / 2);
    const __m256i mask = _mm256_set1_epi32(0xF);
    for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+8: values 8h.. in low nibbles, 16+8h.. in high ones
      const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * h)));
      v[h] = _mm256_cvtepi32_ps(_mm256_and_si256(z, mask));
      v[h + 2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(z, 4));
    }
  } else {
    const uint8_t* q = w.qs + n * w.K + b * kBlock;
    for (int i = 0; i < 4; ++i)
      v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
  }
}

inline float reduce_add(__m256 a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int R>
void scaled_dots(const Weight& w, int64_t n, const float* x0, float* dots) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const float* scale = w.scales + n * w.nb;
  for (int64_t b = 0; b < w.nb; ++b) {
    __m256 v[4];
    decode_block(w, n, b, v);
    const __m256 d = _mm256_set1_ps(scale[b]);
    for (int r = 0; r < R; ++r) {
      const float* xb = x0 + r * w.K + b * kBlock;
      __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
      for (int i = 1; i < 4; ++i) t = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + 8 * i), t);
      acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = reduce_add(acc[r]);
}
#else
// The plain loop (CPUs without AVX-512 or AVX2): the block's 32 values decoded once for all R rows.
template <int R>
void scaled_dots(const Weight& w, int64_t n, const float* x0, float* dots) {
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
  float v[kBlock];
  for (int64_t b = 0; b < w.nb; ++b) {
    if (w.bits == 8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + n * w.K + b * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) v[j] = static_cast<float>(q[j]);
    } else {
      const uint8_t* q = w.qs + n * (w.K / 2) + b * (kBlock / 2);
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        v[j] = static_cast<float>(q[j] & 0xF);
        v[j + kBlock / 2] = static_cast<float>(q[j] >> 4);
      }
    }
    const float d = w.scales[n * w.nb + b];
    for (int r = 0; r < R; ++r) {
      const float* xb = x0 + r * w.K + b * kBlock;
      float acc = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) acc += v[j] * xb[j];
      dots[r] += d * acc;
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// Output features [begin, end) of rows [r0, r0 + R) of x (bfloat16 bits [M, K]) with bfloat16 dot
// products; each block is decoded and rounded once for all R rows.
// scale * q, then + min, rounded twice as BlockWeight.dequantize (the dense copy) does: the explicitly
// rounded forms are never fused into an FMA (-ffast-math would fuse a plain multiply and add).
inline __m512 scale_then_add(__m512 q, __m512 scale, __m512 min) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm512_add_round_ps(_mm512_mul_round_ps(q, scale, kNearest), min, kNearest);
}

template <int R>
void bf16_features(const Weight& w, const uint16_t* x, int64_t r0, int64_t N, int64_t begin, int64_t end,
                   float* out) {
  for (int64_t n = begin; n < end; ++n) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < w.nb; ++b) {
      __m512 lo, hi;
      decode_block(w, n, b, lo, hi);
      const __m512 d = _mm512_set1_ps(w.scales[n * w.nb + b]);
      const __m512 m = _mm512_set1_ps(w.mins != nullptr ? w.mins[n * w.nb + b] : 0.f);
      const __m512bh v = _mm512_cvtne2ps_pbh(scale_then_add(hi, d, m), scale_then_add(lo, d, m));
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], v, (__m512bh)_mm512_loadu_si512(x + (r0 + r) * w.K + b * kBlock));
    }
    for (int r = 0; r < R; ++r) out[(r0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
  }
}

using Bf16Features = void (*)(const Weight&, const uint16_t*, int64_t, int64_t, int64_t, int64_t, float*);
constexpr int64_t kBf16Rows = 16;  // rows per pass over the weight
constexpr Bf16Features kBf16Features[kBf16Rows] = {
    bf16_features<1>, bf16_features<2>, bf16_features<3>, bf16_features<4>, bf16_features<5>, bf16_features<6>,
    bf16_features<7>, bf16_features<8>, bf16_features<9>, bf16_features<10>, bf16_features<11>, bf16_features<12>,
    bf16_features<13>, bf16_features<14>, bf16_features<15>, bf16_features<16>};
#endif

// Output features [begin, end) of rows [r0, r0 + R) of x; xsum [M, nb] holds each block's sum of x.
template <int R>
void features(const Weight& w, const float* x, const float* xsum, int64_t r0, int64_t N, int64_t begin,
              int64_t end, float* out) {
  float dots[R];
  for (int64_t n = begin; n < end; ++n) {
    scaled_dots<R>(w, n, x + r0 * w.K, dots);
    for (int r = 0; r < R; ++r) {
      float m = 0.f;
      if (w.mins != nullptr) {
        const float *mn = w.mins + n * w.nb, *xs = xsum + (r0 + r) * w.nb;
#pragma omp simd reduction(+ : m)
        for (int64_t b = 0; b < w.nb; ++b) m += mn[b] * xs[b];
      }
      out[(r0 + r) * N + n] = dots[r] + m;
    }
  }
}

using Features = void (*)(const Weight&, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
constexpr Features kFeatures[kMaxRows] = {features<1>, features<2>, features<3>, features<4>,
                                          features<5>, features<6>, features<7>, features<8>};

// The blocks' description, after checking them against x [M, K].
Weight checked_weight(const char* name, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                      const at::Tensor& mins, int64_t bits) {
  check_cpu(name, {&x, &qs, &scales, &mins});
  TORCH_CHECK(bits == 4 || bits == 8, name, ": bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && scales.dim() == 2, name, ": x [M, K], qs and scales [N, *]");
  const int64_t K = x.size(1), N = qs.size(0), nb = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && qs.size(1) * (bits == 4 ? 2 : 1) == K, name, ": qs must hold K values a row");
  TORCH_CHECK(qs.element_size() == 1 && qs.is_contiguous(), name, ": qs must be contiguous bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == N &&
                  scales.size(1) == nb, name, ": scales must be float32 [N, K / 32]");
  TORCH_CHECK((bits == 4) == mins.defined(), name, ": 4-bit blocks need mins, 8-bit ones none");
  TORCH_CHECK(!mins.defined() || (mins.scalar_type() == at::kFloat && mins.is_contiguous() &&
                                  mins.sizes() == scales.sizes()), name, ": mins like scales");
  return Weight{static_cast<const uint8_t*>(qs.data_ptr()), scales.data_ptr<float>(),
                mins.defined() ? mins.data_ptr<float>() : nullptr, bits, K, nb};
}

}  // namespace

// x [M, K] float32 or bfloat16 -> float32 [M, N]; see the top of this file for the blocks.
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t bits) {
  const at::Tensor mins_t = mins.value_or(at::Tensor());
  const Weight w = checked_weight("block_linear", x, qs, scales, mins_t, bits);
  const int64_t M = x.size(0), N = qs.size(0), nb = w.nb;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xsum(M * nb, 0.f);
  for (int64_t i = 0; i < M * nb; ++i)
    for (int64_t j = 0; j < kBlock; ++j) xsum[i] += xp[i * kBlock + j];
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int64_t R = std::min(kMaxRows, M - r0);
      kFeatures[R - 1](w, xp, xsum.data(), r0, N, begin, end, op);
    }
  });
  return out;
}

// x [M, K] (rounded to bfloat16) -> float32 [M, N], the dense bfloat16 copy's matmul (top of this
// file); only where built with AVX-512 BF16 (block_linear_bf16_built).
at::Tensor block_linear_bf16(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                             const std::optional<at::Tensor>& mins, int64_t bits) {
#if defined(__AVX512BF16__)
  const at::Tensor mins_t = mins.value_or(at::Tensor());
  const Weight w = checked_weight("block_linear_bf16", x, qs, scales, mins_t, bits);
  const int64_t M = x.size(0), N = qs.size(0);
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  const auto* xp = static_cast<const uint16_t*>(xb.data_ptr());
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < M; r0 += kBf16Rows)
      kBf16Features[std::min(kBf16Rows, M - r0) - 1](w, xp, r0, N, begin, end, op);
  });
  return out;
#else
  TORCH_CHECK(false, "block_linear_bf16: this build has no AVX-512 BF16");
#endif
}

bool block_linear_bf16_built() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Which code computes block_linear: "avx512", "avx2", or "generic" (the plain loop, slower than
// oneDNN's dense matmul: --quantization auto then serves the dense weights).
std::string block_linear_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace engram_kernels
