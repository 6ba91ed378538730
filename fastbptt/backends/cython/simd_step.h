/* Small-batch recurrence kernels: the forward and backward loops of the kernel contract with a
 * register-blocked matrix-vector step instead of a BLAS call per step (see kernels.pyx, _use_simd).
 *
 * One source (simd_step_body.h, GCC vector extensions) is compiled three times, each under its own
 * `#pragma GCC target`, so the module needs no global -march flag and still loads on any x86-64:
 *   level 2  "avx512"    AVX-512F + FMA, 512-bit vectors, 32 registers
 *   level 1  "avx2"      AVX2 + FMA, 256-bit vectors, 16 registers
 *   level 0  "portable"  the build's baseline (SSE2 on x86-64; any GCC/Clang target elsewhere)
 * The level is picked at import from the CPU's features (__builtin_cpu_supports) and can be forced
 * (FASTBPTT_SIMD, or _set_simd_level for tests); a level the CPU lacks is refused, never run.
 * tanh stays glibc's (kernels.pyx, fastbptt_tanhf/fastbptt_tanhd): float64 parity needs it.
 */
#ifndef FASTBPTT_SIMD_STEP_H
#define FASTBPTT_SIMD_STEP_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_levels.h"

/* defined in kernels.pyx's own C block (static functions of the same translation unit) */
static void fastbptt_tanhf(float *x, Py_ssize_t n);
static void fastbptt_tanhd(double *x, Py_ssize_t n);
static inline void fb_simd_tanh_float(float *x, ptrdiff_t n) { fastbptt_tanhf(x, n); }
static inline void fb_simd_tanh_double(double *x, ptrdiff_t n) { fastbptt_tanhd(x, n); }

static inline ptrdiff_t fb_simd_active(const int64_t *bs, ptrdiff_t t, ptrdiff_t lo, ptrdiff_t B) {
    /* how many of the B rows starting at batch row lo step t runs on (bs NULL: all) */
    ptrdiff_t n;
    if (bs == NULL) return B;
    n = (ptrdiff_t)bs[t] - lo;
    return n < 0 ? 0 : (n > B ? B : n);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_SIMD_X86 1
#else
#define FB_SIMD_X86 0
#endif

/* glibc's vector tanh (libmvec) where the build links it (setup.py: FASTBPTT_LIBMVEC), as in
 * kernels.pyx: the kernels apply it to the accumulator registers, each level its own width. */
#if FB_SIMD_X86 && defined(FASTBPTT_LIBMVEC) && defined(__GLIBC__) \
    && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#define FB_SIMD_LIBMVEC 1
#include <immintrin.h>
__m128 _ZGVbN4v_tanhf(__m128);
__m128d _ZGVbN2v_tanh(__m128d);
#else
#define FB_SIMD_LIBMVEC 0
#endif

/* ---- level 0: the build's baseline ---- */
#define FB_VBYTES 16
#define FB_BUDGET 8
#define FB_T float
#define FB_IT int32_t
#define FB_SFX _f32_portable
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVbN4v_tanhf((__m128)(v)))
#endif
#include "simd_step_body.h"
#define FB_T double
#define FB_IT int64_t
#define FB_SFX _f64_portable
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVbN2v_tanh((__m128d)(v)))
#endif
#include "simd_step_body.h"
#undef FB_VBYTES
#undef FB_BUDGET

#if FB_SIMD_X86
/* ---- level 1: AVX2 + FMA ---- */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FB_VBYTES 32
#define FB_BUDGET 8
#if FB_SIMD_LIBMVEC
__m256 _ZGVdN8v_tanhf(__m256);
__m256d _ZGVdN4v_tanh(__m256d);
#endif
#define FB_T float
#define FB_IT int32_t
#define FB_SFX _f32_avx2
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVdN8v_tanhf((__m256)(v)))
#endif
#include "simd_step_body.h"
#define FB_T double
#define FB_IT int64_t
#define FB_SFX _f64_avx2
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVdN4v_tanh((__m256d)(v)))
#endif
#include "simd_step_body.h"
#undef FB_VBYTES
#undef FB_BUDGET
#pragma GCC pop_options

