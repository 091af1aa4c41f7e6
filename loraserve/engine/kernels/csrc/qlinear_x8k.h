/* Q4_K, Q5_K and Q6_K weights repacked at load in groups of 8 rows, as qlinear_x8.h does Q4_0 and Q4_1
 * (included by it, after its helpers; the super-blocks' stored layout: qlinear_k.h).
 *
 * Why: as stored, a K-quant row meets each row of x alone (maddubs, madd by its integer scales, eight
 * partial lanes, a horizontal sum), at half the repacked Q4_0 tile's rate or less at a batch; Q4_K_M
 * files, the ones most users download, are Q4_K and Q6_K throughout. In a group every piece of 32 weights
 * (a super-block's eighth) takes the form of a Q4_1 block, its scale d sc_j and offset -dmin m_j being
 * exact float products of the stored integers, so the tiles are Q4_1's: one activation broadcast feeds 8
 * rows (16 in a zmm), one lane is one output.
 *
 * A group's super-block s (the groups' super-blocks in order, group after group), rows r = 0..7:
 *   Q4_K, Q5_K: fp16 d[8], fp16 dmin[8], sc[j][r] and m[j][r] as bytes (64 + 64: decoded from the
 *     stored 6-bit packing once, at repack), then the eight pieces;
 *   Q6_K: fp16 d[8], the int8 scales sc[h][r] of the 16 halves-pieces h (128), then the pieces.
 * Piece j holds its quants q (unsigned: Q4_K 0..15, Q5_K 0..31, Q6_K 0..63, whose -32 the activations'
 * sums take back) as Q4_1's chunks: chunk c (of 4) has row r's elements 4c..4c+3 in the low nibbles of
 * its bytes 4r..4r+3 and 16+4c..16+4c+3 in the high ones. Then the bits above the nibble, per byte of a
 * chunk, for all four chunks in one 32-byte vector: Q5_K's bit c is the low element's fifth bit in chunk
 * c, bit 4 + c the high element's (32 bytes); Q6_K's bits 2c, 2c+1 are the low element's top two bits in
 * chunk c (32 bytes), then the same for the high elements (32 more). The group is the size of its 8 rows
 * as stored for Q6_K (1,680 bytes), 2.8% more for Q4_K (1,184 vs 1,152) and 2.3% for Q5_K: the bytes
 * the scales take decoded.
 *
 * A piece's integer dot with a row of x (per lane: exact) and its float steps, in the same order in every
 * build (the same bits):
 *   Q4_K, Q5_K: acc = fma(dot, (d sc_j) d_a, fma(-dmin m_j, s_a, acc)): Q4_1's;
 *   Q6_K: elements 0-15 and 16-31 have their own scales: two dots, each starting from -32 times its
 *     half's sum of q_a (quantize_row's c32), acc = fma(dot_hi, (d sc_hi) d_a, fma(dot_lo, (d sc_lo) d_a,
 *     acc)).
 * The AVX2 build sums maddubs pairs in int16 only as far as they cannot saturate: Q4_K's and Q5_K's four
 * chunks a half (4 x 2 x 31 x 128 < 32768), Q6_K's two (2 x 2 x 63 x 128 < 32768).
 */
#define XK_PIECES 8 /* pieces of 32 weights a super-block */

static inline int xk_header_bytes(int type) { return type == Q6_K ? 144 : 160; }

static inline int xk_piece_bytes(int type) { return type == Q4_K ? 128 : type == Q5_K ? 160 : 192; }

static inline int64_t xk_block_bytes(int type) {
    return xk_header_bytes(type) + XK_PIECES * xk_piece_bytes(type);
}

/* Piece j of a stored super-block as unsigned quants (qlinear_k.h's layout), and back (into a zeroed
 * block: bits of several pieces share bytes). */
