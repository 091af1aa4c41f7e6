/* Q8_0, Q4_0 and Q4_1 weights repacked at load in groups of 8 rows (included by qlinear.c, after its
 * block types, QK, MR, MADD and fp16_at).
 *
 * Why: read as stored, each weight row's blocks meet each row of x alone, so every block of every
 * (x row, weight row) pair pays the activation loads, the scale broadcasts and the float work, and every
 * output a horizontal sum: about 4 multiply-adds an instruction on AVX2, under the fp32 kernel's rate. In
 * a group, one 32-byte load holds 4 bytes of each of 8 rows, so one broadcast of 4 activation bytes feeds
 * 8 rows at once, maddubs leaves each row's partial dot in its own lane, and the eight lanes end as the
 * eight outputs: about 9 multiply-adds an instruction, and no horizontal sums (llama.cpp's repack.cpp
 * interleaves q4_0 the same way).
 *
 * A group's block b (the groups' blocks in order, group after group):
 *   the 8 rows' fp16 d (16 bytes), Q4_1's 8 fp16 m (16 more), then the quants 4 bytes a row at a time:
 *   chunk j (of 4 for the 4-bit types, 8 for Q8_0) is rows 0..7's bytes 4j..4j+3, 32 bytes.
 * Rows past N (the last group's) are zero: d = 0, nothing stored from them.
 * A 4-bit chunk j holds elements 4j..4j+3 in its low nibbles and 16+4j..16+4j+3 in its high ones, so it
 * meets the activation bytes 4j.. and 16+4j..; a Q8_0 chunk j meets bytes 4j... In a 4-bit lane the
 * 8 maddubs results add up in int16 without saturating (8 x 2 x 15 x 127 < 32767); Q8_0's do not
 * (2 x 128 x 127 is already near the limit), so each goes to int32 first.
 */
#define GR 8 /* weight rows a group */

static inline int x8_scale_bytes(int type) { return type == Q4_1 ? 32 : 16; }

static inline int x8_quant_bytes(int type) { return type == Q8_0 ? 256 : 128; }

/* Bytes of one group's block; 0 for a type without this layout. */
static inline int64_t x8_block_bytes(int type) {
    return type == Q8_0 || type == Q4_0 || type == Q4_1 ? x8_scale_bytes(type) + x8_quant_bytes(type) : 0;
}

/* Bytes of an N x K weight repacked (0: refused). */
int64_t qlinear_x8_bytes(int type, int64_t N, int64_t K) {
    const int64_t gb = x8_block_bytes(type);
    if (!gb || K <= 0 || K % QK || N < 0) return 0;
    return (N + GR - 1) / GR * (K / QK) * gb;
}

/* One row's block (stored layout) <-> its place in a group's block. to_group: 1 packs, 0 unpacks. */
static void x8_move(int type, uint8_t *grp, int r, uint8_t *blk, int to_group) {
    const int sb = x8_scale_bytes(type), chunks = x8_quant_bytes(type) / 32;
    const int qoff = type == Q4_1 ? 4 : 2;
#define X8_MOVE(g, s, n) (to_group ? memcpy(g, s, n) : memcpy(s, g, n))
    X8_MOVE(grp + 2 * r, blk, 2);
    if (type == Q4_1) X8_MOVE(grp + 16 + 2 * r, blk + 2, 2);
    for (int j = 0; j < chunks; j++) X8_MOVE(grp + sb + 32 * j + 4 * r, blk + qoff + 4 * j, 4);
#undef X8_MOVE
}

/* dst = W repacked, W's row n being src's row order[n] (order NULL: row n): llama.cpp's q/k row order is
 * undone here, on the way, rather than by a copy of the file's blocks. */
int qlinear_x8_pack(const uint8_t *src, int type, int64_t N, int64_t K, const int64_t *order, uint8_t *dst,
                    int nthreads) {
    const int64_t gb = x8_block_bytes(type), bytes = block_bytes(type);
    if (!qlinear_x8_bytes(type, N, K)) return 1;
    const int64_t nb = K / QK, groups = (N + GR - 1) / GR;
    if (order)
        for (int64_t n = 0; n < N; n++)
            if (order[n] < 0 || order[n] >= N) return 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        uint8_t *out = dst + g * nb * gb;
        memset(out, 0, (size_t)(nb * gb));
        for (int r = 0; r < GR && g * GR + r < N; r++) {
            const int64_t n = g * GR + r;
            const uint8_t *row = src + (order ? order[n] : n) * nb * bytes;
            for (int64_t b = 0; b < nb; b++) x8_move(type, out + b * gb, r, (uint8_t *)(row + b * bytes), 1);
        }
    }
    return 0;
}

/* dst[i] = row ids[i] of the repacked W in the stored layout (an embedding lookup; tests). */
int qlinear_x8_unpack(const uint8_t *packed, int type, int64_t N, int64_t K, const int64_t *ids, int64_t count,
                      uint8_t *dst) {
    const int64_t gb = x8_block_bytes(type), bytes = block_bytes(type);
    if (!qlinear_x8_bytes(type, N, K)) return 1;
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= N) return 1;
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *grp = packed + ids[i] / GR * nb * gb;
        for (int64_t b = 0; b < nb; b++)
            x8_move(type, (uint8_t *)(grp + b * gb), (int)(ids[i] % GR), dst + (i * nb + b) * bytes, 0);
    }
    return 0;
}

#ifdef __AVX2__
static inline __m256i bcast4(const int8_t *a) {
    int32_t v;
    memcpy(&v, a, 4);
    return _mm256_set1_epi32(v);
}