/* ---- level 2: AVX-512F + FMA ---- */
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define FB_VBYTES 64
#define FB_BUDGET 16
#if FB_SIMD_LIBMVEC
__m512 _ZGVeN16v_tanhf(__m512);
__m512d _ZGVeN8v_tanh(__m512d);
#endif
#define FB_T float
#define FB_IT int32_t
#define FB_SFX _f32_avx512
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVeN16v_tanhf((__m512)(v)))
#endif
#include "simd_step_body.h"
#define FB_T double
#define FB_IT int64_t
#define FB_SFX _f64_avx512
#if FB_SIMD_LIBMVEC
#define FB_VTANH(v) ((FB_V)_ZGVeN8v_tanh((__m512d)(v)))
#endif
#include "simd_step_body.h"
#undef FB_VBYTES
#undef FB_BUDGET
#pragma GCC pop_options
#endif

static int fb_simd_level = 0;
static int fb_simd_hidden = 0;      /* tests: levels (bit i: level i) treated as missing from the CPU */

static int fb_simd_supported(int level) {
    if (level < 0 || level > 2 || (fb_simd_hidden >> level) & 1) return 0;
    return fb_cpu_has_level(level, 1);
}

static int fb_simd_best(void) {
    return fb_simd_supported(2) ? 2 : fb_simd_supported(1) ? 1 : 0;
}

/* the level in force after asking for `level`: unchanged (and the caller raises) if the CPU lacks it */
static int fb_simd_set_level(int level) {
    if (level >= 0 && level <= 2 && fb_simd_supported(level)) fb_simd_level = level;
    return fb_simd_level;
}

/* The level a call runs at: the level in force caps the instruction set, and a narrower vector is
 * taken while one vector would be more than half of a row (lanes > H/2): at H <= 8 (float32) the
 * 512-bit code spends most lanes on padding, and lost to the 256- and 128-bit code (docs). */
static inline int fb_simd_width(ptrdiff_t H, ptrdiff_t lanes_portable) {
    int level = fb_simd_level;
    while (level > 0 && (lanes_portable << level) > H / 2) level--;
    return level;
}

#if FB_SIMD_X86
#define FB_SIMD_DISPATCH(T, SFX, CALL)                                                               \
    (fb_simd_width(H, 16 / (ptrdiff_t)sizeof(T)) == 2 ? fb_simd_##CALL##_##SFX##_avx512             \
        : fb_simd_width(H, 16 / (ptrdiff_t)sizeof(T)) == 1 ? fb_simd_##CALL##_##SFX##_avx2         \
        : fb_simd_##CALL##_##SFX##_portable)
#else
#define FB_SIMD_DISPATCH(T, SFX, CALL) fb_simd_##CALL##_##SFX##_portable
#endif

static int fb_simd_forward_f32(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const float *A, Py_ssize_t sA,
                               const float *W, float *Hs, Py_ssize_t sH, int act, const int64_t *bs,
                               Py_ssize_t lo) {
    return FB_SIMD_DISPATCH(float, f32, forward)(T, B, H, A, sA, W, Hs, sH, act, bs, lo);
}
static int fb_simd_forward_f64(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const double *A, Py_ssize_t sA,
                               const double *W, double *Hs, Py_ssize_t sH, int act, const int64_t *bs,
                               Py_ssize_t lo) {
    return FB_SIMD_DISPATCH(double, f64, forward)(T, B, H, A, sA, W, Hs, sH, act, bs, lo);
}
static int fb_simd_backward_f32(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const float *G, Py_ssize_t sG,
                                const float *Hs, Py_ssize_t sH, const float *W, Py_ssize_t n_win,
                                const int64_t *ends, const int64_t *bp_starts, int act, float *dZ,
                                Py_ssize_t sZ, const int64_t *bs, Py_ssize_t lo) {
    return FB_SIMD_DISPATCH(float, f32, backward)(T, B, H, G, sG, Hs, sH, W, n_win, ends, bp_starts,
                                                  act, dZ, sZ, bs, lo);
}
static int fb_simd_backward_f64(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const double *G, Py_ssize_t sG,
                                const double *Hs, Py_ssize_t sH, const double *W, Py_ssize_t n_win,
                                const int64_t *ends, const int64_t *bp_starts, int act, double *dZ,
                                Py_ssize_t sZ, const int64_t *bs, Py_ssize_t lo) {
    return FB_SIMD_DISPATCH(double, f64, backward)(T, B, H, G, sG, Hs, sH, W, n_win, ends, bp_starts,
                                                   act, dZ, sZ, bs, lo);
}

#endif /* FASTBPTT_SIMD_STEP_H */
