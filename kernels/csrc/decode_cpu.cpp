// Native pieces of an RWKV-7 layer between its big matrix products, built with rwkv7_cpu.cpp into one library
// (kernels/native_build.py) and called through kernels/native_decode.py.
//
// Why: a single-token step of a small model spent more time outside the projections than in them. In torch ops a
// layer is ~40 small operator calls (layer norms, token shifts, eight LoRA products with their activations,
// dtype casts, residual adds), each a dispatch and an OpenMP fork/join over a few thousand values. Here:
//   goose_residual_ln_mix   x += dx (the previous block's output), layer norm, token shift and the M mixes,
//                           and the shift state's update: one call before the time mix and one before the FFN.
//   goose_lora_time_mix     the four LoRA chains (decay: tanh, in-context rate, gate: sigmoid, value residual)
//                           on the few-row product kernels, then the fused time mix of rwkv7_cpu.cpp: one
//                           call for everything between the r/k/v projections and the output projection.
// The LoRA chains are computed in float32 whatever the rows' dtype (the factors may be bfloat16), so a bf16
// model's decay and gate see no bf16 rounding between the two factors.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include "goose_common.h"
#include "products.h"

using goose::from_bf16;
using goose::to_bf16;

extern "C" void goose_rwkv7_time_mix(int64_t B, int64_t T, int64_t H, int64_t N, int rows_bf16, int out_bf16,
                                     const void *r, const void *w_lora, const void *k, const void *v,
                                     const void *a_lora, const void *v_lora, const void *v_first, const void *g,
                                     const float *w0, const float *a0, const float *v0, const float *k_k,
                                     const float *k_a, const float *r_k, const float *ln_w, const float *ln_b,
                                     float eps, float log_decay_scale, float *state, void *out);

namespace goose {
void time_mix_head(int64_t N, int64_t c, const float *r, const float *w_lora, const float *k, const float *v,
                   const float *a_lora, const float *v_lora, const float *v_first, const float *g, const float *w0,
                   const float *a0, const float *v0, const float *k_k, const float *k_a, const float *r_k,
                   const float *ln_w, const float *ln_b, float eps, float log_decay_scale, float *S, float *out);
}

namespace {

// Rows of float32 or bfloat16 values, widened to float32 where needed.
GOOSE_INLINE void widen(int64_t n, const void *src, bool bf16, float *dst) {
    if (!bf16) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    const uint16_t *s = static_cast<const uint16_t *>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = from_bf16(s[i]);
}

GOOSE_CLONES
void layer_norm_row(int64_t C, float *x, const void *dx, bool dx_bf16, const float *w, const float *b, float eps,
                    float *out) {
    if (dx != nullptr) {
        if (dx_bf16) {
            const uint16_t *d = static_cast<const uint16_t *>(dx);
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) x[c] += from_bf16(d[c]);
        } else {
            const float *d = static_cast<const float *>(dx);
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) x[c] += d[c];
        }
    }
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < C; ++c) mean += x[c];
    mean /= static_cast<float>(C);
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
    const float rstd = 1.0f / std::sqrt(var / static_cast<float>(C) + eps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * w[c] + b[c];
}

GOOSE_CLONES
void mix_row(int64_t C, int64_t M, const float *h, const float *h_prev, const float *mix, bool out_bf16,
             void *out, int64_t stride) {
    for (int64_t m = 0; m < M; ++m) {
        const float *mm = mix + m * C;
        if (out_bf16) {
            uint16_t *o = static_cast<uint16_t *>(out) + m * stride;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = to_bf16(h[c] + (h_prev[c] - h[c]) * mm[c]);
        } else {
            float *o = static_cast<float *>(out) + m * stride;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = h[c] + (h_prev[c] - h[c]) * mm[c];
        }
    }
}

}  // namespace

