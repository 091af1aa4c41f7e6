/* A projection for a few rows on the CPU: y[t] = W x[t] for t < T <= 4, W [N, K] row-major (float32).
 *
 * Built by loraserve/engine/cpu_kernels.py (-O3 -march=native -fopenmp), called through ctypes. At one
 * to four rows a projection is a matrix-vector product bound by reading W; torch's CPU matmul (MKL)
 * read SmolLM2's 538 MB of weights at ~22 GB/s at one row and ~14 GB/s at two (whichever layout),
 * where this loop, each thread streaming its own contiguous band of W's rows once for all T rows,
 * reads at ~38-44 GB/s (benchmark in BENCHMARKS.md). Each output is summed by one thread in a fixed
 * order (16 partial sums over K, then their sum), whatever the thread count.
 */
#include <stdint.h>

#define VL 16 /* partial sums per output: a zmm register, or two ymm */

static inline __attribute__((always_inline)) void rows_dot(const float *x, int64_t ldx, const int T,
                                                            const float *w, int64_t K, float *out) {
    float acc[4][VL] = {{0.f}};
    int64_t i = 0;
    for (; i + VL <= K; i += VL)
        for (int t = 0; t < T; t++) {
#pragma omp simd
            for (int j = 0; j < VL; j++) acc[t][j] += w[i + j] * x[t * ldx + i + j];
        }
    for (int t = 0; t < T; t++) {
        float s = 0.f;
        for (int j = 0; j < VL; j++) s += acc[t][j];
        for (int64_t k = i; k < K; k++) s += w[k] * x[t * ldx + k];
        out[t] = s;
    }
}

void gemv_rows(const float *x, int64_t T, int64_t ldx, const float *w, int64_t N, int64_t K, float *y,
               int64_t ldy, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < N; o++) {
        float out[4];
        const float *wr = w + o * K;
        switch (T) { /* constant row counts: the accumulators stay in registers */
        case 1: rows_dot(x, ldx, 1, wr, K, out); break;
        case 2: rows_dot(x, ldx, 2, wr, K, out); break;
        case 3: rows_dot(x, ldx, 3, wr, K, out); break;
        default: rows_dot(x, ldx, 4, wr, K, out); break;
        }
        for (int64_t t = 0; t < T; t++) y[t * ldy + o] = out[t];
    }
}
