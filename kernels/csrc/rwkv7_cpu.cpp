// Native CPU kernels for RWKV-7's time mix, built and loaded by kernels/native_build.py, called through
// kernels/native.py.
//
// The WKV-7 step in torch ops reads and writes each [N, N] state several times (one batched matmul for S a
// and S (e^w * r), a scaling pass, two rank-1 updates) and every small elementwise op of the time mix is a
// separate pass with its own thread fork/join. Here each (sequence, head) pair is one task that keeps its
// 16 KB state in L1: one read and one write of the state, with the time mix's per-head work (decay, in-context
// learning rate, key normalisation, value residual, group norm, bonus and gate) done on the same 64 values.
// For a prompt the same task walks its head through all T tokens with the state still in L1, transposed once so
// the per-token products need no horizontal sums: the recurrence token by token, exactly as written, several
// times faster on CPU than the chunked matmul form (which suits GPUs).
//
// Plain C ABI over raw fp32 pointers (no torch headers, so a build takes about a second); the caller checks
// shapes, dtypes and contiguity. Threads: OpenMP, which resolves to the libgomp torch has already loaded, so
// these loops share torch's thread pool and its thread count (torch.set_num_threads).
//
// Layout: state [P, N, N] with P = sequences x heads, rows = value index i, columns = key index j (the
// BlinkDL layout). Per head, with decay d_j = exp(w_j):
//     sa_i   = sum_j S[i, j] a_j                      (old state)
//     S[i,j] = S[i, j] d_j + v_i k_j + sa_i b_j
//     y_i    = sum_j S[i, j] r_j                      (new state)
//            = sum_j S_old[i, j] d_j r_j + v_i (k . r) + sa_i (b . r)
// so both products read the old row once and the row is updated while it is in registers.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <limits>

#include "goose_common.h"

namespace {

using goose::fast_exp;
using goose::from_bf16;
using goose::sigmoid;
using goose::to_bf16;

constexpr int64_t kMaxHeadSize = 256;
constexpr int64_t kTransposeFrom = 4;      // tokens per call from which the transposed state pays for its copies

// Rows of the time mix come as float32 or bfloat16 (the projections' dtype); a bfloat16 row is widened into
// scratch, a float32 row is used in place.
struct RowsIn {
    const void *base;
    bool bf16;
    const float *at(int64_t offset, int64_t N, float *scratch) const {
        if (base == nullptr) return nullptr;
        if (!bf16) return static_cast<const float *>(base) + offset;
        const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) scratch[j] = from_bf16(src[j]);
        return scratch;
    }
};

// The steps below are written once for a head size known at compile time (K, 64 in every released model: the
// loops over a row unroll and their sums stay in registers) and once for any size (K = 0).

// One head's WKV step; S is updated in place, y receives N outputs.
template <int64_t K>
GOOSE_INLINE void step_rows(int64_t n, const float *r, const float *w, const float *k, const float *v,
                            const float *a, const float *b, float *S, float *y) {
    const int64_t N = K ? K : n;
    float decay[kMaxHeadSize], decay_r[kMaxHeadSize];
    float kr = 0.f, br = 0.f;
#pragma omp simd reduction(+ : kr, br)
    for (int64_t j = 0; j < N; ++j) {
        decay[j] = fast_exp(w[j]);
        decay_r[j] = decay[j] * r[j];
        kr += k[j] * r[j];
        br += b[j] * r[j];
    }
    for (int64_t i = 0; i < N; ++i) {
        float *row = S + i * N;
        float sa = 0.f, yi = 0.f;
#pragma omp simd reduction(+ : sa, yi)
        for (int64_t j = 0; j < N; ++j) {
            sa += row[j] * a[j];
            yi += row[j] * decay_r[j];
        }
        const float vi = v[i];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) row[j] = row[j] * decay[j] + vi * k[j] + sa * b[j];
        y[i] = yi + vi * kr + sa * br;
    }
}

GOOSE_CLONES
void head_step(int64_t N, const float *r, const float *w, const float *k, const float *v, const float *a,
               const float *b, float *S, float *y) {
    if (N == 64)
        step_rows<64>(N, r, w, k, v, a, b, S, y);
    else
        step_rows<0>(N, r, w, k, v, a, b, S, y);
}