extern "C" {

// x [B, T, C] float32, updated in place: x += dx (dx [B, T, C] float32 or bfloat16, or null), then per row
// h = layer_norm(x) (ln_w, ln_b [C], eps) and out[m, b, t] = h[t] + (h[t - 1] - h[t]) * mix[m] for the M mixes
// (mix [M, C] float32; out [M, B, T, C] float32 or bfloat16, rounded to nearest even), with h[-1] = prev[b].
// prev [B, C] float32 then holds the last token's h (the token-shift state).
void goose_residual_ln_mix(int64_t B, int64_t T, int64_t C, int64_t M, float *x, const void *dx, int dx_bf16,
                           const float *ln_w, const float *ln_b, float eps, float *prev, const float *mix,
                           int out_bf16, void *out) {
    const int64_t rows = B * T;
    float *h = static_cast<float *>(std::malloc(rows * C * sizeof(float)));
    if (h == nullptr) std::abort();
    const int64_t elem = out_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t row = 0; row < rows; ++row) {
        const void *d = dx == nullptr ? nullptr : static_cast<const char *>(dx) + row * C * (dx_bf16 ? 2 : 4);
        layer_norm_row(C, x + row * C, d, dx_bf16 != 0, ln_w, ln_b, eps, h + row * C);
    }
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t row = 0; row < rows; ++row) {
        const float *hp = row % T ? h + (row - 1) * C : prev + (row / T) * C;
        mix_row(C, M, h + row * C, hp, mix, out_bf16 != 0, static_cast<char *>(out) + row * C * elem, rows * C);
    }
    for (int64_t b = 0; b < B; ++b) std::memcpy(prev + b * C, h + (b * T + T - 1) * C, C * sizeof(float));
    std::free(h);
}

// One token of B sequences through the time mix after the r/k/v projections: the LoRA chains
//     w_lora = tanh(xw W1^T) W2^T    a_lora = (xa A1^T) A2^T    g = sigmoid(xg G1^T) G2^T    v_lora = (xv V1^T) V2^T
// (factors row-major [out, in]: W1 [Dw, C], W2 [C, Dw], ...; float32, or bfloat16 with lora_bf16; V1/V2 null at
// the first layer, which has no value residual), then goose_rwkv7_time_mix with T = 1. Rows xw, xa, xg, xv, r, k,
// v, v_first [B, C] are float32 or bfloat16 (rows_bf16); v_first is null exactly when V1 is. The vectors, state
// and out are as in goose_rwkv7_time_mix.
void goose_lora_time_mix(int64_t B, int64_t H, int64_t N, int rows_bf16, const void *xw, const void *xa,
                         const void *xg, const void *xv, const void *r, const void *k, const void *v,
                         const void *v_first, int lora_bf16, const void *w1, const void *w2, int64_t Dw,
                         const void *a1, const void *a2, int64_t Da, const void *g1, const void *g2, int64_t Dg,
                         const void *v1, const void *v2, int64_t Dv, const float *w0, const float *a0,
                         const float *v0, const float *k_k, const float *k_a, const float *r_k, const float *ln_w,
                         const float *ln_b, float eps, float log_decay_scale, float *state, int out_bf16,
                         void *out) {
    const int64_t C = H * N;
    const bool value = v1 != nullptr;
    // float32 scratch: 8 row sets of [B, C] (inputs widened, LoRA outputs) and the hidden [B, D] of each chain
    const int64_t n_rows = 12, hidden = Dw + Da + Dg + (value ? Dv : 0);
    float *buf = static_cast<float *>(std::malloc((n_rows * C + hidden) * B * sizeof(float)));
    if (buf == nullptr) std::abort();
    float *in_w = buf, *in_a = in_w + B * C, *in_g = in_a + B * C, *in_v = in_g + B * C;
    float *fr = in_v + B * C, *fk = fr + B * C, *fv = fk + B * C, *ffirst = fv + B * C;
    float *w_lora = ffirst + B * C, *a_lora = w_lora + B * C, *g = a_lora + B * C, *v_lora = g + B * C;
    float *hw = v_lora + B * C, *ha = hw + B * Dw, *hg = ha + B * Da, *hv = hg + B * Dg;
    const bool in16 = rows_bf16 != 0;
    const void *srcs[8] = {xw, xa, xg, xv, r, k, v, v_first};
    float *dsts[8] = {in_w, in_a, in_g, in_v, fr, fk, fv, ffirst};
    for (int i = 0; i < (value ? 8 : 7); ++i) widen(B * C, srcs[i], in16, dsts[i]);
    // the chains on the few-row product kernels (products_cpu.cpp): first factors, then second factors
    const bool wb = lora_bf16 != 0;
    const int chains = value ? 4 : 3;
    const void *firsts[4] = {w1, a1, g1, v1}, *seconds[4] = {w2, a2, g2, v2};
    const int64_t D[4] = {Dw, Da, Dg, Dv};
    const float *ins[4] = {in_w, in_a, in_g, in_v};
    float *hid[4] = {hw, ha, hg, hv}, *outs[4] = {w_lora, a_lora, g, v_lora};
    const goose::Epilogue act[4] = {goose::kTanh, goose::kStore, goose::kSigmoid, goose::kStore};
#pragma omp parallel
    {
        for (int i = 0; i < chains; ++i)
            goose::product_team(goose::plain_matrix(firsts[i], wb, D[i], C), B, ins[i], C, hid[i], false, D[i], act[i]);
#pragma omp barrier
        for (int i = 0; i < chains; ++i)
            goose::product_team(goose::plain_matrix(seconds[i], wb, C, D[i]), B, hid[i], D[i], outs[i], false, C,
                                goose::kStore);
    }
    goose_rwkv7_time_mix(B, 1, H, N, 0, out_bf16, fr, w_lora, fk, fv, a_lora, value ? v_lora : nullptr,
                         value ? ffirst : nullptr, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps, log_decay_scale,
                         state, out);
    std::free(buf);
}

