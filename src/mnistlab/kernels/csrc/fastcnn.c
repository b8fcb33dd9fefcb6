/* FastCNN (the fast preset's network, and widecnn) in training mode, features forward and backward.
 *
 * x standardised ((x - 0.1307) / 0.3081) -> conv 5x5 s2 p2 -> 14x14xC1 -> BatchNorm -> ReLU
 * -> conv 3x3 s2 p1 -> 7x7xC2 -> BatchNorm -> ReLU -> conv 3x3 s2 p1 -> 4x4xC3 -> BatchNorm
 * -> ReLU -> features (n, 16 C3) in PyTorch's (channel, row, column) order; fastcnn_head below
 * computes the linear head. The widths C1, C2, C3 are multiples of 16 up to SMAX (FastCNN:
 * 16, 32, 64). BatchNorm normalises with the batch's statistics (biased variance) as
 * PyTorch does in training mode; the batch means and variances are returned for the running
 * statistics, which the caller updates.
 *
 * Same conventions as seedcnn.c (whose vector helpers are shared through kernels.h):
 * channels-last activations in zero-bordered grids, G images in flight per weight load, the
 * batch cut into PARTS fixed slices run on OpenMP threads, and every sum over the batch
 * taken slice by slice in a fixed order, so results do not depend on the thread count.
 */
#include "kernels.h"

#define FPARTS 8
#define XF 31 /* zero-bordered input side: 2 + 28 + 1 */
#define Q1 15 /* conv1's output (14x14) with one zero row and column in front, for conv2 */
#define Q2 9  /* conv2's output (7x7) with a zero border, for conv3 */
#define EPS 1e-5f
#define SMAX 128 /* the widest layer; rows of the statistics arrays (6, SMAX) */
#include "bf16.h"

/* Whether this build computes the convolutions with bf16 operands when asked (see bf16.h). */
int fastcnn_bf16(void) { return BF16; }

static inline int fslice(int n, int k) { return (int)((long)n * k / FPARTS); }

/* Images in the group that starts at b of a slice ending at e: G, or what is left. */
static inline int group(long b, long e) { return e - b < G ? (int)(e - b) : G; }

/* Image j of the batch, standardised, into a zero-bordered 31x31 grid (offset 2). */
static void pad_standardised(const float *x, float *xp) {
    memset(xp, 0, XF * XF * sizeof(float));
    for (int r = 0; r < 28; r++)
        for (int c = 0; c < 28; c++) xp[(r + 2) * XF + c + 2] = (x[r * 28 + c] - 0.1307f) * (1.0f / 0.3081f);
}

/* conv1 (5x5 s2, 1 -> C1, no bias) for g images: z (g, 196, C1) pre-normalisation. w: [tap][C1/16]. */
INLINE void conv1_fwd(int g, int C1, const float *xp, const vec *w, float *z) {
    for (int oy = 0; oy < 14; oy++)
        for (int ox = 0; ox < 14; ox++)
            for (int c = 0; c < C1 / 16; c++) {
                vec acc[G];
                for (int j = 0; j < g; j++) acc[j] = zero();
                for (int ky = 0; ky < 5; ky++)
                    for (int kx = 0; kx < 5; kx++)
                        for (int j = 0; j < g; j++)
                            fma_(&acc[j], xp[j * XF * XF + (2 * oy + ky) * XF + 2 * ox + kx], w[(ky * 5 + kx) * (C1 / 16) + c]);
                for (int j = 0; j < g; j++) store(z + ((long)j * 196 + oy * 14 + ox) * C1 + c * 16, acc[j]);
            }
}

/* A 3x3 stride-2 conv, CI -> CO channels (multiples of 16), no bias, for g images: input grids
 * of side pi (CI channels per cell, zero border, output (oy, ox) reads cells (2oy+ky, 2ox+kx)),
 * output z (g, ho*ho, CO). w: [tap][CI][CO/16]. */
INLINE void conv3x3_fwd(int g, int CI, int CO, const float *in, int pi, const vec *w, float *z, int ho) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++)
            for (int c = 0; c < CO / 16; c++) {
                vec acc[G];
                for (int j = 0; j < g; j++) acc[j] = zero();
                for (int ky = 0; ky < 3; ky++)
                    for (int kx = 0; kx < 3; kx++) {
                        const float *v = in + ((2 * oy + ky) * pi + 2 * ox + kx) * CI;
                        const vec *wt = w + (ky * 3 + kx) * CI * (CO / 16) + c;
                        for (int i = 0; i < CI; i++)
                            for (int j = 0; j < g; j++) fma_(&acc[j], v[j * si + i], wt[i * (CO / 16)]);
                    }
                for (int j = 0; j < g; j++) store(z + j * so + (oy * ho + ox) * CO + c * 16, acc[j]);
            }
}

/* Backward of conv3x3_fwd: gz (g, ho*ho, CO) the gradient at its output; adds the weights'
 * gradient to d ([tap][CI][CO/16]) and the input's to gin (grids like the input). wt: [tap][CO][CI/16]. */
