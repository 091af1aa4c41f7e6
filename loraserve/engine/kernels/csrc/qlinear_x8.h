/* Q8_0, Q4_0 and Q4_1 weights repacked at load in groups of 8 rows (included by qlinear.c, after its
 * block types, QK, MR, MADD and fp16_at); the K-quants' groups, in the same tiles' form: qlinear_x8k.h.
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
 *
 * AVX-512 VNNI (VNNI512): vpdpbusd accumulates each chunk's four products a lane straight into int32,
 * against the activations' four bytes broadcast. A tile is two groups (X8_TILE = 16 rows, the
 * threads' unit), side by side in a zmm when MR or more rows of x meet it (up to X8_MR = 8 at once: a
 * batch, compute-bound); fewer rows (a decode step) take one group after the other in ymm registers, one
 * stream of blocks from memory, which streams faster than the two groups' two. This build stores Q8_0's
 * quants plus 128 (X8_Q8_BIAS), so its groups are its own: a weight is repacked by the build that reads it.
 * Either way each output's integer dots and float steps are the AVX2 tile's: the same bits.
 * AVX-VNNI (VNNI256: no AVX-512): the same vpdpbusd on ymm registers, a group (8 rows) a tile as in the AVX2
 * build, up to MR rows of x a decoded chunk (x8_tile8), Q8_0 stored plus 128 as in the AVX-512 VNNI build.
 */
#define GR 8 /* weight rows a group */
/* Weight rows a tile, the unit the threads share: two groups on AVX-512 VNNI */
#ifndef X8_ZMM /* -DX8_ZMM=0: VNNI in ymm registers only, 8 rows a tile (to compare) */
#define X8_ZMM 1
#endif
#if defined(VNNI512) && X8_ZMM
#define X8_TILE 16
#define X8_MR 8 /* rows of x a tile meets at once: the zmm tile's registers hold 8 rows' sums */
#else
#define X8_TILE GR
#define X8_MR MR
#endif

static inline int x8_scale_bytes(int type) { return type == Q4_1 ? 32 : 16; }

static inline int x8_quant_bytes(int type) { return type == Q8_0 ? 256 : 128; }

static inline int64_t xk_block_bytes(int type); /* qlinear_x8k.h, the K-quants' groups */
static void xk_move(int type, uint8_t *grp, int r, uint8_t *blk, int to_group);

/* Weights a row of a group's block holds: 32, or a K-quant's super-block of 256 (qlinear_x8k.h). */
static inline int x8_elems(int type) { return is_k_quant(type) ? QK_K : QK; }

/* Bytes of one group's block; 0 for a type without this layout. */
static inline int64_t x8_block_bytes(int type) {
    if (is_k_quant(type)) return xk_block_bytes(type);
    return type == Q8_0 || type == Q4_0 || type == Q4_1 ? x8_scale_bytes(type) + x8_quant_bytes(type) : 0;
}

/* Bytes of one group over K inputs (nb = K / 32 blocks of x): a tile's groups lie this far apart. */
static inline int64_t x8_group_bytes(int type, int64_t nb) {
    return nb * QK / x8_elems(type) * x8_block_bytes(type);
}

/* Bytes of an N x K weight repacked (0: refused). */
int64_t qlinear_x8_bytes(int type, int64_t N, int64_t K) {
    const int64_t gb = x8_block_bytes(type);
    if (!gb || K <= 0 || K % x8_elems(type) || N < 0) return 0;
    return (N + GR - 1) / GR * (K / x8_elems(type)) * gb;
}

/* What a Q8_0 quant byte is xored with in a group: vpdpbusd takes the weights as its unsigned operand, so
 * the VNNI builds (AVX-512 VNNI, AVX-VNNI) store q + 128 (q ^ 0x80) rather than add it at every block of
 * every call. */
#if defined(VNNI)
#define X8_Q8_BIAS 0x80
#else
#define X8_Q8_BIAS 0
#endif

/* The layout variant this build writes and reads: Q8_0's quants as stored (0) or biased (0x80). */
int qlinear_x8_layout(void) { return X8_Q8_BIAS; }

