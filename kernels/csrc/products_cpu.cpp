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
    static GOOSE_INLINE void store(float *p, F v) { std::memcpy(p, &v, sizeof v); }
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
    static GOOSE_INLINE void store(float *p, F v) { _mm256_storeu_ps(p, v); }
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
    static GOOSE_INLINE void store(float *p, F v) { _mm512_storeu_ps(p, v); }
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
}  // namespace avx512
#pragma GCC pop_options

// int4 weights on AVX-512 with VNNI: the float widening above costs ~9 instructions per 32 weights (a zero
// extension to 32-bit lanes, a mask, a shift, two conversions, two FMAs), which kept int4 products at ~13 GB/s a
// core, below int8's ~31, where they should be the faster of the two. Here x is quantized once per call to int16
// (one scale per row: |error| <= max|x| / 65534, below bf16's rounding for all but the smallest values, and far
// below the 4-bit weights' own error), and 64 weights are multiplied by 16-bit integer dot products
// (vpdpwssd: 32 products per instruction): a zero-extending load, a mask, a shift and two dot products per 64
// weights; int32 sums are exact and scaled in float once per group. Groups of 32 (GGUF Q4_0) or of a
// multiple of 64; the offsets (zero - 8 * scale) come from the float sums of x, as in the float kernel.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512vnni")
namespace avx512vnni {

// The scale that rounds n values of x to int16 (max |x| / 32767; inv: its inverse, to multiply by). NaN when x
// holds a NaN or an inf, so that the row's sums come out NaN, as the float kernels' do.
float int16_scale(const float *x, int64_t n, float &inv) {
    float mx = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < n; ++k) {
        mx = std::max(mx, std::fabs(x[k]));
        finite = finite && std::isfinite(x[k]);
    }
    const float s = mx > 0.f && finite ? mx / 32767.f : 1.f;
    inv = 1.f / s;
    return finite ? s : NAN;
}

// x's rows as int16 in the weights' order within each 64 columns: 32 words for the low nibbles of the 32 bytes
// (columns 0-15 and 32-47), then 32 for the high ones (16-31, 48-63); scale[m] = max |x[m]| / 32767.
void quantize_x(const float *x, int64_t ldx, int64_t M, int64_t chunks, int16_t *q, float *scale) {
    for (int64_t m = 0; m < M; ++m) {
        const float *xm = x + m * ldx;
        float inv;
        scale[m] = int16_scale(xm, chunks * 64, inv);
        int16_t *qm = q + m * chunks * 64;
        for (int64_t c = 0; c < chunks; ++c)
            for (int i = 0; i < 64; ++i) {
                const int64_t col = 64 * c + (i < 32 ? (i < 16 ? i : i + 16) : (i < 48 ? i - 16 : i));
                qm[64 * c + i] = static_cast<int16_t>(std::lrintf(xm[col] * inv));
            }
    }
}

constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kVnniInt8Rows = 4;     // int8 (one scale a row) takes the 16-bit dot products above this many rows