INLINE void conv3x3_bwd(int g, int CI, int CO, const float *in, int pi, const vec *wt, const float *gz, int ho,
                        vec *d, float *gin) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            const float *go = gz + (oy * ho + ox) * CO;
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    int t = ky * 3 + kx;
                    long cell = ((2 * oy + ky) * pi + 2 * ox + kx) * CI;
                    for (int c = 0; c < CO / 16; c++) {
                        vec gv[G];
                        for (int j = 0; j < g; j++) gv[j] = load(go + j * so + c * 16);
                        vec *dt = d + t * CI * (CO / 16) + c;
                        for (int i = 0; i < CI; i++) {
                            vec s = dt[i * (CO / 16)];
                            for (int j = 0; j < g; j++) fma_(&s, in[j * si + cell + i], gv[j]);
                            dt[i * (CO / 16)] = s;
                        }
                    }
                    for (int ic = 0; ic < CI / 16; ic++) {
                        vec acc[G];
                        for (int j = 0; j < g; j++) acc[j] = load(gin + j * si + cell + ic * 16);
                        const vec *w = wt + t * CO * (CI / 16) + ic;
                        for (int o = 0; o < CO; o++)
                            for (int j = 0; j < g; j++) fma_(&acc[j], go[j * so + o], w[o * (CI / 16)]);
                        for (int j = 0; j < g; j++) store(gin + j * si + cell + ic * 16, acc[j]);
                    }
                }
        }
}

/* Sums over positions of z (rows of C channels), or of (z - mean)^2 given mean, added to out. */
static void channel_sums(const float *z, long rows, int C, const float *mean, float *out) {
    for (int c = 0; c < C / 16; c++) {
        vec s = zero(), m = mean ? load(mean + c * 16) : zero();
        for (long r = 0; r < rows; r++) {
            vec v = load(z + r * C + c * 16);
            if (mean) {
                for (int q = 0; q < NV; q++) v.q[q] -= m.q[q];
                for (int q = 0; q < NV; q++) s.q[q] += v.q[q] * v.q[q];
            } else
                add_(&s, v);
        }
        add_(&s, load(out + c * 16));
        store(out + c * 16, s);
    }
}

/* Sum the FPARTS slices' partial sums (rows of C) in order, times scale. */
static void reduce_slices(const float *parts, int C, float scale, float *out) {
    for (int c = 0; c < C; c++) {
        float s = 0;
        for (int k = 0; k < FPARTS; k++) s += parts[k * SMAX + c];
        out[c] = s * scale;
    }
}

/* The batch's mean and biased variance per channel of z (n images of `per` positions of C
 * channels), given part: each slice's sums of z (channel_sums without a mean); two passes,
 * slices added in order. */
static void batch_stats(int n, const float *z, int per, int C, float *part, float *mean, float *var) {
    reduce_slices(part, C, 1.0f / ((float)n * per), mean);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        memset(part + k * SMAX, 0, SMAX * sizeof(float));
        channel_sums(z + (long)fslice(n, k) * per * C, (long)(fslice(n, k + 1) - fslice(n, k)) * per, C, mean,
                     part + k * SMAX);
    }
    reduce_slices(part, C, 1.0f / ((float)n * per), var);
}

/* y = ReLU(gamma (z - mean) / sqrt(var + eps) + beta) for `rows` positions of C channels, written
 * into the cells of grids of side `side` at offset `off` (per image `per` positions of side `ho`). */
static void bn_relu(const float *z, long images, int ho, int C, const float *mean, const float *var,
                    const float *gamma, const float *beta, float *out, int side, int off) {
    float scale[SMAX], shift[SMAX];
    for (int c = 0; c < C; c++) {
        scale[c] = gamma[c] / sqrtf(var[c] + EPS);
        shift[c] = beta[c] - mean[c] * scale[c];
    }
    for (long j = 0; j < images; j++)
        for (int p = 0; p < ho * ho; p++) {
            const float *src = z + (j * ho * ho + p) * C;
            float *dst = out + (j * side * side + (p / ho + off) * side + p % ho + off) * C;
            for (int c = 0; c < C / 16; c++) {
                vec v = load(src + c * 16), a = load(scale + c * 16), b = load(shift + c * 16);
                for (int q = 0; q < NV; q++) v.q[q] = v.q[q] * a.q[q] + b.q[q];
                store(dst + c * 16, where_positive(v, v));
            }
        }
}

/* The weights as vectors, in one allocation (not on a thread's stack: 186 KB for FastCNN). */
typedef struct {
    vec *w1;  /* [tap][C1/16] */
    vec *w2;  /* [tap][C1 in][C2/16 output vectors] */
    vec *w2t; /* [tap][C2 out][C1/16 input vectors] */
    vec *w3;  /* [tap][C2 in][C3/16 output vectors] */
    vec *w3t; /* [tap][C3 out][C2/16 input vectors] */
    vec *mem;
    /* with bf16: conv1's weights as bf16.h's pack_conv1_bf16 packs them, conv2's and conv3's as
     * pack_bf16 does, and each slice's bf16 copies of its operands (scratch, slice k at + k * per) */
    void *b1, *b2, *b2t, *b3, *b3t;
    void *bmem;
    unsigned short *scratch;
    long per;
} FWeights;

static long conv_vecs(int CI, int CO, int taps) { return (long)taps * CI * (CO / 16); }

static int width_ok(int c) { return c > 0 && c <= SMAX && c % 16 == 0; }

