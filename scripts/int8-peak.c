/* The machine's int8 ceiling for the quantized kernel (BENCHMARKS.md, "Where the int8 kernel stands"):
 * one core's rate of vpdpbusd alone, of FMAs alone, and of the two interleaved (whether they share pipes:
 * the repacked Q4_0 tile issues 8 vpdpbusd and 2 FMAs per row of x and block of 32).
 *
 *   gcc -O2 -march=native -o /tmp/int8-peak scripts/int8-peak.c && /tmp/int8-peak
 *
 * Needs AVX-512 VNNI (the machines without it: their kernel is AVX2's maddubs + madd). Thread CPU time,
 * so a busy neighbour does not lower the figures much; the best of five runs. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12 /* independent accumulators: more than latency x throughput */

static double cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const long n = 200000000 / CHAINS;
    const __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);
    const __m512 fw = _mm512_set1_ps(1.0001f);
    __m512i a[CHAINS];
    __m512 f[CHAINS];
    for (int i = 0; i < CHAINS; i++) {
        a[i] = _mm512_set1_epi32(i);
        f[i] = _mm512_set1_ps((float)i);
    }
    double dp = 1e9, fma = 1e9, mix = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t = cpu_s();
        for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS; i++) {
                a[i] = _mm512_dpbusd_epi32(a[i], w, x);
                __asm__ volatile("" : : "v"(a[i])); /* used: the compiler keeps every chain */
            }
        }
        t = cpu_s() - t;
        dp = t < dp ? t : dp;
        t = cpu_s();
        for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS; i++) {
                f[i] = _mm512_fmadd_ps(f[i], fw, fw);
                __asm__ volatile("" : : "v"(f[i]));
            }
        }
        t = cpu_s() - t;
        fma = t < fma ? t : fma;
        t = cpu_s();
        for (long k = 0; k < n; k++) { /* 6 chains of each: shared pipes take 12 cycles, separate ones 6 */
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++) {
                a[i] = _mm512_dpbusd_epi32(a[i], w, x);
                f[i] = _mm512_fmadd_ps(f[i], fw, fw);
                __asm__ volatile("" : : "v"(a[i]), "v"(f[i]));
            }
        }
        t = cpu_s() - t;
        mix = t < mix ? t : mix;
    }
    printf("vpdpbusd zmm alone: %.1f G int8 multiply-adds/s a core (%.2f G instructions/s)\n",
           n * CHAINS * 64 / dp / 1e9, n * CHAINS / dp / 1e9);
    printf("vfmadd zmm alone: %.2f G instructions/s\n", n * CHAINS / fma / 1e9);
    printf("vpdpbusd and vfmadd interleaved: %.2f G instructions/s (both kinds together)\n", n * 12 / mix / 1e9);
    return 0;
}
