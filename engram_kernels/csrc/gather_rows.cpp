// An Engram table's rows, gathered and decoded into the compute dtype in one pass
// (offload/dtypes.py describes the row layouts and decodes them with torch ops, which
// are the reference here). A batch-1 decode step reads 16 rows per layer: in numpy
// and torch that was a dozen calls, each slow when the step's weight traffic has just
// evicted the code and data it touches; this is one call.
//
// Single-threaded on purpose: the prefetch worker calls it while the model's intra-op
// threads run the forward, and a gather is a few hundred rows at most between steps.
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "bf16.h"

namespace engram_kernels {
namespace {

constexpr int64_t kFp8Block = 32;  // values per ue8m0 scale byte (offload/dtypes.py FP8_BLOCK)

// float8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities,
// S.1111.111 is NaN) as float32, for every byte
std::array<float, 256> e4m3_table() {
  std::array<float, 256> table{};
  for (int v = 0; v < 256; ++v) {
    const int exponent = (v >> 3) & 0xF, mantissa = v & 0x7;
    float x = exponent == 0 ? std::ldexp(mantissa / 8.f, -6) : std::ldexp(1.f + mantissa / 8.f, exponent - 7);
    if ((v & 0x7F) == 0x7F) x = NAN;
    table[v] = v & 0x80 ? -x : x;
  }
  return table;
}

template <typename Out>
void decode_fp8(const uint8_t* raw, int64_t head_dim, Out* out) {
  static const std::array<float, 256> table = e4m3_table();
  const uint8_t* scales = raw + head_dim;
  for (int64_t block = 0; block < head_dim / kFp8Block; ++block) {
    const float scale = std::ldexp(1.f, static_cast<int>(scales[block]) - 127);
    for (int64_t i = block * kFp8Block; i < (block + 1) * kFp8Block; ++i) store_float(table[raw[i]] * scale, out + i);
  }
}

template <typename In, typename Out>
void convert(const In* raw, int64_t head_dim, Out* out) {
  if constexpr (std::is_same_v<In, Out>) {
    std::memcpy(out, raw, head_dim * sizeof(Out));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < head_dim; ++i) store_float(load_float(raw[i]), out + i);
  }
}

template <typename In, typename Out>
void gather(const In* table, int64_t elems, const int64_t* rows, int64_t n, int64_t head_dim, Out* out) {
  for (int64_t i = 0; i < n; ++i) {
    const In* row = table + rows[i] * elems;
    if constexpr (std::is_same_v<In, uint8_t>)
      decode_fp8(row, head_dim, out + i * head_dim);
    else
      convert(row, head_dim, out + i * head_dim);
  }
}

template <typename Out>
void gather_as(const at::Tensor& table, const int64_t* rows, int64_t n, int64_t head_dim, Out* out) {
  const int64_t elems = table.size(1);
  switch (table.scalar_type()) {
    case at::kFloat: gather(table.data_ptr<float>(), elems, rows, n, head_dim, out); break;
    case at::kBFloat16: gather(data_as<bf16>(table), elems, rows, n, head_dim, out); break;
    default: gather(table.data_ptr<uint8_t>(), elems, rows, n, head_dim, out);
  }
}

}  // namespace

// table [num_rows, raw_row_elems]: float32, bfloat16, or uint8 fp8_e4m3 rows (head_dim
// e4m3 bytes, then one ue8m0 scale byte per 32 values); rows: int64 ids of any shape.
// Returns [rows.numel(), head_dim] in out_dtype (float32 or bfloat16), new memory.
at::Tensor gather_rows(const at::Tensor& table, const at::Tensor& rows, at::ScalarType out_dtype) {
  check_cpu("gather_rows", {&table, &rows});
  const auto in = table.scalar_type();
  TORCH_CHECK(in == at::kFloat || in == at::kBFloat16 || in == at::kByte, "gather_rows: unsupported table dtype");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "gather_rows decodes to float32 or bfloat16");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "gather_rows needs a contiguous [rows, elems] table");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "row ids must be contiguous int64");
  const int64_t elems = table.size(1), num_rows = table.size(0), n = rows.numel();
  const int64_t head_dim = in == at::kByte ? elems * kFp8Block / (kFp8Block + 1) : elems;
  TORCH_CHECK(in != at::kByte || head_dim % kFp8Block == 0, "fp8 rows need head_dim divisible by 32");
  const int64_t* ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(0 <= ids[i] && ids[i] < num_rows, "row ids must be in [0, ", num_rows, "), got ", ids[i]);
  }
  at::Tensor out = at::empty({n, head_dim}, table.options().dtype(out_dtype));
  if (out_dtype == at::kFloat)
    gather_as(table, ids, n, head_dim, out.data_ptr<float>());
  else
    gather_as(table, ids, n, head_dim, data_as<bf16>(out));
  return out;
}

}  // namespace engram_kernels
