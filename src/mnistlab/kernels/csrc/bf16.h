/* FastCNN's convolutions with bf16 operands and fp32 sums (AVX512-BF16's vdpbf16ps: pairs of
 * bf16 products added into each fp32 lane, twice an fp32 FMA's multiply-adds per instruction).
 *
 * Only where the compiler targets AVX512-BF16 (the library is built with -march=native, so where
 * the CPU has it): BF16 is then 1 and fastcnn.c uses these for conv1, conv2 and conv3, forward and
 * backward, when asked (its `bf16` argument). Everything else stays fp32: the BatchNorms, the
 * head, the weights, their gradients and the optimizer.
 *
 * The operands are rounded to bf16 (to nearest, ties to even) as they are read: the conv weights
 * once per call into pair-interleaved vectors ([tap][CI/2][CO/16]: lane k holds the weights of
 * output 16c+k for inputs 2p and 2p+1; conv1's pair horizontally adjacent taps), the input grids
 * and output gradients once per slice. The weights' gradients pair two images: their activations
 * as one 32-bit broadcast, their output gradients interleaved lane by lane.
 */
#ifndef MNISTLAB_BF16_H
#define MNISTLAB_BF16_H

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16 1
#include <immintrin.h>

typedef unsigned short bf16;

/* float -> bf16, rounded to nearest even (as vcvtneps2bf16 rounds finite values) */
static inline bf16 f2bf(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (bf16)(u >> 16);
}