/* One row's block (stored layout) <-> its place in a group's block. to_group: 1 packs, 0 unpacks. */
static void x8_move(int type, uint8_t *grp, int r, uint8_t *blk, int to_group) {
    const int sb = x8_scale_bytes(type), chunks = x8_quant_bytes(type) / 32;
    const int qoff = type == Q4_1 ? 4 : 2, bias = type == Q8_0 ? X8_Q8_BIAS : 0;
#define X8_MOVE(g, s, n) (to_group ? memcpy(g, s, n) : memcpy(s, g, n))
    X8_MOVE(grp + 2 * r, blk, 2);
    if (type == Q4_1) X8_MOVE(grp + 16 + 2 * r, blk + 2, 2);
    for (int j = 0; j < chunks; j++) {
        uint8_t *q = to_group ? grp + sb + 32 * j + 4 * r : blk + qoff + 4 * j;
        X8_MOVE(grp + sb + 32 * j + 4 * r, blk + qoff + 4 * j, 4);
        for (int e = 0; e < 4; e++) q[e] ^= (uint8_t)bias;
    }
#undef X8_MOVE
}

/* dst = W repacked, W's row n being src's row order[n] (order NULL: row n): llama.cpp's q/k row order is
 * undone here, on the way, rather than by a copy of the file's blocks. */
int qlinear_x8_pack(const uint8_t *src, int type, int64_t N, int64_t K, const int64_t *order, uint8_t *dst,
                    int nthreads) {
    const int64_t gb = x8_block_bytes(type), bytes = block_bytes(type);
    if (!qlinear_x8_bytes(type, N, K)) return 1;
    const int64_t nb = K / x8_elems(type), groups = (N + GR - 1) / GR;
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
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *blk = (uint8_t *)(row + b * bytes); /* read only: to_group */
                if (is_k_quant(type))
                    xk_move(type, out + b * gb, r, blk, 1);
                else
                    x8_move(type, out + b * gb, r, blk, 1);
            }
        }
    }
    return 0;
}

/* dst[i] = row ids[i] of the repacked W in the stored layout (an embedding lookup; tests). */
int qlinear_x8_unpack(const uint8_t *packed, int type, int64_t N, int64_t K, const int64_t *ids, int64_t count,
                      uint8_t *dst) {
    const int64_t gb = x8_block_bytes(type), bytes = block_bytes(type);
    if (!qlinear_x8_bytes(type, N, K)) return 1;
    const int64_t nb = K / x8_elems(type);
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= N) return 1;
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *grp = packed + ids[i] / GR * nb * gb;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *g = (uint8_t *)(grp + b * gb), *blk = dst + (i * nb + b) * bytes; /* g read only */
            if (is_k_quant(type))
                xk_move(type, g, (int)(ids[i] % GR), blk, 0);
            else
                x8_move(type, g, (int)(ids[i] % GR), blk, 0);
        }
    }
    return 0;
}

/* Rows of quantized x from one row on (quantize_row's arrays): row r's block b is q + (r nb + b) 32,
 * d, s, s8, c128[r nb + b] and c32[2 (r nb + b)], c32[2 (r nb + b) + 1]. */
typedef struct {
    const int8_t *q;
    const float *d, *s, *s8;
    const int32_t *c128, *c32;
} xrows;

#if defined(__AVX2__)
/* The four activation bytes at a in every 32-bit lane. */
static inline __m256i bcast4(const int8_t *a) {
    int32_t v;
    memcpy(&v, a, 4);
    return _mm256_set1_epi32(v);
}

/* y[0:valid] = v's first `valid` lanes (valid <= GR) */
static inline void x8_store(float *y, __m256 v, int valid) {
#if defined(VNNI512)
    _mm256_mask_storeu_ps(y, (__mmask8)(valid >= GR ? 0xff : (1u << valid) - 1), v);
#else
    if (valid >= GR) {
        _mm256_storeu_ps(y, v);
        return;
    }
    _mm256_maskstore_ps(y, _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                        v);
#endif
}
#endif

#if defined(VNNI512)
/* acc + the dot products of u's unsigned bytes with the four signed bytes at a, broadcast by the instruction
 * itself: gcc would load them with a vpbroadcastd of their own, one more instruction for each vpdpbusd. */
