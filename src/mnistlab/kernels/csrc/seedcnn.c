/* The seed's CNN, forward and backward, for one CPU thread over a slice of a batch.
 *
 * 28x28x1 -> conv 3x3 s2 p1 -> ReLU -> 14x14x16 -> conv 3x3 s2 p1 -> ReLU -> 7x7x16
 * -> conv 3x3 s2 p1 -> ReLU -> 4x4xC -> mean over the 16 positions -> C (C <= 16).
 *
 * Activations are kept channels-last, one vector of 16 floats per position (GCC/Clang
 * vector extensions: two AVX2 registers, one AVX-512 register, four NEON registers), in
 * zero-bordered grids so that no tap needs a bounds test: the input as 29x29 (row and column
 * 0 zero), conv1's output as 15x15 (row and column 0 zero), conv2's as 9x9 (rows and
 * columns 0 and 8 zero). Images are processed G at a time so that G independent chains of
 * multiply-adds share each weight vector loaded. Weights come and go in PyTorch's
 * (out, in, 3, 3) layout and are rearranged on entry. Built at run time by
 * mnistlab/native.py (cc -O3 -march=native); needs no Python or torch headers.
 */
#include "kernels.h"

#define X 29  /* zero-bordered input side */
#define P1 15 /* zero-bordered conv1 output side (14 + 1) */
#define P2 9  /* zero-bordered conv2 output side (1 + 7 + 1) */

typedef struct {
    vec w1[9];     /* [tap] over outputs */
    vec w2[9][K];  /* [tap][in] over outputs */
    vec w2t[9][K]; /* [tap][out] over inputs */
    vec w3[9][K];  /* [tap][in] over outputs (outputs >= C are 0) */
    vec w3t[9][K]; /* [tap][out] over inputs (rows >= C are 0) */
    vec b1, b2, b3;
} Weights;

static void load_weights(Weights *W, int C, const float *w1, const float *b1, const float *w2, const float *b2,
                         const float *w3, const float *b3) {
    memset(W, 0, sizeof *W);
    for (int o = 0; o < K; o++) {
        set_lane(&W->b1, o, b1[o]);
        set_lane(&W->b2, o, b2[o]);
        for (int t = 0; t < 9; t++) {
            set_lane(&W->w1[t], o, w1[o * 9 + t]);
            for (int i = 0; i < K; i++) {
                set_lane(&W->w2[t][i], o, w2[(o * K + i) * 9 + t]);
                set_lane(&W->w2t[t][o], i, w2[(o * K + i) * 9 + t]);
            }
        }
    }
    for (int o = 0; o < C; o++) {
        set_lane(&W->b3, o, b3[o]);
        for (int t = 0; t < 9; t++)
            for (int i = 0; i < K; i++) {
                set_lane(&W->w3[t][i], o, w3[(o * K + i) * 9 + t]);
                set_lane(&W->w3t[t][o], i, w3[(o * K + i) * 9 + t]);
            }
    }
}

/* Images [0, g) of x as zero-bordered 29x29 grids. */
INLINE void pad_input(int g, const float *x, float xp[][X * X]) {
    for (int j = 0; j < g; j++) {
        memset(xp[j], 0, sizeof xp[j]);
        for (int r = 0; r < 28; r++) memcpy(xp[j] + (r + 1) * X + 1, x + (long)j * 784 + r * 28, 28 * sizeof(float));
    }
}

/* A 3x3 stride-2 conv of 16 input channels over g images of zero-bordered side `pi` (image
 * i at in + i * pi * pi * K), ReLU, written at offset `off` (row and column) of grids of side
 * `po` (image i at out + i * po * po * K) whose other cells are 0. Output (oy, ox) reads the
 * input cells (2 oy + ky, 2 ox + kx). */
INLINE void conv16(int g, const float *in, int pi, const vec w[9][K], vec bias, float *out, int ho, int po,
                   int off) {
    const long si = (long)pi * pi * K, so = (long)po * po * K;
    memset(out, 0, g * so * sizeof(float));
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            vec acc[G];
            for (int j = 0; j < g; j++) acc[j] = bias;
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    const float *v = in + ((2 * oy + ky) * pi + 2 * ox + kx) * K;
                    const vec *wt = w[ky * 3 + kx];
                    for (int i = 0; i < K; i++)
                        for (int j = 0; j < g; j++) fma_(&acc[j], v[j * si + i], wt[i]);
                }
            float *dst = out + ((oy + off) * po + ox + off) * K;
            for (int j = 0; j < g; j++) store(dst + j * so, where_positive(acc[j], acc[j]));
        }
}

