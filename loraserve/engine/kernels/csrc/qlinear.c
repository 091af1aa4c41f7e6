/* A projection over GGUF-quantized weights as stored: y[t][n] = sum_k x[t][k] W[n][k], x float32.
 *
 * Built by loraserve/engine/kernels/build.py (-O3 -march=native -ffp-contract=fast -fopenmp), called
 * through ctypes (loraserve/engine/kernels/qlinear.py). W stays in the file's blocks of 32 weights, read
 * in place from the memory-mapped file: row n is K / 32 consecutive blocks from w + n * (K / 32) * bytes.
 *   Q8_0 (GGML type 8), 34 bytes: fp16 d, 32 x int8 q;            w = d * q
 *   Q4_0 (type 2),      18 bytes: fp16 d, 16 bytes of nibbles;     w = d * (q - 8)
 *   Q4_1 (type 3),      20 bytes: fp16 d, fp16 m, 16 bytes;        w = d * q + m
 * In both 4-bit types element j < 16 is the low nibble of byte j, element j >= 16 the high nibble of
 * byte j - 16 (gguf-py's quants.py, ggml's dequantize_row_q4_0). The K-quants Q4_K, Q5_K and Q6_K
 * (types 12-14) come in super-blocks of 256 weights (K / 256 a row), read as eight pieces of 32 that
 * take the forms below: qlinear_k.h.
 *
 * As llama.cpp does, x is quantized first, per row and block of 32, to int8 with d_a = amax / 127 (round
 * to nearest even), so that each block's dot product is integer work: AVX2's maddubs (u8 x s8 -> s16
 * pairs) and madd (-> eight s32 lanes), then float work once per block: the lanes converted and scaled
 * by d_w d_a. maddubs needs one unsigned operand: 4-bit nibbles are unsigned as stored, and the block's
 * offset (-8 d_w for Q4_0, m for Q4_1) times the activations' sum, s_a = d_a * sum(q_a), kept per block,
 * is spread over the lanes, one FMA; for Q8_0 the sign moves onto the activations, maddubs(|w|, sign(a,
 * w)), which cannot saturate (|a| <= 127). Each decoded weight block serves MR = 4 rows of x (X8_MR in the
 * repacked tiles: qlinear_x8.h); rows come
 * in blocks of TB, whose int8 copy stays in L2 while every weight row passes over it, so a prefill does
 * not stream all of x again per weight row; the (row block, weight row) pairs are split statically
 * between the threads. Even and odd blocks go to two accumulators: a decode step's single row would
 * otherwise wait on each block's FMA latency.
 *
 * Every output is one fixed sequence of operations over its blocks, in order, whatever T, the blocking or
 * the thread count: a row's result does not depend on the other rows of the call. The scalar fallback
 * (a build without AVX2) computes the same integer dots but sums them per block rather than in AVX2's
 * eight lanes, so its floats may differ from the AVX2 build in the last bits.
 *
 * AVX-512 with VNNI (VNNI512: a build for such a CPU; -mno-avx512f gives the AVX2 build there), or AVX-VNNI
 * (VNNI256: the same instruction on ymm registers, on CPUs without AVX-512): vpdpbusd
 * (u8 x s8, four products into each int32 lane) replaces maddubs + madd where no integer scales multiply
 * the lanes (Q8_0, Q4_0, Q4_1; the stored K-quants keep maddubs + madd for their scales). The int32 lanes are the
 * same exact integers, the float steps the same: the same bits as the AVX2 build, weights as stored or
 * repacked (qlinear_x8.h, where it also takes 16 rows a zmm).
 *
 * The engine repacks every weight at load into groups of 8 rows (qlinear_x8.h; the K-quants'
 * qlinear_x8k.h), where one activation broadcast feeds 8 rows at once; the stored layout above is the
 * kernel's reference, and serves any type for tests and tools.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* AVX-512 with VNNI: vpdpbusd multiplies u8 by s8 and adds each four products into an int32 lane, in one
 * instruction where AVX2 takes maddubs, madd and an add (and cannot saturate: no int16 step). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) \
    && !defined(QLINEAR_YMM_VNNI)
#define VNNI512 1
#endif
/* AVX-VNNI: the same vpdpbusd on ymm registers only (VEX-encoded), on CPUs without AVX-512: Intel's client
 * cores since Alder Lake and its E-core Xeons. The AVX2 build's tiles and groups of 8 rows, vpdpbusd where
 * they take maddubs + madd. -DQLINEAR_YMM_VNNI builds this path on an AVX-512 VNNI CPU, through the EVEX
 * encoding of the same instruction, so that it is tested there (tests/qlinear_helpers.py). */