static void xk_get(int type, const uint8_t *blk, int j, uint8_t *q) {
    for (int i = 0; i < QK; i++) {
        if (type == Q6_K) {
            const int half = j / 4, u = j % 4;
            q[i] = (uint8_t)((blk[64 * half + 32 * (u % 2) + i] >> 4 * (u / 2) & 15) |
                             (blk[128 + 32 * half + i] >> 2 * u & 3) << 4);
        } else {
            const uint8_t *qs = blk + (type == Q5_K ? 48 : 16) + 32 * (j / 2);
            q[i] = (uint8_t)((qs[i] >> 4 * (j % 2) & 15) | (type == Q5_K ? (blk[16 + i] >> j & 1) << 4 : 0));
        }
    }
}

static void xk_put(int type, uint8_t *blk, int j, const uint8_t *q) {
    for (int i = 0; i < QK; i++) {
        if (type == Q6_K) {
            const int half = j / 4, u = j % 4;
            blk[64 * half + 32 * (u % 2) + i] |= (uint8_t)((q[i] & 15) << 4 * (u / 2));
            blk[128 + 32 * half + i] |= (uint8_t)((q[i] >> 4) << 2 * u);
        } else {
            blk[(type == Q5_K ? 48 : 16) + 32 * (j / 2) + i] |= (uint8_t)((q[i] & 15) << 4 * (j % 2));
            if (type == Q5_K) blk[16 + i] |= (uint8_t)((q[i] >> 4 & 1) << j);
        }
    }
}

/* One row's super-block (stored layout) <-> its place r in a group's super-block. to_group: 1 packs. */
static void xk_move(int type, uint8_t *grp, int r, uint8_t *blk, int to_group) {
    const int hdr = xk_header_bytes(type), pb = xk_piece_bytes(type);
    if (!to_group) memset(blk, 0, (size_t)block_bytes(type));
    if (type == Q6_K) {
        if (to_group) {
            memcpy(grp + 2 * r, blk + 208, 2);
            for (int h = 0; h < 16; h++) grp[16 + 8 * h + r] = blk[192 + h];
        } else {
            memcpy(blk + 208, grp + 2 * r, 2);
            for (int h = 0; h < 16; h++) blk[192 + h] = grp[16 + 8 * h + r];
        }
    } else if (to_group) {
        uint32_t sc[2], m[2];
        scales_mins(blk + 4, sc, m);
        memcpy(grp + 2 * r, blk, 2);
        memcpy(grp + 16 + 2 * r, blk + 2, 2);
        for (int j = 0; j < XK_PIECES; j++) {
            grp[32 + 8 * j + r] = (uint8_t)(sc[j / 4] >> 8 * (j % 4));
            grp[96 + 8 * j + r] = (uint8_t)(m[j / 4] >> 8 * (j % 4));
        }
    } else { /* scales_mins undone: pieces 4-7 keep their top two bits in bytes 0-7's */
        const uint8_t *sc = grp + 32 + r, *m = grp + 96 + r;
        memcpy(blk, grp + 2 * r, 2);
        memcpy(blk + 2, grp + 16 + 2 * r, 2);
        for (int i = 0; i < 4; i++) {
            blk[4 + i] = (uint8_t)(sc[8 * i] | (sc[8 * (4 + i)] >> 4) << 6);
            blk[8 + i] = (uint8_t)(m[8 * i] | (m[8 * (4 + i)] >> 4) << 6);
            blk[12 + i] = (uint8_t)((sc[8 * (4 + i)] & 15) | (m[8 * (4 + i)] & 15) << 4);
        }
    }
    for (int j = 0; j < XK_PIECES; j++) {
        uint8_t q[QK], *p = grp + hdr + j * pb;
        if (to_group) xk_get(type, blk, j, q);
        for (int c = 0; c < 4; c++)
            for (int e = 0; e < 4; e++) {
                uint8_t *b = p + 32 * c + 4 * r + e, *h = p + 128 + 4 * r + e;
                const int lo = 4 * c + e, hi = 16 + 4 * c + e;
                if (to_group) {
                    *b = (uint8_t)((q[lo] & 15) | (q[hi] & 15) << 4);
                    if (type == Q5_K) *h |= (uint8_t)((q[lo] >> 4 & 1) << c | (q[hi] >> 4 & 1) << (4 + c));
                    if (type == Q6_K) {
                        h[0] |= (uint8_t)((q[lo] >> 4) << 2 * c);
                        h[32] |= (uint8_t)((q[hi] >> 4) << 2 * c);
                    }
                } else {
                    q[lo] = (uint8_t)((*b & 15) | (type == Q5_K ? (*h >> c & 1) << 4 : 0) |
                                      (type == Q6_K ? (h[0] >> 2 * c & 3) << 4 : 0));
                    q[hi] = (uint8_t)((*b >> 4) | (type == Q5_K ? (*h >> (4 + c) & 1) << 4 : 0) |
                                      (type == Q6_K ? (h[32] >> 2 * c & 3) << 4 : 0));
                }
            }
        if (!to_group) xk_put(type, blk, j, q);
    }
}