// The same step on the transposed state U = S^T (rows = key index j), for prompts: S a and S (e^w * r) become
// sums of scaled rows and the update scales and adds whole rows, all vectorised along i with no horizontal sums
// (the row-major form needs two per row). Two passes over U, which stays in L1.
template <int64_t K>
GOOSE_INLINE void step_columns(int64_t n, const float *r, const float *w, const float *k, const float *v,
                               const float *a, const float *b, float *U, float *y) {
    const int64_t N = K ? K : n;
    float decay[kMaxHeadSize], sa[kMaxHeadSize], yi[kMaxHeadSize];
    float kr = 0.f, br = 0.f;
#pragma omp simd reduction(+ : kr, br)
    for (int64_t j = 0; j < N; ++j) {
        decay[j] = fast_exp(w[j]);
        kr += k[j] * r[j];
        br += b[j] * r[j];
        sa[j] = 0.f;
        yi[j] = 0.f;
    }
    for (int64_t j = 0; j < N; ++j) {
        const float *row = U + j * N;
        const float aj = a[j], drj = decay[j] * r[j];
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) {
            sa[i] += row[i] * aj;
            yi[i] += row[i] * drj;
        }
    }
    for (int64_t j = 0; j < N; ++j) {
        float *row = U + j * N;
        const float dj = decay[j], kj = k[j], bj = b[j];
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) row[i] = row[i] * dj + kj * v[i] + bj * sa[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) y[i] = yi[i] + v[i] * kr + sa[i] * br;
}

GOOSE_CLONES
void head_step_transposed(int64_t N, const float *r, const float *w, const float *k, const float *v,
                          const float *a, const float *b, float *U, float *y) {
    if (N == 64)
        step_columns<64>(N, r, w, k, v, a, b, U, y);
    else
        step_columns<0>(N, r, w, k, v, a, b, U, y);
}

void transpose(int64_t N, const float *src, float *dst) {
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) dst[j * N + i] = src[i * N + j];
}

// One head's state for a walk through T tokens: from kTransposeFrom tokens on (a prompt) the steps run on a
// transposed copy, written back when the walk ends; decode steps the row-major state in place. Without memory
// for the copy the walk stays row-major.
class HeadState {
  public:
    HeadState(int64_t N, float *S, int64_t T)
        : N_(N), S_(S), U_(T >= kTransposeFrom ? static_cast<float *>(std::malloc(sizeof(float) * N * N)) : nullptr) {
        if (U_ != nullptr) transpose(N_, S_, U_);
    }
    ~HeadState() {
        if (U_ != nullptr) {
            transpose(N_, U_, S_);
            std::free(U_);
        }
    }
    HeadState(const HeadState &) = delete;
    HeadState &operator=(const HeadState &) = delete;

    void step(const float *r, const float *w, const float *k, const float *v, const float *a, const float *b,
              float *y) const {
        if (U_ != nullptr)
            head_step_transposed(N_, r, w, k, v, a, b, U_, y);
        else
            head_step(N_, r, w, k, v, a, b, S_, y);
    }

  private:
    int64_t N_;
    float *S_, *U_;
};

struct TimeMixParams {           // per-channel vectors of one layer, each [H * N]
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b;
    float eps, log_decay_scale;
};

// One head, one token of the time mix after the projections (see goose_rwkv7_time_mix for the formulas).
GOOSE_CLONES
void head_time_mix(int64_t N, const float *r, const float *w_lora, const float *k_in, const float *v_in,
                   const float *a_lora, const float *v_lora, const float *v_first, const float *g,
                   const TimeMixParams &p, int64_t c, const HeadState &state, float *out) {
    float w[kMaxHeadSize], k[kMaxHeadSize], v[kMaxHeadSize], a[kMaxHeadSize], b[kMaxHeadSize];
    float y[kMaxHeadSize];
    const float *w0 = p.w0 + c, *a0 = p.a0 + c, *k_k = p.k_k + c, *k_a = p.k_a + c, *r_k = p.r_k + c;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) w[j] = p.log_decay_scale * sigmoid(w0[j] + w_lora[j]);
    float norm2 = 0.f;
#pragma omp simd reduction(+ : norm2)
    for (int64_t j = 0; j < N; ++j) {
        const float kk = k_in[j] * k_k[j];
        a[j] = kk;
        norm2 += kk * kk;
    }
    const float norm = std::sqrt(norm2);
    const float inv_norm = 1.0f / (norm > 1e-12f ? norm : 1e-12f);     // F.normalize's eps
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
        const float alpha = sigmoid(a0[j] + a_lora[j]);
        const float kk = a[j] * inv_norm;
        a[j] = -kk;
        b[j] = kk * alpha;
        k[j] = k_in[j] * (1.0f + (alpha - 1.0f) * k_a[j]);
    }
    if (v_lora != nullptr) {
        const float *v0 = p.v0 + c;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) v[j] = v_in[j] + (v_first[j] - v_in[j]) * sigmoid(v0[j] + v_lora[j]);
    } else {
        for (int64_t j = 0; j < N; ++j) v[j] = v_in[j];
    }
    state.step(r, w, k, v, a, b, y);
    float mean = 0.f, bonus = 0.f;