#if !defined(VNNI512) && defined(__AVX2__) && \
    (defined(__AVXVNNI__) || (defined(QLINEAR_YMM_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#define VNNI256 1
#endif
#if defined(VNNI512) || defined(VNNI256)
#define VNNI 1
/* acc + the dots of u's unsigned bytes with a's signed ones, four a lane, on ymm registers */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD256(acc, u, a) _mm256_dpbusd_epi32(acc, u, a)
#else
#define DPBUSD256(acc, u, a) _mm256_dpbusd_avx_epi32(acc, u, a)
#endif
#endif

#define QK 32 /* weights per block */
#define MR 4  /* rows of x per decoded weight block */
#define TB 64 /* rows of x per block: TB * K bytes of int8 stay in L2 */
/* loops over the rows unrolled early, so that their accumulators become registers, not stack arrays */
#define UNROLL _Pragma("GCC unroll 8")

/* The scalar path's multiply-adds, fused or not but the same way everywhere: left to -ffp-contract, the
 * compiler fuses some and not others depending on R, and a row's bits would depend on its neighbours. */
#ifdef FP_FAST_FMAF
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* Bytes per block (of 32 weights, or of 256 for the K-quants: qlinear_k.h), 0 for a type not taken. */
static int64_t block_bytes(int type) {
    switch (type) {
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

static int is_k_quant(int type) { return type == Q4_K || type == Q5_K || type == Q6_K; }

/* Which path this build runs: 512 (AVX-512 VNNI), 256 (AVX2, or AVX-VNNI) or 0 (scalar), so that tests can
 * tell the builds apart. */
int qlinear_vector_bits(void) {
#if defined(VNNI512)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* 1 where the integer dots are vpdpbusd (AVX-512 VNNI or AVX-VNNI), 0 where they are maddubs + madd. */
int qlinear_vnni(void) {
#if defined(VNNI)
    return 1;
#else
    return 0;
#endif
}

static inline float fp16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2); /* blocks are 18, 20 or 34 bytes: unaligned */
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    float f;
    if (e == 0) { /* zero or subnormal: m * 2^-24 */
        f = (float)m * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef __AVX2__
static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
#endif

/* One row of x as int8 blocks: q[b*32 + i] = round(x * (1 / d)), d[b] = amax / 127, s[b] = d * sum(q), and
 * the offsets the repacked tiles add, ready to broadcast from memory: s8[b] = 8 s[b] (Q4_0's; exact, a
 * power of two), c128[b] = -128 sum(q) (Q8_0's on AVX-512 VNNI: qlinear_x8.h), c32[2 b], c32[2 b + 1] = -32
 * times the sums of elements 0-15 and 16-31 (Q6_K's halves: qlinear_x8k.h). */
static void quantize_row(const float *x, int64_t nb, int8_t *q, float *d, float *s, float *s8, int32_t *c128,
                         int32_t *c32) {
    for (int64_t b = 0; b < nb; b++, x += QK, q += QK) {
#ifdef __AVX2__
        const __m256 sgn = _mm256_set1_ps(-0.0f);
        __m256 v[4];
        for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(x + 8 * j);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sgn, v[0]), _mm256_andnot_ps(sgn, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sgn, v[2]), _mm256_andnot_ps(sgn, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float dd = _mm_cvtss_f32(m4) / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
        __m256i iv[4];
        for (int j = 0; j < 4; j++)
            iv[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* sums of elements 0-15 and 16-31 */
        const int32_t lo = hsum8_epi32(_mm256_add_epi32(iv[0], iv[1]));
        const int32_t hi = hsum8_epi32(_mm256_add_epi32(iv[2], iv[3])), is = lo + hi;
        /* the packs work per 128-bit lane: the permute puts the 32 bytes back in order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)q, p);
        c32[2 * b] = -32 * lo;
        c32[2 * b + 1] = -32 * hi;
        d[b] = dd;
        s[b] = dd * (float)is;
        s8[b] = 8.f * s[b];
        c128[b] = -128 * is;
#else
        float amax = 0.f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
        int sum = 0, lo = 0;
        for (int i = 0; i < QK; i++) {
            const float r = nearbyintf(x[i] * id); /* |r| <= 127; NaN (from an inf or NaN in x) -> 0 */
            const int v = r == r ? (int)r : 0;
            q[i] = (int8_t)v;
            sum += v;
            if (i < QK / 2) lo += v;
        }
        c32[2 * b] = -32 * lo;
        c32[2 * b + 1] = -32 * (sum - lo);
        d[b] = dd;
        s[b] = dd * (float)sum;
        s8[b] = 8.f * s[b];
        c128[b] = -128 * sum;
#endif
    }
}

#ifdef __AVX2__
typedef struct {
    __m256 d, m8;   /* d_w, and Q4_1's m / 8, in every lane */
    __m256i q, u;   /* the quants as maddubs' signed operand's signs (Q8_0), and its unsigned operand */
    __m256i s;      /* int16 factors for madd: 1, or a K-quant's integer scales (qlinear_k.h) */
} wblock;

static inline __attribute__((always_inline)) wblock decode_avx2(const int type, const uint8_t *w) {
    wblock k;
    uint32_t dm; /* d, and Q4_1's m: one load, one conversion */
    memcpy(&dm, w, 4);
    const __m128 scales = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
    k.d = _mm256_broadcastss_ps(scales);
    k.s = _mm256_set1_epi16(1);
    k.m8 = type == Q4_1 ? _mm256_mul_ps(_mm256_set1_ps(0.125f), _mm256_broadcastss_ps(_mm_movehdup_ps(scales)))
                        : _mm256_setzero_ps();
    if (type == Q8_0) {
        k.q = _mm256_loadu_si256((const __m256i *)(w + 2));
        k.u = _mm256_abs_epi8(k.q);
    } else { /* the 16 bytes in both halves, the upper one shifted: elements 0-15 low nibbles, 16-31 high */
        const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w + (type == Q4_1 ? 4 : 2))));
        k.q = k.u = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                     _mm256_set1_epi8(0x0f));
    }
    return k;
}

/* acc plus one block's products with one row of x (its int8 block a, scale d_a, s_a). The block's sum
 * stays in the eight lanes of its dot product, the offset term spread over them: Q4_0 adds
 * d_w (d_a dot_l - s_a) per lane, which sums to d_w d_a dot - 8 d_w s_a; Q4_1 adds d_w d_a dot_l +
 * (m / 8) s_a. Q6_K's pieces take Q8_0's form, Q4_K's and Q5_K's Q4_1's (qlinear_k.h). */
static inline __attribute__((always_inline)) __m256 step_avx2(const int type, wblock k, const int8_t *qa,
                                                              const float *da, const float *sa, __m256 acc) {
    const int sign = type == Q8_0 || type == Q6_K; /* signed quants */
    __m256i a = _mm256_loadu_si256((const __m256i *)qa);
    if (sign) a = _mm256_sign_epi8(a, k.q); /* |w| <= 128, |a| <= 127: maddubs cannot saturate */
#ifdef VNNI
    /* the same int32 lanes in one instruction, where no integer scales multiply them (k.s = 1) */
    const __m256 dot = _mm256_cvtepi32_ps(type == Q8_0 || type == Q4_0 || type == Q4_1
                                              ? DPBUSD256(_mm256_setzero_si256(), k.u, a)
                                              : _mm256_madd_epi16(_mm256_maddubs_epi16(k.u, a), k.s));
#else
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(k.u, a), k.s));
#endif
    const __m256 d = _mm256_broadcast_ss(da);
    if (sign) return _mm256_fmadd_ps(dot, _mm256_mul_ps(k.d, d), acc);
    if (type == Q4_0) return _mm256_fmadd_ps(k.d, _mm256_fmsub_ps(d, dot, _mm256_broadcast_ss(sa)), acc);
    return _mm256_fmadd_ps(dot, _mm256_mul_ps(k.d, d), _mm256_fmadd_ps(k.m8, _mm256_broadcast_ss(sa), acc));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Weight row w (nb blocks of type `type`) against R rows of quantized x (qa rows K bytes apart, their
 * d / s rows nb floats apart): y[r * ldy] for r < R. R and type are constants at each call site. */
static inline __attribute__((always_inline)) void dot_rows(const int type, const int R, const uint8_t *w,
                                                           int64_t nb, const int8_t *qa, const float *da,
                                                           const float *sa, float *y, int64_t ldy) {
    const int64_t bytes = block_bytes(type);
#ifdef __AVX2__
    /* even and odd blocks in two accumulators: one row alone would wait on each FMA's latency */
    __m256 even[MR], odd[MR];
    UNROLL for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2, w += 2 * bytes) {
        const wblock k0 = decode_avx2(type, w);
        UNROLL for (int r = 0; r < R; r++)
            even[r] = step_avx2(type, k0, qa + (r * nb + b) * QK, da + r * nb + b, sa + r * nb + b, even[r]);
        const wblock k1 = decode_avx2(type, w + bytes);
        UNROLL for (int r = 0; r < R; r++)
            odd[r] = step_avx2(type, k1, qa + (r * nb + b + 1) * QK, da + r * nb + b + 1, sa + r * nb + b + 1,
                               odd[r]);
    }
    if (b < nb) {
        const wblock k0 = decode_avx2(type, w);
        UNROLL for (int r = 0; r < R; r++)
            even[r] = step_avx2(type, k0, qa + (r * nb + b) * QK, da + r * nb + b, sa + r * nb + b, even[r]);
    }
    UNROLL for (int r = 0; r < R; r++) y[r * ldy] = hsum8(_mm256_add_ps(even[r], odd[r]));
#else
    const int qoff = type == Q4_1 ? 4 : 2; /* where a block's quants start */
    float acc[MR] = {0.f}, accs[MR] = {0.f}; /* the scaled dots; the offsets c_w * s_a */
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        const float dw = fp16_at(w);
        const uint8_t *wq = w + qoff;
        const float c = type == Q4_0 ? -8.f * dw : type == Q4_1 ? fp16_at(w + 2) : 0.f;
        for (int r = 0; r < R; r++) {
            const int8_t *a = qa + (r * nb + b) * QK;
            int32_t dot = 0;
            if (type == Q8_0) {
                for (int i = 0; i < QK; i++) dot += (int32_t)(int8_t)wq[i] * a[i];
            } else {
                for (int i = 0; i < QK / 2; i++) dot += (wq[i] & 15) * a[i] + (wq[i] >> 4) * a[i + QK / 2];
            }
            acc[r] = MADD(dw * da[r * nb + b], (float)dot, acc[r]);
            if (type != Q8_0) accs[r] = MADD(c, sa[r * nb + b], accs[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = acc[r] + accs[r];
#endif
}

#include "qlinear_k.h"
#include "quantize_k.h"
#include "quantize_q6k.h"

/* R rows (1 .. MR) of one weight row, with type and R as constants for DOT (dot_rows or dot_rows_k). */
#define ROWS_OF(DOT, TYPE)                                                                               \
    switch (R) {                                                                                         \
    case 1: DOT(TYPE, 1, w, nb, qa, da, sa, y, ldy); break;                                              \
    case 2: DOT(TYPE, 2, w, nb, qa, da, sa, y, ldy); break;                                              \
    case 3: DOT(TYPE, 3, w, nb, qa, da, sa, y, ldy); break;                                              \
    default: DOT(TYPE, MR, w, nb, qa, da, sa, y, ldy); break;                                            \
    }

static void rows(int type, int R, const uint8_t *w, int64_t nb, const int8_t *qa, const float *da,
                 const float *sa, float *y, int64_t ldy) {
    switch (type) {
    case Q8_0: ROWS_OF(dot_rows, Q8_0) break;
    case Q4_0: ROWS_OF(dot_rows, Q4_0) break;
    case Q4_1: ROWS_OF(dot_rows, Q4_1) break;
    case Q4_K: ROWS_OF(dot_rows_k, Q4_K) break;
    case Q5_K: ROWS_OF(dot_rows_k, Q5_K) break;
    default: ROWS_OF(dot_rows_k, Q6_K) break;
    }
}

/* Bytes of one weight row of K inputs, 0 for a type or K this build does not take (the K-quants need K a
 * multiple of 256). */
int64_t qlinear_row_bytes(int type, int64_t K) {
    const int64_t bytes = block_bytes(type), elems = is_k_quant(type) ? QK_K : QK;
    return bytes && K > 0 && K % elems == 0 ? K / elems * bytes : 0;
}

#include "qlinear_x8.h"

#define X8 256 /* added to a type id: the part is repacked in groups of 8 rows (qlinear_x8.h) */

/* Rows (stored layout) or tiles of X8_TILE rows (repacked) of a part: the units the threads share. */
static int64_t part_units(int type, int64_t n) { return type & X8 ? (n + X8_TILE - 1) / X8_TILE : n; }

/* y[:, n0 + n] = x @ W_p[n] for the P parts W_p (types[p], ns[p] rows each, n0 the rows of the parts before):
 * a fused projection (q, k and v; gate and up) computed from its tensors where they lie, none copied into
 * one matrix, from one int8 copy of x. Parts may differ in type and layout (types[p] + X8: repacked). */
int qlinear_forward(const float *x, int64_t T, int64_t ldx, int P, const uint8_t *const *ws, const int *types,
                    const int64_t *ns, int64_t K, float *y, int64_t ldy, int nthreads) {
    int64_t N = 0, U = 0;
    if (K <= 0 || K % QK || T < 0 || P < 1) return 1;
    for (int p = 0; p < P; p++) {
        const int t = types[p] & ~X8;
        if (ns[p] < 0 || !(types[p] & X8 ? qlinear_x8_bytes(t, ns[p], K) || !ns[p] : qlinear_row_bytes(t, K)))
            return 1;
        N += ns[p];
        U += part_units(types[p], ns[p]);
    }
    if (T == 0 || N == 0) return 0;
    const int64_t nb = K / QK, tblocks = (T + TB - 1) / TB;
    /* One block for the quantized activations and their per-block d, s, 8 s, -128 sum(q) and -32 times
     * each half's sum (Q6_K's): one allocation a call keeps the heap as the previous call left it (the
     * engine's steps reuse its pages: host_malloc.py). */
    int8_t *qa = malloc((size_t)(T * K) + 6 * (size_t)(T * nb) * sizeof(float));
    if (!qa) return 2;
    float *da = (float *)(qa + T * K), *sa = da + T * nb, *s8 = sa + T * nb; /* T * K: a multiple of QK */
    int32_t *c128 = (int32_t *)(s8 + T * nb), *c32 = c128 + T * nb;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            quantize_row(x + t * ldx, nb, qa + t * K, da + t * nb, sa + t * nb, s8 + t * nb, c128 + t * nb,
                         c32 + 2 * t * nb);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < tblocks * U; i++) {
            const int64_t t0 = i / U * TB, t1 = t0 + TB < T ? t0 + TB : T;
            int64_t u = i % U, n0 = 0;
            int p = 0;
            while (u >= part_units(types[p], ns[p])) {
                u -= part_units(types[p], ns[p]);
                n0 += ns[p++];
            }
            const int type = types[p] & ~X8;
            if (types[p] & X8) {
                const int64_t tile_bytes = (X8_TILE / GR) * x8_group_bytes(type, nb);
                const uint8_t *grp = ws[p] + u * tile_bytes;
                const int valid = ns[p] - u * X8_TILE < X8_TILE ? (int)(ns[p] - u * X8_TILE) : X8_TILE;
                /* the part's next tile, which this thread most likely takes next (a static schedule) */
                const uint8_t *next = u + 1 < part_units(types[p], ns[p]) ? grp + tile_bytes : NULL;
                for (int64_t t = t0; t < t1; t += X8_MR) {
                    const xrows a = {qa + t * K, da + t * nb, sa + t * nb, s8 + t * nb, c128 + t * nb,
                                     c32 + 2 * t * nb};
                    const int R = t1 - t < X8_MR ? (int)(t1 - t) : X8_MR;
                    float *yt = y + t * ldy + n0 + u * X8_TILE;
                    x8_rows(type, R, grp, nb, a, yt, ldy, valid, t == t0 ? next : NULL);
                }
            } else {
                const uint8_t *w = ws[p] + u * qlinear_row_bytes(type, K);
                for (int64_t t = t0; t < t1; t += MR)
                    rows(type, t1 - t < MR ? (int)(t1 - t) : MR, w, nb, qa + t * K, da + t * nb, sa + t * nb,
                         y + t * ldy + n0 + u, ldy);
            }
        }
    }
    free(qa);
    return 0;
}
