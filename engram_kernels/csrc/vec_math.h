// Small float32 helpers shared by the kernels, written so that gcc vectorises them inside
// `omp simd` loops (expf needs the -ffast-math the kernels are built with).
#pragma once

#include <cmath>
#include <cstdint>

// 1 / sqrt(mean(x^2) + eps) over x[0..n): RMSNorm's scale.
inline float inv_rms(const float* x, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
