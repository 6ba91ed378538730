/* C = beta*C + A^T.B for row-major A (K x M), B (K x N), C (M x N): the weight gradients' GEMMs,
 * a sum over K = time x batch rows of outer products (K in the thousands, M and N in the tens to
 * hundreds). There OpenBLAS packs both operands first (its copies were ~10 % of a long sequence's
 * step) and ran at 45-72 % of its own square-GEMM speed. Here each row of A and B is read in
 * place: a tile of C (MR rows x two vectors) stays in registers over a chunk of K, taking one
 * vector of B's row and MR broadcasts of A's row per k.
 *
 * AVX-512F only (picked at run time); fb_tn returns -1 where it does not run (no AVX-512, not x86,
 * out of memory, a shape left to BLAS) and the caller then takes BLAS. beta 0 never reads C.
 */
#ifndef FASTBPTT_TN_KERNEL_H
#define FASTBPTT_TN_KERNEL_H

#include <stdint.h>
#include <stdlib.h>

#include "cpu_levels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_TN_X86 1
#include <immintrin.h>
#else
#define FB_TN_X86 0
#endif

/* steps of K per pass over C's tiles: the pass's rows of B's column block stay in L1 */
#define FB_TN_KC 128
#define FB_TN_MR 12
/* the largest C (elements) taken by shape (see fb_tn_wanted) */
#define FB_TN_MAX_C (128 * 128)

#if FB_TN_X86

#define FB_TN_DEFINE(SFX, T, V, MASK, L, MLOAD, MSTORE, SET1, FMA, MUL, ZERO, ADD)                  \
/* C tile (MR x up to 2L columns, masks m0 m1) over kc steps; start 0: C = the sums, 1: C += them, \
 * 2: C = beta*C + them */                                                                                 \
__attribute__((target("avx512f"), always_inline)) static inline void                                \
fb_tn_tile_##SFX(const int MR, int64_t kc, const T *A, int64_t lda, const T *B, int64_t ldb, T *C,  \
                 int64_t ldc, MASK m0, MASK m1, int start, T beta) {                                 \
    V c0[FB_TN_MR], c1[FB_TN_MR];                                                                    \
    _Pragma("GCC unroll 16")                                                                         \
    for (int r = 0; r < MR; r++) { c0[r] = ZERO(); c1[r] = ZERO(); }                                 \
    for (int64_t k = 0; k < kc; k++) {                                                               \
        V b0 = MLOAD(m0, B + k * ldb), b1 = MLOAD(m1, B + k * ldb + L);                              \
        _Pragma("GCC unroll 16")                                                                     \
        for (int r = 0; r < MR; r++) {                                                               \
            V a = SET1(A[k * lda + r]);                                                              \
            c0[r] = FMA(a, b0, c0[r]);                                                               \
            c1[r] = FMA(a, b1, c1[r]);                                                               \
        }                                                                                            \
    }                                                                                                \
    /* the chunk's sums added to C's (not summed on from them: one chain of K rounding errors was   \
     * 10x OpenBLAS's error in float32 at K = 8192) */                                               \
    _Pragma("GCC unroll 16")                                                                         \
    for (int r = 0; r < MR; r++) {                                                                   \
        if (start != 0) {                                                                            \
            V o0 = MLOAD(m0, C + r * ldc), o1 = MLOAD(m1, C + r * ldc + L);                          \
            if (start == 2) { o0 = MUL(o0, SET1(beta)); o1 = MUL(o1, SET1(beta)); }                  \
            c0[r] = ADD(o0, c0[r]);                                                                  \
            c1[r] = ADD(o1, c1[r]);                                                                  \
        }                                                                                            \
        MSTORE(C + r * ldc, m0, c0[r]);                                                              \
        MSTORE(C + r * ldc + L, m1, c1[r]);                                                          \
    }                                                                                                \
}                                                                                                    \
/* one function per tile height: inlined into one loop, the tiles' row offsets spilled */            \
FB_TN_HEIGHT(SFX, T, MASK, 12) FB_TN_HEIGHT(SFX, T, MASK, 8) FB_TN_HEIGHT(SFX, T, MASK, 4)          \
FB_TN_HEIGHT(SFX, T, MASK, 2) FB_TN_HEIGHT(SFX, T, MASK, 1)                                         \
                                                                                                     \