/* R rows of x (1..MR) against one group: y[r * ldy + i] for the group's first `valid` rows i. Every lane is
 * one output: per block, its integer dot, then d_w (d_a dot - 8 s_a) (Q4_0), d_w d_a dot + m s_a (Q4_1)
 * or d_w d_a dot (Q8_0), added in block order. */
static inline __attribute__((always_inline)) void x8_tile(const int type, const int R, const uint8_t *grp,
                                                          int64_t nb, const int8_t *qa, const float *da,
                                                          const float *sa, float *y, int64_t ldy, int valid) {
    const int64_t gb = x8_block_bytes(type);
    const int sb = x8_scale_bytes(type);
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, grp += gb) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        const __m256 mw = type == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16)))
                                       : _mm256_setzero_ps();
        const uint8_t *wq = grp + sb;
        if (type == Q8_0) {
            __m256i w[8], u[8];
            for (int j = 0; j < 8; j++) {
                w[j] = _mm256_loadu_si256((const __m256i *)(wq + 32 * j));
                u[j] = _mm256_abs_epi8(w[j]);
            }
            UNROLL for (int r = 0; r < R; r++) {
                const int8_t *a = qa + (r * nb + b) * QK;
                __m256i s = _mm256_setzero_si256();
                for (int j = 0; j < 8; j++)
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(
                        _mm256_maddubs_epi16(u[j], _mm256_sign_epi8(bcast4(a + 4 * j), w[j])), ones));
                const __m256 d = _mm256_mul_ps(dw, _mm256_broadcast_ss(da + r * nb + b));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r]);
            }
        } else {
            __m256i lo[4], hi[4];
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * j));
                lo[j] = _mm256_and_si256(v, low);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            UNROLL for (int r = 0; r < R; r++) {
                const int8_t *a = qa + (r * nb + b) * QK;
                __m256i s = _mm256_maddubs_epi16(lo[0], bcast4(a));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[0], bcast4(a + 16)));
                for (int j = 1; j < 4; j++) {
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[j], bcast4(a + 4 * j)));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[j], bcast4(a + 16 + 4 * j)));
                }
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
                const __m256 d = _mm256_broadcast_ss(da + r * nb + b);
                if (type == Q4_0)
                    acc[r] = _mm256_fmadd_ps(dw, _mm256_fmsub_ps(d, dot, _mm256_set1_ps(8.f * sa[r * nb + b])),
                                             acc[r]);
                else
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, d),
                                             _mm256_fmadd_ps(mw, _mm256_broadcast_ss(sa + r * nb + b), acc[r]));
            }
        }
    }
    if (valid == GR) {
        UNROLL for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ldy, acc[r]);
    } else {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        UNROLL for (int r = 0; r < R; r++) _mm256_maskstore_ps(y + r * ldy, mask, acc[r]);
    }
}
#else
/* The same integer dots and the same float steps per output, in scalar code. */
static inline void x8_tile(const int type, const int R, const uint8_t *grp, int64_t nb, const int8_t *qa,
                           const float *da, const float *sa, float *y, int64_t ldy, int valid) {
    const int64_t gb = x8_block_bytes(type);
    const int sb = x8_scale_bytes(type);
    float acc[MR][GR] = {{0.f}};
    for (int64_t b = 0; b < nb; b++, grp += gb) {
        for (int i = 0; i < GR; i++) {
            const float dw = fp16_at(grp + 2 * i), mw = type == Q4_1 ? fp16_at(grp + 16 + 2 * i) : 0.f;
            for (int r = 0; r < R; r++) {
                const int8_t *a = qa + (r * nb + b) * QK;
                const float d = da[r * nb + b], s = sa[r * nb + b];
                int32_t dot = 0;
                for (int j = 0; j < x8_quant_bytes(type) / 32; j++)
                    for (int e = 0; e < 4; e++) {
                        const uint8_t q = grp[sb + 32 * j + 4 * i + e];
                        if (type == Q8_0)
                            dot += (int8_t)q * a[4 * j + e];
                        else
                            dot += (q & 15) * a[4 * j + e] + (q >> 4) * a[16 + 4 * j + e];
                    }
                if (type == Q8_0)
                    acc[r][i] = MADD((float)dot, dw * d, acc[r][i]);
                else if (type == Q4_0)
                    acc[r][i] = MADD(dw, MADD(d, (float)dot, -8.f * s), acc[r][i]);
                else
                    acc[r][i] = MADD((float)dot, dw * d, MADD(mw, s, acc[r][i]));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < valid; i++) y[r * ldy + i] = acc[r][i];
}
#endif

#define X8_ROWS_OF(TYPE)                                                                                 \
    switch (R) {                                                                                         \
    case 1: x8_tile(TYPE, 1, grp, nb, qa, da, sa, y, ldy, valid); break;                                 \
    case 2: x8_tile(TYPE, 2, grp, nb, qa, da, sa, y, ldy, valid); break;                                 \
    case 3: x8_tile(TYPE, 3, grp, nb, qa, da, sa, y, ldy, valid); break;                                 \
    default: x8_tile(TYPE, MR, grp, nb, qa, da, sa, y, ldy, valid); break;                               \
    }

static void x8_rows(int type, int R, const uint8_t *grp, int64_t nb, const int8_t *qa, const float *da,
                    const float *sa, float *y, int64_t ldy, int valid) {
    switch (type) {
    case Q8_0: X8_ROWS_OF(Q8_0) break;
    case Q4_0: X8_ROWS_OF(Q4_0) break;
    default: X8_ROWS_OF(Q4_1) break;
    }
}
