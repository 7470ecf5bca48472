// The kernels' entry points, one per .cpp file's job; module.cpp makes them a Python module
// (engram_kernels/__init__.py documents each, beside the torch ops it replaces).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

namespace engram_kernels {

// The kernels read data_ptr() of what they are given: a CUDA tensor must fail here, with its
// kernel's name, and never reach a loop over host pointers.
inline void check_cpu(const char* kernel, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(!t->defined() || t->device().is_cpu(), kernel, " is a CPU kernel, got a tensor on ", t->device());
  }
}

// An Engram layer's own weights for engram_mix, as EngramLayer.mix_weights() makes them
// (engram_kernels.MixWeights on the Python side; module.cpp converts it).
struct MixWeights {
  at::Tensor key_scale, norm_weight, taps;  // [hc, D], [hc, D], [kernel_size, hc * D]
  int64_t dilation;
  double gate_eps, conv_eps;
};

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType dtype);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps,
                         at::ScalarType dtype);
at::Tensor silu_and_mul(const at::Tensor& gate_up, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> engram_mix(const at::Tensor& hidden, const at::Tensor& memory,
                                              const at::Tensor& state, const at::Tensor& slots, const MixWeights& w);
at::Tensor ngram_rows(const at::Tensor& ids, const at::Tensor& lookup, int64_t pad, const at::Tensor& multipliers,
                      const at::Tensor& primes, const at::Tensor& offsets, int64_t skip);
at::Tensor gather_rows(const at::Tensor& table, const at::Tensor& rows, at::ScalarType out_dtype);
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t bits);
at::Tensor block_linear_bf16(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                             const std::optional<at::Tensor>& mins, int64_t bits);
bool block_linear_bf16_built();
std::string block_linear_isa();
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool parallel);

}  // namespace engram_kernels
