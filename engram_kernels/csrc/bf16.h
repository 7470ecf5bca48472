// bfloat16 <-> float32 conversions that gcc vectorises inside `omp simd` loops.
// bfloat16 values are handled as their raw bits (uint16_t): loops over c10::BFloat16
// compile to scalar code (docs/performance.md).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

using bf16 = uint16_t;

inline float load_float(float x) { return x; }

inline float load_float(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store_float(float v, float* out) { *out = v; }

// Round to nearest even, as torch's .to(torch.bfloat16) does for finite values.
inline void store_float(float v, bf16* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *out = static_cast<bf16>(bits >> 16);
}

// A float32 tensor's data as float*, a bfloat16 tensor's as bf16*.
template <typename T>
T* data_as(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, bf16>)
    return reinterpret_cast<bf16*>(t.data_ptr<c10::BFloat16>());
  else
    return t.data_ptr<T>();
}
