/* The packed column split of the Cython kernels (kernels.pyx, ``_split_mode``): each thread of
 * the team owns some output columns of the per-step product for the whole call, packs its
 * slice of W once into panels its register-blocked loop reads in order, and keeps it in its
 * own cache across steps -- where a BLAS call per step re-packs the operand every time. (In the
 * packed row split each thread packs all of W and owns some batch rows instead.)
 *
 * Three paths, chosen at run time by CPU features (fbw_level, set once; tests force one):
 * 2 = AVX-512 (panels of 32 f32 / 16 f64 columns, blocks of up to 12 batch rows),
 * 1 = AVX2 + FMA (16 / 8 columns, up to 6 rows), 0 = plain C (8 / 8 columns, up to 4 rows).
 * GCC vector extensions with target attributes; other compilers get the plain C path only.
 */
#include <string.h>

/* What the packed product does with each sum s of its block (C = the output, all arrays of the
 * same shape; A, Hh, dZ with row stride ld): */
enum {
    FBW_SET,        /* C = s */
    FBW_INIT,       /* C = A + s: a forward step on its input projection A (C then activated) */
    FBW_DZ_TANH,    /* a backward step: d = s [+ A (the loss's gradient G, or NULL)] times tanh's */
    FBW_DZ_RELU     /* or relu's derivative from Hh (the step's h); C = d, and dZ = d with A, else
                       dZ += d */
};
typedef struct {
    int kind;
    const void *A;
    const void *Hh;
    void *dZ;
    Py_ssize_t ld;
} fbw_epi;

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FBW_X86 1
#else
#define FBW_X86 0
#endif
#if defined(__GNUC__)
#define FBW_INLINE static inline __attribute__((always_inline))   /* MR becomes a constant */
#else
#define FBW_INLINE static __inline
#endif

/* portable */
#define FBW_T float
#define FBW_VEC 0
#define FBW_L 4
#define FBW_MRMAX 4
#define FBW_SFX _f32_c
#define FBW_ATTR
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_SFX
#define FBW_T double
#define FBW_SFX _f64_c
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_VEC
#undef FBW_L
#undef FBW_MRMAX
#undef FBW_SFX
#undef FBW_ATTR

#if FBW_X86
#define FBW_VEC 1
#define FBW_ATTR __attribute__((target("avx2,fma")))
#define FBW_MRMAX 6
#define FBW_T float
#define FBW_L 8
#define FBW_SFX _f32_avx2
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_L
#undef FBW_SFX
#define FBW_T double
#define FBW_L 4
#define FBW_SFX _f64_avx2
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_L
#undef FBW_SFX
#undef FBW_ATTR
#undef FBW_MRMAX

#define FBW_ATTR __attribute__((target("avx512f,fma")))
#define FBW_MRMAX 12
#define FBW_T float
#define FBW_L 16
#define FBW_SFX _f32_avx512
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_L
#undef FBW_SFX
#define FBW_T double
#define FBW_L 8
#define FBW_SFX _f64_avx512
#include "wide_kernel.h"
#undef FBW_T
#undef FBW_L
#undef FBW_SFX
#undef FBW_ATTR
#undef FBW_MRMAX
#undef FBW_VEC
#endif

static int fbw_level = 0;

static int fbw_cpu_level(void) {
#if FBW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static void fbw_init(void) { fbw_level = fbw_cpu_level(); }

/* tests: force a path (2 AVX-512, 1 AVX2, 0 plain C) if the CPU has it; returns the level in force */
static int fbw_set_level(int level) {
    if (level >= 0 && level <= fbw_cpu_level()) fbw_level = level;
    return fbw_level;
}

static const char *fbw_impl(void) {
    return fbw_level == 2 ? "avx512" : fbw_level == 1 ? "avx2" : "portable";
}

/* panel width (columns) of the current path */
static Py_ssize_t fbw_panel(int is_double) {
    if (fbw_level == 2) return is_double ? 16 : 32;
    if (fbw_level == 1) return is_double ? 8 : 16;
    return 8;
}

#define FBW_PACK(NAME, T)                                                                        \
    /* P <- W[:, 0:w] (W row-major, row stride ld, K rows) in panels of nr columns, k-major */  \
    static void NAME(Py_ssize_t K, const T *W, Py_ssize_t ld, Py_ssize_t w, Py_ssize_t nr, T *P) { \
        for (Py_ssize_t q = 0; q * nr < w; q++) {                                                \
            Py_ssize_t nv = w - q * nr < nr ? w - q * nr : nr;                                   \
            T *p = P + q * K * nr;                                                               \
            for (Py_ssize_t k = 0; k < K; k++, p += nr) {                                        \
                memcpy(p, W + k * ld + q * nr, (size_t)nv * sizeof(T));                          \
                for (Py_ssize_t c = nv; c < nr; c++) p[c] = 0;                                   \
            }                                                                                    \
        }                                                                                        \
    }
FBW_PACK(fbw_pack_f32, float)
FBW_PACK(fbw_pack_f64, double)
#undef FBW_PACK

/* C (B, w) = e(X (B, K) . W[:, cols]) (see fbw_epi), P = those columns packed by fbw_pack_* at
 * this level */
static void fbw_product_f32(Py_ssize_t B, Py_ssize_t K, const float *X, Py_ssize_t ldx,
                            const float *P, Py_ssize_t w, const fbw_epi *e, float *C,
                            Py_ssize_t ldc) {
#if FBW_X86
    if (fbw_level == 2) { fbw_product__f32_avx512(B, K, X, ldx, P, w, e, C, ldc); return; }
    if (fbw_level == 1) { fbw_product__f32_avx2(B, K, X, ldx, P, w, e, C, ldc); return; }
#endif
    fbw_product__f32_c(B, K, X, ldx, P, w, e, C, ldc);
}

static void fbw_product_f64(Py_ssize_t B, Py_ssize_t K, const double *X, Py_ssize_t ldx,
                            const double *P, Py_ssize_t w, const fbw_epi *e, double *C,
                            Py_ssize_t ldc) {
#if FBW_X86
    if (fbw_level == 2) { fbw_product__f64_avx512(B, K, X, ldx, P, w, e, C, ldc); return; }
    if (fbw_level == 1) { fbw_product__f64_avx2(B, K, X, ldx, P, w, e, C, ldc); return; }
#endif
    fbw_product__f64_c(B, K, X, ldx, P, w, e, C, ldc);
}
