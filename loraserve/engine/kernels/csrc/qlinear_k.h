/* GGUF's K-quants in qlinear.c: super-blocks of 256 weights (ggml-common.h block_q4_K, block_q5_K,
 * block_q6_K), read as eight 32-weight pieces that meet the activations' int8 blocks of 32 as the
 * 32-weight types do, so one inner loop serves all six types. Piece j (0..7) of a super-block, element i:
 *   Q4_K (GGML type 12), 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales sc_j and mins
 *     m_j (ggml's get_scale_min_k4), 128 bytes qs. q = nibble j % 2 of qs[32 (j / 2) + i], w = d sc_j q
 *     - dmin m_j: Q4_1's form, q unsigned and an offset per piece (-dmin m_j, through s_a).
 *   Q5_K (13), 176 bytes: as Q4_K with 32 bytes qh between the scales and qs: bit j of qh[i] is q's
 *     fifth bit (16), q 0..31.
 *   Q6_K (14), 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales (one per 16 weights), fp16 d. With
 *     j = 4 h + u: q = nibble u / 2 of ql[64 h + 32 (u % 2) + i] | bits 2u, 2u + 1 of qh[32 h + i] << 4,
 *     w = d sc (q - 32), sc = scales[2 j] for i < 16, scales[2 j + 1] above: Q8_0's form, q - 32 signed.
 * The integer scales go into the dot product: madd multiplies maddubs' pairs by them rather than by 1.
 * Its eight s32 lanes hold elements 0-15 in lanes 0-3 and 16-31 in lanes 4-7 (maddubs and madd sum
 * adjacent pairs, each 128-bit half in order), so Q6_K's two scales are one vector, [sc_lo x 8, sc_hi x
 * 8] as int16, and the float work per piece stays that of the 32-weight types: one FMA with d d_a, and
 * Q4_K / Q5_K's offset. Nothing saturates or rounds: maddubs pairs are at most 2 * 32 * 127 (Q6_K's
 * |q - 32| <= 32, its sign moved onto the activations as for Q8_0), a piece's whole dot at most 32 * 32
 * * 127 * 128 < 2^24, exact in a float. A super-block's scales are decoded once, for its eight pieces and
 * each row of x that meets them (MR at a time), read as stored (the engine repacks them: qlinear_x8k.h).
 */

#define QK_K 256           /* weights per super-block */
#define PIECES (QK_K / QK) /* 32-weight pieces per super-block */

/* One super-block's scales, decoded once for its pieces (Q6_K's int8 scales are read from the block). */
typedef struct {
    float d;            /* fp16 d */
    float c[PIECES];    /* Q4_K / Q5_K: piece j's offset -dmin m_j (AVX2: / 8, each lane's share) */
    int16_t sc[PIECES]; /* Q4_K / Q5_K: piece j's scale sc_j */
} kscales;

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Q4_K / Q5_K's 12 bytes of 6-bit scales and mins, four pieces a word (piece j: byte j % 4 of word j /
 * 4). Pieces 0-3 are the low six bits of bytes 0-3 (scales) and 4-7 (mins); pieces 4-7 the nibbles of
 * bytes 8-11 (scale low, min high) under the top two bits of bytes 0-3 (scales) and 4-7 (mins). */
static inline void scales_mins(const uint8_t *s, uint32_t sc[2], uint32_t m[2]) {
    const uint32_t a = le32(s), b = le32(s + 4), c = le32(s + 8);
    sc[0] = a & 0x3f3f3f3f;
    m[0] = b & 0x3f3f3f3f;
    sc[1] = (c & 0x0f0f0f0f) | (a >> 2 & 0x30303030);
    m[1] = (c >> 4 & 0x0f0f0f0f) | (b >> 2 & 0x30303030);
}

static inline __attribute__((always_inline)) void decode_scales(const int type, const uint8_t *w,
                                                                kscales *h) {
    h->d = fp16_at(type == Q6_K ? w + 208 : w);
    if (type == Q6_K) return;
    uint32_t sc[2], m[2];
    scales_mins(w + 4, sc, m);
    const float dmin = fp16_at(w + 2);
#ifdef __AVX2__
    /* -dmin m_j / 8 is exact (an 11-bit by a 6-bit integer, then a power of 2): the scalar path's value */
    const __m128i v = _mm_setr_epi32((int)sc[0], (int)sc[1], (int)m[0], (int)m[1]);
    _mm_storeu_si128((__m128i *)h->sc, _mm_cvtepu8_epi16(v));
    _mm256_storeu_ps(h->c, _mm256_mul_ps(_mm256_set1_ps(-0.125f * dmin),
                                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)))));
#else
    for (int j = 0; j < PIECES; j++) {
        h->sc[j] = (int16_t)(sc[j / 4] >> 8 * (j % 4) & 0xff);
        h->c[j] = -dmin * (float)(m[j / 4] >> 8 * (j % 4) & 0xff);
    }
#endif
}

#ifdef __AVX2__
/* Piece j of the super-block at w as a wblock for step_avx2 (Q6_K takes Q8_0's step, Q4_K and Q5_K
 * Q4_1's). j is a constant at every call site: the shifts are immediates. */