/* A 3x3 conv's weights w (CO, CI, 3, 3) as the kernels read them: fwd [tap][CI][CO] and bwd
 * [tap][CO][CI] (rows of CO/16 or CI/16 vectors), written in order, taps shared by the threads. */
static void pack_conv(int CI, int CO, const float *w, float *fwd, float *bwd) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < 9; t++) {
        for (int i = 0; i < CI; i++)
            for (int o = 0; o < CO; o++) fwd[((long)t * CI + i) * CO + o] = w[(o * CI + i) * 9 + t];
        for (int o = 0; o < CO; o++)
            for (int i = 0; i < CI; i++) bwd[((long)t * CO + o) * CI + i] = w[(o * CI + i) * 9 + t];
    }
}

/* 1 on success; 0 (nothing to free) for widths the kernels do not take, for bf16 where this
 * build has no bf16 kernels, or where memory ran out. */
static int fload(FWeights *W, int n, int c1, int c2, int c3, const float *w1, const float *w2, const float *w3,
                 int bf16) {
    if (!width_ok(c1) || !width_ok(c2) || !width_ok(c3) || (bf16 && !BF16)) return 0;
    W->bmem = NULL;
#if BF16
    if (bf16) {
        /* bytes of each packing; bf16 values a slice's image needs at most (bf16.h's conversions) */
        long s1 = 15L * c1 * 4, s2 = 9L * c1 * c2 * 2, s3 = 9L * c2 * c3 * 2, u = 3L * XF * XF;
        if (3L * Q1 * Q1 * c1 + 49L * c2 > u) u = 3L * Q1 * Q1 * c1 + 49L * c2;
        if (3L * Q2 * Q2 * c2 + 16L * c3 > u) u = 3L * Q2 * Q2 * c2 + 16L * c3;
        /* a slice holds at most n / FPARTS + 1 images (one more for the pairs), a group G (what back_layer
         * keeps of it at most 2 G + 2 images' worth); 64-byte multiples */
        W->per = ((n / FPARTS + 3 > 2 * G + 2 ? n / FPARTS + 3 : 2 * G + 2) * u + 31) / 32 * 32;
        W->bmem = aligned_alloc(64, s1 + 2 * (s2 + s3) + FPARTS * W->per * 2);
        if (!W->bmem) return 0;
        W->b2 = W->bmem, W->b2t = (char *)W->b2 + s2, W->b3 = (char *)W->b2t + s2, W->b3t = (char *)W->b3 + s3;
        W->b1 = (char *)W->b3t + s3, W->scratch = (unsigned short *)((char *)W->b1 + s1);
        pack_conv1_bf16(c1, w1, W->b1);
        pack_bf16(c1, c2, w2, W->b2, W->b2t);
        pack_bf16(c2, c3, w3, W->b3, W->b3t);
    }
#endif
    long n1 = conv_vecs(1, c1, 25), n2 = conv_vecs(c1, c2, 9), n3 = conv_vecs(c2, c3, 9);
    W->mem = aligned_alloc(64, (n1 + 2 * n2 + 2 * n3) * sizeof(vec));
    if (!W->mem) {
        free(W->bmem);
        return 0;
    }
    W->w1 = W->mem, W->w2 = W->w1 + n1, W->w2t = W->w2 + n2, W->w3 = W->w2t + n2, W->w3t = W->w3 + n3;
    float *f1 = (float *)W->w1;
    for (int t = 0; t < 25; t++)
        for (int o = 0; o < c1; o++) f1[t * c1 + o] = w1[o * 25 + t];
    pack_conv(c1, c2, w2, (float *)W->w2, (float *)W->w2t);
    pack_conv(c2, c3, w3, (float *)W->w3, (float *)W->w3t);
    return 1;
}

/* Zero the cells of `images` grids of side `side` (C channels a cell) outside the interior
 * hi x hi at offset 1, which bn_relu fills: a grid's border costs less to clear than all of it. */
static void zero_border(float *h, long images, int side, int hi, int C) {
    for (long j = 0; j < images; j++)
        for (int r = 0; r < side; r++) {
            float *row = h + (j * side + r) * side * C;
            if (r < 1 || r > hi) {
                memset(row, 0, (size_t)side * C * sizeof(float));
                continue;
            }
            memset(row, 0, (size_t)C * sizeof(float));
            if (1 + hi < side) memset(row + (1 + hi) * C, 0, (size_t)(side - 1 - hi) * C * sizeof(float));
        }
}

/* One slice (k) of a conv layer's forward pass after a BatchNorm: the input's BatchNorm and
 * ReLU (z_in, rows of CI, side hi) into zero-bordered grids h, the conv (CI -> CO, output side
 * ho) into z_out, and (unless `given`) the slice's sums of z_out for the next statistics. */
