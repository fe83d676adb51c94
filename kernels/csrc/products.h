// Few-row matrix products over every weight form the CPU strategies hold (products_cpu.cpp): plain float32 or
// bfloat16 rows, int8 codes with scales, int4 codes in ggml's Q4_0 order with scales (and zeros). Used by the
// single-token step (step_cpu.cpp), the quantized products (quant_cpu.cpp) and the few-row float product
// (decode_cpu.cpp), so there is one kernel per weight form.
#pragma once

#include <cstdint>

#include "goose_common.h"

namespace goose {

enum WeightKind : int32_t {
    kWeightF32 = 0, kWeightBF16 = 1, kWeightI8 = 2, kWeightI4 = 3,
    kWeightF32Blocked = 4,      // oneDNN's packed fp32 layout on AVX-512: [ceil(N / G)][K][G]
    kWeightBF16Pairs = 5,       // oneDNN's packed bf16 layout on AVX-512: [ceil(N / G)][ceil(K / 2)][G][2]
};
enum ScaleDtype : int32_t { kScaleF32 = 0, kScaleBF16 = 1, kScaleF16 = 2 };

// W [N, K] as the model holds it; kernels/native_step.py builds the same struct with ctypes (keep them equal).
//   f32 / bf16: data = rows of K values, row_bytes apart.
//   int8: W[n, k] = q[n, k] * s[n, k / G]                      (codes int8 [N, K]; G = K: one scale a row)
//   int4: W[n, k] = (q[n, k] - 8) * s[n, k / G] + z[n, k / G]  (zeros may be null; G a multiple of 32; codes
//         [N, ceil(K / 32) * 16] uint8: per 32 columns, column j in the low nibble of byte j, j + 16 in the high)
//   f32 blocked / bf16 pairs: the weights as oneDNN packs them for its own products (kernels/native_step.py checks
//         the layout against the matrix at load), G output rows a block (a multiple of 16), row_bytes = bytes a
//         block; rows past N are padding. Read on CPUs with AVX-512 only (the only layouts recognised).
struct MatRef {
    int32_t kind, scale_dtype;
    int64_t N, K, G;
    const void *data;
    int64_t row_bytes;
    const void *scales, *zeros;
    int64_t scale_stride;      // scale (and zero) elements per row
};

// A plain row-major float32 or bfloat16 matrix [N, K].
inline MatRef plain_matrix(const void *w, bool bf16, int64_t N, int64_t K) {
    return MatRef{bf16 ? kWeightBF16 : kWeightF32, 0, N, K, K, w, K * (bf16 ? 2 : 4), nullptr, nullptr, 0};
}

// What happens to a sum before it is stored (the step's activations between products).
enum Epilogue : int32_t {
    kStore = 0,        // as is
    kRoundBF16 = 1,    // rounded to bfloat16 (nearest even), kept as float
    kTanh = 2,
    kSigmoid = 3,
    kReluSquare = 4,   // relu(y)^2
    kReluSquareBF16 = 5,   // bf16(relu(bf16(y))^2): torch's relu_ and square_ on a bfloat16 tensor
};

// Rows of the product a thread computes: y[m * ldy + n] = epilogue(sum_k x[m * ldx + k] W[n, k]) for m < M and
// n0 <= n < n1. x: float32 rows; for int4 weights each row must be readable (and zero) up to K rounded up to 32.
// Any M (taken four rows at a time). No threads of its own: callers split the rows.
// y: float32, or bfloat16 (rounded to nearest even) with y_bf16.
void product_rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
                  int64_t n0, int64_t n1, Epilogue epilogue);

// All N rows split among the threads of the enclosing OpenMP parallel region (every thread of the team calls it,
// as with an orphaned `omp for nowait`: no barrier at the end, the caller places one); outside a parallel
// region, all rows on the calling thread.
void product_team(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
                  Epilogue epilogue);

// Rows [n0, n1) of a quantized W (int8 / int4) as float32 or bfloat16 rows ld elements apart (out points at row n0).
void dequantize_rows(const MatRef &w, int64_t n0, int64_t n1, void *out, bool out_bf16, int64_t ld);

// A scale or zero of a quantized weight as float.
inline float scale_value(const void *p, int dtype, int64_t i) {
    if (dtype == kScaleF32) return static_cast<const float *>(p)[i];
    const uint16_t h = static_cast<const uint16_t *>(p)[i];
    if (dtype == kScaleBF16) return from_bf16(h);
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {                                             // zero or subnormal: man * 2^-24
        const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    return __builtin_bit_cast(float, bits);
}


}  // namespace goose