// 16 scales (or zeros) of a row from group `at` on, as floats; lanes past `mask` are zero.
inline __m512 load16(const void *p, int dtype, int64_t at, __mmask16 mask) {
    if (dtype == goose::kScaleF32) return _mm512_maskz_loadu_ps(mask, static_cast<const float *>(p) + at);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t *>(p) + at);
    if (dtype == goose::kScaleF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// PG: 0 for groups of 32, 1 for groups of 64, 2 for other multiples of 64
template <int M, int PG>
void rows_i4(const MatRef &w, const float *x, int64_t ldx, const float *xsum, int64_t groups, const int16_t *xq,
             const float *xscale, int64_t chunks, void *y, bool y_bf16, int64_t ldy, int64_t n0, int64_t n1,
             goose::Epilogue epilogue) {
    const __m512i nib = _mm512_set1_epi16(15);
    const int64_t per_group = w.G / 64;                 // chunks a group (0 for groups of 32)
    const bool odd = (w.K + 31) / 32 > 2 * chunks;      // a last block of 32 columns alone (float, below)
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    // The scales and zeros are two more streams beside the codes, a few bytes a row: fetched kPrefetchRows rows
    // ahead, or each row waits on memory for them (measured: 15 -> 21 GB/s on one core, weights beyond L3).
    const int64_t scale_bytes = w.scale_stride * (w.scale_dtype == goose::kScaleF32 ? 4 : 2);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = static_cast<const uint8_t *>(w.data) + n * w.row_bytes;
        const int64_t sb = n * w.scale_stride;
        if (n + kPrefetchRows < n1) {
            _mm_prefetch(static_cast<const char *>(w.scales) + (n + kPrefetchRows) * scale_bytes, _MM_HINT_T0);
            if (w.zeros) _mm_prefetch(static_cast<const char *>(w.zeros) + (n + kPrefetchRows) * scale_bytes, _MM_HINT_T0);
        }
        __m512 acc0[M], acc1[M], off[M];
        for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = off[m] = _mm512_setzero_ps();
        auto dots = [&](int64_t c, __m512i (&sum)[M]) __attribute__((always_inline)) {
            // 32 bytes to 32 words, then the nibbles: the low ones masked, the high ones shifted down (a byte in a
            // word is < 256, so no mask is needed)
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 32 * c)));
            const __m512i lo = _mm512_and_si512(v, nib);
            const __m512i hi = _mm512_srli_epi16(v, 4);
            for (int m = 0; m < M; ++m) {
                const int16_t *q = xq + (m * chunks + c) * 64;
                sum[m] = _mm512_dpwssd_epi32(sum[m], lo, _mm512_loadu_si512(q));
                sum[m] = _mm512_dpwssd_epi32(sum[m], hi, _mm512_loadu_si512(q + 32));
            }
        };
        // the chunks [c0, c1) summed in int32, then scaled by the lanes' scales into `into`
        auto span = [&](int64_t c0, int64_t c1, __m512 sv, __m512 (&into)[M]) __attribute__((always_inline)) {
            __m512i sum[M];
            for (int m = 0; m < M; ++m) sum[m] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; ++c) dots(c, sum);
            for (int m = 0; m < M; ++m) into[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m]), sv, into[m]);
        };
        // 16 groups at a time: their scales and zeros in two registers, each group's scale broadcast from there;
        // the offsets (zero - 8 scale) times the sums of x as vectors. Two accumulators taken in turn, indexed by
        // constants (a runtime index sends them to the stack).
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {
            const int64_t ng = std::min<int64_t>(16, groups - g0);
            const __mmask16 mask = static_cast<__mmask16>(ng == 16 ? 0xFFFF : (1u << ng) - 1);
            const __m512 sv = load16(w.scales, w.scale_dtype, sb + g0, mask);
            const __m512 zv = w.zeros ? load16(w.zeros, w.scale_dtype, sb + g0, mask) : _mm512_setzero_ps();
            const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv);
            for (int m = 0; m < M; ++m)
                off[m] = _mm512_fmadd_ps(shift, _mm512_maskz_loadu_ps(mask, xsum + m * groups + g0), off[m]);
            if (PG == 0) {                              // groups of 32: lanes 0-7 are group 2c, 8-15 group 2c + 1
                const int64_t c0 = g0 / 2, c1 = std::min(chunks, (g0 + ng) / 2);
                int64_t c = c0;
                for (; c + 2 <= c1; c += 2) {
                    span(c, c + 1, _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * (c - c0))), sv), acc0);
                    span(c + 1, c + 2, _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * (c + 1 - c0))), sv), acc1);
                }
                if (c < c1) span(c, c + 1, _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * (c - c0))), sv), acc0);
            } else if (PG == 1) {                       // groups of 64: one chunk a group, two groups at a time
                const int64_t c1 = std::min(chunks, g0 + ng);
                int64_t c = g0;
                for (; c + 2 <= c1; c += 2) {
                    __m512i s0[M], s1[M];
                    for (int m = 0; m < M; ++m) s0[m] = s1[m] = _mm512_setzero_si512();
                    dots(c, s0);
                    dots(c + 1, s1);
                    const __m512 f0 = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(c - g0)), sv);
                    const __m512 f1 = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(c + 1 - g0)), sv);
                    for (int m = 0; m < M; ++m) {
                        acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[m]), f0, acc0[m]);
                        acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[m]), f1, acc1[m]);
                    }
                }
                if (c < c1) span(c, c + 1, _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(c - g0)), sv), acc0);
            } else {
                auto group = [&](int64_t gi, __m512 (&into)[M]) __attribute__((always_inline)) {
                    const int64_t g = g0 + gi;
                    span(g * per_group, std::min(chunks, (g + 1) * per_group),
                         _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(gi)), sv), into);
                };
                int64_t gi = 0;
                for (; gi + 2 <= ng; gi += 2) {
                    group(gi, acc0);
                    group(gi + 1, acc1);
                }
                if (gi < ng) group(gi, acc0);
            }
        }
        for (int m = 0; m < M; ++m) {
            const __m512 all = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), _mm512_set1_ps(xscale[m]), off[m]);
            float t = _mm512_reduce_add_ps(all);
            if (odd) {                                  // the last 32 columns, in float
                const int64_t j0 = 64 * chunks;
                const uint8_t *b = row + j0 / 2;
                float part = 0.f;
                for (int i = 0; i < 16; ++i)
                    part += static_cast<float>(b[i] & 15) * x[m * ldx + j0 + i]
                            + static_cast<float>(b[i] >> 4) * x[m * ldx + j0 + 16 + i];
                t += part * goose::scale_value(w.scales, w.scale_dtype, sb + j0 / w.G);
            }
            const float v = avx512::finish(t, epilogue);
            if (y_bf16)
                static_cast<uint16_t *>(y)[m * ldy + n] = goose::to_bf16(v);
            else
                static_cast<float *>(y)[m * ldy + n] = v;
        }
    }
}