INLINE void fwd_layer(int n, int k, int given, int CI, int CO, int hi, int ho, const float *z_in, const float *mean,
                      const float *var, const float *gamma, const float *beta, float *h, const vec *w, const void *wb,
                      unsigned short *scr, float *z_out, float *sums) {
    const long a = fslice(n, k), e = fslice(n, k + 1), pi = hi == 14 ? Q1 : Q2, si = pi * pi * CI;
    const long so = (long)ho * ho * CO, ri = (long)hi * hi * CI;
    memset(sums, 0, SMAX * sizeof(float));
    if (!wb) {
        zero_border(h + a * si, e - a, pi, hi, CI);
        bn_relu(z_in + a * ri, e - a, hi, CI, mean, var, gamma, beta, h + a * si, pi, 1);
#define FWD(g, b) conv3x3_fwd(g, CI, CO, h + (long)(b) * si, pi, w, z_out + (long)(b) * so, ho)
        GROUPS(a, e, FWD);
#undef FWD
        if (!given) channel_sums(z_out + a * so, (e - a) * ho * ho, CO, 0, sums);
    }
#if BF16
    else { /* group by group, in cache: the BatchNorm and ReLU into fp32 grids (scr; their borders stay
            * zero), the grids in bf16 (after them), the conv on them, the sums; h is not written (the
            * backward recomputes the grids) */
        float *hg = (float *)scr;
        bf16 *hb = (bf16 *)(hg + G * si);
        zero_border(hg, G, pi, hi, CI);
        for (long b = a; b < e; b += G) {
            const int g = group(b, e);
            bn_relu(z_in + b * ri, g, hi, CI, mean, var, gamma, beta, hg, pi, 1);
            to_bf16(hg, hb, g * si);
#define FWD(g, i) conv3x3_fwd_bf16(g, CI, CO, hb, pi, wb, z_out + (long)(i) * so, ho)
            GROUPS(b, b + g, FWD);
#undef FWD
            if (!given) channel_sums(z_out + b * so, g * ho * ho, CO, 0, sums);
        }
    }
#endif
}

/* Saves for the backward pass: xp (n, 31*31) the standardised padded input, z1 (n, 196, C1),
 * h1 (n, 15*15, C1), z2 (n, 49, C2), h2 (n, 9*9, C2), z3 (n, 16, C3), h3 (n, 16, C3); stats
 * (6, SMAX): mean and biased variance of each BatchNorm; feats (n, 16 C3). With bf16, h1 and h2 are
 * not written: the bf16 backward recomputes them from z1 and z2. With `given` (evaluation mode),
 * stats holds the running means and variances on entry and normalises instead.
 * Returns 0, or -1 for widths it does not take or where memory ran out (nothing written then). */
int fastcnn_forward(int n, int given, int c1, int c2, int c3, const float *x, const float *w1, const float *g1,
                    const float *b1, const float *w2, const float *g2, const float *b2, const float *w3, const float *g3,
                    const float *b3, float *xp, float *z1, float *h1, float *z2, float *h2, float *z3, float *h3,
                    float *stats, float *feats, int bf16) {
    FWeights W;
    if (!fload(&W, n, c1, c2, c3, w1, w2, w3, bf16)) return -1;
    float part[FPARTS * SMAX];
    float *mean1 = stats, *var1 = stats + SMAX, *mean2 = stats + 2 * SMAX, *var2 = stats + 3 * SMAX,
          *mean3 = stats + 4 * SMAX, *var3 = stats + 5 * SMAX;
    /* conv1 */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        const long a = fslice(n, k), e = fslice(n, k + 1);
        float *sums = part + k * SMAX;
        memset(sums, 0, SMAX * sizeof(float));
        if (!W.bmem) {
            for (long b = a; b < e; b++) pad_standardised(x + b * 784, xp + b * XF * XF);
#define C1(g, b) conv1_fwd(g, c1, xp + (long)(b) * XF * XF, W.w1, z1 + (long)(b) * 196 * c1)
            GROUPS(a, e, C1);
#undef C1
            if (!given) channel_sums(z1 + a * 196 * c1, (e - a) * 196, c1, 0, sums);
        }
#if BF16
        else { /* group by group, in cache: the grids, in bf16 (one value past the last, read with a zero
                * weight), conv1, the sums */
            unsigned short *xb = W.scratch + k * W.per; /* bf16 (the parameter bf16 hides the type) */
            for (long b = a; b < e; b += G) {
                const int g = group(b, e);
                for (long j = b; j < b + g; j++) pad_standardised(x + j * 784, xp + j * XF * XF);
                to_bf16_any(xp + b * XF * XF, xb, g * XF * XF);
                xb[g * XF * XF] = 0;
#define C1(g, i) conv1_fwd_bf16(g, c1, xb, W.b1, z1 + (long)(i) * 196 * c1)
                GROUPS(b, b + g, C1);
#undef C1
                if (!given) channel_sums(z1 + b * 196 * c1, g * 196L, c1, 0, sums);
            }
        }
#endif
    }
    if (!given) batch_stats(n, z1, 196, c1, part, mean1, var1);
    /* BN1 + ReLU into zero-bordered grids, conv2; the same for BN2 and conv3 */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++)
        fwd_layer(n, k, given, c1, c2, 14, 7, z1, mean1, var1, g1, b1, h1, W.w2, W.bmem ? W.b2 : NULL,
                  W.bmem ? W.scratch + k * W.per : NULL, z2,
                  part + k * SMAX);
    if (!given) batch_stats(n, z2, 49, c2, part, mean2, var2);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++)
        fwd_layer(n, k, given, c2, c3, 7, 4, z2, mean2, var2, g2, b2, h2, W.w3, W.bmem ? W.b3 : NULL,
                  W.bmem ? W.scratch + k * W.per : NULL, z3,
                  part + k * SMAX);
    if (!given) batch_stats(n, z3, 16, c3, part, mean3, var3);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        long a = fslice(n, k), e = fslice(n, k + 1);
        bn_relu(z3 + a * 16 * c3, e - a, 4, c3, mean3, var3, g3, b3, h3 + a * 16 * c3, 4, 0);
        for (long j = a; j < e; j++)
            for (int p = 0; p < 16; p++)
                for (int c = 0; c < c3; c++) feats[j * 16 * c3 + c * 16 + p] = h3[(j * 16 + p) * c3 + c];
    }
    free(W.mem);
    free(W.bmem);
    return 0;
}

