/* Vector helpers shared by the kernels (seedcnn.c, fastcnn.c): 16 channels as NV vectors of
 * the machine's width (GCC/Clang vector extensions), and G images in flight. */
#ifndef MNISTLAB_KERNELS_H
#define MNISTLAB_KERNELS_H
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define K 16  /* channels of every vector; conv3's C classes are padded up to it */
#ifndef G /* images in flight: as many chains of multiply-adds as the vector registers hold */
#if defined(__AVX512F__)
#define G 8
#elif defined(__AVX__)
#define G 6
#else
#define G 4
#endif
#endif
#define INLINE static inline __attribute__((always_inline))

/* The machine's vector width; a row of 16 channels is NV vectors of VW floats. Vector types
 * wider than the machine's registers compile to slow code (GCC moves them through memory). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#define NV (K / VW)
typedef float part __attribute__((vector_size(VW * sizeof(float))));
typedef int ipart __attribute__((vector_size(VW * sizeof(int))));
typedef float upart __attribute__((vector_size(VW * sizeof(float)), aligned(4))); /* any alignment */
typedef struct {
    part q[NV];
} vec;

INLINE vec load(const float *p) {
    vec v;
    for (int q = 0; q < NV; q++) v.q[q] = *(const upart *)(p + q * VW);
    return v;
}
INLINE void store(float *p, vec v) {
    for (int q = 0; q < NV; q++) *(upart *)(p + q * VW) = v.q[q];
}
INLINE vec zero(void) {
    vec v;
    for (int q = 0; q < NV; q++) v.q[q] = (part){0};
    return v;
}
INLINE float lane(vec v, int o) { return v.q[o / VW][o % VW]; }
INLINE void set_lane(vec *v, int o, float x) { v->q[o / VW][o % VW] = x; }
/* a += s * b */
INLINE void fma_(vec *a, float s, vec b) {
    for (int q = 0; q < NV; q++) a->q[q] += s * b.q[q];
}
INLINE void add_(vec *a, vec b) {
    for (int q = 0; q < NV; q++) a->q[q] += b.q[q];
}
/* v where mask > 0, else 0: ReLU (mask = v) and its gradient (mask = the ReLU's output). */
INLINE vec where_positive(vec v, vec mask) {
    for (int q = 0; q < NV; q++) v.q[q] = (part)((ipart)v.q[q] & (mask.q[q] > (part){0}));
    return v;
}

/* Images [a, b) in groups of G, the rest as one smaller group: the switch gives each call a
 * constant group size, so that its loops over images unroll. */
#define CASE(r, CALL) \
    case r: CALL(r, i); break;
#define GROUPS(a, b, CALL)                          \
    do {                                            \
        int i = (a);                                \
        for (; i + G <= (b); i += G) CALL(G, i);    \
        switch ((b) - i) { TAIL(CALL) default: break; } \
    } while (0)
#if G == 8
#define TAIL(CALL) CASE(7, CALL) CASE(6, CALL) CASE(5, CALL) CASE(4, CALL) CASE(3, CALL) CASE(2, CALL) CASE(1, CALL)
#elif G == 6
#define TAIL(CALL) CASE(5, CALL) CASE(4, CALL) CASE(3, CALL) CASE(2, CALL) CASE(1, CALL)
#elif G == 4
#define TAIL(CALL) CASE(3, CALL) CASE(2, CALL) CASE(1, CALL)
#else
#error "G must be 4, 6 or 8"
#endif

#endif
