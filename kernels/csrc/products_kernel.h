// The few-row product kernels of products_cpu.cpp, written once over a vector type V and included there once per
// instruction set, inside a `#pragma GCC target` region and a namespace of its own (hence no include guard):
// every function below is compiled for that ISA and inlines V's operations. Not for other files.

template <class V, int KIND>
GOOSE_INLINE void load_block(const uint8_t *row, int64_t j, typename V::F *out) {
    if constexpr (KIND == goose::kWeightF32) V::f32(reinterpret_cast<const float *>(row) + j, out);
    else if constexpr (KIND == goose::kWeightBF16) V::bf16(reinterpret_cast<const uint16_t *>(row) + j, out);
    else if constexpr (KIND == goose::kWeightI8) V::i8(reinterpret_cast<const int8_t *>(row) + j, out);
    else V::i4(row + j / 2, out);
}

template <int KIND>
GOOSE_INLINE float weight_at(const uint8_t *row, int64_t j) {
    if constexpr (KIND == goose::kWeightF32) return reinterpret_cast<const float *>(row)[j];
    else if constexpr (KIND == goose::kWeightBF16) return goose::from_bf16(reinterpret_cast<const uint16_t *>(row)[j]);
    else if constexpr (KIND == goose::kWeightI8) return static_cast<float>(reinterpret_cast<const int8_t *>(row)[j]);
    else {
        const int64_t at = j & ~int64_t(31), i = j - at;
        const uint8_t byte = row[at / 2 + (i & 15)];
        return static_cast<float>(i < 16 ? (byte & 15) : (byte >> 4));
    }
}

// acc[m][u * NV + i] += block(j + 32 u)[i] * x[m][j + 32 u + W i] over the whole blocks of [j0, j1), U blocks at
// a time (U = 2 for one row of x: more FMA chains in flight), then the last block alone.
template <class V, int KIND, int M, int U>
GOOSE_INLINE void accumulate(const uint8_t *row, const float *x, int64_t ldx, int64_t j0, int64_t j1,
                             typename V::F (&acc)[M][U * (32 / V::W)]) {
    constexpr int NV = 32 / V::W;
    using F = typename V::F;
    int64_t j = j0;
    for (; j + 32 * U <= j1; j += 32 * U) {
        for (int u = 0; u < U; ++u) {
            F w[NV];
            load_block<V, KIND>(row, j + 32 * u, w);
            for (int m = 0; m < M; ++m)
                for (int i = 0; i < NV; ++i)
                    acc[m][u * NV + i] = V::fma(w[i], V::load(x + m * ldx + j + 32 * u + V::W * i), acc[m][u * NV + i]);
        }
    }
    for (; j + 32 <= j1; j += 32) {
        F w[NV];
        load_block<V, KIND>(row, j, w);
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < NV; ++i) acc[m][i] = V::fma(w[i], V::load(x + m * ldx + j + V::W * i), acc[m][i]);
    }
}

template <class V, int N>
GOOSE_INLINE typename V::F collapse(const typename V::F (&v)[N]) {
    typename V::F s = v[0];
    for (int i = 1; i < N; ++i) s = V::add(s, v[i]);
    return s;
}

GOOSE_INLINE void store(void *y, bool bf16, int64_t at, float v) {
    if (bf16)
        static_cast<uint16_t *>(y)[at] = goose::to_bf16(v);
    else
        static_cast<float *>(y)[at] = v;
}

GOOSE_INLINE float finish(float v, goose::Epilogue e) {
    switch (e) {
        case goose::kRoundBF16: return goose::from_bf16(goose::to_bf16(v));
        case goose::kTanh: return std::tanh(v);
        case goose::kSigmoid: return goose::sigmoid(v);
        case goose::kReluSquare: return !(v <= 0.f) ? v * v : 0.f;          // NaN stays NaN, as in torch
        case goose::kReluSquareBF16: {
            const float r = goose::from_bf16(goose::to_bf16(v));
            return !(r <= 0.f) ? goose::from_bf16(goose::to_bf16(r * r)) : 0.f;
        }
        default: return v;
    }
}