#if defined(__AVX2__)
/* v shifted left by s bits per 16-bit lane (right by -s): a chunk's bits above its nibbles moved into
 * place, the neighbouring byte's bits masked off after. s is a constant at every call. */
static inline __m256i xk_shl(__m256i v, int s) {
    return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s);
}

/* Piece quants of one group (the bytes at p): lo[c], hi[c] unsigned, as the chunks of a Q4_1 group. */
static inline __attribute__((always_inline)) void xk_quants8(const int type, const uint8_t *p, __m256i lo[4],
                                                             __m256i hi[4]) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i h0 = type == Q4_K ? low : _mm256_loadu_si256((const __m256i *)(p + 128));
    const __m256i h1 = type == Q6_K ? _mm256_loadu_si256((const __m256i *)(p + 160)) : low;
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * c));
        lo[c] = _mm256_and_si256(v, low);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if (type == Q5_K) {
            const __m256i bit = _mm256_set1_epi8(0x10);
            lo[c] = _mm256_or_si256(lo[c], _mm256_and_si256(xk_shl(h0, 4 - c), bit));
            hi[c] = _mm256_or_si256(hi[c], _mm256_and_si256(xk_shl(h0, -c), bit));
        } else if (type == Q6_K) {
            const __m256i bits = _mm256_set1_epi8(0x30);
            lo[c] = _mm256_or_si256(lo[c], _mm256_and_si256(xk_shl(h0, 4 - 2 * c), bits));
            hi[c] = _mm256_or_si256(hi[c], _mm256_and_si256(xk_shl(h1, 4 - 2 * c), bits));
        }
    }
}

/* 8 bytes at p as 8 floats (signed bytes: Q6_K's scales). */
static inline __m256 xk_bytes8(const uint8_t *p, int sgn) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

/* init + the exact dot of a half-piece's four chunks u with the activation bytes q (4 each, broadcast). */
static inline __attribute__((always_inline)) __m256i xk_half(const int type, __m256i init, const __m256i *u,
                                                             const int8_t *q) {
#if defined(VNNI)
    (void)type;
    for (int c = 0; c < 4; c++) init = DPBUSD256(init, u[c], bcast4(q + 4 * c));
    return init;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], bcast4(q)),
                                         _mm256_maddubs_epi16(u[1], bcast4(q + 4)));
    const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(u[2], bcast4(q + 8)),
                                         _mm256_maddubs_epi16(u[3], bcast4(q + 12)));
    if (type == Q6_K)
        return _mm256_add_epi32(init, _mm256_add_epi32(_mm256_madd_epi16(s01, ones),
                                                       _mm256_madd_epi16(s23, ones)));
    return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones));
#endif
}

/* R rows of x against one group (8 weight rows, one a lane): y[r * ldy + i] for its first `valid` rows i.
 * nb counts x's blocks of 32 (8 a super-block). */
