/* A projection on the CPU for any number of rows: y[t] = W x[t], W [N, K] row-major (float32).
 *
 * Built by loraserve/engine/cpu_kernels.py (-O3 -march=native -fopenmp), called through ctypes. On this
 * project's CPU machine torch's matmul (MKL) ran SmolLM2's projections at ~35-60% of the FMA peak at 1 to
 * 32 rows and ~80% at 1024 (table in BENCHMARKS.md); this loop keeps the FMA units busy at every size:
 *  - a group of P rows of W (P * K * 4 bytes <= ~36 KB, so it stays in L1/L2 while it is reused) is
 *    dotted with one row of x at a time: one x load feeds P FMAs, P accumulators of 16 partial sums stay
 *    in registers (P <= 16 with 32 zmm registers; 6 with AVX2's 16 ymm, where 16 partial sums are two);
 *  - at one row W is streamed once, each thread its own band, at the memory bandwidth;
 *  - rows of x come in blocks of TBLK (TBLK * K * 4 bytes stay in L2 while every group passes over them);
 *    the (block, group) pairs are split between threads, so a long prefill spreads evenly.
 * Each output is summed by one thread in a fixed order (16 partial sums over K, a fixed tree over them,
 * then the tail of K), whatever T, the group size or the thread count: a row's result does not depend on
 * what else is in the step.
 */
#include <stdint.h>

#define VL 16
#define TBLK 256
#define GROUP_FLOATS 9216 /* 36 KB of W per group: measured best for K = 576 (P = 16) and 1536 (P = 6) */
#ifdef __AVX512F__
#define PMAX 16
#define RX 2 /* rows of x at a time for groups of up to 8 W rows */
#define MAX_ROWS INT64_MAX
#else
#define PMAX 6
#define RX 1
/* The AVX2 build (measured as -mno-avx512f on the AVX-512 machine) beat MKL up to 64 rows, not at 256 */
#define MAX_ROWS 64
#endif

static inline __attribute__((always_inline)) float tree_sum(const float *a) {
    float r8[8], r4[4];
    for (int j = 0; j < 8; j++) r8[j] = a[j] + a[j + 8];
    for (int j = 0; j < 4; j++) r4[j] = r8[j] + r8[j + 4];
    return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

/* y[r][p] = w[p] . x[r] for R rows of x (ldx apart; y rows ldy apart) and the P rows of W at w (row
 * stride K). Every (r, p) has its own 16 partial sums, so R and P never change what an output adds up. */
static inline __attribute__((always_inline)) void dots(const float *x, int64_t ldx, const int R, const float *w,
                                                        int64_t K, const int P, float *y, int64_t ldy) {
    float acc[RX][PMAX][VL] = {{{0.f}}};
    int64_t i = 0;
    for (; i + VL <= K; i += VL)
        for (int r = 0; r < R; r++)
            for (int p = 0; p < P; p++) {
#pragma omp simd
                for (int j = 0; j < VL; j++) acc[r][p][j] += w[p * K + i + j] * x[r * ldx + i + j];
            }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) {
            float s = tree_sum(acc[r][p]);
            for (int64_t k = i; k < K; k++) s += w[p * K + k] * x[r * ldx + k];
            y[r * ldy + p] = s;
        }
}

/* Rows t0 <= t < t1 of x against the P rows of W starting at row o, R rows of x at a time (the last
 * alone if odd); P and R constants, so acc is registers (P * R <= 16 on AVX-512). With AVX-512, groups of
 * up to 8 W rows (K >= 1152) take two rows of x: down_proj (K 1536) ran 13% faster so, q/k/v (P 16) not. */
#define GROUP(P, R)                                                                                          \
    static void group_##P(const float *x, int64_t t0, int64_t t1, int64_t ldx, const float *w, int64_t o,  \
                          int64_t K, float *y, int64_t ldy) {                                               \
        int64_t t = t0;                                                                                      \
        for (; t + R <= t1; t += R) dots(x + t * ldx, ldx, R, w + o * K, K, P, y + t * ldy + o, ldy);      \
        for (; t < t1; t++) dots(x + t * ldx, ldx, 1, w + o * K, K, P, y + t * ldy + o, ldy);              \
    }
GROUP(1, RX)
GROUP(2, RX)
GROUP(4, RX)
GROUP(6, RX)
#if PMAX >= 8
GROUP(8, RX)
#endif
#if PMAX >= 16
GROUP(16, 1)
#endif

static int group_size(int64_t K) {
    const int64_t fit = GROUP_FLOATS / (K > 0 ? K : 1);
    const int sizes[] = {16, 8, 6, 4, 2};
    for (int s = 0; s < 5; s++)
        if (sizes[s] <= PMAX && sizes[s] <= fit) return sizes[s];
    return 1;
}

static void run_group(int P, const float *x, int64_t t0, int64_t t1, int64_t ldx, const float *w, int64_t o,
                      int64_t K, float *y, int64_t ldy) {
    switch (P) {
#if PMAX >= 16
    case 16: group_16(x, t0, t1, ldx, w, o, K, y, ldy); break;
#endif
#if PMAX >= 8
    case 8: group_8(x, t0, t1, ldx, w, o, K, y, ldy); break;
#endif
    case 6: group_6(x, t0, t1, ldx, w, o, K, y, ldy); break;
    case 4: group_4(x, t0, t1, ldx, w, o, K, y, ldy); break;
    case 2: group_2(x, t0, t1, ldx, w, o, K, y, ldy); break;
    default: group_1(x, t0, t1, ldx, w, o, K, y, ldy); break;
    }
}

/* Steps of more rows are better left to torch's matmul on this build. */
int64_t linear_max_rows(void) { return MAX_ROWS; }

void linear_forward(const float *x, int64_t T, int64_t ldx, const float *w, int64_t N, int64_t K, float *y,
                    int64_t ldy, int nthreads) {
    const int P = group_size(K);
    const int64_t groups = (N + P - 1) / P, blocks = (T + TBLK - 1) / TBLK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < blocks * groups; i++) {
        const int64_t t0 = i / groups * TBLK, o = i % groups * P;
        const int64_t t1 = t0 + TBLK < T ? t0 + TBLK : T;
        if (o + P <= N)
            run_group(P, x, t0, t1, ldx, w, o, K, y, ldy);
        else /* the last, partial group: one W row at a time */
            for (int64_t r = o; r < N; r++) run_group(1, x, t0, t1, ldx, w, r, K, y, ldy);
    }
}
