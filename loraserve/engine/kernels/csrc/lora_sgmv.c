/* Multi-LoRA on the CPU for one (layer, projection group) of one rank pool: every listed batch row gets
 * its own adapter's delta, out[row] += (x[row] @ A_slot) @ B_slot, each adapter's A and B read once per
 * call however many rows use it (the SGMV idea: rows grouped into segments by adapter).
 *
 * Built by loraserve/engine/kernels/build.py with the machine's C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes. Float32; the adapter weights are packed by lora.py (LoraPool, packed):
 *   x:     [T, K], rows ldx apart       the group's input
 *   out:   [T, N], rows ldo apart       the base projection's output, updated in place
 *   a:     [C, K * nR]                  each slot's A [K, nR] (the group's n targets side by side, nR = n * R)
 *                                       cut into column tiles of TILE: tile c0 is [K, w] at a + K * c0
 *   b:     [C, R * N]                   each slot's B: target j's [R, cols[j + 1] - cols[j]] block cut the
 *                                       same way, the tile at output column c is [R, w] at b + R * c
 *   plan:  int64 [nseg slots | nseg + 1 starts | rows]   segment s: slot plan[s], batch rows
 *                                       rows[starts[s] .. starts[s + 1])
 *   h:     [rows, parts(K) * nR] scratch   the shrink's result, in plan order: a row's partial sums
 *                                       over each KPART rows of A side by side (see sgmv), then their sum
 * Why packed: every task then streams one contiguous block. With B as [nR, N] rows (R rows N apart per
 * column tile) the hardware prefetcher lost track and the expand read its weights well below the
 * memory's pace (the timings, against torch's gather + padded bmm + scatter: BENCHMARKS.md, "Multi-LoRA").
 * Every output element is summed by one thread in a fixed order, whatever the blocking: a row's result
 * does not depend on the other rows or on the thread count.
 * lora_sgmv_f16 is the same over half-precision (IEEE fp16) A and B, widened to float32 as they are
 * read (x, out, h and every sum stay float32): half the bytes, and decode LoRA is bound by reading them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define TILE 16 /* columns per packed tile: the layout's unit, exported to lora.py by lora_sgmv_tile() */
#if defined(__AVX512F__)
#define MB 4 /* accumulator tiles per register block: a tile is one zmm register */
#else
#define MB 2 /* a tile is two ymm registers, and there are 16 */
#endif
#define KS 4 /* the shrink's partial sums per output: one chain of K adds would run at the add's latency */
#define CHUNK 256 /* output columns per expand task: a rank-16 B chunk is 16 KiB, in L1 */
/* Rows of A per shrink task. A tile's K rows are cut into parts summed apart and then in order, a number set
 * by K alone (never by the thread or row count, so a row's bits stay its own): at one row a q/k/v group
 * has 3 tiles, o and down 1, which 2 threads could not share evenly as whole tiles. */
#define KPART 1024
/* fp16 weights: a segment of at least this many rows has its A tile or B chunk widened to float32 once,
 * into per-thread scratch, instead of each row block widening it again (a prefill chunk's segments are
 * 100+ rows, where that made the half-precision path slower than float32) */
#define WIDEN_ROWS 8

int lora_sgmv_tile(void) { return TILE; }

int lora_sgmv_kpart(void) { return KPART; } /* h's row holds ceil(K / KPART) * nR floats */

static int64_t kparts(int64_t K) { return (K + KPART - 1) / KPART; }

/* The end of the part of K that starts at k0. */
static inline int64_t part_end(int64_t k0, int64_t K) { return k0 + KPART < K ? k0 + KPART : K; }

/* IEEE half -> float, without F16C (normal, subnormal, zero, inf and NaN). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union { uint32_t u; float f; } v;
    if (exp == 0x1f) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        v.u = sign | ((exp + 112) << 23) | (man << 13);
    } else { /* zero or subnormal: man * 2^-24 */
        v.f = (float)man * 5.9604644775390625e-8f;
        v.u |= sign;
    }
    return v.f;
}