static inline __attribute__((always_inline)) void xk_tile8(const int type, const int R, const uint8_t *grp,
                                                           int64_t nb, xrows a, float *y, int64_t ldy,
                                                           int valid) {
    const int64_t gb = xk_block_bytes(type);
    const int hdr = xk_header_bytes(type), pb = xk_piece_bytes(type);
    __m256 acc[X8_MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += XK_PIECES, grp += gb) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16)));
        const __m256 nmin = type == Q6_K ? dw : _mm256_xor_ps(_mm256_set1_ps(-0.f), dmin);
        for (int j = 0; j < XK_PIECES; j++) {
#if !defined(VNNI)
            if (type == Q4_K) { /* a piece is a 4-bit block: nibble_dots, as x8_tile's */
                const __m256 dsc = _mm256_mul_ps(dw, xk_bytes8(grp + 32 + 8 * j, 0));
                const __m256 mw = _mm256_mul_ps(nmin, xk_bytes8(grp + 96 + 8 * j, 0));
                const __m256i ones = _mm256_set1_epi16(1);
                __m256i s[X8_MR];
                nibble_dots(R, grp + hdr + j * pb, a.q + (b0 + j) * QK, nb * QK, s);
                UNROLL for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones)),
                                             _mm256_mul_ps(dsc, _mm256_set1_ps(a.d[rb])),
                                             _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[rb]), acc[r]));
                }
                continue;
            }
#endif
            __m256i lo[4], hi[4];
            xk_quants8(type, grp + hdr + j * pb, lo, hi);
            if (type == Q6_K) {
                const __m256 dl = _mm256_mul_ps(dw, xk_bytes8(grp + 16 + 16 * j, 1));
                const __m256 dh = _mm256_mul_ps(dw, xk_bytes8(grp + 24 + 16 * j, 1));
                UNROLL for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    const int8_t *q = a.q + rb * QK;
                    const __m256i sl = xk_half(type, _mm256_set1_epi32(a.c32[2 * rb]), lo, q);
                    const __m256i sh = xk_half(type, _mm256_set1_epi32(a.c32[2 * rb + 1]), hi, q + 16);
                    const __m256 d = _mm256_set1_ps(a.d[rb]);
                    const __m256 half0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sl), _mm256_mul_ps(dl, d), acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh), _mm256_mul_ps(dh, d), half0);
                }
            } else {
                const __m256 dsc = _mm256_mul_ps(dw, xk_bytes8(grp + 32 + 8 * j, 0));
                const __m256 mw = _mm256_mul_ps(nmin, xk_bytes8(grp + 96 + 8 * j, 0));
                UNROLL for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    const int8_t *q = a.q + rb * QK;
                    const __m256i s = _mm256_add_epi32(xk_half(type, _mm256_setzero_si256(), lo, q),
                                                       xk_half(type, _mm256_setzero_si256(), hi, q + 16));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dsc, _mm256_set1_ps(a.d[rb])),
                                             _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[rb]), acc[r]));
                }
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) x8_store(y + r * ldy, acc[r], valid);
}
#endif

#if defined(VNNI512)
static inline __m512i xk_shl2(__m512i v, int s) {
    return s >= 0 ? _mm512_slli_epi16(v, s) : _mm512_srli_epi16(v, -s);
}

/* xk_quants8 for two groups side by side (group 0 in the low 256 bits). */
static inline __attribute__((always_inline)) void xk_quants16(const int type, const uint8_t *p0,
                                                              const uint8_t *p1, __m512i lo[4], __m512i hi[4]) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i h0 = type == Q4_K ? low : load2(p0 + 128, p1 + 128);
    const __m512i h1 = type == Q6_K ? load2(p0 + 160, p1 + 160) : low;
    for (int c = 0; c < 4; c++) {
        const __m512i v = load2(p0 + 32 * c, p1 + 32 * c);
        lo[c] = _mm512_and_si512(v, low);
        hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        if (type == Q5_K) {
            const __m512i bit = _mm512_set1_epi8(0x10);
            lo[c] = _mm512_or_si512(lo[c], _mm512_and_si512(xk_shl2(h0, 4 - c), bit));
            hi[c] = _mm512_or_si512(hi[c], _mm512_and_si512(xk_shl2(h0, -c), bit));
        } else if (type == Q6_K) {
            const __m512i bits = _mm512_set1_epi8(0x30);
            lo[c] = _mm512_or_si512(lo[c], _mm512_and_si512(xk_shl2(h0, 4 - 2 * c), bits));
            hi[c] = _mm512_or_si512(hi[c], _mm512_and_si512(xk_shl2(h1, 4 - 2 * c), bits));
        }
    }
}