static inline __m512i dpbusd_bcast(__m512i acc, __m512i u, const int8_t *a) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t *)a));
    return acc;
}

/* A chunk of two groups' blocks, group 0 in the low 256 bits (lanes 0-7: its rows), group 1 high. */
static inline __m512i load2(const uint8_t *p0, const uint8_t *p1) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p0)),
                              _mm256_loadu_si256((const __m256i *)p1), 1);
}

static inline __m512 fp16x16(const uint8_t *p0, const uint8_t *p1) {
    const __m128i h0 = _mm_loadu_si128((const __m128i *)p0), h1 = _mm_loadu_si128((const __m128i *)p1);
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(h0), h1, 1));
}

/* R rows of x (1..X8_MR) against two consecutive groups (X8_TILE = 16 weight rows, one a lane): y[r * ldy + i]
 * for the first `valid` rows i. The AVX2 tile's float steps, lane by lane, on the same integer dots, so a
 * lane's bits are the AVX2 build's. vpdpbusd takes the unsigned operand from the weights, so that the
 * activations' four bytes, broadcast, need no per-row work (AVX-512 has no vpsignb for Q8_0's sign trick):
 * 4-bit quants are unsigned as stored, Q8_0's were stored plus 128 (X8_Q8_BIAS) and the lane starts at
 * -128 sum(q_a) to take it back: an exact dot, in int32 all along. Each row's dot is one chain of
 * vpdpbusd: the rows' chains cover its latency. Eight rows of x a decoded block rather than MR = 4: the
 * unpacking, the loads and the weights' scales spread over twice the rows (BENCHMARKS.md, eighteenth
 * session). A lone last group reads its own blocks twice and stores lanes 0-7 only. `next` (or NULL):
 * the tile the thread takes after this one, fetched into L2 while this one is worked on, whose first rows
 * of x would otherwise wait on memory; the other rows of x find the tile in L2 already. */
static inline __attribute__((always_inline)) void x8_tile16(const int type, const int R, const uint8_t *grp,
                                                            int64_t nb, xrows a, float *y, int64_t ldy,
                                                            int valid, const uint8_t *next) {
    const int64_t gb = x8_block_bytes(type);
    const int sb = x8_scale_bytes(type);
    const uint8_t *g1 = valid > GR ? grp + nb * gb : grp;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[X8_MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, grp += gb, g1 += gb) {
        if (next)
            for (int64_t o = 0; o < 2 * gb; o += 64)
                _mm_prefetch((const char *)(next + 2 * b * gb + o), _MM_HINT_T1);
        const __m512 dw = fp16x16(grp, g1);
        const __m512 mw = type == Q4_1 ? fp16x16(grp + 16, g1 + 16) : _mm512_setzero_ps();
        const uint8_t *w0 = grp + sb, *w1 = g1 + sb;
        if (type == Q8_0) {
            __m512i u[8];
            for (int j = 0; j < 8; j++) u[j] = load2(w0 + 32 * j, w1 + 32 * j);
            UNROLL for (int r = 0; r < R; r++) {
                const int64_t rb = r * nb + b;
                __m512i dot = _mm512_set1_epi32(a.c128[rb]);
                for (int j = 0; j < 8; j++) dot = dpbusd_bcast(dot, u[j], a.q + rb * QK + 4 * j);
                const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(a.d[rb]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
            }
        } else {
            __m512i lo[4], hi[4];
            for (int j = 0; j < 4; j++) {
                const __m512i v = load2(w0 + 32 * j, w1 + 32 * j);
                lo[j] = _mm512_and_si512(v, low);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            UNROLL for (int r = 0; r < R; r++) {
                const int64_t rb = r * nb + b;
                __m512i idot = _mm512_setzero_si512();
                for (int j = 0; j < 4; j++) {
                    idot = dpbusd_bcast(idot, lo[j], a.q + rb * QK + 4 * j);
                    idot = dpbusd_bcast(idot, hi[j], a.q + rb * QK + 16 + 4 * j);
                }
                const __m512 dot = _mm512_cvtepi32_ps(idot);
                const __m512 d = _mm512_set1_ps(a.d[rb]);
                if (type == Q4_0)
                    acc[r] = _mm512_fmadd_ps(dw, _mm512_fmsub_ps(d, dot, _mm512_set1_ps(a.s8[rb])), acc[r]);
                else
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, d),
                                             _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[rb]), acc[r]));
            }
        }
    }
    const __mmask16 keep = (__mmask16)(valid >= 16 ? 0xffff : (1u << valid) - 1);
    UNROLL for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