template <int M>
void by_group(const MatRef &w, const float *x, int64_t ldx, const float *xsum, int64_t groups, const int16_t *xq,
              const float *xscale, int64_t chunks, void *y, bool y_bf16, int64_t ldy, int64_t n0, int64_t n1,
              goose::Epilogue e) {
    if (w.G == 32)
        rows_i4<M, 0>(w, x, ldx, xsum, groups, xq, xscale, chunks, y, y_bf16, ldy, n0, n1, e);
    else if (w.G == 64)
        rows_i4<M, 1>(w, x, ldx, xsum, groups, xq, xscale, chunks, y, y_bf16, ldy, n0, n1, e);
    else
        rows_i4<M, 2>(w, x, ldx, xsum, groups, xq, xscale, chunks, y, y_bf16, ldy, n0, n1, e);
}

void rows_int4(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups, void *y,
               bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    const int64_t chunks = (w.K + 31) / 32 / 2;
    int16_t stack_q[4 * 4096];
    float xscale[4];
    const int64_t elem = y_bf16 ? 2 : 4;
    int16_t *q = 4 * chunks * 64 <= 4 * 4096 ? stack_q
                                             : static_cast<int16_t *>(std::malloc(sizeof(int16_t) * 4 * chunks * 64));
    if (q == nullptr) std::abort();
    for (int64_t m = 0; m < M; m += 4) {
        const int64_t mt = std::min<int64_t>(4, M - m);
        const float *xm = x + m * ldx, *sm = xsum + m * groups;
        void *ym = static_cast<char *>(y) + m * ldy * elem;
        quantize_x(xm, ldx, mt, chunks, q, xscale);
        switch (mt) {
            case 1: by_group<1>(w, xm, ldx, sm, groups, q, xscale, chunks, ym, y_bf16, ldy, n0, n1, e); break;
            case 2: by_group<2>(w, xm, ldx, sm, groups, q, xscale, chunks, ym, y_bf16, ldy, n0, n1, e); break;
            case 3: by_group<3>(w, xm, ldx, sm, groups, q, xscale, chunks, ym, y_bf16, ldy, n0, n1, e); break;
            default: by_group<4>(w, xm, ldx, sm, groups, q, xscale, chunks, ym, y_bf16, ldy, n0, n1, e); break;
        }
    }
    if (q != stack_q) std::free(q);
}


