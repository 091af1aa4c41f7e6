/* Attention over a paged KV cache, on the CPU: one query token per row, K/V read in place through the
 * row's block table (never gathered into a padded copy first). A row is a decode, or one token of a
 * prefill chunk: the engine passes a chunk as rows of one sequence with lengths growing by one, which is
 * causal attention, each row reading its prefix in place where torch's SDPA needed a gathered copy of
 * each prompt's K/V (BENCHMARKS.md, "Prefill attention through the same kernel").
 *
 * Built by loraserve/engine/kernels/build.py with the machine's C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Layouts (contiguous):
 *   q, out:  [B, Hq, D] float32  one new token per sequence
 *   kc, vc:  [slots, Hkv, D]     one layer's cache; slot = block * bs + offset; float32, or float16 with
 *                                `half` (read as float32: each value widened as it is loaded, the sums in
 *                                float32 as for a float32 cache)
 *   tables:  [B, width] int64    each sequence's block ids
 *   lens:    [B] int64           context length, the new token included (>= 1)
 * Per layer: scale multiplies q.k; softcap > 0 turns a score x into softcap * tanh(x / softcap) before the
 * softmax (Gemma 2); window > 0 restricts a row to its last `window` positions, its own included (a
 * sliding layer: positions [max(0, len - window), len)), and the blocks before that are never read.
 * Each sequence is one task (split by KV head only when there are fewer sequences than threads and the
 * context is long), computed start to finish by one thread in a fixed order, so a sequence's result does
 * not depend on what else is in the batch or on the thread count. The G = Hq / Hkv query heads of a KV
 * head share each K/V row part while it is in L1 (GQA reads K/V once, not G times).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "vmath.h"
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Flush-to-zero and denormals-are-zero: a peaked softmax can make probabilities (and their products
 * with V) subnormal, which x86 computes on many times slower. A guard against that case, not a speed-up
 * of the usual one. Values that small change no output bit a float32 sum keeps. */
#define FTZ_ON(saved) unsigned int saved = _mm_getcsr(); _mm_setcsr(saved | 0x8040)
#define FTZ_OFF(saved) _mm_setcsr(saved)
#else
#define FTZ_ON(saved) (void)0
#define FTZ_OFF(saved) (void)0
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

typedef _Float16 kv_half;

/* Element i of a K/V row at p: the cache's element size is 2 bytes with `half`, 4 without. */
static inline __attribute__((always_inline)) const void *kv_at(const void *p, int64_t i, const int half) {
    return (const char *)p + i * (half ? 2 : 4);
}

static inline __attribute__((always_inline)) float kv_get(const void *p, int64_t i, const int half) {
    return half ? (float)((const kv_half *)p)[i] : ((const float *)p)[i];
}

/* The cache lines of n elements at p, into L2 ahead of use (prefetcht1): fetched into L1 instead, the rows of
 * blocks ahead took L1's line-fill buffers and lines from the rows in use (a third slower from memory). */
static inline __attribute__((always_inline)) void kv_prefetch(const void *p, int64_t n, const int half) {
    for (int64_t c = 0; c < n * (half ? 2 : 4); c += 64) __builtin_prefetch((const char *)p + c, 0, 2);
}

#if defined(__AVX512F__)
#define SW 16 /* scores a tile: one zmm of 16 positions */
static inline __attribute__((always_inline)) __m512 kv_load(const void *p, int64_t i, const int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const kv_half *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}