static inline __m512 xk_bytes16(const uint8_t *p0, const uint8_t *p1, int sgn) {
    const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)p0),
                                         _mm_loadl_epi64((const __m128i *)p1));
    return _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}

/* xk_tile8's work on two consecutive groups a zmm (x8_tile16's structure: one vpdpbusd chain a row and
 * half, its activation bytes broadcast by the instruction, `next` fetched during the first pass). */
static inline __attribute__((always_inline)) void xk_tile16(const int type, const int R, const uint8_t *grp,
                                                            int64_t nb, xrows a, float *y, int64_t ldy,
                                                            int valid, const uint8_t *next) {
    const int64_t gb = xk_block_bytes(type);
    const int hdr = xk_header_bytes(type), pb = xk_piece_bytes(type);
    const uint8_t *g1 = valid > GR ? grp + nb / XK_PIECES * gb : grp;
    __m512 acc[X8_MR];
    UNROLL for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += XK_PIECES, grp += gb, g1 += gb) {
        if (next) {
            for (int64_t o = 0; o < 2 * gb; o += 64) _mm_prefetch((const char *)(next + o), _MM_HINT_T1);
            next += 2 * gb;
        }
        const __m512 dw = fp16x16(grp, g1);
        const __m512 nmin = type == Q6_K ? dw : _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_set1_epi32((int)0x80000000), _mm512_castps_si512(fp16x16(grp + 16, g1 + 16))));
        for (int j = 0; j < XK_PIECES; j++) {
            __m512i lo[4], hi[4];
            xk_quants16(type, grp + hdr + j * pb, g1 + hdr + j * pb, lo, hi);
            if (type == Q6_K) {
                const __m512 dl = _mm512_mul_ps(dw, xk_bytes16(grp + 16 + 16 * j, g1 + 16 + 16 * j, 1));
                const __m512 dh = _mm512_mul_ps(dw, xk_bytes16(grp + 24 + 16 * j, g1 + 24 + 16 * j, 1));
                UNROLL for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    const int8_t *q = a.q + rb * QK;
                    __m512i sl = _mm512_set1_epi32(a.c32[2 * rb]), sh = _mm512_set1_epi32(a.c32[2 * rb + 1]);
                    for (int c = 0; c < 4; c++) {
                        sl = dpbusd_bcast(sl, lo[c], q + 4 * c);
                        sh = dpbusd_bcast(sh, hi[c], q + 16 + 4 * c);
                    }
                    const __m512 d = _mm512_set1_ps(a.d[rb]);
                    const __m512 half0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sl), _mm512_mul_ps(dl, d), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sh), _mm512_mul_ps(dh, d), half0);
                }
            } else {
                const __m512 dsc = _mm512_mul_ps(dw, xk_bytes16(grp + 32 + 8 * j, g1 + 32 + 8 * j, 0));
                const __m512 mw = _mm512_mul_ps(nmin, xk_bytes16(grp + 96 + 8 * j, g1 + 96 + 8 * j, 0));
                UNROLL for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    const int8_t *q = a.q + rb * QK;
                    __m512i s = _mm512_setzero_si512();
                    for (int c = 0; c < 4; c++) {
                        s = dpbusd_bcast(s, lo[c], q + 4 * c);
                        s = dpbusd_bcast(s, hi[c], q + 16 + 4 * c);
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dsc, _mm512_set1_ps(a.d[rb])),
                                             _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[rb]), acc[r]));
                }
            }
        }
    }
    const __mmask16 keep = (__mmask16)(valid >= 16 ? 0xffff : (1u << valid) - 1);
    UNROLL for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}