// Output rows [n0, n1) for M (<= 4) rows of x. xsum [M][groups]: the sums of x over each group (int4 only).
template <class V, int KIND, int M>
void rows_kernel(const MatRef &w, const float *x, int64_t ldx, const float *xsum, int64_t groups_x, void *y,
                 bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue epilogue) {
    constexpr int NV = 32 / V::W;
    using F = typename V::F;
    const int64_t K = w.K;
    const uint8_t *base = static_cast<const uint8_t *>(w.data);
    const bool quant = KIND == goose::kWeightI8 || KIND == goose::kWeightI4;
    const int64_t groups = quant ? (K + w.G - 1) / w.G : 1;
    // K's last partial block: int4 rows hold whole blocks (x is zero there), other forms end at K
    const int64_t body = KIND == goose::kWeightI4 ? (K + 31) / 32 * 32 : K / 32 * 32;
    // quantized weights: the scales (and zeros) are streams of their own beside the codes, fetched a few rows
    // ahead (products_cpu.cpp's int4 kernel measures why)
    const int64_t scale_bytes = w.scale_stride * (w.scale_dtype == goose::kScaleF32 ? 4 : 2);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = base + n * w.row_bytes;
        if (quant && n + 16 < n1) {
            __builtin_prefetch(static_cast<const char *>(w.scales) + (n + 16) * scale_bytes);
            if (w.zeros) __builtin_prefetch(static_cast<const char *>(w.zeros) + (n + 16) * scale_bytes);
        }
        float total[M];
        if (!quant || groups == 1) {
            constexpr int U = M == 1 ? 2 : 1;
            F acc[M][U * NV];
            for (int m = 0; m < M; ++m)
                for (int i = 0; i < U * NV; ++i) acc[m][i] = V::zero();
            accumulate<V, KIND, M, U>(row, x, ldx, 0, body, acc);
            for (int m = 0; m < M; ++m) {
                float s = V::hsum(collapse<V>(acc[m]));
                for (int64_t j = body; j < K; ++j) s += weight_at<KIND>(row, j) * x[m * ldx + j];
                total[m] = s;
            }
            if (quant) {
                const float s = goose::scale_value(w.scales, w.scale_dtype, n * w.scale_stride);
                for (int m = 0; m < M; ++m) total[m] *= s;
                if (KIND == goose::kWeightI4) {
                    const float shift = (w.zeros ? goose::scale_value(w.zeros, w.scale_dtype, n * w.scale_stride)
                                                 : 0.f) - 8.f * s;
                    for (int m = 0; m < M; ++m) total[m] += shift * xsum[m * groups_x];
                }
            }
        } else {        // groups of whole blocks (G a multiple of 32): each group's sum scaled once
            F acc[M];
            float offset[M];
            for (int m = 0; m < M; ++m) {
                acc[m] = V::zero();
                offset[m] = 0.f;
            }
            const int64_t sbase = n * w.scale_stride;
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t j0 = g * w.G, j1 = std::min(body, j0 + w.G);
                F part[M][NV];
                for (int m = 0; m < M; ++m)
                    for (int i = 0; i < NV; ++i) part[m][i] = V::zero();
                accumulate<V, KIND, M, 1>(row, x, ldx, j0, j1, part);
                const float s = goose::scale_value(w.scales, w.scale_dtype, sbase + g);
                const F sv = V::set1(s);
                for (int m = 0; m < M; ++m) acc[m] = V::fma(collapse<V>(part[m]), sv, acc[m]);
                if (KIND == goose::kWeightI4) {
                    const float shift = (w.zeros ? goose::scale_value(w.zeros, w.scale_dtype, sbase + g) : 0.f) - 8.f * s;
                    for (int m = 0; m < M; ++m) offset[m] += shift * xsum[m * groups_x + g];
                }
            }
            for (int m = 0; m < M; ++m) {
                float t = V::hsum(acc[m]) + offset[m];
                if (KIND == goose::kWeightI8 && body < K) {       // the last partial block, in the last group
                    float s = 0.f;
                    for (int64_t j = body; j < K; ++j) s += weight_at<KIND>(row, j) * x[m * ldx + j];
                    t += s * goose::scale_value(w.scales, w.scale_dtype, sbase + groups - 1);
                }
                total[m] = t;
            }
        }
        for (int m = 0; m < M; ++m) store(y, y_bf16, m * ldy + n, finish(total[m], epilogue));
    }
}

// int8 groups that are neither whole blocks nor the whole row (no format here makes them; kept correct)
template <int M>
void rows_any_group(const MatRef &w, const float *x, int64_t ldx, void *y, bool y_bf16, int64_t ldy, int64_t n0,
                    int64_t n1, goose::Epilogue epilogue) {
    const int64_t groups = (w.K + w.G - 1) / w.G;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = static_cast<const uint8_t *>(w.data) + n * w.row_bytes;
        for (int m = 0; m < M; ++m) {
            float t = 0.f;
            for (int64_t g = 0; g < groups; ++g) {
                float s = 0.f;
                for (int64_t j = g * w.G; j < std::min(w.K, (g + 1) * w.G); ++j)
                    s += weight_at<goose::kWeightI8>(row, j) * x[m * ldx + j];
                t += s * goose::scale_value(w.scales, w.scale_dtype, n * w.scale_stride + g);
            }
            store(y, y_bf16, m * ldy + n, finish(t, epilogue));
        }
    }
}