/* The 16 sums of a[0..15] in one vector (lane j: the sum of a[j]'s lanes): a transpose-and-add tree, 15
 * adds and 30 shuffles where 16 horizontal sums take ~130 operations. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int m = 0; m < 8; m++) /* 128-bit lane k: a[2m]'s, a[2m+1]'s, a[2m]'s, a[2m+1]'s partial sums */
        b[m] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * m], a[2 * m + 1]), _mm512_unpackhi_ps(a[2 * m], a[2 * m + 1]));
    for (int m = 0; m < 4; m++) { /* lane k: a[4m .. 4m+3]'s partial sums */
        const __m512d x = _mm512_castps_pd(b[2 * m]), y = _mm512_castps_pd(b[2 * m + 1]);
        c[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int m = 0; m < 2; m++) /* lanes 0-1: a[8m .. 8m+3] (two halves), lanes 2-3: a[8m+4 .. 8m+7] */
        d[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* s[g * ls + j] = scale * q_g . k_j for j < n <= SW and the G heads; rows k_j ld elements apart (all SW
 * readable: they lie in one cache block). */
static inline __attribute__((always_inline)) void qk_tile(const float *q, const void *k, int64_t ld, const int64_t G,
                                                        const int64_t D, float scale, float *s, int64_t ls, int64_t n,
                                                        const int half) {
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), kv_load(k, j * ld, half));
            for (int64_t c = 16; c < D; c += 16)
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + c), kv_load(k, j * ld + c, half), acc[j]);
        }
        const __m512 r = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(s + g * ls, (__mmask16)((1u << n) - 1), r);
    }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SW 8 /* AVX2: one ymm of 8 positions */
static inline __attribute__((always_inline)) __m256 kv_load(const void *p, int64_t i, const int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const kv_half *)p + i)))
                : _mm256_loadu_ps((const float *)p + i);
}

/* The 8 sums of a[0..7] in one vector (lane j: the sum of a[j]'s lanes): 6 horizontal adds, 2 lane
 * permutes and an add, where 8 horizontal sums take ~50 operations. */
static inline __attribute__((always_inline)) __m256 sum8(const __m256 a[8]) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* 128-bit half h: a[0..3] / a[4..7] */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* s[g * ls + j] = scale * q_g . k_j for j < n <= SW and the G heads; rows k_j ld elements apart (all SW
 * readable: they lie in one cache block). */
static inline __attribute__((always_inline)) void qk_tile(const float *q, const void *k, int64_t ld, const int64_t G,
                                                           const int64_t D, float scale, float *s, int64_t ls, int64_t n,
                                                           const int half) {
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t c = 0; c < D; c += 8) { /* 8 accumulators, one q chunk: 10 of the 16 ymm */
            const __m256 qv = _mm256_loadu_ps(q + g * D + c);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, kv_load(k, j * ld + c, half), acc[j]);
        }
        float r[8];
        _mm256_storeu_ps(r, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
        for (int64_t j = 0; j < n; j++) s[g * ls + j] = r[j];
    }
}
#endif

/* a[i] += p * v[i] for i < D. */
static inline __attribute__((always_inline)) void kv_axpy(float *a, float p, const void *v, const int64_t D,
                                                          const int half) {
#ifdef SW
    if (D % SW == 0) {
#if SW == 16
        const __m512 pv = _mm512_set1_ps(p);
        for (int64_t c = 0; c < D; c += 16)
            _mm512_storeu_ps(a + c, _mm512_fmadd_ps(pv, kv_load(v, c, half), _mm512_loadu_ps(a + c)));
#else
        const __m256 pv = _mm256_set1_ps(p);
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(a + c, _mm256_fmadd_ps(pv, kv_load(v, c, half), _mm256_loadu_ps(a + c)));
#endif
        return;
    }
#endif
    if (!half) {
        const float *vf = v;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) a[i] += p * vf[i];
        return;
    }
    for (int64_t i = 0; i < D; i++) a[i] += p * kv_get(v, i, half);
}

/* Rows of many KV heads are read whole, a position after another (attend_wide): a 7B's K row is 32 heads x
 * 128 floats, 16 KiB a position and layer, of which the per-head path above reads one head's 512 bytes at a
 * time, 16 KiB apart, and passes over each block once a head: a stride the hardware prefetchers do not
 * follow across pages. Read whole, a block's K (or V) is one run of memory. From this many floats a row on
 * (a page), the kernel reads rows whole. */
#define WIDE_ROW 1024
#define WIDE_HEADS 16 /* query heads a task takes when a long context is split across threads */

