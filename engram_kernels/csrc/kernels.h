// The kernels' entry points, one per .cpp file's job; module.cpp makes them a Python module
// (engram_kernels/__init__.py documents each, beside the torch ops it replaces).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace engram_kernels {

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType dtype);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps,
                         at::ScalarType dtype);
at::Tensor silu_and_mul(const at::Tensor& gate_up, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> engram_mix(const at::Tensor& hidden, const at::Tensor& memory,
                                              const at::Tensor& key_scale, const at::Tensor& state,
                                              const at::Tensor& slots, const at::Tensor& norm_weight,
                                              const at::Tensor& taps, int64_t dilation, double gate_eps,
                                              double conv_eps);
at::Tensor ngram_rows(const at::Tensor& ids, const at::Tensor& lookup, int64_t pad, const at::Tensor& multipliers,
                      const at::Tensor& primes, const at::Tensor& offsets, int64_t skip);
at::Tensor gather_rows(const at::Tensor& table, const at::Tensor& rows, at::ScalarType out_dtype);
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool parallel);

}  // namespace engram_kernels
