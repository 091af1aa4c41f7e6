/* A projection on the CPU for any number of rows: y[t] = W x[t] (float32), W packed in column panels.
 *
 * Built by loraserve/engine/kernels/build.py (-O3 -march=native -ffp-contract=fast -fopenmp), called
 * through ctypes. W [N, K] is kept as panels of NR = 32 output columns, [ceil(N / 32)][K][32], the last
 * one zero-padded (`LinearKernel.pack`). For each panel and each block of up to MR rows of x, the
 * micro-kernel walks K once: per k, one (or two) vector loads of the panel's 32 weights, MR broadcasts of
 * x[r][k], MR x 32 FMAs into accumulators that stay in registers (AVX-512: MR = 8, 16 zmm; AVX2: MR = 6,
 * each panel as two halves of 16 columns, 12 ymm). Rows of x come in blocks of TBLK, and the (block,
 * panel) pairs are split between threads: a panel (K * 128 bytes) is reused from L2 by every row of the
 * block, a one-row step streams the whole matrix once. While a thread works on one panel it prefetches
 * the next: when a panel is computed over several row groups (32 rows are 4 with AVX-512), only the
 * first group's pass would read it from memory, at the memory's pace, while the others run from L2 at
 * the FMA units'; the prefetch moves that read under the previous panel's compute. One panel ahead, into
 * L1 (the distances and cache levels tried, and the timings: BENCHMARKS.md, "The next panel prefetched").
 *
 * This outer-product form replaced a dot-product kernel (a group of W rows against one row of x at a
 * time, 16 partial sums per output), which was load-bound and paid a 16-lane reduction per output. It
 * beats torch's matmul (MKL) from one row to 1024, in the AVX2 build (-mno-avx512f) too, so MKL is not
 * kept beside it for projections (BENCHMARKS.md, "Packed panels, an outer-product micro-kernel").
 * Each output is one FMA chain over k = 0 .. K-1, in order, whatever T, the blocking or the thread count:
 * a row's result does not depend on what else is in the step.
 */
#include <stdint.h>

#define NR 32 /* output columns per panel: two zmm registers */
#define TBLK 256 /* rows of x per block: TBLK * K * 4 bytes stay in L2 while the panels pass over them */
#ifdef __AVX512F__
#define MR 8
#define SUB 32
#else
#define MR 6
#define SUB 16
#endif

/* y[r][j] = sum_k x[r][k] * wp[k][j] for r < R, j < SUB; wp rows NR apart, y rows ldy apart. Step k
 * also prefetches pfb bytes at pf + k * pfb (this call's share of the next panel), unless pf is NULL. */
static inline __attribute__((always_inline)) void micro(const float *x, int64_t ldx, const int R, const float *wp,
                                                         int64_t K, float *y, int64_t ldy, const char *pf, int64_t pfb) {
    float acc[MR][SUB] = {{0.f}};
    for (int64_t k = 0; k < K; k++) {
        const float *w = wp + k * NR;
        if (pf) {
            __builtin_prefetch(pf + k * pfb, 0, 3);
            if (pfb > 64) __builtin_prefetch(pf + k * pfb + 64, 0, 3);
        }
        for (int r = 0; r < R; r++) {
            const float xv = x[r * ldx + k];
#pragma omp simd
            for (int j = 0; j < SUB; j++) acc[r][j] += xv * w[j];
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < SUB; j++) y[r * ldy + j] = acc[r][j];
}

/* Rows [t, t + n) of x against one panel, n <= MR; R a constant in each case, so acc is registers. Each
 * column half's call prefetches its own K * pfb bytes from pf on. */
static void panel_rows(const float *x, int64_t ldx, int n, const float *wp, int64_t K, float *y, int64_t ldy,
                       const char *pf, int64_t pfb) {
    for (int s = 0; s < NR; s += SUB, pf = pf ? pf + K * pfb : pf) {
        switch (n) {
        case 1: micro(x, ldx, 1, wp + s, K, y + s, ldy, pf, pfb); break;
        case 2: micro(x, ldx, 2, wp + s, K, y + s, ldy, pf, pfb); break;
        case 3: micro(x, ldx, 3, wp + s, K, y + s, ldy, pf, pfb); break;
        case 4: micro(x, ldx, 4, wp + s, K, y + s, ldy, pf, pfb); break;
        case 5: micro(x, ldx, 5, wp + s, K, y + s, ldy, pf, pfb); break;
#if MR > 6
        case 6: micro(x, ldx, 6, wp + s, K, y + s, ldy, pf, pfb); break;
        case 7: micro(x, ldx, 7, wp + s, K, y + s, ldy, pf, pfb); break;
#endif
        default: micro(x, ldx, MR, wp + s, K, y + s, ldy, pf, pfb); break;
        }
    }
}

int64_t linear_panel(void) { return NR; }

void linear_forward(const float *x, int64_t T, int64_t ldx, const float *wp, int64_t N, int64_t K, float *y,
                    int64_t ldy, int nthreads) {
    const int64_t panels = (N + NR - 1) / NR, blocks = (T + TBLK - 1) / TBLK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < blocks * panels; i++) {
        const int64_t t0 = i / panels * TBLK, p = i % panels, t1 = t0 + TBLK < T ? t0 + TBLK : T;
        const float *w = wp + p * K * NR;
        const int64_t cols = N - p * NR < NR ? N - p * NR : NR;
        /* the next panel's K * NR * 4 bytes, spread evenly over this panel's micro-kernel calls (one per
         * row group and column half): pfb bytes a k step */
        const int64_t calls = ((t1 - t0 + MR - 1) / MR) * (NR / SUB);
        const char *pf = p + 1 < panels ? (const char *)(w + K * NR) : 0;
        const int64_t pfb = (NR * 4 + calls - 1) / calls;
        for (int64_t t = t0; t < t1; t += MR) {
            const int n = t1 - t < MR ? (int)(t1 - t) : MR;
            const char *pft = pf ? pf + ((t - t0) / MR) * (NR / SUB) * K * pfb : 0;
            if (cols == NR) {
                panel_rows(x + t * ldx, ldx, n, w, K, y + t * ldy + p * NR, ldy, pft, pfb);
            } else { /* the last, partial panel: through a buffer, so that no column past N is written */
                float buf[MR * NR];
                panel_rows(x + t * ldx, ldx, n, w, K, buf, NR, pft, pfb);
                for (int r = 0; r < n; r++)
                    for (int64_t j = 0; j < cols; j++) y[(t + r) * ldy + p * NR + j] = buf[r * NR + j];
            }
        }
    }
}