#endif

#if defined(VNNI)
/* x8_tile16's work on one group (8 rows) in ymm registers: the AVX-512 VNNI build's tile for fewer than MR rows
 * of x, and the AVX-VNNI build's for all. Each row's dot in two chains (a decode step's one row alone would
 * wait on each vpdpbusd's latency), a chunk of the block at a time meeting every row, as the AVX2 tile does:
 * the rows' sums stay in registers, where AVX-VNNI's 16 would not hold the whole block decoded besides. */
static inline __attribute__((always_inline)) void x8_tile8(const int type, const int R, const uint8_t *grp,
                                                           int64_t nb, xrows a, float *y, int64_t ldy,
                                                           int valid) {
    const int64_t gb = x8_block_bytes(type);
    const int sb = x8_scale_bytes(type);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, grp += gb) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        const __m256 mw = type == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16)))
                                       : _mm256_setzero_ps();
        const uint8_t *wq = grp + sb;
        __m256i s0[MR], s1[MR];
        if (type == Q8_0) { /* chunks 2c and 2c + 1 */
            UNROLL for (int r = 0; r < R; r++) {
                s0[r] = _mm256_set1_epi32(a.c128[r * nb + b]);
                s1[r] = _mm256_setzero_si256();
            }
            for (int c = 0; c < 8; c += 2) {
                const __m256i u0 = _mm256_loadu_si256((const __m256i *)(wq + 32 * c));
                const __m256i u1 = _mm256_loadu_si256((const __m256i *)(wq + 32 * c + 32));
                UNROLL for (int r = 0; r < R; r++) {
                    const int8_t *q = a.q + (r * nb + b) * QK;
                    s0[r] = DPBUSD256(s0[r], u0, bcast4(q + 4 * c));
                    s1[r] = DPBUSD256(s1[r], u1, bcast4(q + 4 * c + 4));
                }
            }
            UNROLL for (int r = 0; r < R; r++) {
                const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[r * nb + b]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0[r], s1[r])), d, acc[r]);
            }
        } else { /* chunk c's low nibbles meet activation bytes 4c.., its high ones 16 + 4c.. */
            UNROLL for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * c));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                UNROLL for (int r = 0; r < R; r++) {
                    const int8_t *q = a.q + (r * nb + b) * QK;
                    s0[r] = DPBUSD256(s0[r], lo, bcast4(q + 4 * c));
                    s1[r] = DPBUSD256(s1[r], hi, bcast4(q + 16 + 4 * c));
                }
            }
            UNROLL for (int r = 0; r < R; r++) {
                const int64_t rb = r * nb + b;
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0[r], s1[r]));
                const __m256 d = _mm256_set1_ps(a.d[rb]);
                if (type == Q4_0)
                    acc[r] = _mm256_fmadd_ps(dw, _mm256_fmsub_ps(d, dot, _mm256_set1_ps(a.s8[rb])), acc[r]);
                else
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, d),
                                             _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[rb]), acc[r]));
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) x8_store(y + r * ldy, acc[r], valid);
}

/* A tile of X8_TILE rows: on AVX-512 VNNI, MR or more rows of x take two groups a zmm (compute-bound);
 * fewer rows of x (a decode step) read the weights from memory at every block, and do it faster a group after
 * the other, one stream of blocks (the two groups side by side are two). The same bits either way. AVX-VNNI:
 * one group, in ymm registers. */