/* The backward of conv16 for g images: gout (image i at gout + i * ho * ho) holds the gradient
 * at its outputs, ReLU already applied; adds the weights' gradient to d and the input grids'
 * gradient to gin (zero-bordered like the input, side pi, image i at gin + i * pi * pi; the
 * border cells collect values no one reads). */
INLINE void conv16_back(int g, const float *in, int pi, const vec wt[9][K], int outs, const vec *gout, int ho,
                        vec d[9][K], vec *gin) {
    const long si = (long)pi * pi * K, sg = (long)pi * pi, so = (long)ho * ho;
    for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < ho; ox++) {
            vec go[G];
            float gs[G][K]; /* the same values as scalars: broadcasts from memory, not lane shuffles */
            for (int j = 0; j < g; j++) {
                go[j] = gout[j * so + oy * ho + ox];
                store(gs[j], go[j]);
            }
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    int t = ky * 3 + kx, cell = (2 * oy + ky) * pi + 2 * ox + kx;
                    const float *v = in + cell * K;
                    for (int i = 0; i < K; i++) {
                        vec s = d[t][i];
                        for (int j = 0; j < g; j++) fma_(&s, v[j * si + i], go[j]);
                        d[t][i] = s;
                    }
                    vec acc[G];
                    for (int j = 0; j < g; j++) acc[j] = gin[j * sg + cell];
                    for (int o = 0; o < outs; o++)
                        for (int j = 0; j < g; j++) fma_(&acc[j], gs[j][o], wt[t][o]);
                    for (int j = 0; j < g; j++) gin[j * sg + cell] = acc[j];
                }
        }
}

INLINE void forward_group(int g, int C, const Weights *W, const float *x, float *a1, float *a2, float *a3,
                          float *out) {
    float xp[G][X * X];
    pad_input(g, x, xp);
    /* conv1: one input channel */
    memset(a1, 0, g * P1 * P1 * K * sizeof(float));
    for (int oy = 0; oy < 14; oy++)
        for (int ox = 0; ox < 14; ox++) {
            vec acc[G];
            for (int j = 0; j < g; j++) acc[j] = W->b1;
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++)
                    for (int j = 0; j < g; j++) fma_(&acc[j], xp[j][(2 * oy + ky) * X + 2 * ox + kx], W->w1[ky * 3 + kx]);
            float *dst = a1 + ((oy + 1) * P1 + ox + 1) * K;
            for (int j = 0; j < g; j++) store(dst + j * P1 * P1 * K, where_positive(acc[j], acc[j]));
        }
    conv16(g, a1, P1, (const vec(*)[K])W->w2, W->b2, a2, 7, P2, 1);
    conv16(g, a2, P2, (const vec(*)[K])W->w3, W->b3, a3, 4, 4, 0);
    for (int j = 0; j < g; j++) {
        vec sum = zero();
        for (int p = 0; p < 16; p++) add_(&sum, load(a3 + (j * 16 + p) * K));
        for (int o = 0; o < C; o++) out[(long)j * C + o] = lane(sum, o) * (1.0f / 16.0f);
    }
}

/* The batch is cut into PARTS fixed slices, run in parallel (OpenMP, the threads PyTorch
 * uses); the weights' gradients are summed over the slices in a fixed order, so the result
 * does not depend on the number of threads. */
#define PARTS 4
static inline int part_start(int n, int k) { return (int)((long)n * k / PARTS); }

/* x: (n, 784); saves a1: (n, 15, 15, K), a2: (n, 9, 9, K) (zero-bordered) and a3: (n, 4, 4, K),
 * after ReLU; out: (n, C). */
void seedcnn_forward(int n, int C, const float *x, const float *w1, const float *b1, const float *w2,
                     const float *b2, const float *w3, const float *b3, float *a1, float *a2, float *a3, float *out) {
    Weights W;
    load_weights(&W, C, w1, b1, w2, b2, w3, b3);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < PARTS; k++) {
#define FORWARD(g, b)                                                                                       \
    forward_group(g, C, &W, x + (long)(b) * 784, a1 + (long)(b) * P1 * P1 * K, a2 + (long)(b) * P2 * P2 * K, \
                  a3 + (long)(b) * 16 * K, out + (long)(b) * C)
        GROUPS(part_start(n, k), part_start(n, k + 1), FORWARD);
#undef FORWARD
    }
}

typedef struct {
    vec d1[9], d2[9][K], d3[9][K];
    vec e1, e2, e3;
} Grads;

