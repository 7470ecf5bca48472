// EngramLayer.mix for a decode step (one new token per row), in one pass per row:
// the gate of the memory's value by its keys' match with the hidden state, the
// per-branch RMSNorm, the depthwise causal conv over the row's conv state, SiLU, and
// the conv state's shift by one position. In torch this is ~20 small ops per layer
// (engram_runtime/engram.py, _gated_conv and ShortConv.update_state), whose fixed
// costs are most of Engram's time in a batch-1 decode step; tests compare the two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace engram_kernels {

// hidden [B, hc, D]; memory [B, hc + 1, D] (per branch the projected key, then the value);
// state [slots, context, hc * D] updated in place at rows `slots` [B]; w.key_scale [hc, D]
// (applied to the normalised keys), w.norm_weight [hc, D], w.taps [kernel_size, hc * D] with
// (kernel_size - 1) * dilation == context. Returns (out [B, hc, D], gate [B, hc]).
std::tuple<at::Tensor, at::Tensor> engram_mix(const at::Tensor& hidden, const at::Tensor& memory,
                                              const at::Tensor& state, const at::Tensor& slots, const MixWeights& w) {
  const at::Tensor &key_scale = w.key_scale, &norm_weight = w.norm_weight, &taps = w.taps;
  const int64_t dilation = w.dilation;
  check_cpu("engram_mix", {&hidden, &memory, &state, &slots, &key_scale, &norm_weight, &taps});
  for (const at::Tensor* t : {&hidden, &memory, &key_scale, &state, &norm_weight, &taps}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "engram_mix works on float32 tensors");
    TORCH_CHECK(t->is_contiguous(), "engram_mix needs contiguous tensors");
  }
  TORCH_CHECK(hidden.dim() == 3, "hidden must be [rows, hc, D]");
  const int64_t B = hidden.size(0), G = hidden.size(1), D = hidden.size(2), C = G * D;
  TORCH_CHECK(memory.dim() == 3 && memory.size(0) == B && memory.size(1) == G + 1 && memory.size(2) == D,
              "memory must be [rows, hc + 1, D]");
  TORCH_CHECK(key_scale.numel() == C && norm_weight.numel() == C && taps.dim() == 2 && taps.size(1) == C,
              "key_scale, norm_weight or taps shape");
  const int64_t K = taps.size(0), ctx = (K - 1) * dilation;
  TORCH_CHECK(state.dim() == 3 && state.size(1) == ctx && state.size(2) == C && ctx > 0,
              "state must be [slots, (kernel_size - 1) * dilation, hc * D]");
  const at::Tensor slot_t = slots.to(at::kLong).contiguous();
  TORCH_CHECK(slot_t.numel() == B, "one slot per row");
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slot[b] >= 0 && slot[b] < state.size(0), "slot outside the state");

  at::Tensor out = at::empty({B, G, D}, hidden.options()), gate = at::empty({B, G}, hidden.options());
  const float *hp = hidden.data_ptr<float>(), *mp = memory.data_ptr<float>(), *ks = key_scale.data_ptr<float>(),
              *nw = norm_weight.data_ptr<float>(), *tp = taps.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>(), *gp = gate.data_ptr<float>();
  const float geps = static_cast<float>(w.gate_eps), ceps = static_cast<float>(w.conv_eps);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> normed(C), y(C);  // the conv's input and output at this position
    for (int64_t b = begin; b < end; ++b) {
      const float *h = hp + b * C, *mem = mp + b * (G + 1) * D, *value = mem + G * D;
      float* st = sp + slot[b] * ctx * C;  // the previous `ctx` positions' conv inputs, oldest first
      float* o = op + b * C;
      for (int64_t g = 0; g < G; ++g) {
        const float *hg = h + g * D, *key = mem + g * D, *scale = ks + g * D;
        float score = 0.f;
#pragma omp simd reduction(+ : score)
        for (int64_t i = 0; i < D; ++i) score += key[i] * scale[i] * hg[i];
        score *= inv_rms(hg, D, geps) * inv_rms(key, D, geps);
        // signed square root before the sigmoid (reference)
        const float root = std::sqrt(std::max(std::fabs(score), 1e-6f));
        const float gv = sigmoid(score < 0 ? -root : (score > 0 ? root : 0.f));
        gp[b * G + g] = gv;
        float* og = o + g * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) og[i] = gv * value[i];
        const float vs = inv_rms(og, D, ceps);
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) normed[g * D + i] = og[i] * vs * nw[g * D + i];
      }
      // y = sum_j taps[j] * full[j * dilation], full = the state's rows, then `normed`
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) y[i] = tp[(K - 1) * C + i] * normed[i];
      for (int64_t j = 0; j < K - 1; ++j) {
        const float* row = st + j * dilation * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) y[i] += tp[j * C + i] * row[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) o[i] += silu(y[i]);
      std::memmove(st, st + C, (ctx - 1) * C * sizeof(float));  // drop the oldest position
      std::copy_n(normed.data(), C, st + (ctx - 1) * C);
    }
  });
  return {out, gate};
}

}  // namespace engram_kernels