static inline __attribute__((always_inline)) void x8_tile(const int type, const int R, const uint8_t *grp,
                                                          int64_t nb, xrows a, float *y, int64_t ldy, int valid,
                                                          const uint8_t *next) {
#if defined(VNNI512) && X8_ZMM
    if (R >= MR) {
        x8_tile16(type, R, grp, nb, a, y, ldy, valid, next);
        return;
    }
#endif
    (void)next;
    x8_tile8(type, R, grp, nb, a, y, ldy, valid < GR ? valid : GR);
    if (valid > GR) x8_tile8(type, R, grp + nb * x8_block_bytes(type), nb, a, y + GR, ldy, valid - GR);
}
#elif defined(__AVX2__)
/* s + p, as an instruction the compiler cannot reassociate: with the plain intrinsic, gcc sums a block's
 * products as a tree, computes all the rows' products first and spills most of them to the stack (the 4-bit
 * tiles took 1.15-1.2x the time at 4-32 rows: BENCHMARKS.md, "The AVX2 int8 tile: a chunk of a block at a
 * time"). */
static inline __m256i add16(__m256i s, __m256i p) {
    __asm__("vpaddw %1, %0, %0" : "+x"(s) : "x"(p));
    return s;
}

static inline __m256i add32(__m256i s, __m256i p) {
    __asm__("vpaddd %1, %0, %0" : "+x"(s) : "x"(p));
    return s;
}

/* s[r] = the int16 dots of a 4-bit block (Q4_0, Q4_1, a Q4_K piece: 4 chunks of 32 bytes at p, a row of the group
 * a lane; low nibbles meet activation bytes 4c.., high ones 16 + 4c..) with the R rows of x at q, ldq apart. A
 * chunk is decoded, then meets every row: the rows' sums stay in registers, where the whole block decoded would
 * not. The 8 products of a lane add up in int16 without saturating (8 x 2 x 15 x 127 < 32767). */
static inline __attribute__((always_inline)) void nibble_dots(const int R, const uint8_t *p, const int8_t *q,
                                                              int64_t ldq, __m256i *s) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * c));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        UNROLL for (int r = 0; r < R; r++) {
            const int8_t *qr = q + r * ldq;
            const __m256i d = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(qr + 4 * c)),
                                               _mm256_maddubs_epi16(hi, bcast4(qr + 16 + 4 * c)));
            s[r] = c ? add16(s[r], d) : d;
        }
    }
}

/* R rows of x (1..MR) against one group: y[r * ldy + i] for the group's first `valid` rows i. Every lane is
 * one output: per block, its integer dot, then d_w (d_a dot - 8 s_a) (Q4_0), d_w d_a dot + m s_a (Q4_1)
 * or d_w d_a dot (Q8_0), added in block order. The dots a chunk of the block at a time, as nibble_dots. */