/* BatchNorm + ReLU backward for `images` images: src holds the gradient at the ReLU's output in the
 * cells of grids laid out as h (side, off; rows when side is ho and off 0), h the ReLU's output as
 * bn_relu wrote it; writes the gradient masked by h > 0 into gy (rows, C) and adds sum(gy) and
 * sum(gy * xhat) to sums (2, SMAX). inv: 1 / sqrt(var + eps) per channel. */
static void bn_back_sums(float *gy, const float *src, const float *h, const float *z, long images, int ho, int C,
                         int side, int off, const float *mean, const float *inv, float *sums) {
    for (int c = 0; c < C / 16; c++) { /* 16 channels at a time, each channel's sums in row order */
        vec s0 = zero(), s1 = zero(), m = load(mean + c * 16), v = load(inv + c * 16);
        for (long j = 0; j < images; j++)
            for (int p = 0; p < ho * ho; p++) {
                long r = j * ho * ho + p, cell = (j * side * side + (p / ho + off) * side + p % ho + off) * C + c * 16;
                vec gv = where_positive(load(src + cell), load(h + cell)), zr = load(z + r * C + c * 16);
                store(gy + r * C + c * 16, gv);
                for (int q = 0; q < NV; q++) {
                    s0.q[q] += gv.q[q];
                    s1.q[q] += gv.q[q] * (zr.q[q] - m.q[q]) * v.q[q];
                }
            }
        add_(&s0, load(sums + c * 16));
        add_(&s1, load(sums + SMAX + c * 16));
        store(sums + c * 16, s0);
        store(sums + SMAX + c * 16, s1);
    }
}

/* dz = gamma / sqrt(var + eps) * (gy - mean(gy) - xhat * mean(gy * xhat)), in place over gy. */
static void bn_back_apply(float *gy, const float *z, long rows, int C, const float *mean, const float *inv,
                          const float *gamma, const float *tot, float count) {
    float a[SMAX], m[SMAX], k[SMAX];
    for (int c = 0; c < C; c++) {
        a[c] = gamma[c] * inv[c];
        m[c] = tot[c] / count;
        k[c] = tot[SMAX + c] / count * inv[c];
    }
    for (long r = 0; r < rows; r++) {
        float *g = gy + r * C;
        const float *zr = z + r * C;
        for (int c = 0; c < C; c++) g[c] = a[c] * (g[c] - m[c] - (zr[c] - mean[c]) * k[c]);
    }
}

static void inverse_std(const float *var, int C, float *inv) {
    for (int c = 0; c < C; c++) inv[c] = 1.0f / sqrtf(var[c] + EPS);
}

static void reduce_sums(const float *parts, int C, float *tot) {
    for (int c = 0; c < C; c++) {
        float a = 0, b = 0;
        for (int k = 0; k < FPARTS; k++) {
            a += parts[k * 2 * SMAX + c];
            b += parts[k * 2 * SMAX + SMAX + c];
        }
        tot[c] = a;
        tot[SMAX + c] = b;
    }
}

/* A BatchNorm in training mode as the backward pass reads it: the batch's mean and variance, the
 * inverse std, weight and bias. */
typedef struct {
    const float *mean, *var, *inv, *gamma, *beta;
} BatchNorm;

/* One slice (k) of a conv layer's backward pass between two BatchNorms: the output's
 * BatchNorm backward (gy_out, rows of CO, in place), the conv's (CI -> CO, input side hi,
 * output side ho; weights' gradient into d, the input grid's into the scratch grids gh), and
 * the input's ReLU mask and BatchNorm sums (gy_in, rows of CI; into sums, zeroed here). The input
 * BatchNorm `in` is what made h_in from z_in. */
