// Helpers shared by the native CPU kernels in this folder (each .cpp file includes it; kernels/native_build.py
// hashes headers with the sources, so a change here rebuilds the library).
#pragma once

#include <cstdint>

#if defined(GOOSE_X86_CLONES)
// One binary for every x86-64 machine: the loader picks the widest vector ISA at run time.
#define GOOSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GOOSE_CLONES
#endif

#define GOOSE_INLINE inline __attribute__((always_inline))

namespace goose {

// exp written for the vectorizer (libm's expf is a call per element): Cephes' range reduction and degree-6
// polynomial, ~1 ulp on the clamped range; round-to-nearest by the 1.5 * 2^23 trick, 2^n built in the
// exponent bits. The clamps keep 2^n finite and normal (exp(-87) ~ 1.6e-38, below any value that matters).
inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// fp32 -> bf16 with round to nearest even (as torch converts); NaN stays a quiet NaN.
inline uint16_t to_bf16(float x) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (x != x) ? static_cast<uint16_t>((bits >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

inline float from_bf16(uint16_t x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16); }

}  // namespace goose
