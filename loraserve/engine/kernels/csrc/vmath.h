/* Vectorisable float math shared by the C kernels (included, so each kernel stays one shared library;
 * kernels/build.py hashes this header with each source). */
#ifndef LORASERVE_VMATH_H
#define LORASERVE_VMATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* c ? a : b, selected bit by bit. GCC (12, without -fno-trapping-math) if-converts neither a float ?:
 * whose arms compute nor a product with a 0/1 comparison (the form exp_nonpos's clamp had): unless
 * AVX-512's masks can guard the arms' operations, such a loop ran one element at a time (the AVX2 build's
 * softmax and silu did). Integer masks it vectorizes everywhere, and both arms are computed anyway, so
 * an arm that overflows where it is not selected does no harm. */
static inline float blend(int c, float a, float b) {
    uint32_t ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    const uint32_t m = -(uint32_t)(c != 0), r = (ia & m) | (ib & ~m);
    float f;
    memcpy(&f, &r, sizeof f);
    return f;
}

/* e^x for x <= 0 (a score minus its row's maximum, -|g| in silu), in a form the compiler vectorizes:
 * 2^n * p(r), with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact) and p
 * Cephes' degree-6 polynomial for expf (error ~1 ulp). Arguments below -87 (where e^x turns subnormal)
 * are clamped there: e^-87 ~ 1.6e-38, which a sum of at least 1 cannot tell from 0. libm's expf is a
 * scalar call per score, which kept the softmax from vectorizing and made it a sizeable part of the
 * attention kernel (BENCHMARKS.md, "Attention scores 16 positions at a time"). GCC vectorizes no floorf
 * without -fno-trapping-math, hence the truncation; the clamp is a `blend` (NaN passes through). */
static inline float exp_nonpos(float x) {
    x = blend(x < -87.f, -87.f, x); /* max(x, -87) */
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

/* tanh(x), vectorizable: Cephes' tanhf, error a few ulp. Below |x| 0.625 an odd polynomial (where
 * 1 - e^-2|x| would cancel), above it (1 - e) / (1 + e) with e = e^-2|x| <= 0.29 and the sign put back. */
static inline float tanh_vec(float x) {
    const float z = x * x, e = exp_nonpos(-2.f * fabsf(x));
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    return blend(fabsf(x) < 0.625f, p * z * x + x, copysignf((1.f - e) / (1.f + e), x));
}

/* 1 / (1 + e^-x), vectorizable and accurate in both tails: e^-|x| never overflows, and for x < 0 it is
 * e^x / (1 + e^x). */
static inline float sigmoid_vec(float x) {
    const float e = exp_nonpos(-fabsf(x)), d = 1.f / (1.f + e);
    return blend(x >= 0.f, d, e * d);
}
#endif