static inline __attribute__((always_inline)) void x8_tile(const int type, const int R, const uint8_t *grp,
                                                          int64_t nb, xrows a, float *y, int64_t ldy, int valid,
                                                          const uint8_t *next) {
    const int64_t gb = x8_block_bytes(type);
    const int sb = x8_scale_bytes(type);
    (void)next; /* measured on the AVX-512 build's tiles only */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[X8_MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, grp += gb) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        const __m256 mw = type == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16)))
                                       : _mm256_setzero_ps();
        const uint8_t *wq = grp + sb;
        if (type == Q8_0) {
            __m256i s[X8_MR];
            for (int j = 0; j < 8; j++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wq + 32 * j)), u = _mm256_abs_epi8(w);
                UNROLL for (int r = 0; r < R; r++) {
                    const __m256i p = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(u, _mm256_sign_epi8(bcast4(a.q + (r * nb + b) * QK + 4 * j), w)), ones);
                    s[r] = j ? add32(s[r], p) : p;
                }
            }
            UNROLL for (int r = 0; r < R; r++) {
                const __m256 d = _mm256_mul_ps(dw, _mm256_broadcast_ss(a.d + r * nb + b));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), d, acc[r]);
            }
        } else {
            __m256i s[X8_MR];
            nibble_dots(R, wq, a.q + b * QK, nb * QK, s);
            UNROLL for (int r = 0; r < R; r++) {
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones));
                const __m256 d = _mm256_broadcast_ss(a.d + r * nb + b);
                if (type == Q4_0)
                    acc[r] = _mm256_fmadd_ps(dw, _mm256_fmsub_ps(d, dot, _mm256_broadcast_ss(a.s8 + r * nb + b)),
                                             acc[r]);
                else
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, d),
                                             _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.s + r * nb + b), acc[r]));
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) x8_store(y + r * ldy, acc[r], valid);
}
#else
/* The same integer dots and the same float steps per output, in scalar code. */
static inline void x8_tile(const int type, const int R, const uint8_t *grp, int64_t nb, xrows a, float *y,
                           int64_t ldy, int valid, const uint8_t *next) {
    const int64_t gb = x8_block_bytes(type);
    (void)next;
    const int sb = x8_scale_bytes(type);
    float acc[MR][GR] = {{0.f}};
    for (int64_t b = 0; b < nb; b++, grp += gb) {
        for (int i = 0; i < GR; i++) {
            const float dw = fp16_at(grp + 2 * i), mw = type == Q4_1 ? fp16_at(grp + 16 + 2 * i) : 0.f;
            for (int r = 0; r < R; r++) {
                const int8_t *q8 = a.q + (r * nb + b) * QK;
                const float d = a.d[r * nb + b], s = a.s[r * nb + b], s8 = a.s8[r * nb + b];
                int32_t dot = 0;
                for (int j = 0; j < x8_quant_bytes(type) / 32; j++)
                    for (int e = 0; e < 4; e++) {
                        const uint8_t q = grp[sb + 32 * j + 4 * i + e];
                        if (type == Q8_0)
                            dot += (int8_t)q * q8[4 * j + e];
                        else
                            dot += (q & 15) * q8[4 * j + e] + (q >> 4) * q8[16 + 4 * j + e];
                    }
                if (type == Q8_0)
                    acc[r][i] = MADD((float)dot, dw * d, acc[r][i]);
                else if (type == Q4_0)
                    acc[r][i] = MADD(dw, MADD(d, (float)dot, -s8), acc[r][i]);
                else
                    acc[r][i] = MADD((float)dot, dw * d, MADD(mw, s, acc[r][i]));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < valid; i++) y[r * ldy + i] = acc[r][i];
}
#endif

#include "qlinear_x8k.h"

#define X8_TILE_R(TILE, TYPE, RR) TILE(TYPE, RR, grp, nb, a, y, ldy, valid, next)
/* the row counts between MR and X8_MR, where a build's tile takes more than MR */
#if X8_MR > MR
#define X8_MORE_ROWS(TILE, TYPE)                                                                         \
    case 4: X8_TILE_R(TILE, TYPE, 4); break;                                                             \
    case 5: X8_TILE_R(TILE, TYPE, 5); break;                                                             \
    case 6: X8_TILE_R(TILE, TYPE, 6); break;                                                             \
    case 7: X8_TILE_R(TILE, TYPE, 7); break;
#else
#define X8_MORE_ROWS(TILE, TYPE)
#endif
#define X8_ROWS_OF(TILE, TYPE)                                                                           \
    switch (R) {                                                                                         \
    case 1: X8_TILE_R(TILE, TYPE, 1); break;                                                             \
    case 2: X8_TILE_R(TILE, TYPE, 2); break;                                                             \
    case 3: X8_TILE_R(TILE, TYPE, 3); break;                                                             \
    X8_MORE_ROWS(TILE, TYPE)                                                                             \
    default: X8_TILE_R(TILE, TYPE, X8_MR); break;                                                        \
    }

/* R rows of x (1..X8_MR) against a tile: x8_tile, with the type and R as constants. */
static void x8_rows(int type, int R, const uint8_t *grp, int64_t nb, xrows a, float *y, int64_t ldy, int valid,
                    const uint8_t *next) {
    switch (type) {
    case Q8_0: X8_ROWS_OF(x8_tile, Q8_0) break;
    case Q4_0: X8_ROWS_OF(x8_tile, Q4_0) break;
    case Q4_1: X8_ROWS_OF(x8_tile, Q4_1) break;
    case Q4_K: X8_ROWS_OF(xk_tile, Q4_K) break;
    case Q5_K: X8_ROWS_OF(xk_tile, Q5_K) break;
    default: X8_ROWS_OF(xk_tile, Q6_K) break;
    }
}