static inline __attribute__((always_inline)) wblock decode_k_avx2(const int type, const uint8_t *w,
                                                                  const kscales *h, const int j) {
    wblock k;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    k.d = _mm256_set1_ps(h->d);
    /* epi16 shifts: what crosses from the neighbouring byte is masked off */
    if (type == Q6_K) {
        const int half = j / 4, u = j % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(w + 64 * half + 32 * (u % 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * half));
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (u / 2)), low4);
        const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * u), _mm256_set1_epi8(3)), 4);
        k.q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
        k.u = _mm256_abs_epi8(k.q);
        k.m8 = _mm256_setzero_ps();
        /* scales 2j (lanes 0-3: elements 0-15) and 2j + 1 (lanes 4-7), eight int16 each */
        const __m128i pick = _mm_add_epi8(_mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                          _mm_set1_epi8((char)(2 * j)));
        k.s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(w + 192)), pick));
        return k;
    }
    const int qs = type == Q5_K ? 48 : 16; /* where the nibbles start */
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + qs + 32 * (j / 2)));
    __m256i q = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (j % 2)), low4);
    if (type == Q5_K) {
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 16));
        q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(1)), 4));
    }
    k.q = k.u = q;
    k.m8 = _mm256_set1_ps(h->c[j]);
    k.s = _mm256_set1_epi16(h->sc[j]);
    return k;
}
#else
/* Piece j's quants as the integers its scales multiply: q (Q4_K, Q5_K) or q - 32 (Q6_K). */
static inline void unpack_k(const int type, const uint8_t *w, const int j, int *q) {
    if (type == Q6_K) {
        const int half = j / 4, u = j % 4;
        const uint8_t *ql = w + 64 * half + 32 * (u % 2), *qh = w + 128 + 32 * half;
        for (int i = 0; i < QK; i++) q[i] = ((ql[i] >> 4 * (u / 2) & 15) | (qh[i] >> 2 * u & 3) << 4) - 32;
        return;
    }
    const uint8_t *qs = w + (type == Q5_K ? 48 : 16) + 32 * (j / 2), *qh = w + 16;
    for (int i = 0; i < QK; i++) q[i] = (qs[i] >> 4 * (j % 2) & 15) | (type == Q5_K ? (qh[i] >> j & 1) << 4 : 0);
}
#endif

/* dot_rows for the K-quants: weight row w (nb / 8 super-blocks) against R rows of quantized x. Piece j
 * of a super-block is x's block b = 8 s + j, and goes to the even or odd accumulator by b, as in
 * dot_rows. */
static inline __attribute__((always_inline)) void dot_rows_k(const int type, const int R, const uint8_t *w,
                                                             int64_t nb, const int8_t *qa, const float *da,
                                                             const float *sa, float *y, int64_t ldy) {
    const int64_t bytes = block_bytes(type);
    kscales h;
#ifdef __AVX2__
    __m256 even[MR], odd[MR];
    UNROLL for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < nb; s += PIECES, w += bytes) {
        decode_scales(type, w, &h);
        _Pragma("GCC unroll 8") for (int j = 0; j < PIECES; j += 2) {
            const int64_t b = s + j;
            const wblock k0 = decode_k_avx2(type, w, &h, j);
            UNROLL for (int r = 0; r < R; r++)
                even[r] = step_avx2(type, k0, qa + (r * nb + b) * QK, da + r * nb + b, sa + r * nb + b, even[r]);
            const wblock k1 = decode_k_avx2(type, w, &h, j + 1);
            UNROLL for (int r = 0; r < R; r++)
                odd[r] = step_avx2(type, k1, qa + (r * nb + b + 1) * QK, da + r * nb + b + 1, sa + r * nb + b + 1,
                                   odd[r]);
        }
    }
    UNROLL for (int r = 0; r < R; r++) y[r * ldy] = hsum8(_mm256_add_ps(even[r], odd[r]));
#else
    float acc[MR] = {0.f}, accs[MR] = {0.f}; /* the scaled dots; the offsets c_j * s_a */
    int q[QK];
    for (int64_t s = 0; s < nb; s += PIECES, w += bytes) {
        decode_scales(type, w, &h);
        for (int j = 0; j < PIECES; j++) {
            const int64_t b = s + j;
            unpack_k(type, w, j, q);
            for (int r = 0; r < R; r++) {
                const int8_t *a = qa + (r * nb + b) * QK;
                int32_t lo = 0, hi = 0;
                for (int i = 0; i < QK / 2; i++) {
                    lo += q[i] * a[i];
                    hi += q[i + QK / 2] * a[i + QK / 2];
                }
                const int32_t dot = type == Q6_K ? (int8_t)w[192 + 2 * j] * lo + (int8_t)w[193 + 2 * j] * hi
                                                 : h.sc[j] * (lo + hi);
                acc[r] = MADD(h.d * da[r * nb + b], (float)dot, acc[r]);
                if (type != Q6_K) accs[r] = MADD(h.c[j], sa[r * nb + b], accs[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = acc[r] + accs[r];
#endif
}