/* n floats (a multiple of 16) to bf16 */
static void to_bf16(const float *src, bf16 *dst, long n) {
    for (long i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

/* The 3x3 conv weights (CO, CI, 3, 3) as pair-interleaved bf16 vectors: fwd [tap][CI/2][CO/16]
 * (input pairs), bwd [tap][CO/2][CI/16] (output pairs), for the input's gradient. */
static void pack_bf16(int CI, int CO, const float *w, __m512i *fwd, __m512i *bwd) {
    bf16 *f = (bf16 *)fwd, *b = (bf16 *)bwd; /* written in order, taps shared by the threads */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < 9; t++) {
        bf16 *ft = f + (long)t * CI * CO, *bt = b + (long)t * CO * CI;
        for (int i = 0; i < CI; i += 2)
            for (int o = 0; o < CO; o++)
                for (int k = 0; k < 2; k++) ft[(long)i * CO + 2 * o + k] = f2bf(w[(o * CI + i + k) * 9 + t]);
        for (int o = 0; o < CO; o += 2)
            for (int i = 0; i < CI; i++)
                for (int k = 0; k < 2; k++) bt[(long)o * CI + 2 * i + k] = f2bf(w[((o + k) * CI + i) * 9 + t]);
    }
}

INLINE __m512bh bcast_pair(const bf16 *p) {
    unsigned pair;
    memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* The interleaving of two images' output gradients, lane by lane: cvtne2ps(b, a) puts a's 16 lanes
 * below b's; this permutation makes bf16 pair k (a_k, b_k). */
INLINE __m512i lace_pairs(void) {
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
                            19, 3, 18, 2, 17, 1, 16, 0);
}
INLINE __m512bh laced(__m512i lace, __m512 a, __m512 b) {
    return (__m512bh)_mm512_permutexvar_epi16(lace, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* conv3x3_fwd_bf16 at position (oy, ox) for images [j0, j0 + jn) and nc = CO / 16 output vectors
 * (constants where inlined): jn x nc sums in registers, each weight vector and broadcast used several times. */
INLINE void fwd_bf16_at(const int nc, const int jn, int j0, int CI, const bf16 *in, int pi, long si,
                        const __m512i *w, float *z, int ho, long so, int oy, int ox) {
    __m512 acc[8][8]; /* [jn][nc]: fixed sizes, so that the compiler keeps them in registers */
    for (int j = 0; j < jn; j++)
        for (int c = 0; c < nc; c++) acc[j][c] = _mm512_setzero_ps();
    for (int t = 0; t < 9; t++) {
        const bf16 *v = in + j0 * si + ((2 * oy + t / 3) * pi + 2 * ox + t % 3) * CI;
        const __m512i *wt = w + t * (CI / 2) * nc;
        for (int p = 0; p < CI / 2; p++) {
            __m512bh wv[8];
            for (int c = 0; c < nc; c++) wv[c] = (__m512bh)wt[p * nc + c];
            for (int j = 0; j < jn; j++) {
                __m512bh x = bcast_pair(v + j * si + 2 * p);
                for (int c = 0; c < nc; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], x, wv[c]);
            }
        }
    }
    for (int j = 0; j < jn; j++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(z + (j0 + j) * so + (oy * ho + ox) * nc * 16 + c * 16, acc[j][c]);
}

/* conv3x3_fwd_bf16 for nc output vectors, images jb at a time (the last block g % jb). */
INLINE void fwd_bf16(const int nc, const int jb, const int g, int CI, const bf16 *in, int pi, long si,
                     const __m512i *w, float *z, int ho, long so) {
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            int j0 = 0;
            for (; j0 + jb <= g; j0 += jb) fwd_bf16_at(nc, jb, j0, CI, in, pi, si, w, z, ho, so, oy, ox);
            if (g % jb) fwd_bf16_at(nc, g % jb, j0, CI, in, pi, si, w, z, ho, so, oy, ox);
        }
}

/* conv3x3_fwd with bf16 operands: `in` the g images' grids in bf16, w as pack_bf16's fwd. */
INLINE void conv3x3_fwd_bf16(const int g, int CI, int CO, const bf16 *in, int pi, const __m512i *w, float *z, int ho) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    switch (CO / 16) { /* 8 to 16 sums in registers */
    case 1: fwd_bf16(1, 8, g, CI, in, pi, si, w, z, ho, so); break;
    case 2: fwd_bf16(2, 8, g, CI, in, pi, si, w, z, ho, so); break;
    case 3: fwd_bf16(3, 4, g, CI, in, pi, si, w, z, ho, so); break;
    case 4: fwd_bf16(4, 4, g, CI, in, pi, si, w, z, ho, so); break;
    case 5: fwd_bf16(5, 2, g, CI, in, pi, si, w, z, ho, so); break;
    case 6: fwd_bf16(6, 2, g, CI, in, pi, si, w, z, ho, so); break;
    case 7: fwd_bf16(7, 2, g, CI, in, pi, si, w, z, ho, so); break;
    default: fwd_bf16(8, 2, g, CI, in, pi, si, w, z, ho, so); break;
    }
}

/* `images` grids of `len` floats, rounded to bf16, as pairs of images value by value: out[m][v] holds
 * image 2m's value v in its low half and image 2m+1's (0 past the last) in its high half. */
static void pair_images(const float *in, long images, long len, unsigned *out) {
    const __m512i lace = lace_pairs();
    for (long m = 0; 2 * m < images; m++) {
        const float *lo = in + 2 * m * len, *hi = lo + len;
        const int two = 2 * m + 1 < images;
        unsigned *o = out + m * len;
        for (long v = 0; v < len; v += 16) {
            const __mmask16 k = len - v >= 16 ? 0xFFFF : (__mmask16)((1u << (len - v)) - 1);
            __m512 a = _mm512_maskz_loadu_ps(k, lo + v), b = two ? _mm512_maskz_loadu_ps(k, hi + v) : _mm512_setzero_ps();
            _mm512_mask_storeu_epi32(o + v, k, (__m512i)laced(lace, a, b));
        }
    }
}

/* conv3x3_bwd_bf16's weights' gradient for nc = CO / 16 output vectors and ib inputs at a time (both
 * constants where inlined, ib dividing CI): the ib x nc sums stay in registers while the positions
 * and image pairs go by. gp [position][nc][(G + 1) / 2]: the image pairs' output gradients, interleaved. */
INLINE void wgrad_bf16(const int nc, const int ib, const int pairs, int CI, const unsigned *in, int pi, long si,
                       int ho, const __m512bh *gp, vec *d) {
    for (int t = 0; t < 9; t++)
        for (int i0 = 0; i0 < CI; i0 += ib) {
            __m512 acc[8][8]; /* [ib][nc]: fixed sizes, so that the compiler keeps them in registers */
            for (int u = 0; u < ib; u++)
                for (int c = 0; c < nc; c++) acc[u][c] = _mm512_setzero_ps();
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < ho; ox++) {
                    const unsigned *cell = in + ((2 * oy + t / 3) * pi + 2 * ox + t % 3) * CI + i0;
                    const __m512bh *gq = gp + (oy * ho + ox) * nc * ((G + 1) / 2);
                    for (int q = 0; q < pairs; q++) {
                        __m512bh gv[8];
                        for (int c = 0; c < nc; c++) gv[c] = gq[c * ((G + 1) / 2) + q];
                        for (int u = 0; u < ib; u++) {
                            __m512bh x = (__m512bh)_mm512_set1_epi32((int)cell[q * si + u]);
                            for (int c = 0; c < nc; c++) acc[u][c] = _mm512_dpbf16_ps(acc[u][c], x, gv[c]);
                        }
                    }
                }
            for (int u = 0; u < ib; u++)
                for (int c = 0; c < nc; c++) {
                    float *dc = (float *)(d + ((long)t * CI + i0 + u) * nc + c);
                    _mm512_storeu_ps(dc, _mm512_add_ps(_mm512_loadu_ps(dc), acc[u][c]));
                }
        }
}

