// NgramHasher's row ids for every Engram layer in one pass over the token ids
// (engram_runtime/hashing.py has the same arithmetic as a dozen numpy array ops,
// which is its reference here): per position, the compressed ids of the token and
// its N-1 predecessors, each multiplied by its layer's odd multiplier with int64
// wrap-around, XOR-accumulated; the mix after k+1 tokens, modulo each head's prime,
// is the row of N-gram order k+1.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace engram_kernels {

// ids [B, W] raw token ids (negative ones are padding markers, used as they are); lookup [V] raw id -> compressed id; pad: the compressed id
// of positions before the sequence start; multipliers [L, N]; primes [L, N - 1, H];
// offsets [L, (N - 1) * H] added to every row (each head's first row in the layer's
// table, or zeros for within-head ids). The first `skip` positions are context only.
// Returns [L, B, W - skip, (N - 1) * H].
at::Tensor ngram_rows(const at::Tensor& ids, const at::Tensor& lookup, int64_t pad, const at::Tensor& multipliers,
                      const at::Tensor& primes, const at::Tensor& offsets, int64_t skip) {
  check_cpu("ngram_rows", {&ids, &lookup, &multipliers, &primes, &offsets});
  for (const at::Tensor* t : {&ids, &lookup, &multipliers, &primes, &offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "ngram_rows works on contiguous int64 tensors");
  }
  TORCH_CHECK(ids.dim() == 2, "token ids must be [B, T]");
  TORCH_CHECK(primes.dim() == 3 && multipliers.dim() == 2, "primes must be [L, N - 1, H], multipliers [L, N]");
  const int64_t B = ids.size(0), W = ids.size(1), V = lookup.numel();
  const int64_t L = primes.size(0), N = primes.size(1) + 1, H = primes.size(2), R = (N - 1) * H;
  TORCH_CHECK(multipliers.size(0) == L && multipliers.size(1) == N, "one multiplier per layer and N-gram position");
  TORCH_CHECK(offsets.numel() == L * R, "offsets must be [L, (N - 1) * H]");
  TORCH_CHECK(0 <= skip && skip <= W, "skip outside the token ids");
  const int64_t T = W - skip;
  const int64_t *id = ids.data_ptr<int64_t>(), *lut = lookup.data_ptr<int64_t>();
  const int64_t *mult = multipliers.data_ptr<int64_t>(), *prime = primes.data_ptr<int64_t>();
  const int64_t* offset = offsets.data_ptr<int64_t>();

  std::vector<int64_t> compressed(B * W);
  for (int64_t i = 0; i < B * W; ++i) {
    TORCH_CHECK_VALUE(id[i] < V, "token id ", id[i], " is outside the vocabulary (size ", V, ")");
    compressed[i] = id[i] < 0 ? id[i] : lut[id[i]];  // negative ids (padding markers) pass through
  }
  at::Tensor out = at::empty({L, B, T, R}, ids.options());
  int64_t* rows = out.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = skip; p < W; ++p) {
        int64_t* row = rows + ((l * B + b) * T + (p - skip)) * R;
        uint64_t mix = 0;  // unsigned: wrap-around is defined, and equals numpy's int64 products
        for (int64_t k = 0; k < N; ++k) {
          const int64_t token = p - k >= 0 ? compressed[b * W + p - k] : pad;
          mix ^= static_cast<uint64_t>(token) * static_cast<uint64_t>(mult[l * N + k]);
          if (k == 0) continue;
          const int64_t signed_mix = static_cast<int64_t>(mix);
          for (int64_t h = 0; h < H; ++h) {
            const int64_t q = prime[(l * (N - 1) + k - 1) * H + h];
            int64_t r = signed_mix % q;
            r += r < 0 ? q : 0;  // numpy's %: the sign of the divisor
            row[(k - 1) * H + h] = r + offset[l * R + (k - 1) * H + h];
          }
        }
      }
    }
  }
  return out;
}

}  // namespace engram_kernels