/* s[h] = scale * q_h . k_{(h0 + h) / G} for the H query heads of q [H, D] (heads h0 .. h0 + H - 1);
 * k: the row at its first KV head's part, kv_of(h) = (h0 + h) / G - h0 / G. Each head's dot is the same
 * sum in the same order whatever H and h0 are (a lane of a tile depends on its own head only), so a
 * sequence gets the same bits split across threads or not. */
static inline __attribute__((always_inline)) void qk_heads(const float *q, const void *k, int64_t H, int64_t h0,
                                                           const int64_t G, const int64_t D, float scale, float *s,
                                                           const int half) {
#if SW == 16
    for (int64_t hb = 0; hb < H; hb += 16) {
        const int64_t n = H - hb < 16 ? H - hb : 16;
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            const int64_t h = hb + (j < n ? j : n - 1); /* lanes past H repeat the last head */
            const float *qh = q + h * D;
            const void *kh = kv_at(k, ((h0 + h) / G - h0 / G) * D, half);
            acc[j] = _mm512_mul_ps(_mm512_loadu_ps(qh), kv_load(kh, 0, half));
            for (int64_t c = 16; c < D; c += 16)
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c), kv_load(kh, c, half), acc[j]);
        }
        _mm512_mask_storeu_ps(s + hb, (__mmask16)((1u << n) - 1), _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
#elif SW == 8
    for (int64_t hb = 0; hb < H; hb += 8) {
        const int64_t n = H - hb < 8 ? H - hb : 8;
        __m256 acc[8];
        for (int j = 0; j < 8; j++) {
            const int64_t h = hb + (j < n ? j : n - 1);
            const float *qh = q + h * D;
            const void *kh = kv_at(k, ((h0 + h) / G - h0 / G) * D, half);
            acc[j] = _mm256_setzero_ps();
            for (int64_t c = 0; c < D; c += 8)
                acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c), kv_load(kh, c, half), acc[j]);
        }
        float r[8];
        _mm256_storeu_ps(r, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
        for (int64_t j = 0; j < n; j++) s[hb + j] = r[j];
    }
#else
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * D;
        const void *kh = kv_at(k, ((h0 + h) / G - h0 / G) * D, half);
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < D; i++) d += qh[i] * kv_get(kh, i, half);
        s[h] = d * scale;
    }
#endif
}

/* Query heads [h0, h1) of one row over positions [lo, L), rows read whole (WIDE_ROW): q, out [Hq, D] (at head
 * 0); scratch holds (h1 - h0) * (span + D + 2) floats. Scores position-major, [position][head], so that the
 * softmax runs with heads as its lanes; V is summed into an [H, D] accumulator that stays in L1 (16 KiB for a
 * 7B) while the rows stream by. */
