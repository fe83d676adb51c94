// Weight-only quantized matrix products for the CPU strategies "fp32i8", "bf16i8", "fp32i4" and "bf16i4", and
// for GGUF Q8_0 / Q4_0 weights kept as they are in the file; called through kernels/quant_native.py.
//
// y[m, n] = sum_k x[m, k] * W[n, k] with W stored as codes and scales (fp32 accumulation throughout):
//   int8: W[n, k] = q[n, k] * s[n, k / G]                       (G = 32: GGUF Q8_0; G = K: one scale per row)
//   int4: W[n, k] = (q[n, k] - 8) * s[n, k / G] + z[n, k / G]   (z absent: GGUF Q4_0, G = 32)
// int4 codes are packed in ggml's Q4_0 order, 16 bytes per 32 columns: column j of a 32-block in the low nibble
// of byte j, column j + 16 in the high nibble. Scales (and zeros) are fp32, bf16 or fp16, [N, ceil(K / G)].
//
// Why a kernel of our own: torch's weight-only ops take bf16 activations only (fp32 ones run 10-40x slower),
// and know neither ggml's blocks nor fp16 scales. Few-row products (decode) run the kernels of products_cpu.cpp,
// shared with the float weights and the single-token step; for many rows the caller dequantizes into a float
// matrix (goose_quant_dequantize) and uses the float product instead. Threads: OpenMP over output rows, on
// torch's pool.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include "goose_common.h"
#include "products.h"

#if defined(GOOSE_X86_CLONES)
#include <immintrin.h>
#endif

#pragma GCC optimize("fp-contract=fast")   // a * b + c as one FMA in this file (ISO C++ mode turns it off)

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i32 __attribute__((vector_size(32)));
typedef int16_t v16i16 __attribute__((vector_size(32)));
typedef int8_t v16i8 __attribute__((vector_size(16)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));


enum Dtype { kF32 = 0, kBF16 = 1, kF16 = 2 };

GOOSE_INLINE float bf16_value(uint16_t x) { return goose::from_bf16(x); }

GOOSE_INLINE uint16_t bf16_round(float x) { return goose::to_bf16(x); }

GOOSE_INLINE float f16_value(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {                                             // zero or subnormal: man * 2^-24
        const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    return __builtin_bit_cast(float, bits);
}

GOOSE_INLINE float scalar_at(const void *p, int dtype, int64_t i) {
    if (dtype == kF32) return static_cast<const float *>(p)[i];
    const uint16_t v = static_cast<const uint16_t *>(p)[i];
    return dtype == kBF16 ? bf16_value(v) : f16_value(v);
}

GOOSE_INLINE v8f load8(const float *p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

GOOSE_INLINE float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

struct Weights {
    int bits;                // 8 or 4
    int64_t N, K, G, groups; // groups = ceil(K / G)
    const uint8_t *codes;
    int64_t code_stride;     // bytes per row
    const void *scales, *zeros;
    int scale_dtype;
    int64_t scale_stride;    // elements per row (scales and zeros alike)
};

// 32 codes to four vectors of floats (int8: the codes; int4: 0..15, the "- 8" comes with the shift), in registers.
// Written with 16-bit steps because GCC turns __builtin_convertvector from char vectors straight to float into
// scalar code, and a float buffer filled by 16-byte stores and read by 32-byte loads stalls store forwarding.
struct Block { v8f v[4]; };

GOOSE_INLINE Block widen_halves(v16i16 lo, v16i16 hi) {
    Block b;
    b.v[0] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(lo, lo, 0, 1, 2, 3, 4, 5, 6, 7), v8i32), v8f);
    b.v[1] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(lo, lo, 8, 9, 10, 11, 12, 13, 14, 15), v8i32), v8f);
    b.v[2] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(hi, hi, 0, 1, 2, 3, 4, 5, 6, 7), v8i32), v8f);
    b.v[3] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(hi, hi, 8, 9, 10, 11, 12, 13, 14, 15), v8i32), v8f);
    return b;
}

struct Portable {
    template <int BITS>
    static GOOSE_INLINE Block widen32(const uint8_t *row, int64_t j) {
        if (BITS == 8) {
            v16i8 a, b;
            std::memcpy(&a, row + j, sizeof a);
            std::memcpy(&b, row + j + 16, sizeof b);
            return widen_halves(__builtin_convertvector(a, v16i16), __builtin_convertvector(b, v16i16));
        }
        v16u8 c;
        std::memcpy(&c, row + (j >> 1), sizeof c);
        return widen_halves(__builtin_convertvector(c & 15, v16i16), __builtin_convertvector(c >> 4, v16i16));
    }
};