// int8 weights with one scale a row, for many rows of x (batched decode): x rounded to int16 as for int4, 32
// weights sign-extended to 16 bits once and multiplied with up to 8 rows of x by vpdpwssd (32 products an
// instruction), int32 sums moved to float every 4096 columns (before they could overflow). Blocks of 16 weight rows
// stay in L1 while every row of x passes over them. For few rows the float kernel is as fast (the weights' reading
// bounds it) and exact, so this serves more than kVnniInt8Rows rows only.
constexpr int64_t kFlushColumns = 4096;

template <int MB>
void rows_i8(const MatRef &w, const float *x, int64_t ldx, const int16_t *xq, int64_t Kq, const float *xscale,
             void *y, bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue epilogue) {
    const int64_t K = w.K;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t *row = static_cast<const int8_t *>(w.data) + n * w.row_bytes;
        __m512 facc[MB];
        for (int m = 0; m < MB; ++m) facc[m] = _mm512_setzero_ps();
        for (int64_t k0 = 0; k0 < Kq; k0 += kFlushColumns) {
            __m512i acc[MB];
            for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_si512();
            const int64_t k1 = std::min(Kq, k0 + kFlushColumns);
            for (int64_t k = k0; k < k1; k += 32) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + k)));
                for (int m = 0; m < MB; ++m)
                    acc[m] = _mm512_dpwssd_epi32(acc[m], wv, _mm512_loadu_si512(xq + m * Kq + k));
            }
            for (int m = 0; m < MB; ++m) facc[m] = _mm512_add_ps(facc[m], _mm512_cvtepi32_ps(acc[m]));
        }
        const float s = goose::scale_value(w.scales, w.scale_dtype, n * w.scale_stride);
        for (int m = 0; m < MB; ++m) {
            float t = _mm512_reduce_add_ps(facc[m]) * xscale[m];
            for (int64_t k = Kq; k < K; ++k) t += static_cast<float>(row[k]) * x[m * ldx + k];
            const float v = avx512::finish(t * s, epilogue);
            if (y_bf16)
                static_cast<uint16_t *>(y)[m * ldy + n] = goose::to_bf16(v);
            else
                static_cast<float *>(y)[m * ldy + n] = v;
        }
    }
}

void rows_int8(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
               int64_t n0, int64_t n1, goose::Epilogue e) {
    constexpr int64_t kGroup = 8, kBlock = 16;
    const int64_t Kq = w.K / 32 * 32, elem = y_bf16 ? 2 : 4;
    int16_t *q = static_cast<int16_t *>(std::malloc(sizeof(int16_t) * M * std::max<int64_t>(Kq, 1)));
    float *xscale = static_cast<float *>(std::malloc(sizeof(float) * M));
    if (q == nullptr || xscale == nullptr) std::abort();
    for (int64_t m = 0; m < M; ++m) {                   // x as int16 in column order, one scale a row
        const float *xm = x + m * ldx;
        float inv;
        xscale[m] = int16_scale(xm, Kq, inv);
        for (int64_t k = 0; k < Kq; ++k) q[m * Kq + k] = static_cast<int16_t>(std::lrintf(xm[k] * inv));
    }
    for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
        const int64_t b1 = std::min(n1, b0 + kBlock);
        for (int64_t m = 0; m < M; m += kGroup) {
            const float *xm = x + m * ldx;
            const int16_t *qm = q + m * Kq;
            void *ym = static_cast<char *>(y) + m * ldy * elem;
            switch (std::min(kGroup, M - m)) {
                case 1: rows_i8<1>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 2: rows_i8<2>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 3: rows_i8<3>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 4: rows_i8<4>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 5: rows_i8<5>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 6: rows_i8<6>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                case 7: rows_i8<7>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
                default: rows_i8<8>(w, xm, ldx, qm, Kq, xscale + m, ym, y_bf16, ldy, b0, b1, e); break;
            }
        }
    }
    std::free(q);
    std::free(xscale);
}

}  // namespace avx512vnni
#pragma GCC pop_options

