/* Float rows to GGUF Q4_K and Q5_K super-blocks (included by qlinear.c, after its K-quant layouts:
 * qlinear_k.h), the way llama.cpp's reference quantizers (quantize_row_q4_K_ref, quantize_row_q5_K_ref)
 * choose them, so that `--quantize q4_k` / `q5_k_m` and `loraserve quantize --type ...` write what a user of
 * llama.cpp would get from the same float weights.
 *
 * A super-block of 256 is eight pieces of 32, w = d sc_j q - dmin m_j with q in 0..nmax (Q4_K: 15, four
 * bits; Q5_K: 31, the fifth bit of each q in `qh`) and sc_j, m_j 6-bit. Per piece (ggml's
 * make_qkx2_quants(32, nmax, ...)), the scale and offset are fitted, not just taken from the piece's range:
 * the range's grid (step (max - min) / nmax, min clamped to <= 0) and slightly finer or coarser ones
 * ((nmax + rmin + 0.1 i) / (max - min), i = 0..nstep; Q4_K: rmin -1, nstep 20; Q5_K: rmin -0.5, nstep 15)
 * each round the values to levels, then take the weighted least-squares scale and offset for those levels
 * (an offset above 0 pinned at 0); the grid whose fit has the least weighted squared error wins. The
 * weights, rms(piece) + |x|, favour the large values, which matter most in a dot product. Then the
 * super-block's d and dmin are the largest scale and offset / 63, each piece's integers are the nearest
 * 6-bit multiples, and the levels are taken again against the rounded scales. Q4_K and Q5_K share all of
 * this; only the level count, the grids and the packing of the levels differ.
 *
 * Every float operation is a float32 one in a fixed order, without fused multiply-adds (the functions are
 * compiled with fp-contract off), so the bytes do not depend on the build: tests/engine/weights/
 * test_quantize.py holds them to a line-by-line Python transcription and to ggml's own functions.
 */
#if defined(__clang__) /* clang: a block-scope pragma, the first statement of each such function */
#define EXACT_FLOATS
#define NO_CONTRACT _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define EXACT_FLOATS __attribute__((optimize("fp-contract=off")))
#define NO_CONTRACT
#else
#define EXACT_FLOATS
#define NO_CONTRACT
#endif

static inline int nearest(float v) { return (int)nearbyintf(v); } /* ties to even, as ggml's */

/* f as IEEE half bits, rounded to nearest even (overflow to inf, subnormals kept), as ggml's conversion. */
static inline uint16_t fp16_bits(float f) {
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)(x >> 16 & 0x8000);
    const uint32_t a = x & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00;  /* NaN */
    if (a >= 0x477ff000) return sign | 0x7c00; /* 65520 and up round to inf */
    if (a < 0x38800000) {                      /* under 2^-14: a subnormal half, in units of 2^-24 */
        float v;
        memcpy(&v, &a, 4);
        return sign | (uint16_t)nearbyintf(v * 16777216.f);
    }
    return sign | (uint16_t)((a - (112u << 23) + 0xfff + (a >> 13 & 1)) >> 13); /* the 13 bits dropped, RNE */
#endif
}

#define NP 16 /* pieces fitted side by side (two super-blocks): the loops over them are the vector loops */

/* v rounded to the nearest level in 0..nmax, ties to even: adding and taking back 1.5 * 2^23 rounds a float
 * of magnitude under 2^22 to an integer (ggml's nearest_int does the same), larger ones clamp alike, and
 * unlike nearbyintf it vectorizes. NaN (a constant piece's lane, discarded) gives 0. */
static inline EXACT_FLOATS float clamp_level(float v, float nmax) {
    NO_CONTRACT
    const float l = (v + 12582912.f) - 12582912.f;
    return l > nmax ? nmax : l >= 0 ? l : 0;
}

/* The fit's parameters (ggml's make_qkx2_quants arguments; rdelta is 0.1 for both) */
typedef struct {
    int nmax;   /* levels 0..nmax */
    float rmin; /* the first of the finer or coarser grids: nmax + rmin levels over the range */
    int nstep;  /* grids nmax + rmin + 0.1 i, i = 0..nstep */
    int bytes;  /* a super-block's */
} kfit;

static const kfit Q4K_FIT = {15, -1.f, 20, 144}, Q5K_FIT = {31, -0.5f, 15, 176};

/* NP pieces (x: NP * 32 floats, piece after piece) fitted: each one's scale (0 for a constant piece), its
 * offset as the amount subtracted (-min >= 0) and its levels L (piece after piece). Every lane p runs the
 * scalar fit's operations in its order (no lane reads another's): the vector loops give the bytes a
 * piece-at-a-time loop would. */