#pragma omp simd reduction(+ : mean, bonus)
    for (int64_t j = 0; j < N; ++j) {
        mean += y[j];
        bonus += r[j] * k[j] * r_k[j];
    }
    mean /= static_cast<float>(N);
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < N; ++j) {
        const float d = y[j] - mean;
        var += d * d;
    }
    const float rstd = 1.0f / std::sqrt(var / static_cast<float>(N) + p.eps);
    const float *ln_w = p.ln_w + c, *ln_b = p.ln_b + c;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) out[j] = ((y[j] - mean) * rstd * ln_w[j] + ln_b[j] + bonus * v[j]) * g[j];
}

// Inverse-CDF draw from softmax(x * it) over one row (see goose_sample_rows); sums is scratch for nb floats.
GOOSE_CLONES
int64_t sample_row(int64_t V, const float *x, float it, float u, float *sums) {
    constexpr int64_t kBlock = 256;
    const int64_t nb = (V + kBlock - 1) / kBlock;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < V; ++j) mx = x[j] > mx ? x[j] : mx;
    if (!std::isfinite(mx)) return -1;                      // no finite logit
    double total = 0.0;
    for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t lo = blk * kBlock, hi = lo + kBlock < V ? lo + kBlock : V;
        float sb = 0.f;
#pragma omp simd reduction(+ : sb)
        for (int64_t j = lo; j < hi; ++j) sb += x[j] == -INFINITY ? 0.f : fast_exp((x[j] - mx) * it);
        sums[blk] = sb;
        total += sb;
    }
    if (!(total > 0.0) || !std::isfinite(total)) return -1;   // a NaN logit, or an overflowing temperature
    const double target = static_cast<double>(u) * total;
    double before = 0.0;
    int64_t blk = 0;
    while (blk < nb - 1 && before + sums[blk] <= target) before += sums[blk++];
    while (blk > 0 && sums[blk] <= 0.f) before -= sums[--blk];     // rounding walked into an empty tail
    const int64_t lo = blk * kBlock, hi = lo + kBlock < V ? lo + kBlock : V;
    int64_t last = -1;
    double cum = before;
    for (int64_t j = lo; j < hi; ++j) {
        const float e = x[j] == -INFINITY ? 0.f : fast_exp((x[j] - mx) * it);
        if (e <= 0.f) continue;
        last = j;
        cum += e;
        if (cum > target) return j;
    }
    return last;                                            // rounding between the two levels: the block's last
}

}  // namespace

namespace goose {

// One head of one token of the time mix (goose_rwkv7_time_mix with B = T = 1, on the head's slices): for the
// single-token step of decode_cpu.cpp, which calls it from its own threads. c: the head's first channel (the
// vectors are indexed from it); S: the head's [N, N] state, advanced in place; out: N values.
void time_mix_head(int64_t N, int64_t c, const float *r, const float *w_lora, const float *k, const float *v,
                   const float *a_lora, const float *v_lora, const float *v_first, const float *g, const float *w0,
                   const float *a0, const float *v0, const float *k_k, const float *k_a, const float *r_k,
                   const float *ln_w, const float *ln_b, float eps, float log_decay_scale, float *S, float *out) {
    const TimeMixParams params{w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps, log_decay_scale};
    const HeadState head(N, S, 1);
    head_time_mix(N, r, w_lora, k, v, a_lora, v_lora, v_first, g, params, c, head, out);
}

}  // namespace goose

extern "C" {

// Bumped whenever a signature below changes; kernels/native_build.py refuses a library reporting another number.
int goose_abi_version() { return 8; }

int64_t goose_max_head_size() { return kMaxHeadSize; }

// The WKV-7 recurrence over T tokens: r, w (log decay), k, v, a, b, y are [B, T, H, N]; state [B, H, N, N] is
// advanced in place through all T tokens.
void goose_wkv7_seq(int64_t B, int64_t T, int64_t H, int64_t N, const float *r, const float *w, const float *k,
                    const float *v, const float *a, const float *b, float *state, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < B * H; ++p) {
        const int64_t bi = p / H, h = p % H;
        const HeadState head(N, state + p * N * N, T);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t o = ((bi * T + t) * H + h) * N;
            head.step(r + o, w + o, k + o, v + o, a + o, b + o, y + o);
        }
    }
}