// oneDNN's packed float layouts (products.h): output rows in blocks of G, so one block is G sums at once, each
// vector of weights multiplied with a broadcast x[k]: no horizontal sums, one contiguous stream per block.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512blocked {

template <int M, int NV, bool PAIRS>
void blocks(const MatRef &w, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy, int64_t b0, int64_t b1,
            int64_t n0, int64_t n1, goose::Epilogue epilogue) {
    const int64_t K = w.K, G = w.G;
    for (int64_t b = b0; b < b1; ++b) {
        const char *blk = static_cast<const char *>(w.data) + b * w.row_bytes;
        __m512 acc[M][NV];
        for (int m = 0; m < M; ++m)
            for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
        if (!PAIRS) {
            const float *p = reinterpret_cast<const float *>(blk);
            for (int64_t k = 0; k < K; ++k, p += G)
                for (int m = 0; m < M; ++m) {
                    const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
                    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * v), xv, acc[m][v]);
                }
        } else {            // 16 rows x 2 columns a vector: even lanes hold column 2 kp, odd lanes 2 kp + 1
            const uint16_t *p = reinterpret_cast<const uint16_t *>(blk);
            const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
            for (int64_t kp = 0; kp < (K + 1) / 2; ++kp, p += 2 * G) {
                __m512 even[NV], odd[NV];
                for (int v = 0; v < NV; ++v) {
                    const __m512i raw = _mm512_loadu_si512(p + 32 * v);
                    even[v] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
                    odd[v] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
                }
                for (int m = 0; m < M; ++m) {
                    const __m512 x0 = _mm512_set1_ps(x[m * ldx + 2 * kp]);
                    const __m512 x1 = _mm512_set1_ps(2 * kp + 1 < K ? x[m * ldx + 2 * kp + 1] : 0.f);
                    for (int v = 0; v < NV; ++v)
                        acc[m][v] = _mm512_fmadd_ps(odd[v], x1, _mm512_fmadd_ps(even[v], x0, acc[m][v]));
                }
            }
        }
        alignas(64) float out[M][16 * NV];
        for (int m = 0; m < M; ++m)
            for (int v = 0; v < NV; ++v) _mm512_store_ps(out[m] + 16 * v, acc[m][v]);
        const int64_t lo = std::max(n0, b * G), hi = std::min(n1, (b + 1) * G);
        for (int m = 0; m < M; ++m)
            for (int64_t n = lo; n < hi; ++n) {
                const float v = avx512::finish(out[m][n - b * G], epilogue);
                if (y_bf16)
                    static_cast<uint16_t *>(y)[m * ldy + n] = goose::to_bf16(v);
                else
                    static_cast<float *>(y)[m * ldy + n] = v;
            }
    }
}

template <int NV, bool PAIRS>
void blocks_m(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
              int64_t n0, int64_t n1, goose::Epilogue e) {
    const int64_t b0 = n0 / w.G, b1 = (n1 + w.G - 1) / w.G, elem = y_bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m += 4) {
        const float *xm = x + m * ldx;
        void *ym = static_cast<char *>(y) + m * ldy * elem;
        switch (std::min<int64_t>(4, M - m)) {
            case 1: blocks<1, NV, PAIRS>(w, xm, ldx, ym, y_bf16, ldy, b0, b1, n0, n1, e); break;
            case 2: blocks<2, NV, PAIRS>(w, xm, ldx, ym, y_bf16, ldy, b0, b1, n0, n1, e); break;
            case 3: blocks<3, NV, PAIRS>(w, xm, ldx, ym, y_bf16, ldy, b0, b1, n0, n1, e); break;
            default: blocks<4, NV, PAIRS>(w, xm, ldx, ym, y_bf16, ldy, b0, b1, n0, n1, e); break;
        }
    }
}