static inline __attribute__((always_inline)) void attend_wide(const float *q, const void *kc, const void *vc,
        const int64_t *tb, int64_t L, int64_t lo, int64_t h0, int64_t h1, int64_t Hkv, const int64_t G,
        const int64_t D, int64_t bs, float scale, float softcap, float *out, float *scratch, const int half) {
    const int64_t H = h1 - h0, ld = Hkv * D, koff = h0 / G * D;
    const int64_t b0 = lo / bs, jb = b0 * bs, first = lo - jb, n = L - jb; /* scores from block b0's start */
    float *s = scratch, *acc = s + n * H, *mx = acc + H * D, *sum = mx + H; /* s: [n, H]; acc: [H, D] */
    const float *qh = q + h0 * D;
    for (int64_t j0 = jb, blk = b0; j0 < L; j0 += bs, blk++) {
        const int64_t m = L - j0 < bs ? L - j0 : bs;
        const void *kb = kv_at(kc, tb[blk] * bs * ld + koff, half);
        for (int64_t j = 0; j < m; j++)
            qk_heads(qh, kv_at(kb, j * ld, half), H, h0, G, D, scale, s + (j0 - jb + j) * H, half);
    }
    if (softcap > 0.f) {
        const float inv = 1.f / softcap;
#pragma omp simd
        for (int64_t i = 0; i < n * H; i++) s[i] = softcap * tanh_vec(s[i] * inv);
    }
    for (int64_t h = 0; h < H; h++) {
        mx[h] = -INFINITY;
        sum[h] = 0.f;
    }
    for (int64_t j = first; j < n; j++) {
        const float *sj = s + j * H;
#pragma omp simd
        for (int64_t h = 0; h < H; h++) mx[h] = sj[h] > mx[h] ? sj[h] : mx[h];
    }
    for (int64_t j = first; j < n; j++) {
        float *sj = s + j * H;
#pragma omp simd
        for (int64_t h = 0; h < H; h++) {
            sj[h] = exp_nonpos(sj[h] - mx[h]);
            sum[h] += sj[h];
        }
    }
    for (int64_t h = 0; h < H; h++) sum[h] = 1.f / sum[h];
    for (int64_t i = 0; i < H * D; i++) acc[i] = 0.f;
    for (int64_t j0 = jb, blk = b0; j0 < L; j0 += bs, blk++) {
        const int64_t m = L - j0 < bs ? L - j0 : bs;
        const void *vb = kv_at(vc, tb[blk] * bs * ld + koff, half);
        for (int64_t j = j0 < lo ? lo - j0 : 0; j < m; j++) {
            const void *vr = kv_at(vb, j * ld, half);
            const float *p = s + (j0 - jb + j) * H;
            for (int64_t h = 0; h < H; h++)
                kv_axpy(acc + h * D, p[h] * sum[h], kv_at(vr, ((h0 + h) / G - h0 / G) * D, half), D, half);
        }
    }
    for (int64_t i = 0; i < H * D; i++) out[h0 * D + i] = acc[i];
}

/* Attention of the G query heads of KV head kvh over the sequence's positions [lo, L): q, out [G, D];
 * scores in s. Positions outermost, so each K/V row part (one or a few cache lines) is read once
 * for the G heads. Called with constant G and D for the common shapes, so that the accumulators (G * D
 * floats: 12 zmm for SmolLM2) stay in registers while V streams by, where one pass over all heads kept
 * them in memory (same bits either way).
 * Scores come a tile of positions at a time (qk_tile: 16 with AVX-512, 8 with AVX2): one horizontal
 * sum per score had made the QK phase a large part of the kernel with K in cache. From memory (the
 * engine's case) the tiles gain less: reading K/V is then what bounds the kernel.
 * Blocks lie anywhere in the cache, so the hardware prefetcher starts cold at each one: the rows of the block
 * PF_BLOCKS ahead are prefetched into L2, which matters with cold caches, as in the engine where the weights
 * stream through between layers. The timings: BENCHMARKS.md, "Decode attention", "Attention scores 16
 * positions at a time" and "Decode attention: the rows two blocks ahead prefetched into L2". */