INLINE void back_layer(int n, int k, int CI, int CO, int hi, int ho, const float *h_in, const vec *wt, const void *wtb,
                       unsigned short *scr, float *gy_out, const float *z_out, const float *mean_o, const float *inv_o,
                       const float *gamma_o, const float *tot_o, float *gh, vec *d, float *gy_in, const float *z_in,
                       BatchNorm in, float *sums) {
    const long a = fslice(n, k), e = fslice(n, k + 1), pi = hi == 14 ? Q1 : Q2, si = pi * pi * CI;
    const long so = (long)ho * ho * CO, ri = (long)hi * hi * CI;
    memset(d, 0, 9 * CI * (CO / 16) * sizeof(vec));
    memset(sums, 0, 2 * SMAX * sizeof(float));
    if (!wtb) {
        bn_back_apply(gy_out + a * so, z_out + a * so, (e - a) * ho * ho, CO, mean_o, inv_o, gamma_o, tot_o,
                      n * (float)(ho * ho));
        memset(gh + a * si, 0, (e - a) * si * sizeof(float));
#define BACK(g, b) \
    conv3x3_bwd(g, CI, CO, h_in + (long)(b) * si, pi, wt, gy_out + (long)(b) * so, ho, d, gh + (long)(b) * si)
        GROUPS(a, e, BACK);
#undef BACK
        bn_back_sums(gy_in + a * ri, gh + a * si, h_in + a * si, z_in + a * ri, e - a, hi, CI, pi, 1, in.mean, in.inv,
                     sums);
    }
#if BF16
    else { /* group by group, so that what a group reads and writes stays in cache (scr: its input
            * gradient's grids, its input grids, both fp32, the input grids paired in bf16, its output
            * gradients in bf16): the BatchNorm backward, the input grids again (as the forward made
            * them; their borders stay zero), the bf16 operands, the conv, the mask and sums */
        float *ghg = (float *)scr, *hg = ghg + G * si;
        unsigned *hp = (unsigned *)(hg + G * si);
        bf16 *gb = (bf16 *)(hp + (G + 1) / 2 * si);
        zero_border(hg, G, pi, hi, CI);
        for (long b = a; b < e; b += G) {
            const int g = group(b, e);
            bn_back_apply(gy_out + b * so, z_out + b * so, g * ho * ho, CO, mean_o, inv_o, gamma_o, tot_o,
                          n * (float)(ho * ho));
            to_bf16(gy_out + b * so, gb, g * so);
            bn_relu(z_in + b * ri, g, hi, CI, in.mean, in.var, in.gamma, in.beta, hg, pi, 1);
            pair_images(hg, g, si, hp);
            memset(ghg, 0, g * si * sizeof(float));
#define BACK(g, i) conv3x3_bwd_bf16(g, CI, CO, hp, pi, wtb, gy_out + (long)(i) * so, gb, ho, d, ghg)
            GROUPS(b, b + g, BACK);
#undef BACK
            bn_back_sums(gy_in + b * ri, ghg, hg, z_in + b * ri, g, hi, CI, pi, 1, in.mean, in.inv, sums);
        }
    }
#endif
}

/* Gradients of sum(gfeat . feats) with respect to the conv weights and the BatchNorm weights and
 * biases, from the parameters and what fastcnn_forward saved (with bf16, h1 and h2 are recomputed
 * from z1 and z2 with the BatchNorms' weights and biases; otherwise b1 and b2 are unused). Scratch:
 * gy3 (n, 16, C3), gh2 (n, 81, C2), gy2 (n, 49, C2), gh1 (n, 225, C1), gy1 (n, 196, C1). Outputs are
 * overwritten: gw1 (C1,1,5,5), gg1, gb1 (C1), gw2 (C2,C1,3,3), gg2, gb2 (C2), gw3 (C3,C2,3,3), gg3,
 * gb3 (C3). Returns 0, or -1 for widths it does not take or where memory ran out (nothing written then). */
int fastcnn_backward(int n, int c1, int c2, int c3, const float *w1, const float *g1, const float *b1, const float *w2,
                     const float *g2, const float *b2, const float *w3, const float *g3, const float *xp,
                     const float *z1, const float *h1, const float *z2, const float *h2, const float *z3,
                     const float *h3, const float *stats, const float *gfeat, float *gy3, float *gh2, float *gy2,
                     float *gh1, float *gy1, float *gw1, float *gg1, float *gb1, float *gw2, float *gg2, float *gb2,
                     float *gw3, float *gg3, float *gb3, int bf16) {
    FWeights W;
    if (!fload(&W, n, c1, c2, c3, w1, w2, w3, bf16)) return -1;
    const long n1 = conv_vecs(1, c1, 25), n2 = conv_vecs(c1, c2, 9), n3 = conv_vecs(c2, c3, 9);
    vec *d = aligned_alloc(64, FPARTS * (n1 + n2 + n3) * sizeof(vec)); /* each slice's weight gradients */
    if (!d) {
        free(W.mem);
        free(W.bmem);
        return -1;
    }
    vec *d1 = d, *d2 = d1 + FPARTS * n1, *d3 = d2 + FPARTS * n2; /* slice k at + k * n1, n2, n3 */
    const float *mean1 = stats, *var1 = stats + SMAX, *mean2 = stats + 2 * SMAX, *var2 = stats + 3 * SMAX,
                *mean3 = stats + 4 * SMAX, *var3 = stats + 5 * SMAX;
    float part[FPARTS * 2 * SMAX], tot3[2 * SMAX], tot2[2 * SMAX], tot1[2 * SMAX], inv1[SMAX], inv2[SMAX], inv3[SMAX];
    inverse_std(var1, c1, inv1);
    inverse_std(var2, c2, inv2);
    inverse_std(var3, c3, inv3);
    const BatchNorm bn1 = {mean1, var1, inv1, g1, b1}, bn2 = {mean2, var2, inv2, g2, b2};
    /* BN3 */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        long a = fslice(n, k), e = fslice(n, k + 1);
        for (long j = a; j < e; j++)
            for (int p = 0; p < 16; p++)
                for (int c = 0; c < c3; c++) gy3[(j * 16 + p) * c3 + c] = gfeat[j * 16 * c3 + c * 16 + p];
        memset(part + k * 2 * SMAX, 0, 2 * SMAX * sizeof(float));
        bn_back_sums(gy3 + a * 16 * c3, gy3 + a * 16 * c3, h3 + a * 16 * c3, z3 + a * 16 * c3, e - a, 4, c3, 4, 0,
                     mean3, inv3, part + k * 2 * SMAX);
    }
    reduce_sums(part, c3, tot3);
    /* conv3 backward, BN2 sums; conv2 backward, BN1 sums */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++)
        back_layer(n, k, c2, c3, 7, 4, h2, W.w3t, W.bmem ? W.b3t : NULL, W.bmem ? W.scratch + k * W.per : NULL, gy3,
                   z3, mean3, inv3, g3, tot3, gh2, d3 + k * n3, gy2, z2, bn2, part + k * 2 * SMAX);
    reduce_sums(part, c2, tot2);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++)
        back_layer(n, k, c1, c2, 14, 7, h1, W.w2t, W.bmem ? W.b2t : NULL, W.bmem ? W.scratch + k * W.per : NULL, gy2,
                   z2, mean2, inv2, g2, tot2, gh1, d2 + k * n2, gy1, z1, bn1, part + k * 2 * SMAX);
    reduce_sums(part, c1, tot1);
    /* conv1 backward (weights only) */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        long a = fslice(n, k), e = fslice(n, k + 1);
        vec *dk = d1 + k * n1;
        memset(dk, 0, n1 * sizeof(vec));