GOOSE_INLINE float code_at(const uint8_t *row, int bits, int64_t j) {
    if (bits == 8) return static_cast<float>(reinterpret_cast<const int8_t *>(row)[j]);
    const int64_t at = j & ~int64_t(31), i = j - at;
    const uint8_t byte = row[at / 2 + (i & 15)];
    return static_cast<float>(i < 16 ? (byte & 15) : (byte >> 4));
}

// One row of W back to floats (fp32 or bf16).
GOOSE_CLONES
void dequantize_row(const Weights &w, int64_t n, void *out, int out_dtype) {
    const uint8_t *q = w.codes + n * w.code_stride;
    alignas(32) float buf[32];
    for (int64_t g = 0; g < w.groups; ++g) {
        const int64_t lo = g * w.G, hi = std::min(w.K, lo + w.G);
        const float s = scalar_at(w.scales, w.scale_dtype, n * w.scale_stride + g);
        const float shift = w.bits == 8 ? 0.f
                            : (w.zeros ? scalar_at(w.zeros, w.scale_dtype, n * w.scale_stride + g) : 0.f) - 8.f * s;
        for (int64_t j = lo; j < hi; j += 32) {
            const int64_t len = std::min<int64_t>(32, hi - j);
            if (len == 32) {
                const Block b = w.bits == 8 ? Portable::widen32<8>(q, j) : Portable::widen32<4>(q, j);
                for (int i = 0; i < 4; ++i) std::memcpy(buf + 8 * i, &b.v[i], sizeof(v8f));
            } else {
                for (int64_t i = 0; i < len; ++i) buf[i] = code_at(q, w.bits, j + i);
            }
#pragma omp simd
            for (int64_t i = 0; i < 32; ++i) buf[i] = buf[i] * s + shift;
            if (out_dtype == kBF16) {
                uint16_t *o = static_cast<uint16_t *>(out) + j;
                for (int64_t i = 0; i < len; ++i) o[i] = bf16_round(buf[i]);
            } else {
                std::memcpy(static_cast<float *>(out) + j, buf, len * sizeof(float));
            }
        }
    }
}

Weights make_weights(int bits, int64_t N, int64_t K, int64_t G, const void *codes, int64_t code_stride,
                     const void *scales, const void *zeros, int scale_dtype, int64_t scale_stride) {
    return Weights{bits, N, K, G, (K + G - 1) / G, static_cast<const uint8_t *>(codes), code_stride, scales,
                   zeros, scale_dtype, scale_stride};
}

}  // namespace

extern "C" {

// y [M, N] (row stride y_stride, fp32 or bf16) = x [M, K] (row stride x_stride, fp32 or bf16) @ W^T, W as described
// at the top, through the few-row kernels of products_cpu.cpp. int4 needs G a multiple of 32. Returns 0, or -1 when
// scratch memory could not be had.
int goose_quant_matmul(int64_t M, int64_t N, int64_t K, int bits, int64_t G, const void *x, int x_dtype,
                       int64_t x_stride, const void *codes, int64_t code_stride, const void *scales,
                       const void *zeros, int scale_dtype, int64_t scale_stride, void *y, int y_dtype,
                       int64_t y_stride) {
    const goose::MatRef w{bits == 8 ? goose::kWeightI8 : goose::kWeightI4, scale_dtype, N, K, G, codes, code_stride,
                          scales, zeros, scale_stride};
    // x as fp32 rows padded with zeros to whole 32-column blocks (the int4 kernel reads whole blocks)
    const int64_t Kp = (K + 31) / 32 * 32;
    float *xf = static_cast<float *>(std::calloc(M * Kp, sizeof(float)));
    if (xf == nullptr) return -1;
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k)
            xf[m * Kp + k] = x_dtype == kF32 ? static_cast<const float *>(x)[m * x_stride + k]
                                             : bf16_value(static_cast<const uint16_t *>(x)[m * x_stride + k]);
#pragma omp parallel
    goose::product_team(w, M, xf, Kp, y, y_dtype == kBF16, y_stride, goose::kStore);
    std::free(xf);
    return 0;
}

// out [N, K] (row stride out_stride, fp32 or bf16) = W, for products with many activation rows.
void goose_quant_dequantize(int64_t N, int64_t K, int bits, int64_t G, const void *codes, int64_t code_stride,
                            const void *scales, const void *zeros, int scale_dtype, int64_t scale_stride,
                            void *out, int out_dtype, int64_t out_stride) {
    const Weights w = make_weights(bits, N, K, G, codes, code_stride, scales, zeros, scale_dtype, scale_stride);
    const int64_t elem = out_dtype == kBF16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        dequantize_row(w, n, static_cast<char *>(out) + n * out_stride * elem, out_dtype);
}

}  // extern "C"