#define PF_BLOCKS 2
static inline __attribute__((always_inline)) void attend_kv(const float *q, const void *kc, const void *vc,
        const int64_t *tb, int64_t L, int64_t lo, int64_t kvh, int64_t Hkv, const int64_t G, const int64_t D,
        int64_t bs, float scale, float softcap, float *out, float *s, const int half) {
    /* Positions [lo, L) are attended to. Scores start at the block holding lo (jb), so that the tiles
     * stay aligned to blocks; the ones before lo are computed and left out of the softmax. */
    const int64_t b0 = lo / bs, jb = b0 * bs, ls = L - jb; /* s: [G, ls], position j at s[g * ls + j - jb] */
    for (int64_t j0 = jb, blk = b0; j0 < L; j0 += bs, blk++) {
        const int64_t n = L - j0 < bs ? L - j0 : bs;
        const void *kb = kv_at(kc, (tb[blk] * bs * Hkv + kvh) * D, half);
        const void *kn = j0 + PF_BLOCKS * bs < L ? kv_at(kc, (tb[blk + PF_BLOCKS] * bs * Hkv + kvh) * D, half) : kb;
        float *sb = s + j0 - jb;
#ifdef SW
        if (bs % SW == 0 && D % SW == 0) {
            for (int64_t j = 0; j < n; j += SW) {
                for (int64_t r = j; r < j + SW; r++) kv_prefetch(kv_at(kn, r * Hkv * D, half), D, half);
                qk_tile(q, kv_at(kb, j * Hkv * D, half), Hkv * D, G, D, scale, sb + j, ls, n - j < SW ? n - j : SW,
                        half);
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < n; j++) {
            const void *kr = kv_at(kb, j * Hkv * D, half);
            kv_prefetch(kv_at(kn, j * Hkv * D, half), D, half);
            for (int64_t g = 0; g < G; g++) {
                const float *qh = q + g * D;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (int64_t i = 0; i < D; i++) d += qh[i] * kv_get(kr, i, half);
                sb[g * ls + j] = d * scale;
            }
        }
    }
    if (softcap > 0.f) { /* a pass of its own: the loops above stay as they are without a cap */
        const float inv = 1.f / softcap;
#pragma omp simd
        for (int64_t i = 0; i < G * ls; i++) s[i] = softcap * tanh_vec(s[i] * inv);
    }
    for (int64_t g = 0; g < G; g++) {
        float *sr = s + g * ls + (lo - jb), m = -INFINITY, sum = 0.f;
        const int64_t len = L - lo;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < len; j++) m = sr[j] > m ? sr[j] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; j++) {
            sr[j] = exp_nonpos(sr[j] - m);
            sum += sr[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < len; j++) sr[j] *= inv;
    }
    float acc[G][D];
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < D; i++) acc[g][i] = 0.f;
    for (int64_t j0 = jb, blk = b0; j0 < L; j0 += bs, blk++) {
        const int64_t n = L - j0 < bs ? L - j0 : bs;
        const void *vb = kv_at(vc, (tb[blk] * bs * Hkv + kvh) * D, half);
        const void *vn = j0 + PF_BLOCKS * bs < L ? kv_at(vc, (tb[blk + PF_BLOCKS] * bs * Hkv + kvh) * D, half) : vb;
        const float *pb = s + j0 - jb;
        for (int64_t j = j0 < lo ? lo - j0 : 0; j < n; j++) {
            const void *vr = kv_at(vb, j * Hkv * D, half);
            kv_prefetch(kv_at(vn, j * Hkv * D, half), D, half);
            for (int64_t g = 0; g < G; g++) kv_axpy(acc[g], pb[g * ls + j], vr, D, half);
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < D; i++) out[g * D + i] = acc[g][i];
}

/* Sequence b's query heads [h0, h1) (a multiple of G apart) over positions [lo, L): q, out [Hq, D]; scratch
 * holds G * (L - lo rounded down to a block start) floats, or attend_wide's. */
static inline __attribute__((always_inline)) void attend_as(const float *q, const void *kc, const void *vc,
        const int64_t *tb, int64_t L, int64_t lo, int64_t h0, int64_t h1, int64_t Hkv, int64_t G, int64_t D,
        int64_t bs, float scale, float softcap, float *out, float *scratch, const int half) {
    if (Hkv * D >= WIDE_ROW) {
        if (G == 1 && D == 128) /* Llama-2-7B */
            attend_wide(q, kc, vc, tb, L, lo, h0, h1, Hkv, 1, 128, bs, scale, softcap, out, scratch, half);
        else if (G == 4 && D == 128) /* Mistral-7B, Llama-3-8B */
            attend_wide(q, kc, vc, tb, L, lo, h0, h1, Hkv, 4, 128, bs, scale, softcap, out, scratch, half);
        else
            attend_wide(q, kc, vc, tb, L, lo, h0, h1, Hkv, G, D, bs, scale, softcap, out, scratch, half);
        return;
    }
    for (int64_t kvh = h0 / G; kvh < h1 / G; kvh++) {
        const float *qk = q + kvh * G * D;
        float *ok = out + kvh * G * D;
        if (G == 3 && D == 64) /* SmolLM2-135M */
            attend_kv(qk, kc, vc, tb, L, lo, kvh, Hkv, 3, 64, bs, scale, softcap, ok, scratch, half);
        else
            attend_kv(qk, kc, vc, tb, L, lo, kvh, Hkv, G, D, bs, scale, softcap, ok, scratch, half);
    }
}

