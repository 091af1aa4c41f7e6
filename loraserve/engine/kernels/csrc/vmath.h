/* Vectorisable float math shared by the C kernels (included, so each kernel stays one shared library;
 * cpu_kernels.build hashes this header with each source). */
#ifndef LORASERVE_VMATH_H
#define LORASERVE_VMATH_H
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (a score minus its row's maximum, -|g| in silu), in a form the compiler vectorizes:
 * 2^n * p(r), with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact) and p
 * Cephes' degree-6 polynomial for expf (error ~1 ulp). Arguments below -87 (where e^x turns subnormal)
 * are clamped there: e^-87 ~ 1.6e-38, which a sum of at least 1 cannot tell from 0. libm's expf is a
 * scalar call per score, which kept the softmax from vectorizing and made it a sizeable part of the
 * attention kernel (BENCHMARKS.md, "Attention scores 16 positions at a time"). GCC vectorizes no float
 * ?: here (nor floorf without -fno-trapping-math), hence the arithmetic clamp and the truncation. */
static inline float exp_nonpos(float x) {
    x = x * (x >= -87.f) + -87.f * (x < -87.f); /* max(x, -87) */
    const int32_t ni = (int32_t)(x * 1.44269504088896341f - 0.5f); /* round(x / ln 2): truncation, x <= 0 */
    const float n = (float)ni;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = (ni + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#endif
