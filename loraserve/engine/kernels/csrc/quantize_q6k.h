/* Float rows to GGUF Q6_K super-blocks (included by qlinear.c after quantize_k.h, whose EXACT_FLOATS,
 * NO_CONTRACT and fp16_bits it uses), chosen as llama.cpp's reference quantizer (quantize_row_q6_K_ref)
 * chooses them: the type of the head and of some v / down projections in `--quantize q4_k_m` (llama.cpp's
 * Q4_K_M mix) and of the head in every 4-bit quantization, as llama.cpp's files have them.
 *
 * A super-block of 256 is sixteen sub-blocks of 16, w = d sc_j (q - 32) with q in 0..63 (6 bits: four in
 * `ql`, two in `qh`), sc_j an int8 and d an fp16. Per sub-block (ggml's make_qx_quants(16, 32, x, L, 1)),
 * the scale is fitted: the grid -32 / max (max: the value of largest magnitude, its sign kept, so that it
 * lands on -32, the level with no positive twin) and 18 slightly finer or coarser ones, -(32 + 0.1 is) /
 * max for is = -9..9 but 0, each round the values to levels in -32..31 and take the least-squares scale
 * for those levels, weighted by x^2 (the large values matter most in a dot product); a grid wins when its
 * fit explains more of the weighted sum of squares than the best so far (sumlx^2 / suml2 larger). Then d
 * is the largest scale (in magnitude, sign kept) / -128, each sub-block's integer the nearest to its scale
 * / d (at most 127), and the levels are taken again against the rounded scales. A super-block whose
 * scales are all under 1e-15 is all zero bytes.
 *
 * The sixteen sub-blocks of a super-block are fitted side by side, one per lane (the loops over them are
 * the vector loops): each lane runs the scalar fit's float32 operations in its order, without fused
 * multiply-adds (fp-contract off), and rounds with ggml's own nearest_int (1.5 * 2^23 added, the integer
 * read from the low bits), so the bytes do not depend on the build: tests/engine/weights/
 * test_quantize.py holds them to a line-by-line Python transcription and to ggml's own function.
 */

#define Q6K_SUB 16      /* values per sub-block */
#define Q6K_LANES 16    /* sub-blocks per super-block: the lanes of the fit */
#define Q6K_BYTES 210   /* ql 128, qh 64, 16 int8 scales, fp16 d */
#define Q6K_EPS 1e-15f  /* ggml's GROUP_MAX_EPS: a sub-block (or super-block) under it is zero */

/* ggml's nearest_int, bit for bit: round to nearest even for |v| < 2^22 (larger or NaN v give what ggml's
 * gives, since the same bits are read); integer operations only after the add, so it vectorizes. */