#if BF16
        if (W.bmem) { /* group by group, the gradient staying in cache */
            for (long b = a; b < e; b += G) {
                const int g = group(b, e);
                bn_back_apply(gy1 + b * 196 * c1, z1 + b * 196 * c1, g * 196, c1, mean1, inv1, g1, tot1, n * 196.0f);
                conv1_bwd_bf16(g, c1, xp + b * XF * XF, gy1 + b * 196 * c1, dk, W.scratch + k * W.per);
            }
            continue;
        }
#endif
        for (long j = a; j < e; j++) { /* image by image (its gradient stays in cache), tap by tap */
            bn_back_apply(gy1 + j * 196 * c1, z1 + j * 196 * c1, 196, c1, mean1, inv1, g1, tot1, n * 196.0f);
            for (int t = 0; t < 25; t++)
                for (int c = 0; c < c1 / 16; c++) {
                    const float *xj = xp + j * XF * XF + (t / 5) * XF + t % 5, *gj = gy1 + j * 196 * c1 + c * 16;
                    vec s0 = zero(), s1 = zero(), s2 = zero(), s3 = zero();
                    for (int oy = 0; oy < 14; oy += 2)
                        for (int ox = 0; ox < 14; ox += 2) {
                            const float *x0 = xj + 2 * oy * XF + 2 * ox, *x1 = x0 + 2 * XF, *g0 = gj + (oy * 14 + ox) * c1;
                            fma_(&s0, x0[0], load(g0));
                            fma_(&s1, x0[2], load(g0 + c1));
                            fma_(&s2, x1[0], load(g0 + 14 * c1));
                            fma_(&s3, x1[2], load(g0 + 15 * c1));
                        }
                    add_(&s0, s1);
                    add_(&s2, s3);
                    add_(&s0, s2);
                    add_(&dk[t * (c1 / 16) + c], s0);
                }
        }
    }
    /* sums over the slices, in order, into PyTorch's layouts */
    for (int k = 1; k < FPARTS; k++) {
        for (long t = 0; t < n1; t++) add_(&d1[t], d1[k * n1 + t]);
        for (long t = 0; t < n2; t++) add_(&d2[t], d2[k * n2 + t]);
        for (long t = 0; t < n3; t++) add_(&d3[t], d3[k * n3 + t]);
    }
    for (int o = 0; o < c1; o++)
        for (int t = 0; t < 25; t++) gw1[o * 25 + t] = lane(d1[t * (c1 / 16) + o / 16], o % 16);
    for (int o = 0; o < c2; o++)
        for (int i = 0; i < c1; i++)
            for (int t = 0; t < 9; t++) gw2[(o * c1 + i) * 9 + t] = lane(d2[(t * c1 + i) * (c2 / 16) + o / 16], o % 16);
    for (int o = 0; o < c3; o++)
        for (int i = 0; i < c2; i++)
            for (int t = 0; t < 9; t++) gw3[(o * c2 + i) * 9 + t] = lane(d3[(t * c2 + i) * (c3 / 16) + o / 16], o % 16);
    for (int c = 0; c < c1; c++) {
        gb1[c] = tot1[c];
        gg1[c] = tot1[SMAX + c];
    }
    for (int c = 0; c < c2; c++) {
        gb2[c] = tot2[c];
        gg2[c] = tot2[SMAX + c];
    }
    for (int c = 0; c < c3; c++) {
        gb3[c] = tot3[c];
        gg3[c] = tot3[SMAX + c];
    }
    free(W.mem);
    free(W.bmem);
    free(d);
    return 0;
}