// T tokens of an RWKV-7 time mix, from the projections to the input of the output projection.
// Rows [B, T, H * N]: r, k, v (projections), w_lora (w1/w2 LoRA output), a_lora (a1/a2 output), v_lora (v1/v2
// output, or null at the first layer, which has no value residual), v_first (layer 0's v; null with v_lora),
// g (gate). state [B, H, N, N] advanced in place through the T tokens; out [B, T, H * N]. Per channel:
//     w = log_decay_scale * sigmoid(w0 + w_lora)         alpha = sigmoid(a0 + a_lora)
//     kk = normalize_per_head(k * k_k)                   k' = k * (1 + (alpha - 1) * k_a)
//     v' = v + (v_first - v) * sigmoid(v0 + v_lora)     (layers > 0)
//     y = WKV(r, w, k', v', a = -kk, b = kk * alpha)
//     out = (group_norm_per_head(y) * ln_w + ln_b + sum_head(r * k' * r_k) * v') * g
// rows_bf16: the eight row inputs are bfloat16 (else float32); out_bf16: out is written as bfloat16 (rounded
// to nearest even, else float32). Vectors and state are always float32.
void goose_rwkv7_time_mix(int64_t B, int64_t T, int64_t H, int64_t N, int rows_bf16, int out_bf16,
                          const void *r, const void *w_lora, const void *k, const void *v, const void *a_lora,
                          const void *v_lora, const void *v_first, const void *g, const float *w0, const float *a0,
                          const float *v0, const float *k_k, const float *k_a, const float *r_k, const float *ln_w,
                          const float *ln_b, float eps, float log_decay_scale, float *state, void *out) {
    const TimeMixParams params{w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps, log_decay_scale};
    const int64_t C = H * N;
    const bool in16 = rows_bf16 != 0;
    const RowsIn rows[8] = {{r, in16}, {w_lora, in16}, {k, in16}, {v, in16}, {a_lora, in16}, {v_lora, in16},
                            {v_first, in16}, {g, in16}};
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < B * H; ++p) {
        const int64_t c = (p % H) * N;
        float scratch[9][kMaxHeadSize];
        const HeadState head(N, state + p * N * N, T);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t o = ((p / H) * T + t) * C + c;
            const float *in[8];
            for (int i = 0; i < 8; ++i) in[i] = rows[i].at(o, N, scratch[i]);
            float *dst = out_bf16 ? scratch[8] : static_cast<float *>(out) + o;
            head_time_mix(N, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], params, c, head, dst);
            if (out_bf16) {
                uint16_t *o16 = static_cast<uint16_t *>(out) + o;
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) o16[j] = to_bf16(dst[j]);
            }
        }
    }
}

// Sampling from softmax(x / temperature) for R rows of V logits (row stride `stride`), one uniform u in [0, 1)
// per row, by inverse CDF: the max, then exp and 256-wide block sums in one pass, then the block and the token
// where the cumulative mass first exceeds u times the total. Each row is read twice and nothing is written but
// the token, where softmax and then block sums in torch read 16 MB three times and write it once for 64 rows
// of 65536. A -inf logit (a banned token) has probability exactly 0; a row with no finite logit gives -1.
void goose_sample_rows(int64_t R, int64_t V, const float *x, int64_t stride, const float *inv_temperature,
                       const float *u, int64_t *out) {
    constexpr int64_t kStackBlocks = 4096;        // vocabularies up to 1M tokens use the stack
    const int64_t nb = (V + 255) / 256;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < R; ++row) {
        float local[kStackBlocks];
        float *sums = nb <= kStackBlocks ? local : static_cast<float *>(std::malloc(sizeof(float) * nb));
        out[row] = sums == nullptr ? -2 : sample_row(V, x + row * stride, inv_temperature[row], u[row], sums);
        if (sums != local) std::free(sums);
    }
}

// Token masks of constrained rows: bit k of word j of mask row m allows token 32 j + k of logits row rows[m];
// every other token of that row (past the mask's width too) becomes -inf. A word of all ones (JSON strings
// allow most tokens) is skipped and a zero word is 32 stores, so a row costs about one pass over its mask.
void goose_apply_token_mask(int64_t M, int64_t V, float *x, int64_t stride, const int64_t *rows,
                            const uint32_t *bits, int64_t words) {
    const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        float *row = x + rows[m] * stride;
        const uint32_t *w = bits + m * words;
        const int64_t full = std::min(words, V / 32);
        for (int64_t j = 0; j < full; ++j) {
            const uint32_t b = w[j];
            float *t = row + 32 * j;
            if (b == 0xFFFFFFFFu) continue;
            if (b == 0) {
                for (int k = 0; k < 32; ++k) t[k] = ninf;
                continue;
            }
            for (int k = 0; k < 32; ++k)
                if (!((b >> k) & 1u)) t[k] = ninf;
        }
        for (int64_t tok = 32 * full; tok < V; ++tok) {
            const int64_t j = tok / 32;
            if (j >= words || !((w[j] >> (tok % 32)) & 1u)) row[tok] = ninf;
        }
    }
}

}  // extern "C"