/* C (M x N, ldc) = beta*C + A^T.B, one orientation: C's rows are A's columns */                    \
__attribute__((target("avx512f"))) static void                                                      \
fb_tn_direct_##SFX(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *B, int64_t ldb, \
                   T beta, T *C, int64_t ldc) {                                                      \
    for (int64_t k0 = 0; k0 < K; k0 += FB_TN_KC) {                                                   \
        int64_t kc = K - k0 < FB_TN_KC ? K - k0 : FB_TN_KC;                                          \
        int start = k0 > 0 ? 1 : beta == 0 ? 0 : beta == 1 ? 1 : 2;                                 \
        for (int64_t j0 = 0; j0 < N; j0 += 2 * (L)) {                                                \
            int64_t nb = N - j0 < 2 * (L) ? N - j0 : 2 * (L);                                        \
            MASK m0 = (MASK)(nb >= (L) ? (MASK)~(MASK)0 : (MASK)(((uint32_t)1 << nb) - 1));          \
            MASK m1 = (MASK)(nb >= 2 * (L) ? (MASK)~(MASK)0                                          \
                             : nb > (L) ? (MASK)(((uint32_t)1 << (nb - (L))) - 1) : (MASK)0);        \
            const T *b = B + k0 * ldb + j0;                                                          \
            for (int64_t i0 = 0; i0 < M;) {                                                          \
                int64_t left = M - i0;                                                               \
                const T *a = A + k0 * lda + i0;                                                      \
                T *c = C + i0 * ldc + j0;                                                            \
                int h = left >= 12 ? 12 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;        \
                switch (h) {                                                                         \
                case 12: fb_tn_h12_##SFX(kc, a, lda, b, ldb, c, ldc, m0, m1, start, beta); break;    \
                case 8: fb_tn_h8_##SFX(kc, a, lda, b, ldb, c, ldc, m0, m1, start, beta); break;      \
                case 4: fb_tn_h4_##SFX(kc, a, lda, b, ldb, c, ldc, m0, m1, start, beta); break;      \
                case 2: fb_tn_h2_##SFX(kc, a, lda, b, ldb, c, ldc, m0, m1, start, beta); break;      \
                default: fb_tn_h1_##SFX(kc, a, lda, b, ldb, c, ldc, m0, m1, start, beta); break;     \
                }                                                                                    \
                i0 += h;                                                                             \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}

#define FB_TN_HEIGHT(SFX, T, MASK, MR)                                                              \
__attribute__((target("avx512f"), noinline)) static void                                            \
fb_tn_h##MR##_##SFX(int64_t kc, const T *A, int64_t lda, const T *B, int64_t ldb, T *C, int64_t ldc, \
                    MASK m0, MASK m1, int start, T beta) {                                           \
    fb_tn_tile_##SFX(MR, kc, A, lda, B, ldb, C, ldc, m0, m1, start, beta);                          \
}

FB_TN_DEFINE(f32, float, __m512, __mmask16, 16, _mm512_maskz_loadu_ps,
             _mm512_mask_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_setzero_ps,
             _mm512_add_ps)
FB_TN_DEFINE(f64, double, __m512d, __mmask8, 8, _mm512_maskz_loadu_pd,
             _mm512_mask_storeu_pd, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_mul_pd, _mm512_setzero_pd,
             _mm512_add_pd)

static int fb_tn_avx512 = -1;       /* -1: not asked yet */
static int fb_tn_mode = -1;         /* tests: 0 never, 1 always where it runs, -1 by shape */

#endif  /* FB_TN_X86 */

/* The share of lanes a column count fills in vectors of L */
static inline double fb_tn_fill(int64_t n, int64_t L) { return (double)n / (double)((n + L - 1) / L * L); }

#define FB_TN_ENTRY(SFX, T, L)                                                                       \
/* C = beta*C + A^T.B; 0, or -1 where this kernel does not run (the caller takes BLAS). A few      \
 * columns beyond whole vectors ((M, N) = (128, 33): [X | 1]'s ones) run apart, as (r, M) into a    \
 * work array; otherwise the orientation whose vectors are fuller is taken ((31, 9) as (9, 31)). */   \
static int fb_tn_##SFX(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *B,        \
                       int64_t ldb, T beta, T *C, int64_t ldc) {                                     \
    if (!FB_TN_X86 || M < 1 || N < 1 || K < 1) return -1;                                           \
    FB_TN_BODY(SFX, T, L)                                                                           \
}

#if FB_TN_X86
#define FB_TN_BODY(SFX, T, L)                                                                        \
    if (fb_tn_avx512 < 0) fb_tn_avx512 = fb_cpu_has_level(2, 0);                                    \
    if (!fb_tn_avx512 || fb_tn_mode == 0) return -1;                                                \
    if (fb_tn_mode < 0 && !fb_tn_wanted(M, N, K)) return -1;                                        \
    /* the last r columns run as r rows over M's vectors into a work array, then transposed into C:  \
     * a short tail beyond whole vectors (in a masked vector it costs a whole one per tile; 128 x 33: \
     * 2.0 ms as 33 x 128, 0.8 ms for 128 x 32 alone), or all N when M fills vectors better */       \
    int64_t r = N > (L) && N % (L) != 0 && N % (L) <= (L) / 4 ? N % (L)                              \
              : fb_tn_fill(M, L) > 1.1 * fb_tn_fill(N, L) ? N : 0;                                   \
    if (r > 0) {                                                                                     \
        int64_t n = N - r;                                                                           \
        T *W = (T *)malloc((size_t)(r * M) * sizeof(T));                                             \
        if (W == NULL) return -1;           /* (before C is written: the caller's BLAS does it all) */ \
        if (n > 0) fb_tn_direct_##SFX(M, n, K, A, lda, B, ldb, beta, C, ldc);                        \
        fb_tn_direct_##SFX(r, M, K, B + n, ldb, A, lda, (T)0, W, M);                                 \
        for (int64_t i = 0; i < M; i++)                                                              \
            for (int64_t j = 0; j < r; j++)                                                          \
                C[i * ldc + n + j] = beta == 0 ? W[j * M + i] : beta * C[i * ldc + n + j] + W[j * M + i]; \
        free(W);                                                                                     \
        return 0;                                                                                    \
    }                                                                                                \
    fb_tn_direct_##SFX(M, N, K, A, lda, B, ldb, beta, C, ldc);                                       \
    return 0;
#else
#define FB_TN_BODY(SFX, T, L) return -1;
#endif

/* By shape: where it was measured faster than OpenBLAS. C stays in L1/L2 over the whole of K
 * (no blocking of M and N: from (256, 256) on OpenBLAS wins), and K is long enough to pay the
 * tile's loads and stores of C. */
static inline int fb_tn_wanted(int64_t M, int64_t N, int64_t K) {
    return K >= 256 && M >= 8 && N >= 8 && M * N <= FB_TN_MAX_C;
}

FB_TN_ENTRY(f32, float, 16)
FB_TN_ENTRY(f64, double, 8)

static int fb_tn_set_mode(int mode) {
#if FB_TN_X86
    int old = fb_tn_mode;
    fb_tn_mode = mode;
    return old;
#else
    (void)mode;
    return -1;
#endif
}

static int fb_tn_available(void) {
#if FB_TN_X86
    if (fb_tn_avx512 < 0) fb_tn_avx512 = fb_cpu_has_level(2, 0);
    return fb_tn_avx512;
#else
    return 0;
#endif
}

#endif  /* FASTBPTT_TN_KERNEL_H */
