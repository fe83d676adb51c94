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
// and know neither ggml's blocks nor fp16 scales. Single-token decode reads each weight byte once, so the kernel
// streams rows of codes and widens them in registers; for a few activation rows (batched decode) each widened
// block of weights is multiplied with up to four rows of x before the next block is read, and a thread's rows
// of codes (16 rows, at most a few hundred KB) stay in its L2 while it walks the rest of x. For many rows the
// caller dequantizes into a float matrix (goose_quant_dequantize) and uses the float product instead.
// Each block of 32 codes is widened and dequantized in registers (AVX2 where the CPU has it, else portable vector
// code built for several ISAs); the scales are applied there, so 32-column groups (GGUF) cost no more than one
// scale a row. Threads: OpenMP over blocks of output rows, on torch's pool.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include "goose_common.h"

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

constexpr int64_t kRowBlock = 16;        // output rows a thread takes at a time (their codes stay in L2)
constexpr int64_t kRowsPerPass = 4;      // activation rows multiplied with each widened block of weights

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

#if defined(GOOSE_X86_CLONES)
// AVX2: one sign/zero extension and one conversion per 8 codes (the portable form takes about twice the
// instructions, and at one activation row the widening, not memory, bounds the speed).
#define GOOSE_AVX2 __attribute__((target("arch=x86-64-v3")))
struct Avx2 {
    template <int BITS>
    static GOOSE_AVX2 inline Block widen32(const uint8_t *row, int64_t j) {
        Block b;
        if (BITS == 8) {
            for (int i = 0; i < 4; ++i) {
                const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(row + j + 8 * i));
                b.v[i] = reinterpret_cast<v8f>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
            }
            return b;
        }
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(row + (j >> 1)));
        const __m128i nib = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(c, nib), hi = _mm_and_si128(_mm_srli_epi16(c, 4), nib);
        b.v[0] = reinterpret_cast<v8f>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)));
        b.v[1] = reinterpret_cast<v8f>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))));
        b.v[2] = reinterpret_cast<v8f>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)));
        b.v[3] = reinterpret_cast<v8f>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
        return b;
    }
};
#endif

GOOSE_INLINE float code_at(const uint8_t *row, int bits, int64_t j) {
    if (bits == 8) return static_cast<float>(reinterpret_cast<const int8_t *>(row)[j]);
    const int64_t at = j & ~int64_t(31), i = j - at;
    const uint8_t byte = row[at / 2 + (i & 15)];
    return static_cast<float>(i < 16 ? (byte & 15) : (byte >> 4));
}

// One output row n against MT activation rows (fp32, contiguous, stride K): out[m] = the dot products. 32 codes at
// a time are widened and dequantized in registers (code * s + shift, shift = z - 8 s for int4, 0 for int8) and
// multiplied with each of the MT rows; P independent sums per row keep the FMA pipes busy when MT is small.
template <class Widen, int BITS, int MT, int P>
GOOSE_INLINE void block_dot(const uint8_t *q, int64_t j, float s, float shift, const float *x, int64_t K,
                            v8f (&acc)[MT][P]) {
    const Block b = Widen::template widen32<BITS>(q, j);
    for (int i = 0; i < 4; ++i) {
        const v8f wv = b.v[i] * s + shift;
        for (int m = 0; m < MT; ++m) acc[m][i % P] += wv * load8(x + m * K + j + 8 * i);
    }
}

template <int BITS>
GOOSE_INLINE void group_factors(const Weights &w, int64_t at, float &s, float &shift) {
    s = scalar_at(w.scales, w.scale_dtype, at);
    shift = BITS == 8 ? 0.f : (w.zeros ? scalar_at(w.zeros, w.scale_dtype, at) : 0.f) - 8.f * s;
}

template <class Widen, int BITS, int MT, int P>
inline void row_dot(const Weights &w, int64_t n, const float *x, float *out) {
    const int64_t K = w.K;
    const uint8_t *q = w.codes + n * w.code_stride;
    const int64_t base = n * w.scale_stride;
    v8f acc[MT][P] = {};
    float tail[MT] = {};
    float s, shift;
    int64_t j = 0;
    if (w.G % 32 == 0 || w.groups == 1) {
        // groups of whole 32-blocks (or one group): one pass over the blocks, the factors reloaded at a group's
        // start; a loop per group (below) cost 3.6x more at G = 32 (GGUF) than one scale a row
        const int64_t per_group = w.groups == 1 ? K / 32 + 1 : w.G / 32;
        int64_t left = 0, g = 0;
        for (; j + 32 <= K; j += 32) {
            if (left == 0) {
                group_factors<BITS>(w, base + g++, s, shift);
                left = per_group;
            }
            --left;
            block_dot<Widen, BITS, MT, P>(q, j, s, shift, x, K, acc);
        }
        if (j < K) group_factors<BITS>(w, base + (w.groups == 1 ? 0 : j / w.G), s, shift);
        for (; j < K; ++j) {                    // the last K % 32 columns, all in the last group
            const float wj = code_at(q, BITS, j) * s + shift;
            for (int m = 0; m < MT; ++m) tail[m] += wj * x[m * K + j];
        }
    } else {
        for (int64_t g = 0; g < w.groups; ++g) {   // groups that are not whole blocks (int8 only)
            const int64_t lo = g * w.G, hi = std::min(K, lo + w.G);
            group_factors<BITS>(w, base + g, s, shift);
            for (j = lo; j + 32 <= hi; j += 32) block_dot<Widen, BITS, MT, P>(q, j, s, shift, x, K, acc);
            for (; j < hi; ++j) {
                const float wj = code_at(q, BITS, j) * s + shift;
                for (int m = 0; m < MT; ++m) tail[m] += wj * x[m * K + j];
            }
        }
    }
    for (int m = 0; m < MT; ++m) {
        v8f sum = acc[m][0];
        for (int p = 1; p < P; ++p) sum += acc[m][p];
        out[m] = hsum(sum) + tail[m];
    }
}