// y [M, N] = x [M, K] W^T for a few rows M, W [N, K] row-major, on the few-row product kernels (products_cpu.cpp). x, W and y are
// each float32 or bfloat16 (the flags); sums are float32, a bfloat16 y is rounded to nearest even.
void goose_gemv(int64_t M, int64_t N, int64_t K, const void *x, int x_bf16, const void *w, int w_bf16, void *y,
                int y_bf16) {
    float *xf = static_cast<float *>(std::malloc(M * K * sizeof(float)));
    if (xf == nullptr) std::abort();
    widen(M * K, x, x_bf16 != 0, xf);
#pragma omp parallel
    goose::product_team(goose::plain_matrix(w, w_bf16 != 0, N, K), M, xf, K, y, y_bf16 != 0, N, goose::kStore);
    std::free(xf);
}

}  // extern "C"

// ------------------------------------------------------------------------------------------- the whole step
// One token for each of B sequences through the whole model in one call, for single-stream decode: embedding,
// every layer, the final norm and the head. kernels/native_step.py builds these structs once per model (keep
// them equal to its ctypes mirrors).
//
// Why: a token of a 0.1B model is ~75 matrix products and ~25 small calls in between; even with the small work
// fused, each call from Python costs a dispatch and a thread fork/join, which at 3-6 ms a token was a third of
// the time of the quantized strategies. Here all of it runs in one OpenMP parallel region: every product's rows
// are split among the threads (products_cpu.cpp), the LoRA chains and the r/k/v products share one pass, heads
// run in parallel, the norms and shifts run on one thread between barriers.
//
// Numerics follow the model's torch path (engine/model/rwkv7.py) step for step: with bf16 activations, the
// token-shift mixes, every product's output, the time mix's output and the FFN's squared activations are rounded
// to bf16 where the torch path stores a bf16 tensor; norms, LoRA chains, the time mix and the residual stream are
// float32.
namespace {

struct LayerRef {
    const float *ln1_w, *ln1_b, *att_mix, *ln2_w, *ln2_b, *ffn_mix;
    goose::MatRef r, k, v, o, fk, fv;
    goose::MatRef w1, w2, a1, a2, g1, g2, v1, v2;      // LoRA factors [out, in]; v1/v2 data null: no value residual
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;
};

struct ModelRef {
    int64_t L, C, H, N, F, V;
    int32_t act_bf16, emb_bf16;
    const void *emb;                                    // [V, C]
    const float *ln_out_w, *ln_out_b;
    goose::MatRef head;
    const LayerRef *layers;
    float ln_eps, gn_eps, log_decay_scale, unused;
};

GOOSE_INLINE int64_t whole_blocks(int64_t n) { return (n + 31) / 32 * 32; }

// h = layer_norm(x (+= dx)); out[i] = rounded(h + (prev - h) * mix[i]) for the M mixes (out rows ldo apart);
// prev = h.
void norm_and_mix(const ModelRef &m, int64_t B, float *x, const float *dx, const float *ln_w, const float *ln_b,
                  float *prev, const float *mix, int64_t M, float *out, int64_t ldo, float *h) {
    const int64_t C = m.C;
    for (int64_t b = 0; b < B; ++b) {
        layer_norm_row(C, x + b * C, dx ? dx + b * C : nullptr, false, ln_w, ln_b, m.ln_eps, h);
        float *p = prev + b * C;
        for (int64_t i = 0; i < M; ++i) {
            float *o = out + (i * B + b) * ldo;
            const float *mm = mix + i * C;
            for (int64_t c = 0; c < C; ++c) {
                const float v = h[c] + (p[c] - h[c]) * mm[c];
                o[c] = m.act_bf16 ? from_bf16(to_bf16(v)) : v;
            }
        }
        std::memcpy(p, h, C * sizeof(float));
    }
}

}  // namespace

