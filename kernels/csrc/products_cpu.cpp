// Few-row matrix products for every weight form (products.h): the kernel behind single-token decode.
//
// Single-token decode reads every weight byte once per token, so a product is as fast as the weights stream from
// memory, provided the work per byte keeps up: on a 2-core AMD EPYC (Zen 5) one core reads ~39 GB/s, i.e. ~10
// int8 weights a cycle. Each block of 32 weights is loaded, widened to float32 in registers (int8: one sign
// extension and one conversion per vector; int4: one zero extension, a mask and a shift for two vectors; bf16: a
// zero extension and a shift) and multiplied with up to four rows of x before the next block is read. Scales are
// applied once per group (int8 with one scale a row: once per row), and the int4 offsets (zero - 8 * scale) once
// per group against the sum of x over the group, so the inner loop is one FMA per vector of weights and row.
// Accumulation is float32; for one row of x, two blocks are in flight (four to eight independent FMA chains).
//
// Three builds of the same templates, picked once at run time: AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3), and
// portable vector code for anything else.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "goose_common.h"
#include "products.h"

#if defined(GOOSE_X86_CLONES)
#include <immintrin.h>
#endif

#pragma GCC optimize("fp-contract=fast")

namespace {

using goose::MatRef;

// ---------------------------------------------------------------------------------------------------- vectors
// Each ISA: V::F (a vector of W floats) and loaders turning one block of 32 weights into NV = 32 / W vectors in
// column order; products_kernel.h is compiled once per ISA over its V.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i32 __attribute__((vector_size(32)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef int16_t v8i16 __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef int16_t v16i16 __attribute__((vector_size(32)));
typedef int8_t v16i8 __attribute__((vector_size(16)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

namespace portable {
struct V {
    using F = v8f;
    static constexpr int W = 8;
    static GOOSE_INLINE F zero() { return F{}; }
    static GOOSE_INLINE F set1(float v) { return F{} + v; }
    static GOOSE_INLINE F fma(F a, F b, F c) { return a * b + c; }
    static GOOSE_INLINE F add(F a, F b) { return a + b; }
    static GOOSE_INLINE F load(const float *p) {
        F v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    static GOOSE_INLINE float hsum(F v) {
        return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    }
    static GOOSE_INLINE void f32(const float *p, F *out) {
        for (int i = 0; i < 4; ++i) out[i] = load(p + 8 * i);
    }
    static GOOSE_INLINE void bf16(const uint16_t *p, F *out) {
        for (int i = 0; i < 4; ++i) {
            v8u16 h;
            std::memcpy(&h, p + 8 * i, sizeof h);
            const v8u32 wide = __builtin_convertvector(h, v8u32) << 16;
            std::memcpy(&out[i], &wide, sizeof(F));
        }
    }
    // 16-bit steps: GCC turns a char -> float conversion of generic vectors into scalar code
    static GOOSE_INLINE void halves(v16i16 lo, v16i16 hi, F *out) {
        out[0] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(lo, lo, 0, 1, 2, 3, 4, 5, 6, 7), v8i32), v8f);
        out[1] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(lo, lo, 8, 9, 10, 11, 12, 13, 14, 15), v8i32), v8f);
        out[2] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(hi, hi, 0, 1, 2, 3, 4, 5, 6, 7), v8i32), v8f);
        out[3] = __builtin_convertvector(__builtin_convertvector(__builtin_shufflevector(hi, hi, 8, 9, 10, 11, 12, 13, 14, 15), v8i32), v8f);
    }
    static GOOSE_INLINE void i8(const int8_t *p, F *out) {
        v16i8 a, b;
        std::memcpy(&a, p, sizeof a);
        std::memcpy(&b, p + 16, sizeof b);
        halves(__builtin_convertvector(a, v16i16), __builtin_convertvector(b, v16i16), out);
    }
    static GOOSE_INLINE void i4(const uint8_t *p, F *out) {
        v16u8 c;
        std::memcpy(&c, p, sizeof c);
        halves(__builtin_convertvector(c & 15, v16i16), __builtin_convertvector(c >> 4, v16i16), out);
    }
};

#include "products_kernel.h"

void rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups, void *y,
          bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    rows_any<V>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e);
}
}  // namespace portable