/* Row `off` (in elements) of w floats from a packed weight: in place for float32, else the fp16 row
 * widened into buf (one vector conversion for a full tile). */
static inline __attribute__((always_inline)) const float *wrow(const void *base, int64_t off, const int half,
                                                                const int w, float *buf) {
    if (!half) return (const float *)base + off;
    const uint16_t *p = (const uint16_t *)base + off;
#if defined(__AVX512F__)
    if (w == TILE) {
        _mm512_storeu_ps(buf, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
        return buf;
    }
#elif defined(__F16C__)
    if (w == TILE) {
        _mm256_storeu_ps(buf, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
        _mm256_storeu_ps(buf + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
        return buf;
    }
#endif
    for (int t = 0; t < w; t++) buf[t] = half_to_float(p[t]);
    return buf;
}

/* dst[0:n] = the fp16 src[0:n] as float32. */
static void widen(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + TILE <= n; i += TILE) wrow(src, i, 1, TILE, dst + i); /* converts straight into dst */
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* h[r * ldh + c0:c0+w] = x[rows[r], k0:k1] @ A[k0:k1, c0:c0+w] for mb rows; acc[r][p] sums the k = k0 + p
 * (mod KS) terms. */
static inline __attribute__((always_inline)) void shrink_block(const float *x, int64_t ldx, const int64_t *rows,
                                                                const int mb, const void *a, int64_t at,
                                                                const int half, int64_t k0, int64_t k1,
                                                                int64_t ldh, int64_t c0, const int w, float *h) {
    float acc[MB][KS][TILE] = {{{0.f}}}, buf[TILE];
    const float *xr[MB];
    for (int r = 0; r < mb; r++) xr[r] = x + rows[r] * ldx;
    int64_t k = k0;
    for (; k + KS <= k1; k += KS)
        for (int p = 0; p < KS; p++) {
            const float *ar = wrow(a, at + (k + p) * w, half, w, buf);
            for (int r = 0; r < mb; r++) {
                const float xv = xr[r][k + p];
#pragma omp simd
                for (int t = 0; t < w; t++) acc[r][p][t] += xv * ar[t];
            }
        }
    for (; k < k1; k++) {
        const float *ar = wrow(a, at + k * w, half, w, buf);
        for (int r = 0; r < mb; r++) {
            const float xv = xr[r][k];
#pragma omp simd
            for (int t = 0; t < w; t++) acc[r][0][t] += xv * ar[t];
        }
    }
    for (int r = 0; r < mb; r++)
        for (int t = 0; t < w; t++)
            h[r * ldh + c0 + t] = (acc[r][0][t] + acc[r][1][t]) + (acc[r][2][t] + acc[r][3][t]);
}

/* The packed A's tile at column c0 is [K, w] (w = tile_width: TILE, or what is left of the nR columns), its
 * rows k0.. from a_part_at on: where shrink reads a task's part, and the task before it prefetches. */
static inline int64_t tile_width(int64_t nR, int64_t c0) { return nR - c0 < TILE ? nR - c0 : TILE; }

static inline int64_t a_part_at(int64_t a0, int64_t K, int64_t nR, int64_t c0, int64_t k0) {
    return a0 + K * c0 + k0 * tile_width(nR, c0);
}

/* The shrink of A's tile at column c0, its rows k0..k1, for the m rows of one segment (h: their partial
 * sums for this part, rows ldh apart), the tile's weights starting `at` elements into a. */
static inline __attribute__((always_inline)) void shrink_rows(const float *x, int64_t ldx, const int64_t *rows,
                                                               int64_t m, const void *a, int64_t at, const int half,
                                                               int64_t k0, int64_t k1, int64_t nR, int64_t ldh,
                                                               int64_t c0, float *h) {
    const int w = (int)tile_width(nR, c0);
    int64_t i = 0;
    if (w == TILE) { /* constant widths: the compiler unrolls the tile into registers */
        for (; i + MB <= m; i += MB)
            shrink_block(x, ldx, rows + i, MB, a, at, half, k0, k1, ldh, c0, TILE, h + i * ldh);
        for (; i < m; i++) shrink_block(x, ldx, rows + i, 1, a, at, half, k0, k1, ldh, c0, TILE, h + i * ldh);
    } else {
        for (; i < m; i++) shrink_block(x, ldx, rows + i, 1, a, at, half, k0, k1, ldh, c0, w, h + i * ldh);
    }
}

/* shrink_rows for a slot whose packed A starts `a0` elements into a; a large segment's fp16 part of a tile
 * is widened into scratch first. */
static inline __attribute__((always_inline)) void shrink(const float *x, int64_t ldx, const int64_t *rows, int64_t m,
                                                          const void *a, int64_t a0, const int half, int64_t K,
                                                          int64_t k0, int64_t k1, int64_t nR, int64_t ldh,
                                                          int64_t c0, float *h, float *scratch) {
    if (half && scratch && m >= WIDEN_ROWS) {
        const int64_t w = tile_width(nR, c0);
        widen((const uint16_t *)a + a_part_at(a0, K, nR, c0, k0), (k1 - k0) * w, scratch);
        shrink_rows(x, ldx, rows, m, scratch, -k0 * w, 0, k0, k1, nR, ldh, c0, h);
    } else {
        shrink_rows(x, ldx, rows, m, a, a0 + K * c0, half, k0, k1, nR, ldh, c0, h);
    }
}

/* out[rows[r], c + q*TILE + t] += h[r, :R] @ B's tile at c + q*TILE (h's rows ldh apart), for mb rows and nt
 * tiles of width w (mb * nt <= MB * MB accumulator tiles, each a chain of R adds in the same order whatever the
 * blocking). */
static inline __attribute__((always_inline)) void expand_block(float *out, int64_t ldo, const int64_t *rows,
                                                                const int mb, const int nt, const float *hj,
                                                                int64_t ldh, const void *b, int64_t b0,
                                                                const int half, int64_t R, int64_t c,
                                                                const int w) {
    float acc[MB][MB][TILE], buf[TILE];
    for (int r = 0; r < mb; r++)
        for (int q = 0; q < nt; q++)
            for (int t = 0; t < w; t++) acc[r][q][t] = out[rows[r] * ldo + c + q * TILE + t];
    for (int64_t k = 0; k < R; k++)
        for (int q = 0; q < nt; q++) {
            const float *br = wrow(b, b0 + R * (c + q * TILE) + k * w, half, w, buf);
            for (int r = 0; r < mb; r++) {
                const float hv = hj[r * ldh + k];
#pragma omp simd
                for (int t = 0; t < w; t++) acc[r][q][t] += hv * br[t];
            }
        }
    for (int r = 0; r < mb; r++)
        for (int q = 0; q < nt; q++)
            for (int t = 0; t < w; t++) out[rows[r] * ldo + c + q * TILE + t] = acc[r][q][t];
}

/* out[rows[i], c0:c1] += h[i, jR:jR+R] @ B_j[:, c0:c1] for the m rows of one segment (hj = h + jR; the
 * tile at output column c at b + b0 + R * c). Rows in blocks of MB over MB tiles (then one tile); the rest
 * one row at a time over MB tiles. */
static inline __attribute__((always_inline)) void expand_rows(float *out, int64_t ldo, const int64_t *rows,
                                                               int64_t m, const float *hj, int64_t ldh, const void *b,
                                                               int64_t b0, const int half, int64_t R, int64_t c0,
                                                               int64_t c1) {
    const int64_t blocked = m - m % MB;
    int64_t c = c0;
    /* MB rows x MB tiles: MB * MB independent FMA chains. With MB rows over one tile (MB chains of R adds)
     * too few FMAs were in flight and a prefill chunk's expand ran at the FMA's latency (BENCHMARKS.md,
     * "The prefill expand"). */
    for (; c + MB * TILE <= c1; c += MB * TILE)
        for (int64_t i = 0; i < blocked; i += MB)
            expand_block(out, ldo, rows + i, MB, MB, hj + i * ldh, ldh, b, b0, half, R, c, TILE);
    for (; c < c1; c += TILE) {
        const int w = c1 - c < TILE ? (int)(c1 - c) : TILE;
        if (w == TILE)
            for (int64_t i = 0; i < blocked; i += MB)
                expand_block(out, ldo, rows + i, MB, 1, hj + i * ldh, ldh, b, b0, half, R, c, TILE);
        else
            for (int64_t i = 0; i < blocked; i++)
                expand_block(out, ldo, rows + i, 1, 1, hj + i * ldh, ldh, b, b0, half, R, c, w);
    }
    for (int64_t i = blocked; i < m; i++) {
        for (c = c0; c + MB * TILE <= c1; c += MB * TILE)
            expand_block(out, ldo, rows + i, 1, MB, hj + i * ldh, ldh, b, b0, half, R, c, TILE);
        for (; c + TILE <= c1; c += TILE)
            expand_block(out, ldo, rows + i, 1, 1, hj + i * ldh, ldh, b, b0, half, R, c, TILE);
        if (c < c1) expand_block(out, ldo, rows + i, 1, 1, hj + i * ldh, ldh, b, b0, half, R, c, (int)(c1 - c));
    }
}

/* expand_rows for a slot whose packed B starts `b0` elements into b; a large segment's fp16 chunk (its
 * tiles lie together: R * (c1 - c0) weights from column c0's tile on) is widened into scratch first. */
static inline __attribute__((always_inline)) void expand(float *out, int64_t ldo, const int64_t *rows, int64_t m,
                                                          const float *hj, int64_t ldh, const void *b, int64_t b0,
                                                          const int half, int64_t R, int64_t c0, int64_t c1,
                                                          float *scratch) {
    if (half && scratch && m >= WIDEN_ROWS) {
        widen((const uint16_t *)b + b0 + R * c0, R * (c1 - c0), scratch);
        expand_rows(out, ldo, rows, m, hj, ldh, scratch, -R * c0, 0, R, c0, c1);
    } else {
        expand_rows(out, ldo, rows, m, hj, ldh, b, b0, half, R, c0, c1);
    }
}

static int64_t chunks_of(int64_t width) { return (width + CHUNK - 1) / CHUNK; }

/* Rows of a segment a task takes: a segment's rows are cut into blocks of RB (a multiple of MB), so that one
 * adapter's rows (a prefill chunk's hundreds, or the popular adapter's share of a decode batch) can be shared
 * by the threads. A row is still computed by one task in one order: its bits are the same. */
#define RB 16
/* A task's weight when the tasks are shared out: its rows plus this many, per weight it reads (streaming a
 * tile's weights costs about what multiplying them into this many rows does). */
#define STREAM_ROWS 2

static int64_t blocks_of(int64_t rows) { return (rows + RB - 1) / RB; }

/* The cache lines of [p, p + bytes) into L2 (prefetcht1), ahead of the task that reads them. */
static inline void prefetch_l2(const void *p, int64_t bytes) {
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)p + c, 0, 2);
}

/* A position in a phase's task list: tasks run segment by segment, row block by row block, and within a
 * block over `per` tasks (the shrink's tiles times parts of K, or the expand's column chunks). */
typedef struct {
    int64_t s, block, rest;
} cursor_t;

static inline void advance(cursor_t *c, const int64_t *starts, int64_t per) {
    if (++c->rest < per) return;
    c->rest = 0;
    if (++c->block < blocks_of(starts[c->s + 1] - starts[c->s])) return;
    c->block = 0;
    c->s++;
}

/* The rows of c's block. */
static inline int64_t block_rows(const cursor_t *c, const int64_t *starts) {
    const int64_t m = starts[c->s + 1] - starts[c->s] - c->block * RB;
    return m < RB ? m : RB;
}

/* Expand chunk c of a row block as target j's columns [c0, c1). */
static inline void chunk_cols(const int64_t *cols, int64_t c, int64_t *j, int64_t *c0, int64_t *c1) {
    int64_t i = 0;
    for (; c >= chunks_of(cols[i + 1] - cols[i]); i++) c -= chunks_of(cols[i + 1] - cols[i]);
    *j = i;
    *c0 = cols[i] + c * CHUNK;
    *c1 = *c0 + CHUNK < cols[i + 1] ? *c0 + CHUNK : cols[i + 1];
}

/* The weights a task reads, per row: a shrink task's part of K (times the tile, the same for all), an
 * expand task's chunk of columns (times R). */
static inline int64_t task_width(const cursor_t *c, int expand, int64_t K, int64_t S, const int64_t *cols) {
    if (expand) {
        int64_t j, c0, c1;
        chunk_cols(cols, c->rest, &j, &c0, &c1);
        return c1 - c0;
    }
    const int64_t k0 = c->rest % S * KPART;
    return K - k0 < KPART ? K - k0 : KPART;
}

/* Where thread `me` of `nt` starts in a phase's task list, and how many tasks it runs: the list cut in order
 * into runs of about equal weight, (rows + STREAM_ROWS) * task_width a task, each task going to the thread
 * whose share holds its middle. Each thread then streams neighbouring tiles of one slot's weights, as a
 * static schedule does, but a batch whose rows crowd onto a few adapters (a power-law mix: a segment of 12
 * rows, the next of 1) is no longer shared out by task count, which left one thread most of the work
 * (BENCHMARKS.md, "LoRA tasks shared by weight"). */
static int64_t share(const int64_t *starts, int64_t nseg, int64_t per, int expand, int64_t K, int64_t S,
                     const int64_t *cols, int me, int nt, cursor_t *first) {
    int64_t total = 0;
    cursor_t c = {0, 0, 0};
    while (c.s < nseg) {
        total += (block_rows(&c, starts) + STREAM_ROWS) * task_width(&c, expand, K, S, cols);
        advance(&c, starts, per);
    }
    int64_t before = 0, count = 0;
    c = (cursor_t){0, 0, 0};
    while (c.s < nseg) {
        const int64_t w = (block_rows(&c, starts) + STREAM_ROWS) * task_width(&c, expand, K, S, cols);
        const int64_t owner = (2 * before + w) * nt / (2 * total);
        if (owner > me) break;
        if (owner == me && !count++) *first = c;
        before += w;
        advance(&c, starts, per);
    }
    return count;
}

static inline __attribute__((always_inline)) void sgmv(const float *x, int64_t ldx, float *out, int64_t ldo,
                                                        const void *a, const void *b, const int half, int64_t K,
                                                        int64_t N, int64_t R, int64_t n, const int64_t *cols,
                                                        int64_t nseg, const int64_t *plan, float *h, int nthreads) {
    const int64_t nR = n * R, *slots = plan, *starts = plan + nseg, *rows = plan + 2 * nseg + 1;
    const int64_t tiles = (nR + TILE - 1) / TILE, S = kparts(K), ldh = S * nR;
    int64_t chunks = 0; /* expand tasks per row block: column chunks of the n targets' ranges */
    for (int64_t j = 0; j < n; j++) chunks += chunks_of(cols[j + 1] - cols[j]);
#pragma omp parallel num_threads(nthreads)
    {
        const int me = omp_get_thread_num(), nt = omp_get_num_threads();
        /* fp16 only: an A tile or a B chunk widened (NULL when malloc fails: every segment then widens as
         * it reads, which is only slower) */
        const int64_t widened = KPART * TILE > R * CHUNK ? KPART * TILE : R * CHUNK; /* an A part or a B chunk */
        float *scratch = half ? malloc(sizeof(float) * (size_t)widened) : 0;
        const int64_t el = half ? 2 : 4; /* bytes a weight */
        cursor_t c;
        for (int64_t i = 0, m = share(starts, nseg, tiles * S, 0, K, S, cols, me, nt, &c); i < m;
             i++, advance(&c, starts, tiles * S)) { /* (segment, row block, tile, part of K): a tile's parts in order */
            const int64_t r0 = starts[c.s] + c.block * RB, c0 = c.rest / S * TILE, k0 = c.rest % S * KPART;
            if (i + 1 < m) { /* the next task's part of A, when it starts a segment (later blocks share it) */
                cursor_t n = c;
                advance(&n, starts, tiles * S);
                const int64_t nc0 = n.rest / S * TILE, nk0 = n.rest % S * KPART;
                if (n.block == 0)
                    prefetch_l2((const char *)a + a_part_at(slots[n.s] * K * nR, K, nR, nc0, nk0) * el,
                                (part_end(nk0, K) - nk0) * tile_width(nR, nc0) * el);
            }
            shrink(x, ldx, rows + r0, block_rows(&c, starts), a, slots[c.s] * K * nR, half, K, k0, part_end(k0, K),
                   nR, ldh, c0, h + r0 * ldh + c.rest % S * nR, scratch);
        }
#pragma omp barrier
        if (S > 1) { /* each row's partial sums into its first part's place, in order */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < starts[nseg]; r++)
                for (int64_t k = 0; k < nR; k++) {
                    float v = h[r * ldh + k];
                    for (int64_t p = 1; p < S; p++) v += h[r * ldh + p * nR + k];
                    h[r * ldh + k] = v;
                }
        }
        /* (the barrier above, or the loop's: every h row is complete before an expand reads it) */
        for (int64_t i = 0, m = share(starts, nseg, chunks, 1, K, S, cols, me, nt, &c); i < m;
             i++, advance(&c, starts, chunks)) {
            int64_t j, c0, c1;
            const int64_t r0 = starts[c.s] + c.block * RB;
            chunk_cols(cols, c.rest, &j, &c0, &c1);
            if (i + 1 < m) { /* the next task's chunk of B */
                cursor_t n = c;
                advance(&n, starts, chunks);
                int64_t nj, n0, n1;
                chunk_cols(cols, n.rest, &nj, &n0, &n1);
                if (n.block == 0) prefetch_l2((const char *)b + (slots[n.s] * R * N + R * n0) * el, R * (n1 - n0) * el);
            }
            expand(out, ldo, rows + r0, block_rows(&c, starts), h + r0 * ldh + j * R, ldh, b,
                   slots[c.s] * R * N, half, R, c0, c1, scratch);
        }
        free(scratch);
    }
}

void lora_sgmv(const float *x, int64_t ldx, float *out, int64_t ldo, const float *a, const float *b, int64_t K,
               int64_t N, int64_t R, int64_t n, const int64_t *cols, int64_t nseg, const int64_t *plan, float *h,
               int nthreads) {
    sgmv(x, ldx, out, ldo, a, b, 0, K, N, R, n, cols, nseg, plan, h, nthreads);
}

void lora_sgmv_f16(const float *x, int64_t ldx, float *out, int64_t ldo, const uint16_t *a, const uint16_t *b,
                   int64_t K, int64_t N, int64_t R, int64_t n, const int64_t *cols, int64_t nseg,
                   const int64_t *plan, float *h, int nthreads) {
    sgmv(x, ldx, out, ldo, a, b, 1, K, N, R, n, cols, nseg, plan, h, nthreads);
}