INLINE void backward_group(int g, int C, const Weights *W, Grads *D, const float *x, const float *a1,
                           const float *a2, const float *a3, const float *gout) {
    float xp[G][X * X];
    pad_input(g, x, xp);
    vec g1[G][P1 * P1], g2[G][P2 * P2], g2u[G][49], g3[G][16];
    memset(g1, 0, g * sizeof g1[0]);
    memset(g2, 0, g * sizeof g2[0]);
    for (int j = 0; j < g; j++) {
        vec go = zero();
        for (int o = 0; o < C; o++) set_lane(&go, o, gout[(long)j * C + o] * (1.0f / 16.0f));
        for (int p = 0; p < 16; p++) {
            g3[j][p] = where_positive(go, load(a3 + (j * 16 + p) * K));
            add_(&D->e3, g3[j][p]);
        }
    }
    conv16_back(g, a2, P2, (const vec(*)[K])W->w3t, C, g3[0], 4, D->d3, g2[0]);
    for (int j = 0; j < g; j++) /* conv2's output gradient, unbordered 7x7, through its ReLU */
        for (int oy = 0; oy < 7; oy++)
            for (int ox = 0; ox < 7; ox++) {
                int cell = (oy + 1) * P2 + ox + 1;
                g2u[j][oy * 7 + ox] = where_positive(g2[j][cell], load(a2 + (j * P2 * P2 + cell) * K));
                add_(&D->e2, g2u[j][oy * 7 + ox]);
            }
    conv16_back(g, a1, P1, (const vec(*)[K])W->w2t, K, g2u[0], 7, D->d2, g1[0]);
    for (int oy = 0; oy < 14; oy++)
        for (int ox = 0; ox < 14; ox++) {
            int cell = (oy + 1) * P1 + ox + 1;
            vec go[G];
            for (int j = 0; j < g; j++) {
                go[j] = where_positive(g1[j][cell], load(a1 + (j * P1 * P1 + cell) * K));
                add_(&D->e1, go[j]);
            }
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    vec s = D->d1[ky * 3 + kx];
                    for (int j = 0; j < g; j++) fma_(&s, xp[j][(2 * oy + ky) * X + 2 * ox + kx], go[j]);
                    D->d1[ky * 3 + kx] = s;
                }
        }
}

/* The gradients of the sum over images [0, n) of gout . out with respect to the weights and
 * biases, from the forward pass's saved activations. The g* outputs are overwritten, in
 * PyTorch's layouts: gw1 (16, 1, 3, 3), gw2 (16, 16, 3, 3), gw3 (C, 16, 3, 3). */
void seedcnn_backward(int n, int C, const float *x, const float *w1, const float *b1, const float *w2,
                      const float *b2, const float *w3, const float *b3, const float *a1, const float *a2,
                      const float *a3, const float *gout, float *gw1, float *gb1, float *gw2, float *gb2, float *gw3,
                      float *gb3) {
    Weights W;
    Grads parts[PARTS], D;
    load_weights(&W, C, w1, b1, w2, b2, w3, b3);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < PARTS; k++) {
        Grads *P = &parts[k];
        memset(P, 0, sizeof *P);
#define BACKWARD(g, b)                                                                                         \
    backward_group(g, C, &W, P, x + (long)(b) * 784, a1 + (long)(b) * P1 * P1 * K, a2 + (long)(b) * P2 * P2 * K, \
                   a3 + (long)(b) * 16 * K, gout + (long)(b) * C)
        GROUPS(part_start(n, k), part_start(n, k + 1), BACKWARD);
#undef BACKWARD
    }
    D = parts[0];
    for (int k = 1; k < PARTS; k++) {
        for (int t = 0; t < 9; t++) {
            add_(&D.d1[t], parts[k].d1[t]);
            for (int i = 0; i < K; i++) {
                add_(&D.d2[t][i], parts[k].d2[t][i]);
                add_(&D.d3[t][i], parts[k].d3[t][i]);
            }
        }
        add_(&D.e1, parts[k].e1);
        add_(&D.e2, parts[k].e2);
        add_(&D.e3, parts[k].e3);
    }
    for (int o = 0; o < K; o++) {
        gb1[o] = lane(D.e1, o);
        gb2[o] = lane(D.e2, o);
        for (int t = 0; t < 9; t++) {
            gw1[o * 9 + t] = lane(D.d1[t], o);
            for (int i = 0; i < K; i++) gw2[(o * K + i) * 9 + t] = lane(D.d2[t][i], o);
        }
    }
    for (int o = 0; o < C; o++) {
        gb3[o] = lane(D.e3, o);
        for (int t = 0; t < 9; t++)
            for (int i = 0; i < K; i++) gw3[(o * K + i) * 9 + t] = lane(D.d3[t][i], o);
    }
}