// G = 16, 32, 48 or 64 rows a block (products.h)
void rows_blocked(const MatRef &w, int64_t M, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy,
                  int64_t n0, int64_t n1, goose::Epilogue e) {
    const bool pairs = w.kind == goose::kWeightBF16Pairs;
    switch (w.G / 16) {
        case 1: pairs ? blocks_m<1, true>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e) : blocks_m<1, false>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e); break;
        case 2: pairs ? blocks_m<2, true>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e) : blocks_m<2, false>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e); break;
        case 3: pairs ? blocks_m<3, true>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e) : blocks_m<3, false>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e); break;
        default: pairs ? blocks_m<4, true>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e) : blocks_m<4, false>(w, M, x, ldx, y, y_bf16, ldy, n0, n1, e); break;
    }
}

}  // namespace avx512blocked
#pragma GCC pop_options

enum Isa { kPortable, kAvx2, kAvx512, kAvx512Vnni };

Isa isa() {
    static const Isa which = [] {
        if (const char *forced = std::getenv("GOOSE_KERNEL_ISA")) {      // tests run every build on one machine
            if (std::strcmp(forced, "portable") == 0) return kPortable;
            if (std::strcmp(forced, "avx2") == 0 && __builtin_cpu_supports("avx2")) return kAvx2;
            if (std::strcmp(forced, "avx512") == 0 && __builtin_cpu_supports("x86-64-v4")) return kAvx512;
        }
        if (__builtin_cpu_supports("x86-64-v4"))
            return __builtin_cpu_supports("avx512vnni") ? kAvx512Vnni : kAvx512;
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
    if (w.kind == kWeightF32Blocked || w.kind == kWeightBF16Pairs) {
#if defined(GOOSE_X86_CLONES)
        if (isa() >= kAvx512 && w.G % 16 == 0 && w.G >= 16 && w.G <= 64) {
            avx512blocked::rows_blocked(w, M, x, ldx, y, y_bf16, ldy, n0, n1, epilogue);
            return;
        }
#endif
        std::abort();           // kernels/native_step.py only describes these layouts where this kernel runs
    }
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
        case kAvx512Vnni:
            if (w.kind == kWeightI8 && w.G >= w.K && M > avx512vnni::kVnniInt8Rows) {
                avx512vnni::rows_int8(w, M, x, ldx, y, y_bf16, ldy, n0, n1, epilogue);
                break;
            }
            if (w.kind == kWeightI4 && (w.G == 32 || w.G % 64 == 0) && w.G <= 4096) {   // a group's int32 sums fit
                avx512vnni::rows_int4(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue);
                break;
            }
            avx512::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue);
            break;
        case kAvx512: avx512::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
        case kAvx2: avx2::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
        default: portable::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue); break;
    }
#else
    portable::rows(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, epilogue);
#endif
    if (xsum != stack) std::free(xsum);
}

void dequantize_rows(const MatRef &w, int64_t n0, int64_t n1, void *out, bool out_bf16, int64_t ld) {
    float stack[4096];
    float *buf = w.K + 32 <= 4096 ? stack : static_cast<float *>(std::malloc(sizeof(float) * (w.K + 32)));
    if (buf == nullptr) std::abort();
#if defined(GOOSE_X86_CLONES)
    switch (isa()) {
        case kAvx512Vnni:
        case kAvx512: avx512::dequantize(w, n0, n1, out, out_bf16, ld, buf); break;
        case kAvx2: avx2::dequantize(w, n0, n1, out, out_bf16, ld, buf); break;
        default: portable::dequantize(w, n0, n1, out, out_bf16, ld, buf); break;
    }
#else
    portable::dequantize(w, n0, n1, out, out_bf16, ld, buf);
#endif
    if (buf != stack) std::free(buf);
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
    const int64_t unit = (w.kind == kWeightF32Blocked || w.kind == kWeightBF16Pairs) ? w.G : 8;
    const int64_t share = (per + unit - 1) / unit * unit;
    const int64_t n0 = std::min(w.N, t * share), n1 = std::min(w.N, n0 + share);
    product_rows(w, M, x, ldx, y, y_bf16, ldy, n0, n1, epilogue);
}

}  // namespace goose

extern "C" {

// 1 where the kernels read oneDNN's packed layouts (products.h: AVX-512), else 0.
int goose_packed_layouts_readable() {
#if defined(GOOSE_X86_CLONES)
    return isa() >= kAvx512 ? 1 : 0;
#else
    return 0;
#endif
}

}  // extern "C"