extern "C" {

// tokens [B]; att_x, wkv, ffn_x: per layer, the state rows of the B sequences ([B, C], [B, H, N, N], [B, C],
// contiguous float32), advanced in place; logits [B, V] float32. Returns 0, -1 when scratch memory could not be
// had, -2 when a token id is outside the vocabulary (nothing was changed then).
int goose_decode_step(const ModelRef *model, int64_t B, const int64_t *tokens, float *const *att_x,
                      float *const *wkv, float *const *ffn_x, float *logits) {
    const ModelRef &m = *model;
    for (int64_t b = 0; b < B; ++b)
        if (tokens[b] < 0 || tokens[b] >= m.V) return -2;      // nothing read or changed
    const int64_t C = m.C, Cp = whole_blocks(C), Fp = whole_blocks(m.F), H = m.H, N = m.N;
    int64_t dmax = 0;
    for (int64_t l = 0; l < m.L; ++l) {
        const LayerRef &lw = m.layers[l];
        dmax = std::max(dmax, lw.w1.N + lw.a1.N + lw.g1.N + (lw.v1.data ? lw.v1.N : 0));
    }
    // scratch, zeroed once: rows read by int4 products stay zero past C / F
    const int64_t sizes[] = {B * C, 6 * B * Cp, 3 * B * C, B * C, 4 * B * C, B * dmax, B * Cp, B * C, B * Cp, B * Fp,
                             B * C, B * Cp, C};
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    float *buf = static_cast<float *>(std::calloc(total, sizeof(float)));
    if (buf == nullptr) return -1;
    float *at = buf;
    auto take = [&at](int64_t n) { float *p = at; at += n; return p; };
    float *x = take(sizes[0]), *mixed = take(sizes[1]), *rkv = take(sizes[2]), *vfirst = take(sizes[3]);
    float *lora = take(sizes[4]), *hidden = take(sizes[5]), *tm = take(sizes[6]), *dx = take(sizes[7]);
    float *xk = take(sizes[8]), *ffn = take(sizes[9]), *pending = take(sizes[10]), *xo = take(sizes[11]);
    float *h = take(sizes[12]);
    float *r = rkv, *k = rkv + B * C, *v = rkv + 2 * B * C;
    float *lw_ = lora, *la = lora + B * C, *lg = lora + 2 * B * C, *lv = lora + 3 * B * C;
    const goose::Epilogue out_e = m.act_bf16 ? goose::kRoundBF16 : goose::kStore;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t t = tokens[b];
        if (m.emb_bf16)
            widen(C, static_cast<const uint16_t *>(m.emb) + t * C, true, x + b * C);
        else
            std::memcpy(x + b * C, static_cast<const float *>(m.emb) + t * C, C * sizeof(float));
    }
#pragma omp parallel
    {
        for (int64_t l = 0; l < m.L; ++l) {
            const LayerRef &lw = m.layers[l];
            const bool value = lw.v1.data != nullptr;
            float *xr = mixed, *xkk = mixed + B * Cp, *xv = mixed + 2 * B * Cp, *xw = mixed + 3 * B * Cp;
            float *xa = mixed + 4 * B * Cp, *xg = mixed + 5 * B * Cp;
            float *hw = hidden, *ha = hw + B * lw.w1.N, *hg = ha + B * lw.a1.N, *hv = hg + B * lw.g1.N;
#pragma omp single
            norm_and_mix(m, B, x, l ? pending : nullptr, lw.ln1_w, lw.ln1_b, att_x[l], lw.att_mix, 6, mixed, Cp, h);
            // everything that reads the mixes: r, k, v and the first LoRA factors
            goose::product_team(lw.r, B, xr, Cp, r, false, C, out_e);
            goose::product_team(lw.k, B, xkk, Cp, k, false, C, out_e);
            goose::product_team(lw.v, B, xv, Cp, v, false, C, out_e);
            goose::product_team(lw.w1, B, xw, Cp, hw, false, lw.w1.N, goose::kTanh);
            goose::product_team(lw.a1, B, xa, Cp, ha, false, lw.a1.N, goose::kStore);
            goose::product_team(lw.g1, B, xg, Cp, hg, false, lw.g1.N, goose::kSigmoid);
            if (value) goose::product_team(lw.v1, B, xv, Cp, hv, false, lw.v1.N, goose::kStore);
#pragma omp barrier
            goose::product_team(lw.w2, B, hw, lw.w1.N, lw_, false, C, goose::kStore);
            goose::product_team(lw.a2, B, ha, lw.a1.N, la, false, C, goose::kStore);
            goose::product_team(lw.g2, B, hg, lw.g1.N, lg, false, C, goose::kStore);
            if (value) goose::product_team(lw.v2, B, hv, lw.v1.N, lv, false, C, goose::kStore);
            if (l == 0) {
#pragma omp single nowait
                std::memcpy(vfirst, v, B * C * sizeof(float));
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t p = 0; p < B * H; ++p) {
                const int64_t b = p / H, c = (p % H) * N, o = b * C + c;
                float *dst = tm + b * Cp + c;
                goose::time_mix_head(N, c, r + o, lw_ + o, k + o, v + o, la + o, value ? lv + o : nullptr,
                                     value ? vfirst + o : nullptr, lg + o, lw.w0, lw.a0, lw.v0, lw.k_k, lw.k_a,
                                     lw.r_k, lw.lnx_w, lw.lnx_b, m.gn_eps, m.log_decay_scale,
                                     wkv[l] + p * N * N, dst);
                if (m.act_bf16)
                    for (int64_t j = 0; j < N; ++j) dst[j] = from_bf16(to_bf16(dst[j]));
            }
            goose::product_team(lw.o, B, tm, Cp, dx, false, C, out_e);
#pragma omp barrier
#pragma omp single
            norm_and_mix(m, B, x, dx, lw.ln2_w, lw.ln2_b, ffn_x[l], lw.ffn_mix, 1, xk, Cp, h);
            goose::product_team(lw.fk, B, xk, Cp, ffn, false, Fp,
                                m.act_bf16 ? goose::kReluSquareBF16 : goose::kReluSquare);
#pragma omp barrier
            goose::product_team(lw.fv, B, ffn, Fp, pending, false, C, out_e);
#pragma omp barrier
        }
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
            layer_norm_row(C, x + b * C, pending + b * C, false, m.ln_out_w, m.ln_out_b, m.ln_eps, xo + b * Cp);
            if (m.act_bf16)
                for (int64_t c = 0; c < C; ++c) xo[b * Cp + c] = from_bf16(to_bf16(xo[b * Cp + c]));
        }
        goose::product_team(m.head, B, xo, Cp, logits, false, m.V, out_e);
    }
    std::free(buf);
    return 0;
}

}  // extern "C"
