/* Decode attention over a paged KV cache, on the CPU: one query token per sequence, K/V read in place
 * through the sequence's block table (never gathered into a padded copy first).
 *
 * Built by loraserve/engine/cpu_kernels.py with the machine's C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Layouts (float32, contiguous):
 *   q, out:  [B, Hq, D]          one new token per sequence
 *   kc, vc:  [slots, Hkv, D]     one layer's cache; slot = block * bs + offset
 *   tables:  [B, width] int64    each sequence's block ids
 *   lens:    [B] int64           context length, the new token included (>= 1)
 * Each sequence is one task (split by KV head only when there are fewer sequences than threads and the
 * context is long), computed start to finish by one thread in a fixed order, so a sequence's result does
 * not depend on what else is in the batch or on the thread count. The G = Hq / Hkv query heads of a KV
 * head share each K/V row while it is in L1 (GQA reads K/V once, not G times).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Flush-to-zero and denormals-are-zero: a peaked softmax can make probabilities (and their products
 * with V) subnormal, which x86 computes on many times slower. A guard: on the benchmark workload it
 * changed nothing measurable (the 3x slowdown once seen in the engine was the task split, see below).
 * Values that small change no output bit a float32 sum keeps. */
#define FTZ_ON(saved) unsigned int saved = _mm_getcsr(); _mm_setcsr(saved | 0x8040)
#define FTZ_OFF(saved) _mm_setcsr(saved)
#else
#define FTZ_ON(saved) (void)0
#define FTZ_OFF(saved) (void)0
#endif

/* Attention of sequence b's query heads [h0, h1) (a multiple of G apart) over its first L positions:
 * scores [Hq', L] and accumulators [Hq', D] in `scratch` (sized by the caller). Positions outermost, so
 * each K/V row (all of the task's heads, one or a few cache lines) is read once per task. */
static void attend(const float *q, const float *kc, const float *vc, const int64_t *tb, int64_t L,
                   int64_t h0, int64_t h1, int64_t Hkv, int64_t G, int64_t D, int64_t bs, float scale,
                   float *out, float *scratch) {
    const int64_t n = h1 - h0; /* query heads of this task */
    float *s = scratch, *acc = scratch + n * L;
    for (int64_t i = 0; i < n * D; i++) acc[i] = 0.f;
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = tb[j / bs] * bs + j % bs;
        for (int64_t hq = h0; hq < h1; hq++) {
            const float *kr = kc + (slot * Hkv + hq / G) * D, *qh = q + hq * D;
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < D; i++) d += qh[i] * kr[i];
            s[(hq - h0) * L + j] = d * scale;
        }
    }
    for (int64_t r = 0; r < n; r++) {
        float *sr = s + r * L, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < L; j++) m = sr[j] > m ? sr[j] : m;
        for (int64_t j = 0; j < L; j++) {
            sr[j] = expf(sr[j] - m);
            sum += sr[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < L; j++) sr[j] *= inv;
    }
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = tb[j / bs] * bs + j % bs;
        for (int64_t hq = h0; hq < h1; hq++) {
            const float p = s[(hq - h0) * L + j], *vr = vc + (slot * Hkv + hq / G) * D;
            float *a = acc + (hq - h0) * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) a[i] += p * vr[i];
        }
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < D; i++) out[(h0 + r) * D + i] = acc[r * D + i];
}

int paged_decode_attention(const float *q, const float *kc, const float *vc, const int64_t *tables,
                           int64_t width, const int64_t *lens, int64_t B, int64_t Hq, int64_t Hkv,
                           int64_t D, int64_t bs, float scale, float *out, int nthreads) {
    const int64_t G = Hq / Hkv;
    /* A task is one sequence with all its heads: each K/V row is then touched by one task only. Split by
     * KV head, tasks touched each row Hkv times, and in the engine (weights streaming through the caches
     * between layers) TLB and cache misses made a layer 3x slower (1.1 ms vs 0.36 at batch 32). Only
     * fewer sequences than threads over long contexts are split, so that every thread has work. */
    int64_t lmax = 0;
    for (int64_t b = 0; b < B; b++) lmax = lens[b] > lmax ? lens[b] : lmax;
    const int64_t split = B < (int64_t)nthreads && lmax >= 1024 ? Hkv : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_ON(csr);
        const int64_t heads = Hq / split;
        float *scratch = malloc(sizeof(float) * (size_t)(heads * (lmax + D)));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * split; t++) {
            if (!scratch) continue;
            const int64_t b = t / split, h0 = (t % split) * heads;
            attend(q + b * Hq * D, kc, vc, tables + b * width, lens[b], h0, h0 + heads, Hkv, G, D, bs,
                   scale, out + b * Hq * D, scratch);
        }
        free(scratch);
        FTZ_OFF(csr);
    }
    return failed;
}