#if defined(GOOSE_X86_CLONES)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
struct V {
    using F = __m256;
    static constexpr int W = 8;
    static GOOSE_INLINE F zero() { return _mm256_setzero_ps(); }
    static GOOSE_INLINE F set1(float v) { return _mm256_set1_ps(v); }
    static GOOSE_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static GOOSE_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
    static GOOSE_INLINE F load(const float *p) { return _mm256_loadu_ps(p); }
    static GOOSE_INLINE float hsum(F v) {
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    }
    static GOOSE_INLINE void f32(const float *p, F *out) {
        for (int i = 0; i < 4; ++i) out[i] = _mm256_loadu_ps(p + 8 * i);
    }
    static GOOSE_INLINE void bf16(const uint16_t *p, F *out) {
        for (int i = 0; i < 4; ++i) {
            const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p + 8 * i));
            out[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
    }
    static GOOSE_INLINE void i8(const int8_t *p, F *out) {
        for (int i = 0; i < 4; ++i) {
            const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p + 8 * i));
            out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
        }
    }
    static GOOSE_INLINE void i4(const uint8_t *p, F *out) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
        const __m128i nib = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(c, nib), hi = _mm_and_si128(_mm_srli_epi16(c, 4), nib);
        out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
};

#include "products_kernel.h"

void rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups, void *y,
          bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    rows_any<V>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e);
}
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
struct V {
    using F = __m512;
    static constexpr int W = 16;
    static GOOSE_INLINE F zero() { return _mm512_setzero_ps(); }
    static GOOSE_INLINE F set1(float v) { return _mm512_set1_ps(v); }
    static GOOSE_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static GOOSE_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
    static GOOSE_INLINE F load(const float *p) { return _mm512_loadu_ps(p); }
    static GOOSE_INLINE float hsum(F v) { return _mm512_reduce_add_ps(v); }
    static GOOSE_INLINE void f32(const float *p, F *out) {
        out[0] = _mm512_loadu_ps(p);
        out[1] = _mm512_loadu_ps(p + 16);
    }
    static GOOSE_INLINE void bf16(const uint16_t *p, F *out) {
        for (int i = 0; i < 2; ++i) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 16 * i));
            out[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
    }
    static GOOSE_INLINE void i8(const int8_t *p, F *out) {
        for (int i = 0; i < 2; ++i)
            out[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p + 16 * i))));
    }
    static GOOSE_INLINE void i4(const uint8_t *p, F *out) {
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
        out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
    }
};
#include "products_kernel.h"

void rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups, void *y,
          bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    rows_any<V>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e);
}
}  // namespace avx512
#pragma GCC pop_options

enum Isa { kPortable, kAvx2, kAvx512 };

Isa isa() {
    static const Isa which = [] {
        if (const char *forced = std::getenv("GOOSE_KERNEL_ISA")) {      // tests run every build on one machine
            if (std::strcmp(forced, "portable") == 0) return kPortable;
            if (std::strcmp(forced, "avx2") == 0 && __builtin_cpu_supports("avx2")) return kAvx2;
        }
        if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
        return kPortable;
    }();
    return which;
}
#endif

}  // namespace

namespace goose {

void product_rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
                  int64_t n0, int64_t n1, Epilogue epilogue) {
    if (n1 <= n0 || M <= 0) return;
    if (w.kind == kWeightI8 && w.G % 32 != 0 && w.G < w.K) {
        for (int64_t m = 0; m < M; ++m)
            portable::rows_any_group<1>(w, x + m * ldx, ldx, static_cast<char *>(y) + m * ldy * (y_bf16 ? 2 : 4),
                                        y_bf16, ldy, n0, n1, epilogue);
        return;
    }
    // int4: the sums of x over each group, for the offsets (zero - 8 * scale)
    const int64_t groups = w.kind == kWeightI4 ? (w.K + w.G - 1) / w.G : 0;
    float stack[1024];
    float *xsum = nullptr;
    if (groups) {
        xsum = M * groups <= 1024 ? stack : static_cast<float *>(std::malloc(sizeof(float) * M * groups));
        if (xsum == nullptr) std::abort();
        for (int64_t m = 0; m < M; ++m)
            for (int64_t g = 0; g < groups; ++g) {
                float s = 0.f;
                for (int64_t j = g * w.G; j < std::min(w.K, (g + 1) * w.G); ++j) s += x[m * ldx + j];
                xsum[m * groups + g] = s;
            }
    }
#if defined(GOOSE_X86_CLONES)
    switch (isa()) {
        case kAvx512: avx512::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
        case kAvx2: avx2::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
        default: portable::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
    }
#else
    portable::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue);
#endif
    if (xsum != stack) std::free(xsum);
}

void product_team(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
                  Epilogue epilogue) {
#if defined(_OPENMP)
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t threads = 1, t = 0;
#endif
    // contiguous, equal shares of rows (rounded to 8 rows): each thread streams its own part of the matrix
    const int64_t per = (w.N + threads - 1) / threads;
    const int64_t share = (per + 7) / 8 * 8;
    const int64_t n0 = std::min(w.N, t * share), n1 = std::min(w.N, n0 + share);
    product_rows(w, M, x, ldx, y, y_bf16, ldy, n0, n1, epilogue);
}

}  // namespace goose