static EXACT_FLOATS void fit_pieces(const float *x, uint8_t *L, float *scale_out, float *neg_min, kfit f) {
    NO_CONTRACT
    float xs[QK][NP], w[QK][NP], Lb[QK][NP], La[QK][NP];
    float mn[NP], mx[NP], sum_w[NP], sum_x[NP], iscale[NP], scale[NP], best[NP], s2[NP];
    const float nmax = (float)f.nmax;
    for (int i = 0; i < QK; i++)
        for (int p = 0; p < NP; p++) xs[i][p] = x[QK * p + i];
    for (int p = 0; p < NP; p++) s2[p] = 0;
    for (int i = 0; i < QK; i++)
        for (int p = 0; p < NP; p++) s2[p] += xs[i][p] * xs[i][p];
    for (int i = 0; i < QK; i++)
        for (int p = 0; p < NP; p++) w[i][p] = sqrtf(s2[p] / QK) + fabsf(xs[i][p]);
    for (int p = 0; p < NP; p++) {
        mn[p] = mx[p] = xs[0][p];
        sum_w[p] = w[0][p];
        sum_x[p] = w[0][p] * xs[0][p];
    }
    for (int i = 1; i < QK; i++)
        for (int p = 0; p < NP; p++) {
            mn[p] = xs[i][p] < mn[p] ? xs[i][p] : mn[p];
            mx[p] = xs[i][p] > mx[p] ? xs[i][p] : mx[p];
            sum_w[p] += w[i][p];
            sum_x[p] += w[i][p] * xs[i][p];
        }
    for (int p = 0; p < NP; p++) {
        mn[p] = mn[p] > 0 ? 0 : mn[p];
        iscale[p] = nmax / (mx[p] - mn[p]); /* a flat piece's inf: its lane is discarded at the end */
        scale[p] = 1 / iscale[p];
        best[p] = 0;
    }
    for (int i = 0; i < QK; i++)
        for (int p = 0; p < NP; p++) {
            Lb[i][p] = clamp_level(iscale[p] * (xs[i][p] - mn[p]), nmax);
            const float diff = scale[p] * Lb[i][p] + mn[p] - xs[i][p];
            best[p] += w[i][p] * (diff * diff);
        }
    /* grids a little finer and coarser than the range's: (nmax + rmin + 0.1 step) levels over it */
    for (int step = 0; step <= f.nstep; step++) {
        float sum_l[NP], sum_l2[NP], sum_xl[NP], ts[NP], tm[NP], err[NP];
        for (int p = 0; p < NP; p++) {
            iscale[p] = (f.rmin + 0.1f * step + nmax) / (mx[p] - mn[p]);
            sum_l[p] = sum_l2[p] = sum_xl[p] = err[p] = 0;
        }
        for (int i = 0; i < QK; i++)
            for (int p = 0; p < NP; p++) {
                const float l = clamp_level(iscale[p] * (xs[i][p] - mn[p]), nmax);
                La[i][p] = l;
                sum_l[p] += w[i][p] * l;
                sum_l2[p] += w[i][p] * l * l;
                sum_xl[p] += w[i][p] * l * xs[i][p];
            }
        for (int p = 0; p < NP; p++) {
            const float D = sum_w[p] * sum_l2[p] - sum_l[p] * sum_l[p];
            ts[p] = (sum_w[p] * sum_xl[p] - sum_x[p] * sum_l[p]) / D;
            tm[p] = (sum_l2[p] * sum_x[p] - sum_l[p] * sum_xl[p]) / D;
            const int pinned = tm[p] > 0; /* an offset above 0 is pinned at 0, the scale fitted alone */
            ts[p] = pinned ? sum_xl[p] / sum_l2[p] : ts[p];
            tm[p] = pinned ? 0 : tm[p];
            err[p] = D > 0 ? 0 : INFINITY; /* D <= 0: this grid is skipped */
        }
        for (int i = 0; i < QK; i++)
            for (int p = 0; p < NP; p++) {
                const float diff = ts[p] * La[i][p] + tm[p] - xs[i][p];
                err[p] += w[i][p] * (diff * diff);
            }
        int better[NP];
        for (int p = 0; p < NP; p++) {
            better[p] = err[p] < best[p];
            best[p] = better[p] ? err[p] : best[p];
            scale[p] = better[p] ? ts[p] : scale[p];
            mn[p] = better[p] ? tm[p] : mn[p];
        }
        for (int i = 0; i < QK; i++)
            for (int p = 0; p < NP; p++) Lb[i][p] = better[p] ? La[i][p] : Lb[i][p];
    }
    for (int p = 0; p < NP; p++) {
        float lo = xs[0][p], hi = xs[0][p];
        for (int i = 1; i < QK; i++) {
            lo = xs[i][p] < lo ? xs[i][p] : lo;
            hi = xs[i][p] > hi ? xs[i][p] : hi;
        }
        lo = lo > 0 ? 0 : lo;
        const int constant = hi == lo; /* the scalar fit's early return: no levels, no scale */
        scale_out[p] = constant ? 0.f : scale[p];
        neg_min[p] = -(constant ? lo : mn[p]);
        for (int i = 0; i < QK; i++) L[QK * p + i] = constant ? 0 : (uint8_t)Lb[i][p];
    }
}