// Output rows [n0, n1) for any M: blocks of 16 weight rows (a few KB to a few hundred, cache-resident), each
// multiplied with every row of x, four rows of x at a time.
template <class V, int KIND>
GOOSE_INLINE void rows_m(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups,
                         void *y, bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    const int64_t step = M <= 4 ? n1 - n0 : 16;
    const int64_t elem = y_bf16 ? 2 : 4;
    for (int64_t b0 = n0; b0 < n1; b0 += step) {
        const int64_t b1 = std::min(n1, b0 + step);
        for (int64_t m = 0; m < M; m += 4) {
            const float *xm = x + m * ldx, *sm = xsum ? xsum + m * groups : nullptr;
            void *ym = static_cast<char *>(y) + m * ldy * elem;
            switch (std::min<int64_t>(4, M - m)) {
                case 1: rows_kernel<V, KIND, 1>(w, xm, ldx, sm, groups, ym, y_bf16, ldy, b0, b1, e); break;
                case 2: rows_kernel<V, KIND, 2>(w, xm, ldx, sm, groups, ym, y_bf16, ldy, b0, b1, e); break;
                case 3: rows_kernel<V, KIND, 3>(w, xm, ldx, sm, groups, ym, y_bf16, ldy, b0, b1, e); break;
                default: rows_kernel<V, KIND, 4>(w, xm, ldx, sm, groups, ym, y_bf16, ldy, b0, b1, e); break;
            }
        }
    }
}

template <class V>
inline void rows_any(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups,
                     void *y, bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    switch (w.kind) {
        case goose::kWeightF32: rows_m<V, goose::kWeightF32>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e); break;
        case goose::kWeightBF16: rows_m<V, goose::kWeightBF16>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e); break;
        case goose::kWeightI8: rows_m<V, goose::kWeightI8>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e); break;
        default: rows_m<V, goose::kWeightI4>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e); break;
    }
}

// Rows [n0, n1) of a quantized W as floats (out rows ld elements apart, fp32 or bf16 rounded to nearest even), for
// products with many rows of x; buf: K + 32 floats of scratch.
template <class V, int KIND>
GOOSE_INLINE void dequantize_kind(const MatRef &w, int64_t n0, int64_t n1, void *out, bool out_bf16, int64_t ld,
                                  float *buf) {
    constexpr int NV = 32 / V::W;
    const int64_t K = w.K, groups = (K + w.G - 1) / w.G;
    const int64_t body = K / 32 * 32;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = static_cast<const uint8_t *>(w.data) + n * w.row_bytes;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t j0 = g * w.G, j1 = std::min(K, j0 + w.G);
            const float s = goose::scale_value(w.scales, w.scale_dtype, n * w.scale_stride + g);
            const float shift = KIND == goose::kWeightI4
                ? (w.zeros ? goose::scale_value(w.zeros, w.scale_dtype, n * w.scale_stride + g) : 0.f) - 8.f * s : 0.f;
            const typename V::F sv = V::set1(s), hv = V::set1(shift);
            int64_t j = j0;
            if (j0 % 32 == 0)
                for (; j + 32 <= std::min(j1, body); j += 32) {
                    typename V::F v[NV];
                    load_block<V, KIND>(row, j, v);
                    for (int i = 0; i < NV; ++i) V::store(buf + j + V::W * i, V::fma(v[i], sv, hv));
                }
            for (; j < j1; ++j) buf[j] = weight_at<KIND>(row, j) * s + shift;
        }
        if (out_bf16) {
            uint16_t *o = static_cast<uint16_t *>(out) + (n - n0) * ld;
            for (int64_t j = 0; j < K; ++j) o[j] = goose::to_bf16(buf[j]);
        } else {
            std::memcpy(static_cast<float *>(out) + (n - n0) * ld, buf, K * sizeof(float));
        }
    }
}

template <class V>
inline void dequantize_any(const MatRef &w, int64_t n0, int64_t n1, void *out, bool out_bf16, int64_t ld,
                           float *buf) {
    if (w.kind == goose::kWeightI8)
        dequantize_kind<V, goose::kWeightI8>(w, n0, n1, out, out_bf16, ld, buf);
    else
        dequantize_kind<V, goose::kWeightI4>(w, n0, n1, out, out_bf16, ld, buf);
}

// The entries products_cpu.cpp calls, once per ISA (V is the including namespace's vector type).
void rows(const MatRef &w, int64_t M, const float *x, int64_t ldx, const float *xsum, int64_t groups, void *y,
          bool y_bf16, int64_t ldy, int64_t n0, int64_t n1, goose::Epilogue e) {
    rows_any<V>(w, M, x, ldx, xsum, groups, y, y_bf16, ldy, n0, n1, e);
}

void dequantize(const MatRef &w, int64_t n0, int64_t n1, void *out, bool out_bf16, int64_t ld, float *buf) {
    dequantize_any<V>(w, n0, n1, out, out_bf16, ld, buf);
}
