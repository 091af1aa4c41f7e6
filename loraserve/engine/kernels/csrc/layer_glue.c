/* The element-wise work between a decoder layer's projections, fused, on the CPU (float32):
 *  - add_rms_norm: h += delta (the residual), then x = rmsnorm(h) * w;
 *  - rope_store: RoPE on a fused qkv row's q and k heads (HF's rotate_half layout: cos/sin tables
 *    [max_pos, D] whose two halves repeat the frequencies), q written out, k and v written into their KV
 *    cache slots;
 *  - silu_mul: the MLP's act = silu(gate) * up from the fused gate/up projection's output (SwiGLU);
 *    gelu_tanh_mul the same with GELU's tanh approximation (GeGLU: Gemma).
 * Through torch these are ~20 small operators a layer (rms_norm alone is five on the CPU), each a few
 * microseconds of dispatch whatever the batch, which at small batches is a real share of a decode step
 * (BENCHMARKS.md, "Layer glue"). Rows are independent and each is computed by one thread in a fixed order.
 * Built by loraserve/engine/kernels/build.py, called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include "vmath.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

#define PAR_ROWS 64 /* fewer rows than this: one thread (an OpenMP fork costs more than the work) */
#define PAR_ELEMENTS 12288 /* the same for silu_mul, in elements */

void add_rms_norm(float *h, int64_t ldh, const float *delta, int64_t ldd, int64_t T, int64_t H, const float *w,
                  float eps, float *x, int64_t ldx, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T >= PAR_ROWS) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *hr = h + t * ldh, *xr = x + t * ldx;
        if (delta) {
            const float *dr = delta + t * ldd;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) hr[i] += dr[i];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; i++) ss += hr[i] * hr[i];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) xr[i] = hr[i] * r * w[i];
    }
}

static inline void rotate(const float *x, const float *c, const float *s, int64_t D, float *out) {
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * c[i] - x[i + half] * s[i];
        out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
}

/* dst[i] = src[i] in float16, rounded to nearest even (a float16 KV cache), i < n. */
static inline void to_half(_Float16 *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++) dst[i] = (_Float16)src[i];
}

/* qkv: [T, (Hq + 2 Hkv) D] rows ldqkv apart; q: [T, Hq, D]; kc, vc: [nslots, Hkv, D], float32, or float16
 * with `half`; pos, slots: [T]. Returns -1 (and writes nothing) when a position or slot is out of its
 * table: a wrong index from the runner must not become a write outside the cache. */
int rope_store(const float *qkv, int64_t ldqkv, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
               const float *cos_t, const float *sin_t, int64_t max_pos, const int64_t *pos,
               const int64_t *slots, int64_t nslots, float *q, void *kc, void *vc, int half, int nthreads) {
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= max_pos || slots[t] < 0 || slots[t] >= nslots) return -1;
#pragma omp parallel for num_threads(nthreads) if (T >= PAR_ROWS) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * ldqkv, *c = cos_t + pos[t] * D, *s = sin_t + pos[t] * D;
        for (int64_t h = 0; h < Hq; h++) rotate(row + h * D, c, s, D, q + (t * Hq + h) * D);
        const float *k = row + Hq * D, *v = k + Hkv * D;
        if (half) {
            _Float16 *kr = (_Float16 *)kc + slots[t] * Hkv * D, *vr = (_Float16 *)vc + slots[t] * Hkv * D;
            float rk[D];
            for (int64_t h = 0; h < Hkv; h++) {
                rotate(k + h * D, c, s, D, rk);
                to_half(kr + h * D, rk, D);
            }
            to_half(vr, v, Hkv * D);
            continue;
        }
        float *kr = (float *)kc + slots[t] * Hkv * D, *vr = (float *)vc + slots[t] * Hkv * D;
        for (int64_t h = 0; h < Hkv; h++) rotate(k + h * D, c, s, D, kr + h * D);
        for (int64_t i = 0; i < Hkv * D; i++) vr[i] = v[i];
    }
    return 0;
}

/* act[t, i] = silu(gu[t, i]) * gu[t, I + i]: gu [T, 2I] rows ldg apart (gate, then up), act [T, I]. silu(g)
 * = g * sigmoid(g). */
void silu_mul(const float *gu, int64_t ldg, int64_t T, int64_t I, float *act, int64_t lda, int nthreads) {
    /* rows are wider than a norm's (SmolLM2: 1536), so a second thread pays for its fork at fewer rows:
     * PAR_ELEMENTS is 8 such rows, from where two threads were faster than one (BENCHMARKS.md, "Figures
     * that used to live in code comments") */
#pragma omp parallel for num_threads(nthreads) if (T * I >= PAR_ELEMENTS) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * ldg, *u = g + I;
        float *a = act + t * lda;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) a[i] = g[i] * sigmoid_vec(g[i]) * u[i];
    }
}

/* act[t, i] = gelu(gu[t, i]) * gu[t, I + i] with GELU's tanh approximation, as torch's F.gelu(g,
 * approximate="tanh"): g / 2 * (1 + tanh(y / 2)) with y = 2 sqrt(2 / pi) (g + 0.044715 g^3), which is
 * g * sigmoid(y): no 1 + tanh cancelling in the negative tail. Inside y, g is clamped to [-10, 10], where
 * sigmoid(y) is already 1 or below 1e-37 (its exp's clamp), so that g^3 cannot overflow. */
void gelu_tanh_mul(const float *gu, int64_t ldg, int64_t T, int64_t I, float *act, int64_t lda, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * I >= PAR_ELEMENTS) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * ldg, *u = g + I;
        float *a = act + t * lda;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            const float c = blend(fabsf(g[i]) <= 10.f, g[i], copysignf(10.f, g[i]));
            a[i] = g[i] * sigmoid_vec(1.5957691216057308f * c * (1.f + 0.044715f * c * c)) * u[i];
        }
    }
}

#define PAR_ARGMAX 65536 /* elements from which rows are shared by the threads */

/* The first i < V with r[i] == m, or with r[i] a NaN when `nan`: 64 elements tested at a time. */
static int64_t first_of(const float *r, int64_t V, float m, int nan) {
    int64_t i = 0;
    for (; i + 64 <= V; i += 64) {
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t j = i; j < i + 64; j++) hit |= nan ? r[j] != r[j] : r[j] == m;
        if (hit) break;
    }
    for (; i < V; i++)
        if (nan ? r[i] != r[i] : r[i] == m) return i;
    return 0; /* not reached: m is one of the row's values */
}

/* out[t] = the index of row t's largest value, the first of equal ones, a NaN counting as the largest (its
 * first), as torch.argmax: x [T, V] (V >= 1), rows ldx apart. torch's argmax over a step's logits is a
 * scalar loop on the CPU (0.65 ms over [32, 49152]), a greedy step's last op: a vector max, then the first
 * index holding it. */
void row_argmax(const float *x, int64_t ldx, int64_t T, int64_t V, int64_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * V >= PAR_ARGMAX) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *r = x + t * ldx;
        float m = r[0];
        int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t i = 0; i < V; i++) {
            m = r[i] > m ? r[i] : m;
            nan |= r[i] != r[i];
        }
        out[t] = first_of(r, V, m, nan);
    }
}
