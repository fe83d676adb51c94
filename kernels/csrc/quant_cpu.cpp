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


namespace {

enum Dtype { kF32 = 0, kBF16 = 1, kF16 = 2 };

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
                                             : goose::from_bf16(static_cast<const uint16_t *>(x)[m * x_stride + k]);
#pragma omp parallel
    goose::product_team(w, M, xf, Kp, y, y_dtype == kBF16, y_stride, goose::kStore);
    std::free(xf);
    return 0;
}

// out [N, K] (row stride out_stride, fp32 or bf16) = W, for products with many activation rows.
void goose_quant_dequantize(int64_t N, int64_t K, int bits, int64_t G, const void *codes, int64_t code_stride,
                            const void *scales, const void *zeros, int scale_dtype, int64_t scale_stride,
                            void *out, int out_dtype, int64_t out_stride) {
    const goose::MatRef w{bits == 8 ? goose::kWeightI8 : goose::kWeightI4, scale_dtype, N, K, G, codes, code_stride,
                          scales, zeros, scale_stride};
    const int64_t elem = out_dtype == kBF16 ? 2 : 4;
    constexpr int64_t kRows = 64;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += kRows)
        goose::dequantize_rows(w, n, std::min(N, n + kRows), static_cast<char *>(out) + n * out_stride * elem,
                               out_dtype == kBF16, out_stride);
}

}  // extern "C"