/* Two super-blocks of 256 floats (x, 512 of them) to their f.bytes each (Q4_K 144, Q5_K 176); `one`: only
 * the first is written (the second's floats are read but may be anything finite). */
static EXACT_FLOATS void quantize_k_pair(const float *x, uint8_t *blk, int one, kfit f) {
    NO_CONTRACT
    uint8_t L[2 * QK_K];
    float scales[NP], mins[NP];
    const float nmax = (float)f.nmax;
    fit_pieces(x, L, scales, mins, f);
    for (int half = 0; half < (one ? 1 : 2); half++, x += QK_K, blk += f.bytes) {
        const uint8_t *Lh = L + QK_K * half;
        uint8_t Lq[QK_K];
        memcpy(Lq, Lh, QK_K);
        const float *sj = scales + PIECES * half, *mj = mins + PIECES * half;
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < PIECES; j++) {
            if (sj[j] > max_scale) max_scale = sj[j];
            if (mj[j] > max_min) max_min = mj[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        uint8_t *s = blk + 4; /* the 12 bytes of 6-bit scales and mins: qlinear_k.h's scales_mins, inverted */
        memset(s, 0, 12);
        for (int j = 0; j < PIECES; j++) {
            const int ls0 = nearest(inv_scale * sj[j]), lm0 = nearest(inv_min * mj[j]);
            const uint8_t ls = (uint8_t)(ls0 > 63 ? 63 : ls0), lm = (uint8_t)(lm0 > 63 ? 63 : lm0);
            if (j < 4) {
                s[j] = ls;
                s[j + 4] = lm;
            } else {
                s[j + 4] = (uint8_t)((ls & 0xf) | (lm & 0xf) << 4);
                s[j - 4] |= (uint8_t)((ls >> 4) << 6);
                s[j] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        const uint16_t d16 = fp16_bits(max_scale / 63.f), dmin16 = fp16_bits(max_min / 63.f);
        memcpy(blk, &d16, 2);
        memcpy(blk + 2, &dmin16, 2);
        const float d = fp16_at(blk), dmin = fp16_at(blk + 2);
        uint32_t sc[2], m[2];
        scales_mins(s, sc, m);
        for (int j = 0; j < PIECES; j++) { /* the levels again, against the rounded scales */
            const float dj = d * (float)(sc[j / 4] >> 8 * (j % 4) & 0xff);
            if (dj == 0.f) continue; /* the fit's levels stay: any q gives -dmin m_j */
            const float dm = dmin * (float)(m[j / 4] >> 8 * (j % 4) & 0xff);
            for (int i = 0; i < QK; i++)
                Lq[QK * j + i] = (uint8_t)clamp_level((x[QK * j + i] + dm) / dj, nmax);
        }
        /* pieces 2c and 2c + 1 share 32 bytes of qs: low nibbles and high ones; Q5_K: bit j of qh[i] is
         * piece j's level i's fifth bit, qh (32 bytes) between the scales and qs */
        uint8_t *q = blk + (f.nmax > 15 ? 48 : 16), *qh = blk + 16;
        if (f.nmax > 15) {
            memset(qh, 0, QK);
            for (int j = 0; j < PIECES; j++)
                for (int i = 0; i < QK; i++) qh[i] |= (uint8_t)((Lq[QK * j + i] >> 4) << j);
        }
        for (int c = 0; c < PIECES / 2; c++)
            for (int i = 0; i < QK; i++)
                q[QK * c + i] = (uint8_t)((Lq[64 * c + i] & 0xf) | (Lq[64 * c + QK + i] & 0xf) << 4);
    }
}

/* out = rows x cols floats (cols a multiple of 256) as the fit's blocks, row after row; 1 for a cols it
 * cannot take. */
static int quantize_k_rows(const float *x, int64_t rows, int64_t cols, uint8_t *out, kfit f) {
    if (cols <= 0 || cols % QK_K || rows < 0) return 1;
    const int64_t n = rows * (cols / QK_K);
    int64_t b = 0;
    for (; b + 1 < n; b += 2) quantize_k_pair(x + QK_K * b, out + f.bytes * b, 0, f);
    if (b < n) { /* a last lone super-block: its pair's second half zeros */
        float pair[2 * QK_K] = {0.f};
        memcpy(pair, x + QK_K * b, sizeof(float) * QK_K);
        quantize_k_pair(pair, out + f.bytes * b, 1, f);
    }
    return 0;
}

int qlinear_quantize_q4_k(const float *x, int64_t rows, int64_t cols, uint8_t *out) {
    return quantize_k_rows(x, rows, cols, out, Q4K_FIT);
}

int qlinear_quantize_q5_k(const float *x, int64_t rows, int64_t cols, uint8_t *out) {
    return quantize_k_rows(x, rows, cols, out, Q5K_FIT);
}