static void attend(const float *q, const void *kc, const void *vc, const int64_t *tb, int64_t L, int64_t lo,
                   int64_t h0, int64_t h1, int64_t Hkv, int64_t G, int64_t D, int64_t bs, float scale,
                   float softcap, float *out, float *scratch, int half) {
    if (half)
        attend_as(q, kc, vc, tb, L, lo, h0, h1, Hkv, G, D, bs, scale, softcap, out, scratch, 1);
    else
        attend_as(q, kc, vc, tb, L, lo, h0, h1, Hkv, G, D, bs, scale, softcap, out, scratch, 0);
}

/* Positions a score tile holds: 16 (AVX-512), 8 (AVX2), 0 in the scalar build (tests check which ran). */
int paged_attention_tile(void) {
#ifdef SW
    return SW;
#else
    return 0;
#endif
}

/* The first position a row of context length L attends to. */
static inline int64_t window_start(int64_t L, int64_t window) {
    return window > 0 && L > window ? L - window : 0;
}

/* Returns 0; 1 when scratch memory could not be had; 2 (nothing computed) when a length or a block id
 * that would be read is outside the tables or the cache (nslots slots): a wrong index must not become a
 * read anywhere. Blocks wholly before a row's window are not read, so not checked either. */
int paged_decode_attention(const float *q, const void *kc, const void *vc, int64_t nslots,
                           const int64_t *tables, int64_t width, const int64_t *lens, int64_t B, int64_t Hq,
                           int64_t Hkv, int64_t D, int64_t bs, float scale, float softcap, int64_t window,
                           int half, float *out, int nthreads) {
    const int64_t G = Hq / Hkv;
    int64_t span = 0; /* the most scores a head of one row holds: from its window's first block on */
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > width * bs) return 2;
        const int64_t b0 = window_start(lens[b], window) / bs;
        for (int64_t i = b0; i < (lens[b] + bs - 1) / bs; i++)
            if (tables[b * width + i] < 0 || (tables[b * width + i] + 1) * bs > nslots) return 2;
        span = lens[b] - b0 * bs > span ? lens[b] - b0 * bs : span;
    }
    /* A task is one sequence with all its heads: each K/V row is then touched by one task only. Split by
     * KV head, tasks touched each row's pages Hkv times, and in the engine (weights streaming through the
     * caches between layers) the TLB and cache misses made a layer several times slower (BENCHMARKS.md,
     * "Paged decode attention kernel"). Only fewer sequences than threads over long contexts (the part a
     * window leaves) are split, so that every thread has work. */
    const int wide = Hkv * D >= WIDE_ROW, long_few = B < (int64_t)nthreads && span >= 1024;
    /* Wide rows split by WIDE_HEADS query heads (whole KV heads), where the heads divide so. */
    const int64_t split = !long_few ? 1 : !wide ? Hkv : Hq % WIDE_HEADS == 0 && WIDE_HEADS % G == 0 ? Hq / WIDE_HEADS : 1;
    const int64_t heads = Hq / split;
    const size_t floats = wide ? (size_t)(heads * (span + D + 2)) : (size_t)(G * span);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_ON(csr);
        float *scratch = malloc(sizeof(float) * floats);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * split; t++) {
            if (!scratch) continue;
            const int64_t b = t / split, h0 = (t % split) * heads;
            attend(q + b * Hq * D, kc, vc, tables + b * width, lens[b], window_start(lens[b], window), h0,
                   h0 + heads, Hkv, G, D, bs, scale, softcap, out + b * Hq * D, scratch, half);
        }
        free(scratch);
        FTZ_OFF(csr);
    }
    return failed;
}
