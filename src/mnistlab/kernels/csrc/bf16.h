/* FastCNN's 3x3 convolutions with bf16 operands and fp32 sums (AVX512-BF16's vdpbf16ps: pairs of
 * bf16 products added into each fp32 lane, twice an fp32 FMA's multiply-adds per instruction).
 *
 * Only where the compiler targets AVX512-BF16 (the library is built with -march=native, so where
 * the CPU has it): BF16 is then 1 and fastcnn.c uses these for conv2 and conv3, forward and
 * backward, when asked (its `bf16` argument). Everything else stays fp32: the first layer, the
 * BatchNorms, the head, the weights, their gradients and the optimizer.
 *
 * The operands are rounded to bf16 (to nearest, ties to even) as they are read: the conv weights
 * once per call into pair-interleaved vectors ([tap][CI/2][CO/16]: lane k holds the weights of
 * output 16c+k for inputs 2p and 2p+1), the input grids and output gradients once per slice. The
 * weights' gradient pairs two images: their activations as one 32-bit broadcast, their output
 * gradients interleaved lane by lane.
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
    bf16 *f = (bf16 *)fwd, *b = (bf16 *)bwd;
    for (int o = 0; o < CO; o++)
        for (int i = 0; i < CI; i++)
            for (int t = 0; t < 9; t++) {
                bf16 v = f2bf(w[(o * CI + i) * 9 + t]);
                f[(((long)t * (CI / 2) + i / 2) * (CO / 16) + o / 16) * 32 + (o % 16) * 2 + i % 2] = v;
                b[(((long)t * (CO / 2) + o / 2) * (CI / 16) + i / 16) * 32 + (i % 16) * 2 + o % 2] = v;
            }
}

INLINE __m512bh bcast_pair(const bf16 *p) {
    unsigned pair;
    memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* conv3x3_fwd with bf16 operands: `in` the g images' grids in bf16, w as pack_bf16's fwd. */
INLINE void conv3x3_fwd_bf16(int g, int CI, int CO, const bf16 *in, int pi, const __m512i *w, float *z, int ho) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++)
            for (int c = 0; c < CO / 16; c++) {
                __m512 acc[G];
                for (int j = 0; j < g; j++) acc[j] = _mm512_setzero_ps();
                for (int ky = 0; ky < 3; ky++)
                    for (int kx = 0; kx < 3; kx++) {
                        const bf16 *v = in + ((2 * oy + ky) * pi + 2 * ox + kx) * CI;
                        const __m512i *wt = w + (ky * 3 + kx) * (CI / 2) * (CO / 16) + c;
                        for (int p = 0; p < CI / 2; p++) {
                            __m512bh wv = (__m512bh)wt[p * (CO / 16)];
                            for (int j = 0; j < g; j++) acc[j] = _mm512_dpbf16_ps(acc[j], bcast_pair(v + j * si + 2 * p), wv);
                        }
                    }
                for (int j = 0; j < g; j++) _mm512_storeu_ps(z + j * so + (oy * ho + ox) * CO + c * 16, acc[j]);
            }
}

/* `images` grids of `len` bf16 values as pairs of images, value by value: out[m][v] holds image 2m's
 * value v in its low half and image 2m+1's (0 past the last) in its high half. */
static void pair_images(const bf16 *in, long images, long len, unsigned *out) {
    for (long m = 0; 2 * m < images; m++) {
        const bf16 *lo = in + 2 * m * len, *hi = lo + len;
        unsigned *o = out + m * len;
        if (2 * m + 1 < images)
            for (long v = 0; v < len; v++) o[v] = lo[v] | (unsigned)hi[v] << 16;
        else
            for (long v = 0; v < len; v++) o[v] = lo[v];
    }
}

/* conv3x3_bwd with bf16 operands: in (the g grids as pair_images pairs them), gz (g, ho*ho, CO) the
 * output gradient in fp32 and gzb the same in bf16, wt as pack_bf16's bwd; adds into d (fp32
 * [tap][CI][CO/16]) and gin. */
INLINE void conv3x3_bwd_bf16(int g, int CI, int CO, const unsigned *in, int pi, const __m512i *wt, const float *gz,
                             const bf16 *gzb, int ho, vec *d, float *gin) {
    const long si = (long)pi * pi * CI, so = (long)ho * ho * CO;
    const __m512i lace = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                          21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512bh gp[SMAX / 16][(G + 1) / 2]; /* the output gradient of image pairs, lanes interleaved */
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            const long pos = (oy * ho + ox) * CO;
            for (int c = 0; c < CO / 16; c++)
                for (int q = 0; 2 * q < g; q++) {
                    __m512 a = _mm512_loadu_ps(gz + 2 * q * so + pos + c * 16);
                    __m512 b = 2 * q + 1 < g ? _mm512_loadu_ps(gz + (2 * q + 1) * so + pos + c * 16) : _mm512_setzero_ps();
                    gp[c][q] = (__m512bh)_mm512_permutexvar_epi16(lace, (__m512i)_mm512_cvtne2ps_pbh(b, a));
                }
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    const int t = ky * 3 + kx;
                    const long cell = ((2 * oy + ky) * pi + 2 * ox + kx) * CI;
                    float *dt = (float *)(d + t * CI * (CO / 16));
                    for (int i = 0; i < CI; i++) {
                        __m512bh pair[(G + 1) / 2];
                        for (int q = 0; 2 * q < g; q++) pair[q] = (__m512bh)_mm512_set1_epi32((int)in[q * si + cell + i]);
                        for (int c = 0; c < CO / 16; c++) {
                            float *dc = dt + ((long)i * (CO / 16) + c) * 16;
                            __m512 s = _mm512_loadu_ps(dc);
                            for (int q = 0; 2 * q < g; q++) s = _mm512_dpbf16_ps(s, pair[q], gp[c][q]);
                            _mm512_storeu_ps(dc, s);
                        }
                    }
                    for (int ic = 0; ic < CI / 16; ic++) {
                        __m512 acc[G];
                        for (int j = 0; j < g; j++) acc[j] = _mm512_loadu_ps(gin + j * si + cell + ic * 16);
                        const __m512i *w = wt + t * (CO / 2) * (CI / 16) + ic;
                        for (int q = 0; q < CO / 2; q++) {
                            __m512bh wv = (__m512bh)w[q * (CI / 16)];
                            for (int j = 0; j < g; j++) acc[j] = _mm512_dpbf16_ps(acc[j], bcast_pair(gzb + j * so + pos + 2 * q), wv);
                        }
                        for (int j = 0; j < g; j++) _mm512_storeu_ps(gin + j * si + cell + ic * 16, acc[j]);
                    }
                }
        }
}

#else
#define BF16 0
#endif

#endif