static inline EXACT_FLOATS int32_t q6k_nearest(float v) {
    NO_CONTRACT
    const float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t q6k_level(int32_t l) { return l < -32 ? -32 : l > 31 ? 31 : l; } /* -32..31 */

/* The 16 sub-blocks of a super-block (x: 256 floats) fitted: each one's scale (0 for a sub-block under
 * Q6K_EPS) and its levels L in 0..63 (sub-block after sub-block). */
static EXACT_FLOATS void q6k_fit(const float *x, uint8_t *L, float *scale_out) {
    NO_CONTRACT
    float xs[Q6K_SUB][Q6K_LANES], w[Q6K_SUB][Q6K_LANES], wx[Q6K_SUB][Q6K_LANES];
    float mx[Q6K_LANES], amax[Q6K_LANES], scale[Q6K_LANES], best[Q6K_LANES], best_iscale[Q6K_LANES];
    for (int i = 0; i < Q6K_SUB; i++)
        for (int p = 0; p < Q6K_LANES; p++) xs[i][p] = x[Q6K_SUB * p + i];
    for (int p = 0; p < Q6K_LANES; p++) mx[p] = amax[p] = 0;
    for (int i = 0; i < Q6K_SUB; i++)
        for (int p = 0; p < Q6K_LANES; p++) { /* the first of the largest magnitudes wins */
            mx[p] = fabsf(xs[i][p]) > amax[p] ? xs[i][p] : mx[p];
            amax[p] = fabsf(xs[i][p]) > amax[p] ? fabsf(xs[i][p]) : amax[p];
        }
    for (int i = 0; i < Q6K_SUB; i++)
        for (int p = 0; p < Q6K_LANES; p++) {
            w[i][p] = xs[i][p] * xs[i][p];
            wx[i][p] = w[i][p] * xs[i][p]; /* ggml's w*x[i]*l is (w*x[i])*l: this product, then l */
        }
    /* is = 0 (the grid -32 / max) first, then -9..9 but 0; a zero lane's NaNs are discarded at the end */
    for (int is = 0; is <= 18; is++) {
        const int step = is == 0 ? 0 : is <= 9 ? is - 10 : is - 9;
        float iscale[Q6K_LANES], sumlx[Q6K_LANES], suml2[Q6K_LANES];
        for (int p = 0; p < Q6K_LANES; p++) {
            iscale[p] = is == 0 ? -32.f / mx[p] : -(32.f + 0.1f * (float)step) / mx[p];
            sumlx[p] = suml2[p] = 0;
        }
        for (int i = 0; i < Q6K_SUB; i++)
            for (int p = 0; p < Q6K_LANES; p++) {
                const float l = (float)q6k_level(q6k_nearest(iscale[p] * xs[i][p]));
                sumlx[p] += wx[i][p] * l;
                suml2[p] += w[i][p] * l * l;
            }
        for (int p = 0; p < Q6K_LANES; p++) { /* the first grid is taken as it is */
            const float s = suml2[p] != 0 ? sumlx[p] / suml2[p] : 0.f;
            const int better = is == 0 || (suml2[p] > 0 && sumlx[p] * sumlx[p] > best[p] * suml2[p]);
            scale[p] = better ? s : scale[p];
            best[p] = better ? s * sumlx[p] : best[p];
            best_iscale[p] = better ? iscale[p] : best_iscale[p];
        }
    }
    uint8_t Lt[Q6K_SUB][Q6K_LANES];
    for (int i = 0; i < Q6K_SUB; i++)
        for (int p = 0; p < Q6K_LANES; p++)
            Lt[i][p] = (uint8_t)(amax[p] < Q6K_EPS ? 0 : q6k_level(q6k_nearest(best_iscale[p] * xs[i][p])) + 32);
    for (int p = 0; p < Q6K_LANES; p++) {
        scale_out[p] = amax[p] < Q6K_EPS ? 0.f : scale[p];
        for (int i = 0; i < Q6K_SUB; i++) L[Q6K_SUB * p + i] = Lt[i][p];
    }
}

/* One super-block of 256 floats (x) to its 210 bytes (blk). */
static EXACT_FLOATS void quantize_q6_k_block(const float *x, uint8_t *blk) {
    NO_CONTRACT
    uint8_t L[QK_K];
    float scales[Q6K_LANES];
    q6k_fit(x, L, scales);
    float max_scale = 0, max_abs = 0;
    for (int j = 0; j < Q6K_LANES; j++) { /* the first of the largest magnitudes, its sign kept */
        const float a = fabsf(scales[j]);
        if (a > max_abs) {
            max_abs = a;
            max_scale = scales[j];
        }
    }
    if (max_abs < Q6K_EPS) {
        memset(blk, 0, Q6K_BYTES);
        return;
    }
    const float iscale = -128.f / max_scale;
    const uint16_t d16 = fp16_bits(1.f / iscale);
    int8_t *sc = (int8_t *)(blk + 192);
    for (int j = 0; j < Q6K_LANES; j++) {
        const int32_t s = q6k_nearest(iscale * scales[j]);
        sc[j] = (int8_t)(s > 127 ? 127 : s);
    }
    memcpy(blk + 208, &d16, 2);
    const float d = fp16_at(blk + 208);
    for (int j = 0; j < Q6K_LANES; j++) { /* the levels again, against the rounded scales */
        const float dj = d * (float)sc[j];
        if (dj == 0.f) continue; /* the fit's levels stay: any q gives 0 */
        for (int i = 0; i < Q6K_SUB; i++)
            L[Q6K_SUB * j + i] = (uint8_t)(q6k_level(q6k_nearest(x[Q6K_SUB * j + i] / dj)) + 32);
    }
    /* each half of 128: ql holds values l and l + 64 (low nibbles, then high) at byte l, values l + 32 and
     * l + 96 at byte l + 32; qh byte l their top two bits, 2 bits each from value l up */
    uint8_t *ql = blk, *qh = blk + 128;
    for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
        const uint8_t *Lh = L + 128 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((Lh[l] & 0xf) | (Lh[l + 64] & 0xf) << 4);
            ql[l + 32] = (uint8_t)((Lh[l + 32] & 0xf) | (Lh[l + 96] & 0xf) << 4);
            qh[l] = (uint8_t)(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 | (Lh[l + 64] >> 4) << 4 | (Lh[l + 96] >> 4) << 6);
        }
    }
}

/* out = rows x cols floats (cols a multiple of 256) as Q6_K blocks, row after row; 1 for a cols it
 * cannot take. */
int qlinear_quantize_q6_k(const float *x, int64_t rows, int64_t cols, uint8_t *out) {
    if (cols <= 0 || cols % QK_K || rows < 0) return 1;
    const int64_t n = rows * (cols / QK_K);
    for (int64_t b = 0; b < n; b++) quantize_q6_k_block(x + QK_K * b, out + Q6K_BYTES * b);
    return 0;
}