GOOSE_INLINE void store(void *y, int y_dtype, int64_t at, float v) {
    if (y_dtype == kBF16)
        static_cast<uint16_t *>(y)[at] = bf16_round(v);
    else
        static_cast<float *>(y)[at] = v;
}

// Output rows [n0, n1) for all M activation rows, kRowsPerPass rows of x at a time.
template <class Widen, int BITS>
inline void product_rows(const Weights &w, int64_t M, const float *x, void *y, int y_dtype, int64_t y_stride,
                               int64_t n0, int64_t n1) {
    float out[kRowsPerPass];
    for (int64_t m = 0; m < M; m += kRowsPerPass) {
        const int64_t mt = std::min(kRowsPerPass, M - m);
        const float *xm = x + m * w.K;
        for (int64_t n = n0; n < n1; ++n) {
            switch (mt) {
                case 1: row_dot<Widen, BITS, 1, 4>(w, n, xm, out); break;
                case 2: row_dot<Widen, BITS, 2, 2>(w, n, xm, out); break;
                case 3: row_dot<Widen, BITS, 3, 1>(w, n, xm, out); break;
                default: row_dot<Widen, BITS, 4, 1>(w, n, xm, out); break;
            }
            for (int64_t i = 0; i < mt; ++i) store(y, y_dtype, (m + i) * y_stride + n, out[i]);
        }
    }
}

template <class Widen>
inline void product_block(const Weights &w, int64_t M, const float *x, void *y, int y_dtype, int64_t y_stride,
                                int64_t n0, int64_t n1) {
    if (w.bits == 8)
        product_rows<Widen, 8>(w, M, x, y, y_dtype, y_stride, n0, n1);
    else
        product_rows<Widen, 4>(w, M, x, y, y_dtype, y_stride, n0, n1);
}

// flatten: everything below inlined into each entry, so the AVX2 widening compiles in an AVX2 function
GOOSE_CLONES __attribute__((flatten))
void product_block_portable(const Weights &w, int64_t M, const float *x, void *y, int y_dtype, int64_t y_stride,
                            int64_t n0, int64_t n1) {
    product_block<Portable>(w, M, x, y, y_dtype, y_stride, n0, n1);
}

#if defined(GOOSE_X86_CLONES)
GOOSE_AVX2 __attribute__((flatten))
void product_block_avx2(const Weights &w, int64_t M, const float *x, void *y, int y_dtype, int64_t y_stride,
                        int64_t n0, int64_t n1) {
    product_block<Avx2>(w, M, x, y, y_dtype, y_stride, n0, n1);
}

bool have_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
#endif

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
// at the top. int4 needs G a multiple of 32. Returns 0, or -1 when scratch memory could not be had.
int goose_quant_matmul(int64_t M, int64_t N, int64_t K, int bits, int64_t G, const void *x, int x_dtype,
                       int64_t x_stride, const void *codes, int64_t code_stride, const void *scales,
                       const void *zeros, int scale_dtype, int64_t scale_stride, void *y, int y_dtype,
                       int64_t y_stride) {
    const Weights w = make_weights(bits, N, K, G, codes, code_stride, scales, zeros, scale_dtype, scale_stride);
    // x as contiguous fp32 rows (a copy only for bf16 or strided x)
    const bool copy = x_dtype != kF32 || x_stride != K;
    float *scratch = copy ? static_cast<float *>(std::malloc(sizeof(float) * M * K)) : nullptr;
    if (copy && scratch == nullptr) return -1;
    const float *xf = copy ? scratch : static_cast<const float *>(x);
    if (copy) {
#pragma omp parallel for schedule(static) if (M * K > 65536)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k)
                scratch[m * K + k] = x_dtype == kF32 ? static_cast<const float *>(x)[m * x_stride + k]
                                                     : bf16_value(static_cast<const uint16_t *>(x)[m * x_stride + k]);
    }
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * kRowBlock, n1 = std::min(N, n0 + kRowBlock);
#if defined(GOOSE_X86_CLONES)
        if (have_avx2()) {
            product_block_avx2(w, M, xf, y, y_dtype, y_stride, n0, n1);
            continue;
        }
#endif
        product_block_portable(w, M, xf, y, y_dtype, y_stride, n0, n1);
    }
    std::free(scratch);
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