/* The linear head on the features (n, F): logits (n, C) = feats w^T + b. With labels y (not NULL),
 * also the mean cross-entropy with label smoothing s (PyTorch's F.cross_entropy(..., label_smoothing=s))
 * into *loss, and its gradients: gfeat (n, F), gw (C, F), gb (C). Sums over the batch run in a
 * fixed order, independent of the thread count. */
#define HB 5 /* classes the head computes at once */
void fastcnn_head(int n, int C, int F, const float *feats, const float *w, const float *b, const long *y, float s,
                  float *logits, float *gfeat, float *gw, float *gb, double *loss) {
    double part[FPARTS];
#pragma omp parallel for schedule(static)
    for (int k = 0; k < FPARTS; k++) {
        double acc = 0;
        for (int j = fslice(n, k); j < fslice(n, k + 1); j++) {
            const float *f = feats + (long)j * F;
            float *z = logits + (long)j * C;
            for (int c0 = 0; c0 < C; c0 += HB) { /* HB classes at once: independent chains of multiply-adds */
                const int cn = C - c0 < HB ? C - c0 : HB;
                vec lanes[HB]; /* 16 running sums per class: the same sums as one lane at a time */
                for (int c = 0; c < cn; c++) lanes[c] = zero();
                int i = 0;
                for (; i + 16 <= F; i += 16) {
                    vec fv = load(f + i);
                    for (int c = 0; c < cn; c++) {
                        vec wv = load(w + (long)(c0 + c) * F + i);
                        for (int q = 0; q < NV; q++) lanes[c].q[q] += fv.q[q] * wv.q[q];
                    }
                }
                for (int c = 0; c < cn; c++) {
                    const float *wc = w + (long)(c0 + c) * F;
                    float t = 0;
                    for (int r = i; r < F; r++) t += f[r] * wc[r];
                    for (int l = 0; l < 16; l++) t += lane(lanes[c], l);
                    z[c0 + c] = t + b[c0 + c];
                }
            }
            if (!y) continue;
            float m = z[0];
            for (int c = 1; c < C; c++) m = z[c] > m ? z[c] : m;
            float sum = 0;
            for (int c = 0; c < C; c++) sum += expf(z[c] - m);
            float lse = m + logf(sum), all = 0;
            for (int c = 0; c < C; c++) all += z[c] - lse;
            acc -= (1 - s) * (z[y[j]] - lse) + s / C * all;
            /* z becomes the gradient at the logits: (softmax - target) / n */
            for (int c = 0; c < C; c++) z[c] = (expf(z[c] - lse) - s / C - (c == y[j] ? 1 - s : 0)) / n;
            float *gf = gfeat + (long)j * F;
            int i = 0;
            for (; i + 64 <= F; i += 64) { /* 64 columns in registers while the classes go by */
                vec s[4] = {zero(), zero(), zero(), zero()};
                for (int c = 0; c < C; c++)
                    for (int u = 0; u < 4; u++) fma_(&s[u], z[c], load(w + (long)c * F + i + 16 * u));
                for (int u = 0; u < 4; u++) store(gf + i + 16 * u, s[u]);
            }
            for (int r = i; r < F; r++) gf[r] = 0;
            for (int c = 0; c < C; c++)
                for (int r = i; r < F; r++) gf[r] += z[c] * w[(long)c * F + r];
        }
        part[k] = acc;
    }
    if (!y) return;
    double total = 0;
    for (int k = 0; k < FPARTS; k++) total += part[k];
    *loss = total / n;
    for (int c = 0; c < C; c++) {
        float t = 0;
        for (int j = 0; j < n; j++) t += logits[(long)j * C + c];
        gb[c] = t;
    }
    /* gw a block of 32 columns and HB classes at a time, in registers while the batch streams past */
    const int blocks = (F + 31) / 32, cb = (C + HB - 1) / HB;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < blocks * cb; k++) {
        const int a = k / cb * 32, c0 = k % cb * HB, cn = C - c0 < HB ? C - c0 : HB;
        if (a + 32 <= F) {
            vec s[HB][2];
            for (int c = 0; c < cn; c++) s[c][0] = s[c][1] = zero();
            for (int j = 0; j < n; j++) {
                const float *f = feats + (long)j * F + a, *gz = logits + (long)j * C + c0;
                vec f0 = load(f), f1 = load(f + 16);
                for (int c = 0; c < cn; c++) {
                    fma_(&s[c][0], gz[c], f0);
                    fma_(&s[c][1], gz[c], f1);
                }
            }
            for (int c = 0; c < cn; c++) {
                store(gw + (long)(c0 + c) * F + a, s[c][0]);
                store(gw + (long)(c0 + c) * F + a + 16, s[c][1]);
            }
        } else {
            for (int c = c0; c < c0 + cn; c++)
                for (int i = a; i < F; i++) gw[(long)c * F + i] = 0;
            for (int j = 0; j < n; j++)
                for (int c = c0; c < c0 + cn; c++) {
                    float gz = logits[(long)j * C + c], *g = gw + (long)c * F;
                    for (int i = a; i < F; i++) g[i] += gz * feats[(long)j * F + i];
                }
        }
    }
}