#endif

#if !defined(__AVX2__)
/* The same integer dots and float steps per output, in scalar code. */
static void xk_tile8(const int type, const int R, const uint8_t *grp, int64_t nb, xrows a, float *y,
                     int64_t ldy, int valid) {
    const int64_t gb = xk_block_bytes(type);
    const int hdr = xk_header_bytes(type), pb = xk_piece_bytes(type);
    float acc[X8_MR][GR] = {{0.f}};
    for (int64_t b0 = 0; b0 < nb; b0 += XK_PIECES, grp += gb) {
        for (int i = 0; i < GR; i++) {
            const float dw = fp16_at(grp + 2 * i), nmin = type == Q6_K ? 0.f : -fp16_at(grp + 16 + 2 * i);
            for (int j = 0; j < XK_PIECES; j++) {
                const uint8_t *p = grp + hdr + j * pb;
                int q[QK];
                for (int c = 0; c < 4; c++)
                    for (int e = 0; e < 4; e++) {
                        const int byte = p[32 * c + 4 * i + e], h = type == Q4_K ? 0 : p[128 + 4 * i + e];
                        q[4 * c + e] = (byte & 15) | (type == Q5_K ? (h >> c & 1) << 4 : 0) |
                                       (type == Q6_K ? (h >> 2 * c & 3) << 4 : 0);
                        q[16 + 4 * c + e] = (byte >> 4) | (type == Q5_K ? (h >> (4 + c) & 1) << 4 : 0) |
                                            (type == Q6_K ? (p[160 + 4 * i + e] >> 2 * c & 3) << 4 : 0);
                    }
                for (int r = 0; r < R; r++) {
                    const int64_t rb = r * nb + b0 + j;
                    const int8_t *qa = a.q + rb * QK;
                    int32_t lo = type == Q6_K ? a.c32[2 * rb] : 0, hi = type == Q6_K ? a.c32[2 * rb + 1] : 0;
                    for (int e = 0; e < QK / 2; e++) {
                        lo += q[e] * qa[e];
                        hi += q[16 + e] * qa[16 + e];
                    }
                    const float d = a.d[rb];
                    if (type == Q6_K) {
                        const float dl = dw * (float)(int8_t)grp[16 + 16 * j + i];
                        const float dh = dw * (float)(int8_t)grp[24 + 16 * j + i];
                        acc[r][i] = MADD((float)hi, dh * d, MADD((float)lo, dl * d, acc[r][i]));
                    } else {
                        const float dsc = dw * (float)grp[32 + 8 * j + i];
                        const float mw = nmin * (float)grp[96 + 8 * j + i];
                        acc[r][i] = MADD((float)(lo + hi), dsc * d, MADD(mw, a.s[rb], acc[r][i]));
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < valid; i++) y[r * ldy + i] = acc[r][i];
}
#endif

/* A tile of X8_TILE rows of a K-quant: as x8_tile chooses, but a zmm pair of groups from 2 rows of x on
 * rather than MR: a K-quant piece's decoding (its high bits, its scales) costs more than a 32-weight
 * block's, and at 2-3 rows halving its instructions outweighs the second stream of blocks (BENCHMARKS.md,
 * nineteenth session); at one row the two ways measured alike, and one stream is kept. */
static inline __attribute__((always_inline)) void xk_tile(const int type, const int R, const uint8_t *grp,
                                                          int64_t nb, xrows a, float *y, int64_t ldy, int valid,
                                                          const uint8_t *next) {
#if defined(VNNI512) && X8_ZMM
    if (R >= 2) {
        xk_tile16(type, R, grp, nb, a, y, ldy, valid, R >= MR ? next : NULL);
        return;
    }
#endif
    (void)next;
    xk_tile8(type, R, grp, nb, a, y, ldy, valid < GR ? valid : GR);
    if (valid > GR)
        xk_tile8(type, R, grp + nb / XK_PIECES * xk_block_bytes(type), nb, a, y + GR, ldy, valid - GR);
}