/* conv3x3_bwd with bf16 operands: in (the g grids as pair_images pairs them), gz (g, ho*ho, CO) the
 * output gradient in fp32 and gzb the same in bf16, wt as pack_bf16's bwd; adds into d (fp32
 * [tap][CI][CO/16]) and gin. */
INLINE void conv3x3_bwd_bf16(const int g, int CI, int CO, const unsigned *in, int pi, const __m512i *wt, const float *gz,
                             const bf16 *gzb, int ho, vec *d, float *gin) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    const int pairs = (g + 1) / 2;
    const __m512i lace = lace_pairs();
    __m512bh gp[ho * ho * (CO / 16) * ((G + 1) / 2)];
    for (int p = 0; p < ho * ho; p++)
        for (int c = 0; c < CO / 16; c++)
            for (int q = 0; q < pairs; q++) {
                const float *a = gz + 2 * q * so + (long)p * CO + c * 16;
                gp[(p * (CO / 16) + c) * ((G + 1) / 2) + q] =
                    laced(lace, _mm512_loadu_ps(a), 2 * q + 1 < g ? _mm512_loadu_ps(a + so) : _mm512_setzero_ps());
            }
    switch (CO / 16) { /* 8 to 16 sums in registers */
    case 1: wgrad_bf16(1, 8, pairs, CI, in, pi, si, ho, gp, d); break;
    case 2: wgrad_bf16(2, 8, pairs, CI, in, pi, si, ho, gp, d); break;
    case 3: wgrad_bf16(3, 4, pairs, CI, in, pi, si, ho, gp, d); break;
    case 4: wgrad_bf16(4, 4, pairs, CI, in, pi, si, ho, gp, d); break;
    case 5: wgrad_bf16(5, 2, pairs, CI, in, pi, si, ho, gp, d); break;
    case 6: wgrad_bf16(6, 2, pairs, CI, in, pi, si, ho, gp, d); break;
    case 7: wgrad_bf16(7, 2, pairs, CI, in, pi, si, ho, gp, d); break;
    default: wgrad_bf16(8, 2, pairs, CI, in, pi, si, ho, gp, d); break;
    }
    /* the input's gradient: a row of three taps at a time for the g images, 3 g sums in registers,
     * each broadcast of an output gradient pair used three times */
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            const long pos = (oy * ho + ox) * CO;
            for (int ky = 0; ky < 3; ky++) {
                const long row = ((2 * oy + ky) * pi + 2 * ox) * CI;
                for (int ic = 0; ic < CI / 16; ic++) {
                    __m512 acc[G][3];
                    for (int j = 0; j < g; j++)
                        for (int kx = 0; kx < 3; kx++) acc[j][kx] = _mm512_loadu_ps(gin + j * si + row + kx * CI + ic * 16);
                    const __m512i *w = wt + ky * 3 * (CO / 2) * (CI / 16) + ic;
                    for (int q = 0; q < CO / 2; q++) {
                        __m512bh wv[3];
                        for (int kx = 0; kx < 3; kx++) wv[kx] = (__m512bh)w[(kx * (CO / 2) + q) * (CI / 16)];
                        for (int j = 0; j < g; j++) {
                            __m512bh x = bcast_pair(gzb + j * so + pos + 2 * q);
                            for (int kx = 0; kx < 3; kx++) acc[j][kx] = _mm512_dpbf16_ps(acc[j][kx], x, wv[kx]);
                        }
                    }
                    for (int j = 0; j < g; j++)
                        for (int kx = 0; kx < 3; kx++) _mm512_storeu_ps(gin + j * si + row + kx * CI + ic * 16, acc[j][kx]);
                }
            }
        }
}

/* n floats (any n) to bf16 */
static void to_bf16_any(const float *src, bf16 *dst, long n) {
    long i = n / 16 * 16;
    to_bf16(src, dst, i);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

/* conv1's weights (C1, 1, 5, 5) as bf16 pairs of horizontally adjacent taps, [row][pair][C1/16]:
 * taps (ky, 2p) and (ky, 2p + 1), the sixth column 0. */
static void pack_conv1_bf16(int C1, const float *w, __m512i *out) {
    bf16 *f = (bf16 *)out;
    for (int ky = 0; ky < 5; ky++)
        for (int p = 0; p < 3; p++)
            for (int o = 0; o < C1; o++)
                for (int k = 0; k < 2; k++) {
                    const int kx = 2 * p + k;
                    f[(long)(ky * 3 + p) * C1 * 2 + 2 * o + k] = kx < 5 ? f2bf(w[o * 25 + ky * 5 + kx]) : 0;
                }
}

/* conv1_fwd with bf16 operands: xb the g images' padded grids (XF x XF) in bf16 (one value past the
 * last, 0), w as pack_conv1_bf16 packs it. Each pair of taps reads two adjacent pixels at once. */
INLINE void conv1_fwd_bf16(int g, int C1, const bf16 *xb, const __m512i *w, float *z) {
    for (int oy = 0; oy < 14; oy++)
        for (int ox = 0; ox < 14; ox++)
            for (int c = 0; c < C1 / 16; c++) {
                __m512 acc[G];
                for (int j = 0; j < g; j++) acc[j] = _mm512_setzero_ps();
                for (int ky = 0; ky < 5; ky++)
                    for (int p = 0; p < 3; p++) {
                        __m512bh wv = (__m512bh)w[(ky * 3 + p) * (C1 / 16) + c];
                        const bf16 *v = xb + (2 * oy + ky) * XF + 2 * ox + 2 * p;
                        for (int j = 0; j < g; j++) acc[j] = _mm512_dpbf16_ps(acc[j], bcast_pair(v + j * XF * XF), wv);
                    }
                for (int j = 0; j < g; j++) _mm512_storeu_ps(z + ((long)j * 196 + oy * 14 + ox) * C1 + c * 16, acc[j]);
            }
}

/* conv1's weights' gradient with bf16 operands for `images` images: xp their padded fp32 grids, gy
 * (images, 196, C1) the gradient at conv1's output; adds into d ([tap][C1/16]). Two images at a
 * time: their pixels as one 32-bit broadcast, their gradients interleaved lane by lane. */
static void conv1_bwd_bf16(long images, int C1, const float *xp, const float *gy, vec *d, bf16 *scr) {
    const long pairs = (images + 1) / 2, len = XF * XF;
    unsigned *xq = (unsigned *)scr; /* scratch: the pairs */
    pair_images(xp, images, len, xq);
    const __m512i lace = lace_pairs();
    for (int c = 0; c < C1 / 16; c++) {
        __m512 acc[25];
        for (int t = 0; t < 25; t++) acc[t] = _mm512_setzero_ps();
        for (long m = 0; m < pairs; m++) {
            const unsigned *x = xq + m * len;
            const float *lo = gy + 2 * m * 196 * C1 + c * 16, *hi = lo + 196 * C1;
            const int two = 2 * m + 1 < images;
            for (int oy = 0; oy < 14; oy++)
                for (int ox = 0; ox < 14; ox++) {
                    const int pos = (oy * 14 + ox) * C1;
                    __m512bh gp = laced(lace, _mm512_loadu_ps(lo + pos), two ? _mm512_loadu_ps(hi + pos) : _mm512_setzero_ps());
                    const unsigned *xc = x + 2 * oy * XF + 2 * ox;
                    for (int ky = 0; ky < 5; ky++)
                        for (int kx = 0; kx < 5; kx++)
                            acc[ky * 5 + kx] = _mm512_dpbf16_ps(acc[ky * 5 + kx], (__m512bh)_mm512_set1_epi32((int)xc[ky * XF + kx]), gp);
                }
        }
        for (int t = 0; t < 25; t++) {
            float *dt = (float *)(d + t * (C1 / 16) + c);
            _mm512_storeu_ps(dt, _mm512_add_ps(_mm512_loadu_ps(dt), acc[t]));
        }
    }
}

#else
#define BF16 0
#endif

#endif
