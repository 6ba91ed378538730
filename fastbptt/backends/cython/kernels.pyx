"""The Cython backend: the two sequential kernels of the contract in :mod:`fastbptt.backends.reference`.

``forward_recurrence`` and ``backward_accumulate`` are ``def`` entry points
that check shapes, allocate the per-call work buffers and release the GIL
around ``cdef ... noexcept nogil`` kernels. One fused ``floating`` source
serves float32 and float64.

Each step's (B, H)·(H, H) product goes either to BLAS (scipy's, through
:mod:`fastbptt.backends.cython.blas`) or, at small shapes where the BLAS call overhead
dominates, to a hand-written loop (``_small_matmul``); see ``_use_small``
for the rule and the measurements behind it. At large H a call splits each step's
columns between threads; from ``MIN_H_FOR_PACKED`` each thread packs its columns
of W once per call and multiplies them with its own loop (wide.h), instead of a
BLAS call that re-packs them every step; with enough rows a thread and a small
enough W (``MAX_W_FOR_PACKED_ROWS``) each thread packs all of W and runs its own
rows instead, with no barrier a step. At B <= 4 (per thread) whole
calls go instead, where they measured faster (``_use_simd``), to the
register-blocked SIMD loops of ``simd_step.h`` (AVX-512, AVX2 or portable,
``SIMD_IMPL``; ``FASTBPTT_SIMD`` forces a level or turns them off). tanh is glibc's: its vector
(libmvec) entry points where the build found them, else libm's scalar
``tanh``/``tanhf`` (``TANH_IMPL`` says which; see the comment above it).
The kernels are single-threaded; the BLAS pool is the caller's business.
"""

from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from fastbptt._threads import row_parts
from fastbptt._validation import check_batch_sizes

from cython cimport floating
from fastbptt.backends.cython.pool cimport part_start, run_parts

from fastbptt.backends.cython.blas cimport BLAS_Trans, NoTrans, _cgemm, _gemm

cimport numpy as cnp
from libc.math cimport exp, expf, fabs, fabsf, log, log1p, log1pf, logf

cnp.import_array()

# tanh and exp (the ce head's softmax) over a contiguous run, in C. Where the
# build found glibc's libmvec (glibc >= 2.35 on x86-64: setup.py defines
# FASTBPTT_LIBMVEC and links -lmvec) it takes glibc's own vector functions --
# the vector-ABI twins of libm's scalar ones, no cruder than them (max error
# measured here: tanhf 1 ulp against libm's 2.4; tanh <= 2 ulp; see
# docs/fused.md for exp) -- 16 (f32) or 8 (f64) lanes at a time on an AVX-512
# CPU (checked at import), else 4 or 2 lanes through the SSE entry points
# every x86-64 has. The tail of a run goes through the same vector call,
# masked or padded, so every element of a run takes the same code. Measured
# per element (Zen 4): tanhf 10.6 ns scalar, 1.16 ns SSE, 0.42 ns AVX-512;
# tanh 9.9 ns scalar, 4.7 ns SSE, 1.75 ns AVX-512 -- at small shapes the
# scalar tanhf was 2/3 of the forward step. Elsewhere: libm's scalar ones.
cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    #if defined(FASTBPTT_LIBMVEC) && defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) \
        && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    #include <immintrin.h>
    __m128 _ZGVbN4v_tanhf(__m128);
    __m128d _ZGVbN2v_tanh(__m128d);
    __m128 _ZGVbN4v_expf(__m128);
    __m128d _ZGVbN2v_exp(__m128d);
    __attribute__((target("avx512f"))) __m512 _ZGVeN16v_tanhf(__m512);
    __attribute__((target("avx512f"))) __m512d _ZGVeN8v_tanh(__m512d);
    __attribute__((target("avx512f"))) __m512 _ZGVeN16v_expf(__m512);
    __attribute__((target("avx512f"))) __m512d _ZGVeN8v_exp(__m512d);

    static int fastbptt_tanh_level = 1;   /* 1: SSE entry points, 2: AVX-512; set once at import */

    static void fastbptt_tanh_init(void) {
        __builtin_cpu_init();
        fastbptt_tanh_level = __builtin_cpu_supports("avx512f") ? 2 : 1;
    }
    static const char *fastbptt_tanh_impl(void) {
        return fastbptt_tanh_level == 2 ? "libmvec-avx512" : "libmvec-sse";
    }
    static int fastbptt_tanh_set_level(int level) {   /* tests: 1 = SSE, 2 = AVX-512 if the CPU has it */
        if (level == 1 || (level == 2 && __builtin_cpu_supports("avx512f"))) fastbptt_tanh_level = level;
        return fastbptt_tanh_level;
    }
    /* fastbptt_<FN>f_avx512/_sse, fastbptt_<FN>d_avx512/_sse and fastbptt_<FN>f/d (the level's) over
       a run of n, for FN = tanh and exp: the tail goes through the same vector call, masked or padded. */
    #define FASTBPTT_VEC_MATH(FN, F512, D512, F128, D128)                                            \
    __attribute__((target("avx512f")))                                                              \
    static void fastbptt_##FN##f_avx512(float *x, Py_ssize_t n) {                                    \
        Py_ssize_t i = 0;                                                                           \
        for (; i + 16 <= n; i += 16)                                                                \
            _mm512_storeu_ps(x + i, F512(_mm512_loadu_ps(x + i)));                                  \
        if (i < n) {                                                                                \
            __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);                                        \
            _mm512_mask_storeu_ps(x + i, m, F512(_mm512_maskz_loadu_ps(m, x + i)));                 \
        }                                                                                           \
    }                                                                                               \
    __attribute__((target("avx512f")))                                                              \
    static void fastbptt_##FN##d_avx512(double *x, Py_ssize_t n) {                                   \
        Py_ssize_t i = 0;                                                                           \
        for (; i + 8 <= n; i += 8)                                                                  \
            _mm512_storeu_pd(x + i, D512(_mm512_loadu_pd(x + i)));                                  \
        if (i < n) {                                                                                \
            __mmask8 m = (__mmask8)((1u << (n - i)) - 1u);                                          \
            _mm512_mask_storeu_pd(x + i, m, D512(_mm512_maskz_loadu_pd(m, x + i)));                 \
        }                                                                                           \
    }                                                                                               \
    static void fastbptt_##FN##f_sse(float *x, Py_ssize_t n) {                                       \
        Py_ssize_t i = 0;                                                                           \
        for (; i + 4 <= n; i += 4)                                                                  \
            _mm_storeu_ps(x + i, F128(_mm_loadu_ps(x + i)));                                        \
        if (i < n) {                                                                                \
            float buf[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                \
            memcpy(buf, x + i, (size_t)(n - i) * sizeof(float));                                    \
            _mm_storeu_ps(buf, F128(_mm_loadu_ps(buf)));                                            \
            memcpy(x + i, buf, (size_t)(n - i) * sizeof(float));                                    \
        }                                                                                           \
    }                                                                                               \
    static void fastbptt_##FN##d_sse(double *x, Py_ssize_t n) {                                      \
        Py_ssize_t i = 0;                                                                           \
        for (; i + 2 <= n; i += 2)                                                                  \
            _mm_storeu_pd(x + i, D128(_mm_loadu_pd(x + i)));                                        \
        if (i < n) {                                                                                \
            double buf[2] = {x[i], 0.0};                                                            \
            _mm_storeu_pd(buf, D128(_mm_loadu_pd(buf)));                                            \
            x[i] = buf[0];                                                                          \
        }                                                                                           \
    }                                                                                               \
    static void fastbptt_##FN##f(float *x, Py_ssize_t n) {                                           \
        if (fastbptt_tanh_level == 2) fastbptt_##FN##f_avx512(x, n); else fastbptt_##FN##f_sse(x, n); \
    }                                                                                               \
    static void fastbptt_##FN##d(double *x, Py_ssize_t n) {                                          \
        if (fastbptt_tanh_level == 2) fastbptt_##FN##d_avx512(x, n); else fastbptt_##FN##d_sse(x, n); \
    }
    FASTBPTT_VEC_MATH(tanh, _ZGVeN16v_tanhf, _ZGVeN8v_tanh, _ZGVbN4v_tanhf, _ZGVbN2v_tanh)
    FASTBPTT_VEC_MATH(exp, _ZGVeN16v_expf, _ZGVeN8v_exp, _ZGVbN4v_expf, _ZGVbN2v_exp)
    #else
    static void fastbptt_tanh_init(void) {}
    static const char *fastbptt_tanh_impl(void) { return "libm"; }
    static int fastbptt_tanh_set_level(int level) { (void)level; return 0; }
    static void fastbptt_tanhf(float *x, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) x[i] = tanhf(x[i]);
    }
    static void fastbptt_tanhd(double *x, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) x[i] = tanh(x[i]);
    }
    static void fastbptt_expf(float *x, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) x[i] = expf(x[i]);
    }
    static void fastbptt_expd(double *x, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) x[i] = exp(x[i]);
    }
    #endif
    """
    void fastbptt_tanh_init() noexcept nogil
    const char *fastbptt_tanh_impl() noexcept nogil
    int fastbptt_tanh_set_level(int level) noexcept nogil
    void fastbptt_tanhf(float *x, Py_ssize_t n) noexcept nogil
    void fastbptt_tanhd(double *x, Py_ssize_t n) noexcept nogil
    void fastbptt_expf(float *x, Py_ssize_t n) noexcept nogil
    void fastbptt_expd(double *x, Py_ssize_t n) noexcept nogil


fastbptt_tanh_init()

# The small-batch kernels (B <= 4): the forward and backward loops with a register-blocked
# matrix-vector step in place of a BLAS call per step, for AVX-512, AVX2 or the portable
# baseline, picked at import from the CPU (see simd_step.h and ``_use_simd``).
cdef extern from "simd_step.h":
    int fb_simd_level
    int fb_simd_hidden
    int fb_simd_best() noexcept nogil
    int fb_simd_supported(int level) noexcept nogil
    int fb_simd_set_level(int level) noexcept nogil
    int fb_simd_forward_f32(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const float *A, Py_ssize_t sA,
                            const float *W, float *Hs, Py_ssize_t sH, int act, const int64_t *bs,
                            Py_ssize_t lo) noexcept nogil
    int fb_simd_forward_f64(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const double *A, Py_ssize_t sA,
                            const double *W, double *Hs, Py_ssize_t sH, int act, const int64_t *bs,
                            Py_ssize_t lo) noexcept nogil
    int fb_simd_backward_f32(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const float *G, Py_ssize_t sG,
                             const float *Hs, Py_ssize_t sH, const float *W, Py_ssize_t n_win,
                             const int64_t *ends, const int64_t *bp_starts, int act, float *dZ,
                             Py_ssize_t sZ, const int64_t *bs, Py_ssize_t lo) noexcept nogil
    int fb_simd_backward_f64(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const double *G, Py_ssize_t sG,
                             const double *Hs, Py_ssize_t sH, const double *W, Py_ssize_t n_win,
                             const int64_t *ends, const int64_t *bp_starts, int act, double *dZ,
                             Py_ssize_t sZ, const int64_t *bs, Py_ssize_t lo) noexcept nogil

#: the instruction sets of the small-batch kernels, by level (``SIMD_IMPL`` is the one in force)
SIMD_LEVELS = ("portable", "avx2", "avx512")
_SIMD_NEEDS = {"portable": "nothing", "avx2": "AVX2 and FMA", "avx512": "AVX-512F and FMA"}


cdef bint _simd_on = True      # False: "auto" never picks the small-batch kernels (FASTBPTT_SIMD=off)


def _set_simd_level(name):
    """Run the small-batch kernels on ``name`` ("avx512", "avx2", "portable" or "auto": the best
    the CPU has), or never pick them ("off"); returns the name now in force (``SIMD_IMPL``).

    Raises ValueError for another name and RuntimeError for a level this CPU lacks (nothing
    changes then). Not thread-safe: call it only when no kernel runs (tests, or at import from
    ``FASTBPTT_SIMD``).
    """
    global SIMD_IMPL, _simd_on
    key = str(name).strip().lower()
    if key == "off":
        _simd_on = False
        SIMD_IMPL = "off"
        return SIMD_IMPL
    if key == "auto":
        level = fb_simd_best()
    elif key in SIMD_LEVELS:
        level = SIMD_LEVELS.index(key)
    else:
        raise ValueError(f"SIMD level: expected one of 'auto', 'avx512', 'avx2', 'portable', 'off', "
                         f"got {name!r}")
    if not fb_simd_supported(level):
        have = [lv for i, lv in enumerate(SIMD_LEVELS) if fb_simd_supported(i)]
        raise RuntimeError(f"SIMD level {key!r} needs {_SIMD_NEEDS[key]}, which this CPU (or this "
                           f"build) lacks; available here: {', '.join(have)}")
    fb_simd_set_level(level)
    _simd_on = True
    SIMD_IMPL = SIMD_LEVELS[fb_simd_level]
    return SIMD_IMPL


def _hide_simd_levels(names):
    """Tests only: treat the levels ``names`` as missing from the CPU (as on an older CPU), so that
    forcing one raises and "auto" takes the best of the others; ``()`` undoes it. Does not change
    the level in force: call ``_set_simd_level`` after it."""
    global fb_simd_hidden
    fb_simd_hidden = sum(1 << SIMD_LEVELS.index(name) for name in names)


def _simd_from_env():
    """The level at import: ``FASTBPTT_SIMD`` (auto, avx512, avx2, portable or off), else the best."""
    import os
    value = os.environ.get("FASTBPTT_SIMD", "auto")
    try:
        return _set_simd_level(value or "auto")
    except (ValueError, RuntimeError) as exc:
        raise type(exc)(f"FASTBPTT_SIMD={value!r}: {exc}") from None


#: which instruction set the small-batch kernels use: "avx512", "avx2" or "portable"; "off": none
SIMD_IMPL = _simd_from_env()

# The small-shape product on AVX-512 (x86-64, checked at import): per batch row and block of 16
# (f32) or 8 (f64) outputs, eight independent accumulators over the contraction index -- the
# SSE2 loop below has one chain of dependent adds per output, and lost to a BLAS call from
# B·H = 16 up. Sums in another order than BLAS (and with fused multiply-adds): within the
# parity tolerances like any BLAS kernel.
cdef extern from *:
    """
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    static int fastbptt_mv_level = 0;          /* 2: the AVX-512 product is used */
    static void fastbptt_mv_init(void) {
        __builtin_cpu_init();
        fastbptt_mv_level = __builtin_cpu_supports("avx512f") ? 2 : 0;
    }
    static int fastbptt_mv_set_level(int level) {   /* tests: 0 = the portable loop, 2 = AVX-512 */
        if (level == 0 || (level == 2 && __builtin_cpu_supports("avx512f"))) fastbptt_mv_level = level;
        return fastbptt_mv_level;
    }
    #define FB_MV_BODY(VEC, MASK, LANES, SET1, FMA, ADD, LOADZ, STORE, ZERO, FULL, T)          \
        for (Py_ssize_t b = 0; b < B; b++) {                                                     \
            const T *x = X + b * H;                                                              \
            T *c = C + b * H;                                                                    \
            for (Py_ssize_t j = 0; j < H; j += LANES) {                                          \
                MASK m = (H - j >= LANES) ? (MASK)FULL : (MASK)((1u << (H - j)) - 1u);          \
                VEC a0 = acc ? LOADZ(m, c + j) : ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO(); \
                VEC a4 = ZERO(), a5 = ZERO(), a6 = ZERO(), a7 = ZERO();                          \
                const T *w = W + j;                                                              \
                Py_ssize_t i = 0;                                                                \
                for (; i + 8 <= H; i += 8, w += 8 * H) {                                         \
                    a0 = FMA(SET1(x[i]), LOADZ(m, w), a0);                                       \
                    a1 = FMA(SET1(x[i + 1]), LOADZ(m, w + H), a1);                               \
                    a2 = FMA(SET1(x[i + 2]), LOADZ(m, w + 2 * H), a2);                           \
                    a3 = FMA(SET1(x[i + 3]), LOADZ(m, w + 3 * H), a3);                           \
                    a4 = FMA(SET1(x[i + 4]), LOADZ(m, w + 4 * H), a4);                           \
                    a5 = FMA(SET1(x[i + 5]), LOADZ(m, w + 5 * H), a5);                           \
                    a6 = FMA(SET1(x[i + 6]), LOADZ(m, w + 6 * H), a6);                           \
                    a7 = FMA(SET1(x[i + 7]), LOADZ(m, w + 7 * H), a7);                           \
                }                                                                                \
                for (; i < H; i++, w += H) a0 = FMA(SET1(x[i]), LOADZ(m, w), a0);                \
                a0 = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));          \
                STORE(c + j, m, a0);                                                             \
            }                                                                                    \
        }
    __attribute__((target("avx512f")))
    static void fastbptt_mv_f32(Py_ssize_t B, Py_ssize_t H, const float *X, const float *W,
                                int acc, float *C) {
        FB_MV_BODY(__m512, __mmask16, 16, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
                   _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps, _mm512_setzero_ps, 0xFFFFu, float)
    }
    __attribute__((target("avx512f")))
    static void fastbptt_mv_f64(Py_ssize_t B, Py_ssize_t H, const double *X, const double *W,
                                int acc, double *C) {
        FB_MV_BODY(__m512d, __mmask8, 8, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_add_pd,
                   _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd, _mm512_setzero_pd, 0xFFu, double)
    }
    #else
    static int fastbptt_mv_level = 0;
    static void fastbptt_mv_init(void) {}
    static int fastbptt_mv_set_level(int level) { (void)level; return 0; }
    static void fastbptt_mv_f32(Py_ssize_t B, Py_ssize_t H, const float *X, const float *W,
                                int acc, float *C) {}
    static void fastbptt_mv_f64(Py_ssize_t B, Py_ssize_t H, const double *X, const double *W,
                                int acc, double *C) {}
    #endif
    """
    int fastbptt_mv_level
    void fastbptt_mv_init() noexcept nogil
    int fastbptt_mv_set_level(int level) noexcept nogil
    void fastbptt_mv_f32(Py_ssize_t B, Py_ssize_t H, const float *X, const float *W, int acc,
                         float *C) noexcept nogil
    void fastbptt_mv_f64(Py_ssize_t B, Py_ssize_t H, const double *X, const double *W, int acc,
                         double *C) noexcept nogil


fastbptt_mv_init()

# The packed column split (``_split_mode`` 2): each thread packs its columns of W once per call
# and multiplies them with its own register-blocked loop at every step; see wide.h.
cdef extern from "wide.h":
    int fbw_level
    void fbw_init() noexcept nogil
    int fbw_set_level(int level) noexcept nogil
    const char *fbw_impl() noexcept nogil
    Py_ssize_t fbw_panel(int is_double) noexcept nogil
    void fbw_pack_f32(Py_ssize_t K, const float *W, Py_ssize_t ld, Py_ssize_t w, Py_ssize_t nr,
                      float *P) noexcept nogil
    void fbw_pack_f64(Py_ssize_t K, const double *W, Py_ssize_t ld, Py_ssize_t w, Py_ssize_t nr,
                      double *P) noexcept nogil
    enum: FBW_SET, FBW_INIT, FBW_DZ_TANH, FBW_DZ_RELU
    ctypedef struct fbw_epi:
        int kind
        const void *A
        const void *Hh
        void *dZ
        Py_ssize_t ld
    void fbw_product_f32(Py_ssize_t B, Py_ssize_t K, const float *X, Py_ssize_t ldx, const float *P,
                         Py_ssize_t w, const fbw_epi *e, float *C, Py_ssize_t ldc) noexcept nogil
    void fbw_product_f64(Py_ssize_t B, Py_ssize_t K, const double *X, Py_ssize_t ldx,
                         const double *P, Py_ssize_t w, const fbw_epi *e, double *C,
                         Py_ssize_t ldc) noexcept nogil


fbw_init()

NAME = "cython"

#: the kernels release the GIL, so :mod:`fastbptt.engine.core` may run them on disjoint batch ``rows``
#: from several threads at once
SPLITS_BATCH = True


#: a call on several threads splits the columns of every step, not the rows, from this hidden
#: size with 16 rows per thread, and from twice it always (see ``_forward_cols``). Measured,
#: float32, 2 threads, forward / backward ms by rows vs by columns: T=100, B=128, H=1024:
#: 259 / 283 vs 212 / 265; T=200, B=64, H=512: 87 / 88 vs 74 / 60; T=100, B=8, H=1024:
#: 47 / 56 vs 29 / 32; T=100, B=16, H=512: 15 / 22 vs 19 / 22; T=200, B=64, H=256:
#: 22 / 22 vs 23 / 25; T=2000, B=16, H=128: 9 / 13 vs 24 / 32.
MIN_H_FOR_COLUMN_SPLIT = 512

#: "auto" takes the packed column split (``_split_mode`` 2, wide.h; AVX-512 only) from this hidden
#: size on any thread count, and on one thread from ``MIN_H_FOR_PACKED_ONE_THREAD`` with 8 rows or
#: more (on 2 threads below H=512 its barrier per step of a few µs of work lost to the row split).
#: Measured, float32, forward / backward, BLAS split over packed, timed in turns
#: (benchmarks/test_bench_kernels_wide.py, docs/kernels_wide.md): T=300, B=20, H=800: 2.5 / 2.4
#: on 1 thread, 4.2 / 4.5 on 2; T=100, B=128, H=1024: 1.4 / 1.4 and 1.5 / 1.6.
MIN_H_FOR_PACKED = 512
MIN_H_FOR_PACKED_ONE_THREAD = 128

#: where "auto" packs on several threads, it splits the rows instead of the columns (each thread
#: with a copy of all of W_hh, no barrier a step) with 8 rows a thread or more while W_hh takes at
#: most ``MAX_W_FOR_PACKED_ROWS`` bytes, or 32 rows a thread up to 4 times that. Measured on 2
#: threads, T=100-300, rows over columns, forward / backward: f32 B=64, H=256: 0.65 / 0.75;
#: B=32, H=384: 0.77 / 0.80; B=64, H=512: 0.83 / 0.84; B=20, H=512: 0.82 / 0.89; B=64, H=800:
#: 0.93 / 0.93; B=128, H=1024: 0.98 / 0.95; but B=20, H=800: 1.07 / 1.05 and B=32, H=1024:
#: 1.08 / 1.11. f64 B=64, H=256: 0.78 / 0.72; B=128, H=512: 0.99 / 0.93; B=20, H=512: 1.02 / 1.10.
MAX_W_FOR_PACKED_ROWS = 1 << 20

#: the packed backward makes dz_{t-1} as its product finishes each block (``FBW_DZ_*``) where a
#: thread's slice of W_hh takes at most this many bytes; beyond, in a pass of its own as the BLAS
#: split does. Measured (f32, backward, pass over fused, best of 7): 2 threads at H = 256-800
#: (slices of 0.13-1.28 MB) 0.83-0.95; H = 896, 960, 1024 (1.6-2 MB) 1.02-1.09; 1 thread 0.99-1.02.
cdef Py_ssize_t _max_fused_dz_slice = 1310720
MAX_SLICE_FOR_FUSED_DZ = _max_fused_dz_slice
cdef int _fused_dz_mode = -1        # tests: 1 always, 0 never, -1 by MAX_SLICE_FOR_FUSED_DZ

#: ``threads=n`` splits the rows between n threads of fastbptt's C team (:mod:`fastbptt.backends.cython.pool`:
#: a hand-off there costs ~1 µs, against ~20-100 µs on a pool of Python threads)
TEAM = True

#: which tanh the kernels use: "libmvec-avx512", "libmvec-sse" or "libm" (see above)
TANH_IMPL = fastbptt_tanh_impl().decode()

#: which loop the packed column split uses: "avx512", "avx2" or "portable" (see wide.h)
WIDE_IMPL = fbw_impl().decode()

ACT_TANH = 0
ACT_RELU = 1



cdef inline bint _use_small(Py_ssize_t B, Py_ssize_t H) noexcept nogil:
    """Whether the per-step product goes to the hand-written loop rather than BLAS.

    Measured (2 x Zen 4, scipy's OpenBLAS, 1 thread, gcc -O3 -funroll-loops
    with the portable x86-64 baseline, i.e. SSE2 vectors; forward + full
    backward with relu so the product dominates; best of 9, T = 2000; ratio =
    BLAS time / small-loop time, > 1 means the loop wins)::

                 H=4   H=8   H=12  H=16  H=24  H=32  H=64
        f32 B=1  2.09  1.75  1.46  1.36  1.23  0.77  0.44
        f32 B=2  1.64  1.22  0.95  0.84  0.74  0.49  0.36
        f32 B=4  1.28  0.91  0.71  0.60  0.57  0.42  0.32
        f64 B=1  2.21  1.69  1.55  1.19  0.94  0.69  0.64
        f64 B=2  1.77  1.11  0.98  0.74  0.60  0.42  0.40
        f64 B=4  1.36  0.80  0.75  0.58  0.50  0.39  0.35

    The crossover sits at B·H ≈ 16 for both dtypes: below it the ~50 ns of a
    BLAS call (argument checks, kernel dispatch) is most of the step; above
    it OpenBLAS's AVX-512 kernels beat the SSE2 loop.

    Where the CPU has AVX-512 the loop is the one in ``fastbptt_mv_f32/f64``
    (eight accumulators per block of outputs); the same measurement, relu,
    best of 30, T = 2000, ratio BLAS / AVX-512 loop::

                 H=8   H=16  H=32  H=64  H=128
        f32 B=1  1.67  1.95  0.92  0.98  0.68
        f32 B=2  1.51  1.37  0.74  0.53  0.42
        f32 B=4  1.20  1.06  0.69  0.56  0.33
        f64 B=1  1.72  1.50  0.99  0.90  0.59
        f64 B=2  1.65  1.24  0.69  0.66  0.34
        f64 B=4  1.28  0.92  0.55  0.62  0.28

    so with it the loop takes H <= 16 up to B·H = 32.
    """
    if fastbptt_mv_level == 2:
        return H <= 16 and B * H <= 32
    return B * H <= 16


cdef inline bint _use_simd(Py_ssize_t B, Py_ssize_t H, bint is_double) noexcept nogil:
    """Whether a part of B rows runs on the small-batch SIMD kernels (simd_step.h) rather than
    ``_forward``/``_backward`` (BLAS or the small loop, as ``_use_small`` picks).

    Only where they won in docs/kernels_simd.md (paired timings of forward + backward, tanh,
    against that per-step path): at B = 1 always (the BLAS call per step is most of the step),
    at B = 2..4 unless OpenBLAS's own small kernels tie or win (B = 2 beyond H = 48 / 24, float64
    at H = 5..8 and at B = 3 below H = 128). The AVX2 rule is from the AVX2 code on Zen 4; never
    at the portable level.
    """
    if B > 4:                   # f32 on AVX-512 (Xeon; docs/kernels_simd.md): 1.07-1.6x BLAS's per-step
        return fb_simd_level == 2 and not is_double and (H <= 64 or (H <= 128 and B <= 16))  # product
    if B < 1 or fb_simd_level == 0:
        return False
    if fb_simd_level == 1:
        return B == 1 or H <= 4 or (not is_double and 16 <= H <= 24)
    if B == 1 or H <= 4:
        return True
    if H <= 8:
        return not is_double
    if B == 2:
        return H <= (24 if is_double else 48)
    if B == 3 and is_double:
        return H >= 128
    return True


cdef inline void _small_matmul(Py_ssize_t B, Py_ssize_t H, const floating *X,
                               const floating *W, bint accumulate,
                               floating *C) noexcept nogil:
    """``C (B, H) = [C +] X (B, H) · W (H, H)``, all row-major, for small shapes.

    The contraction index i is the outer loop and the output index j the inner
    one, over contiguous rows of ``W`` and ``C``, so the compiler vectorises
    the j loop. Four rows of ``W`` are taken per pass over ``C`` to cut its
    loads and stores by four.
    """
    if fastbptt_mv_level == 2:
        if floating is float:
            fastbptt_mv_f32(B, H, X, W, accumulate, C)
        else:
            fastbptt_mv_f64(B, H, X, W, accumulate, C)
        return
    cdef Py_ssize_t b, i, j
    cdef const floating *x
    cdef const floating *w0
    cdef const floating *w1
    cdef const floating *w2
    cdef const floating *w3
    cdef floating *c
    cdef floating x0, x1, x2, x3
    for b in range(B):
        x = X + b * H
        c = C + b * H
        if not accumulate:
            memset(c, 0, H * sizeof(floating))
        i = 0
        while i + 4 <= H:
            x0 = x[i]
            x1 = x[i + 1]
            x2 = x[i + 2]
            x3 = x[i + 3]
            w0 = W + i * H
            w1 = w0 + H
            w2 = w1 + H
            w3 = w2 + H
            for j in range(H):
                c[j] = c[j] + (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j])
            i += 4
        while i < H:
            x0 = x[i]
            w0 = W + i * H
            for j in range(H):
                c[j] = c[j] + x0 * w0[j]
            i += 1


cdef inline void _step_product(bint small, Py_ssize_t B, Py_ssize_t H, const floating *X,
                               const floating *W, bint accumulate, floating *C) noexcept nogil:
    """``C = [C +] X·W`` for (B, H)·(H, H), by the small-shape loop or by BLAS."""
    if small:
        _small_matmul(B, H, X, W, accumulate, C)
    else:
        _gemm(NoTrans, NoTrans, <int> B, <int> H, <int> H, <floating> 1.0, X, <int> H,
              W, <int> H, <floating> (1.0 if accumulate else 0.0), C, <int> H)


cdef inline void _activate(Py_ssize_t n, int act, floating *h) noexcept nogil:
    """``h = f(h)`` in place: glibc's tanh (see ``TANH_IMPL``), or relu."""
    cdef Py_ssize_t e
    if act == 0:
        if floating is float:
            fastbptt_tanhf(h, n)
        else:
            fastbptt_tanhd(h, n)
    else:
        for e in range(n):              # a select, not a branch, so it vectorises
            h[e] = h[e] if h[e] > 0 else 0


cdef inline Py_ssize_t _active(const int64_t *bs, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t B) noexcept nogil:
    """How many of the B rows starting at batch row ``lo`` step t runs on (``bs`` NULL: all)."""
    cdef Py_ssize_t n
    if bs == NULL:
        return B
    n = bs[t] - lo
    return 0 if n < 0 else (B if n > B else n)


cdef void _forward(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const floating *A, Py_ssize_t sA,
                   const floating *W_hhT, floating *Hs, Py_ssize_t sH, int act,
                   bint small, const int64_t *bs, Py_ssize_t lo) noexcept nogil:
    """Hs[t+1] = f(A[t] + Hs[t]·W_hhT): A[t] is copied in and is the beta=1 accumulator.

    ``sA``/``sH`` are the time strides (elements) of ``A``/``Hs``; each step is a
    C-contiguous (B, H) block (the rows lo..lo+B of a larger batch), of which step t
    runs on the rows still active (``bs``, see :func:`_active`).
    """
    cdef Py_ssize_t t, n
    for t in range(T):
        n = _active(bs, t, lo, B)
        if n == 0:
            break
        memcpy(Hs + (t + 1) * sH, A + t * sA, n * H * sizeof(floating))
        _step_product(small, n, H, Hs + t * sH, W_hhT, True, Hs + (t + 1) * sH)
        _activate(n * H, act, Hs + (t + 1) * sH)


cdef inline void _dz_step(Py_ssize_t n, int act, const floating *carried, bint has_carried,
                          const floating *g, bint inject, const floating *h,
                          floating *dz, floating *dZt) noexcept nogil:
    """δ = [carried] + [G[t]];  dz = δ ⊙ f'(from h);  dZ[t] += dz, or dZ[t] = dz on a loss step.

    A window's own loss steps (``inject``) lie in no earlier window, so dZ[t] is
    written there, not added to (no pass to zero dZ first); other steps it
    reaches were written by an earlier window already.
    """
    cdef Py_ssize_t e
    cdef floating d, hv
    for e in range(n):
        if has_carried and inject:
            d = carried[e] + g[e]
        elif has_carried:
            d = carried[e]
        elif inject:
            d = g[e]
        else:
            d = 0
        hv = h[e]
        if act == 0:
            d = d * (1 - hv * hv)
        else:
            d = d if hv > 0 else 0
        dz[e] = d
        if inject:
            dZt[e] = d
        else:
            dZt[e] += d


cdef void _backward(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, const floating *G, Py_ssize_t sG,
                    const floating *Hs, Py_ssize_t sH, const floating *W_hh, Py_ssize_t n_win,
                    const int64_t *ends, const int64_t *bp_starts, int act,
                    floating *dZ, Py_ssize_t sZ, floating *carried, floating *dz,
                    bint small, const int64_t *bs, Py_ssize_t lo) noexcept nogil:
    """Fill dZ with Σ_windows dz_t; ``carried`` and ``dz`` are (B, H) work buffers.

    ``sG``/``sH``/``sZ`` are time strides (elements); each step is a C-contiguous (B, H) block,
    of which step t runs on the rows still active (see :func:`_forward`).
    """
    cdef Py_ssize_t BH = B * H, w, t, n, n_carried, end, bp_start, loss_start = 0
    for w in range(n_win):
        end = ends[w]
        bp_start = bp_starts[w]
        for t in range(loss_start, bp_start):       # steps in no window: zero
            memset(dZ + t * sZ, 0, BH * sizeof(floating))
        n_carried = 0
        t = end - 1
        while t >= bp_start:
            n = _active(bs, t, lo, B)
            if n_carried and n > n_carried:     # rows at their own last step: δ starts at zero
                memset(carried + n_carried * H, 0, (n - n_carried) * H * sizeof(floating))
            _dz_step(n * H, act, carried, n_carried > 0, G + t * sG, t >= loss_start,
                     Hs + (t + 1) * sH, dz, dZ + t * sZ)
            n_carried = 0
            if t > bp_start and n > 0:  # δ_{t-1} = W_hhᵀ dz_t, i.e. dz_t · W_hh by rows
                _step_product(small, n, H, dz, W_hh, False, carried)
                n_carried = n
            t -= 1
        loss_start = end
    for t in range(loss_start, T):                  # after the last window (none by contract)
        memset(dZ + t * sZ, 0, BH * sizeof(floating))


# ---------------------------------------------------------------------------------------------
# the column split: at large H each thread of the team computes some columns of every step
# ---------------------------------------------------------------------------------------------
# A batch split gives each thread (B/n, H)·(H, H) per step, and OpenBLAS packs the whole (H, H)
# operand on every call for only B/n rows. Split by columns, each thread computes (B, H)·(H, H/n):
# half the packing per row. Measured (one core, numpy's sgemm): (64, 1024)·(1024, 1024) 1788 µs
# against (128, 1024)·(1024, 512) 1476 µs; (32, 256)·(256, 256) 52 µs against
# (64, 256)·(256, 128) 47 µs. Every step then needs the whole h_t (or dz_t) of the others: one
# barrier per step (the team's threads spin: ~0.1-0.3 µs).

cdef extern from *:
    """
    typedef struct { long count; long sense; long n; } fb_barrier;
    static void fb_barrier_wait(fb_barrier *b, long *local_sense) {
        long s = !*local_sense;
        *local_sense = s;
        if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
            __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&b->sense, s, __ATOMIC_RELEASE);
        } else {
            unsigned k = 0;
            while (__atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != s) {
    #if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
    #endif
                if ((++k & 1023u) == 0) sched_yield();
            }
        }
    }
    """
    ctypedef struct fb_barrier:
        long count
        long sense
        long n
    void fb_barrier_wait(fb_barrier *b, long *local_sense) noexcept nogil


cdef inline void _cols_product(Py_ssize_t n, Py_ssize_t w, Py_ssize_t H, const floating *X,
                              const floating *W, const floating *P, fbw_epi *e,
                              floating *C) noexcept nogil:
    """``C[:, :w] = e(X·W[:, :w])`` for n rows (row strides H; ``e`` as in wide.h): with ``P`` (not
    NULL) by the packed loop of wide.h on those columns of W packed once per call, else by BLAS
    (``e.kind`` FBW_SET or FBW_INIT only)."""
    cdef Py_ssize_t b
    if P != NULL:
        if floating is float:
            fbw_product_f32(n, H, X, H, P, w, e, C, H)
        else:
            fbw_product_f64(n, H, X, H, P, w, e, C, H)
        return
    if e.kind == FBW_INIT:
        for b in range(n):
            memcpy(C + b * H, <const floating *> e.A + b * e.ld, w * sizeof(floating))
    _gemm(NoTrans, NoTrans, <int> n, <int> w, <int> H, <floating> 1.0, X, <int> H, W, <int> H,
          <floating> (0.0 if e.kind == FBW_SET else 1.0), C, <int> H)


cdef inline void _cols_pack(Py_ssize_t H, Py_ssize_t w, const floating *W, floating *P,
                            Py_ssize_t nr) noexcept nogil:
    """Pack the columns ``W[:, :w]`` (row stride H) into ``P`` in panels of ``nr`` (no-op if NULL):
    by the thread that will read them, so they start out in its cache."""
    if P != NULL:
        if floating is float:
            fbw_pack_f32(H, W, H, w, nr, P)
        else:
            fbw_pack_f64(H, W, H, w, nr, P)


cdef void _forward_cols(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t j0, Py_ssize_t j1,
                        const floating *A, Py_ssize_t sA, const floating *W_hhT, floating *Hs,
                        Py_ssize_t sH, int act, fb_barrier *barrier, const int64_t *bs,
                        Py_ssize_t lo, floating *P, Py_ssize_t nr) noexcept nogil:
    """Columns [j0, j1) of every step of :func:`_forward` (rows of A and Hs: H apart); with ``P``
    (not NULL) the product is the packed loop's (see ``_cols_product``). ``barrier`` NULL: the
    only part on these rows (every column)."""
    cdef Py_ssize_t t, b, n, w = j1 - j0
    cdef long sense = 0
    cdef floating *h
    cdef fbw_epi e
    e.kind = FBW_INIT           # h_t = A[t] + h_{t-1}·W_hhT, then activated
    e.Hh = NULL
    e.dZ = NULL
    e.ld = H
    _cols_pack(H, w, W_hhT + j0, P, nr)
    for t in range(T):
        n = _active(bs, t, lo, B)               # the same for every thread: they all stop together
        if n == 0:
            break
        h = Hs + (t + 1) * sH
        e.A = A + t * sA + j0
        _cols_product(n, w, H, Hs + t * sH, W_hhT + j0, P, &e, h + j0)
        for b in range(n):
            _activate(w, act, h + b * H + j0)
        if barrier != NULL:
            fb_barrier_wait(barrier, &sense)    # h_t complete before anyone reads it


cdef void _backward_cols(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t j0, Py_ssize_t j1,
                         const floating *G, Py_ssize_t sG, const floating *Hs, Py_ssize_t sH,
                         const floating *W_hh, Py_ssize_t n_win, const int64_t *ends,
                         const int64_t *bp_starts, int act, floating *dZ, Py_ssize_t sZ,
                         floating *carried, floating *dz2, fb_barrier *barrier, const int64_t *bs,
                         Py_ssize_t lo, floating *P, Py_ssize_t nr) noexcept nogil:
    """Columns [j0, j1) of :func:`_backward`; ``dz2`` holds two (B, H) buffers, used in turn;
    ``P`` as in :func:`_forward_cols`.

    Step t writes its columns of dz into buffer t % 2, waits for the others', and reads all
    of it for its columns of δ_{t-1}; a thread writes a buffer again only after a barrier every
    thread passed once done reading it (the last step of a window has no product, so a window
    ends with a barrier of its own). The packed loop makes dz_{t-1} from δ_{t-1} as it finishes
    each block (into the other buffer, and dZ), where BLAS leaves δ_{t-1} in ``carried`` for the
    next step's pass.
    """
    cdef Py_ssize_t w_ = j1 - j0, win, t, b, n, n_carried, n_done, end, bp_start, loss_start = 0, k = 0
    cdef long sense = 0
    cdef floating *dz
    cdef bint fused = P != NULL and (_fused_dz_mode == 1 or (
        _fused_dz_mode == -1 and H * w_ * <Py_ssize_t> sizeof(floating) <= _max_fused_dz_slice))
    cdef fbw_epi e
    e.kind = (FBW_DZ_TANH if act == 0 else FBW_DZ_RELU) if fused else FBW_SET
    e.A = NULL
    e.Hh = NULL
    e.dZ = NULL
    e.ld = H
    _cols_pack(H, w_, W_hh + j0, P, nr)
    for win in range(n_win):
        end = ends[win]
        bp_start = bp_starts[win]
        for t in range(loss_start, bp_start):       # steps in no window: zero
            for b in range(B):
                memset(dZ + t * sZ + b * H + j0, 0, w_ * sizeof(floating))
        n_carried = 0
        n_done = 0                                  # rows whose dz_t the last product made
        t = end - 1
        while t >= bp_start:
            n = _active(bs, t, lo, B)
            dz = dz2 + (k % 2) * B * H
            k += 1
            for b in range(n_done, n):
                _dz_step(w_, act, carried + b * H + j0, b < n_carried, G + t * sG + b * H + j0,
                         t >= loss_start, Hs + (t + 1) * sH + b * H + j0, dz + b * H + j0,
                         dZ + t * sZ + b * H + j0)
            n_carried = 0
            n_done = 0
            if t > bp_start and n > 0:
                if barrier != NULL:
                    fb_barrier_wait(barrier, &sense)    # dz_t complete
                if fused:                           # dz_{t-1} for these n rows, into the other buffer
                    e.A = G + (t - 1) * sG + j0 if t - 1 >= loss_start else NULL
                    e.Hh = Hs + t * sH + j0
                    e.dZ = dZ + (t - 1) * sZ + j0
                    _cols_product(n, w_, H, dz, W_hh + j0, P, &e, dz2 + (k % 2) * B * H + j0)
                    n_done = n
                else:
                    _cols_product(n, w_, H, dz, W_hh + j0, P, &e, carried + j0)
                    n_carried = n
            t -= 1
        loss_start = end
        if barrier != NULL:                 # the window's last products read before the next writes
            fb_barrier_wait(barrier, &sense)
    for t in range(loss_start, T):                  # after the last window (none by contract)
        for b in range(B):
            memset(dZ + t * sZ + b * H + j0, 0, w_ * sizeof(floating))


def _check_act(int act):
    if act != 0 and act != 1:
        raise ValueError(f"act: expected ACT_TANH (0) or ACT_RELU (1), got {act}")


cdef _check_windows(const int64_t[::1] ends, const int64_t[::1] bp_starts, Py_ssize_t T):
    """ValueError unless the windows are as the kernel contract says (see backward_accumulate)."""
    cdef Py_ssize_t n_win = ends.shape[0], i, prev = 0
    if bp_starts.shape[0] != n_win:
        raise ValueError(f"bp_starts: expected shape ({n_win},) like ends, got ({bp_starts.shape[0]},)")
    for i in range(n_win):
        if not (prev < ends[i] <= T) or not (0 <= bp_starts[i] < ends[i]):
            raise ValueError(
                f"ends, bp_starts: expected 0 < ends[0] < ... <= T={T} and 0 <= bp_starts[i] < ends[i], "
                f"got ends[{i}]={ends[i]}, bp_starts[{i}]={bp_starts[i]} (previous end {prev})")
        prev = ends[i]


def _rows(rows, Py_ssize_t B):
    """``rows`` -> (b0, b1): the batch rows a kernel call computes (all of them if None)."""
    if rows is None:
        return 0, B
    b0, b1 = int(rows[0]), int(rows[1])
    if not 0 <= b0 < b1 <= B:
        raise ValueError(f"rows: expected (b0, b1) with 0 <= b0 < b1 <= B={B}, got {rows!r}")
    return b0, b1


def _work_bounds(bs, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t n, bint cols):
    """A variable-length batch split by rows: ``n`` parts of near-equal work (None: equal rows)."""
    if bs is None or cols or n < 2:
        return None
    ranges = row_parts(bs, b0, b1, n)
    if len(ranges) != n:        # fewer rows with work than parts: equal row counts
        return None
    return np.array([r[0] for r in ranges] + [b1], dtype=np.int64)


cdef struct _Job:
    # one kernel call, split by rows (or, with cols, by columns) between the team's threads
    Py_ssize_t T, H, stride, b0, rows, n_win
    int act
    bint small, is_double, cols
    bint simd                   # the rows go to the small-batch kernels of simd_step.h
    fb_barrier *barrier
    const void *A
    const void *W
    const void *G
    void *Hs
    void *dZ
    void *carried
    void *dz
    const int64_t *ends
    const int64_t *bp_starts
    const int64_t *bs
    const int64_t *bounds       # the parts' first rows (n + 1, absolute), or NULL: equal row counts
    void *P                     # W's columns packed in panels of nr (wide.h), or NULL: BLAS
    Py_ssize_t nr               # > 0: packed (by columns, or with cols False by rows: a copy a part)
    Py_ssize_t n                # parts


cdef inline Py_ssize_t _col_part(_Job *j, Py_ssize_t p, Py_ssize_t n, Py_ssize_t *j1) noexcept nogil:
    """Columns [j0, *j1) of part p of a column split (returned: j0); packed, whole panels each."""
    cdef Py_ssize_t panels
    if j.P == NULL:
        j1[0] = part_start(p + 1, n, j.H)
        return part_start(p, n, j.H)
    panels = (j.H + j.nr - 1) // j.nr
    j1[0] = min(part_start(p + 1, n, panels) * j.nr, j.H)
    return part_start(p, n, panels) * j.nr


cdef inline void *_col_panels(_Job *j, Py_ssize_t j0) noexcept nogil:
    """Where the packed panels from column j0 start (NULL without packing)."""
    if j.P == NULL:
        return NULL
    if j.is_double:
        return <double *> j.P + j0 * j.H
    return <float *> j.P + j0 * j.H


cdef inline void *_part_panels(_Job *j, Py_ssize_t p) noexcept nogil:
    """Part p's own copy of the packed W (a packed row split)."""
    cdef Py_ssize_t size = (j.H + j.nr - 1) // j.nr * j.nr * j.H
    if j.is_double:
        return <double *> j.P + p * size
    return <float *> j.P + p * size


cdef int _simd_forward_part(_Job *j, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Rows lo..hi of a forward job on the small-batch kernels; -1 (out of memory): not done."""
    if j.is_double:
        return fb_simd_forward_f64(j.T, hi - lo, j.H, <const double *> j.A + lo * j.H, j.stride,
                                   <const double *> j.W, <double *> j.Hs + lo * j.H, j.stride, j.act,
                                   j.bs, lo)
    return fb_simd_forward_f32(j.T, hi - lo, j.H, <const float *> j.A + lo * j.H, j.stride,
                               <const float *> j.W, <float *> j.Hs + lo * j.H, j.stride, j.act, j.bs, lo)


cdef int _simd_backward_part(_Job *j, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Rows lo..hi of a backward job on the small-batch kernels; -1 (out of memory): not done."""
    if j.is_double:
        return fb_simd_backward_f64(j.T, hi - lo, j.H, <const double *> j.G + lo * j.H, j.stride,
                                    <const double *> j.Hs + lo * j.H, j.stride, <const double *> j.W,
                                    j.n_win, j.ends, j.bp_starts, j.act, <double *> j.dZ + lo * j.H,
                                    j.stride, j.bs, lo)
    return fb_simd_backward_f32(j.T, hi - lo, j.H, <const float *> j.G + lo * j.H, j.stride,
                                <const float *> j.Hs + lo * j.H, j.stride, <const float *> j.W,
                                j.n_win, j.ends, j.bp_starts, j.act, <float *> j.dZ + lo * j.H,
                                j.stride, j.bs, lo)


cdef void _forward_part(void *arg, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    """Part ``p`` of ``n`` of a forward job: its rows of the batch, or its columns of every step."""
    cdef _Job *j = <_Job *> arg
    cdef Py_ssize_t lo, hi
    if j.cols:
        lo = _col_part(j, p, n, &hi)
        if j.is_double:
            _forward_cols(j.T, j.rows, j.H, lo, hi, <const double *> j.A + j.b0 * j.H, j.stride,
                          <const double *> j.W, <double *> j.Hs + j.b0 * j.H, j.stride, j.act, j.barrier,
                          j.bs, j.b0, <double *> _col_panels(j, lo), j.nr)
        else:
            _forward_cols(j.T, j.rows, j.H, lo, hi, <const float *> j.A + j.b0 * j.H, j.stride,
                          <const float *> j.W, <float *> j.Hs + j.b0 * j.H, j.stride, j.act, j.barrier,
                          j.bs, j.b0, <float *> _col_panels(j, lo), j.nr)
        return
    if j.bounds != NULL:
        lo, hi = j.bounds[p], j.bounds[p + 1]
    else:
        lo = j.b0 + part_start(p, n, j.rows)
        hi = j.b0 + part_start(p + 1, n, j.rows)
    if j.nr:                    # packed by rows: every column of these rows, with its own copy of W
        if j.is_double:
            _forward_cols(j.T, hi - lo, j.H, 0, j.H, <const double *> j.A + lo * j.H, j.stride,
                          <const double *> j.W, <double *> j.Hs + lo * j.H, j.stride, j.act, NULL,
                          j.bs, lo, <double *> _part_panels(j, p), j.nr)
        else:
            _forward_cols(j.T, hi - lo, j.H, 0, j.H, <const float *> j.A + lo * j.H, j.stride,
                          <const float *> j.W, <float *> j.Hs + lo * j.H, j.stride, j.act, NULL,
                          j.bs, lo, <float *> _part_panels(j, p), j.nr)
        return
    if j.simd and _simd_forward_part(j, lo, hi) == 0:
        return
    if j.is_double:
        _forward(j.T, hi - lo, j.H, <const double *> j.A + lo * j.H, j.stride, <const double *> j.W,
                 <double *> j.Hs + lo * j.H, j.stride, j.act, j.small, j.bs, lo)
    else:
        _forward(j.T, hi - lo, j.H, <const float *> j.A + lo * j.H, j.stride, <const float *> j.W,
                 <float *> j.Hs + lo * j.H, j.stride, j.act, j.small, j.bs, lo)


cdef void _backward_part(void *arg, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    """Part ``p`` of ``n`` of a backward job: its rows of the batch (and of the work buffers), or its
    columns of every step."""
    cdef _Job *j = <_Job *> arg
    cdef Py_ssize_t r0, r1, lo
    if j.cols:
        r0 = _col_part(j, p, n, &r1)
        if j.is_double:
            _backward_cols(j.T, j.rows, j.H, r0, r1, <const double *> j.G + j.b0 * j.H, j.stride,
                           <const double *> j.Hs + j.b0 * j.H, j.stride, <const double *> j.W,
                           j.n_win, j.ends, j.bp_starts, j.act, <double *> j.dZ + j.b0 * j.H,
                           j.stride, <double *> j.carried, <double *> j.dz, j.barrier, j.bs, j.b0,
                           <double *> _col_panels(j, r0), j.nr)
        else:
            _backward_cols(j.T, j.rows, j.H, r0, r1, <const float *> j.G + j.b0 * j.H, j.stride,
                           <const float *> j.Hs + j.b0 * j.H, j.stride, <const float *> j.W,
                           j.n_win, j.ends, j.bp_starts, j.act, <float *> j.dZ + j.b0 * j.H,
                           j.stride, <float *> j.carried, <float *> j.dz, j.barrier, j.bs, j.b0,
                           <float *> _col_panels(j, r0), j.nr)
        return
    if j.bounds != NULL:
        r0, r1 = j.bounds[p] - j.b0, j.bounds[p + 1] - j.b0
    else:
        r0 = part_start(p, n, j.rows)
        r1 = part_start(p + 1, n, j.rows)
    lo = j.b0 + r0
    if j.nr:                    # packed by rows; its two dz buffers: rows 2·r0 .. 2·r1 of dz
        if j.is_double:
            _backward_cols(j.T, r1 - r0, j.H, 0, j.H, <const double *> j.G + lo * j.H, j.stride,
                           <const double *> j.Hs + lo * j.H, j.stride, <const double *> j.W,
                           j.n_win, j.ends, j.bp_starts, j.act, <double *> j.dZ + lo * j.H,
                           j.stride, <double *> j.carried + r0 * j.H, <double *> j.dz + 2 * r0 * j.H,
                           NULL, j.bs, lo, <double *> _part_panels(j, p), j.nr)
        else:
            _backward_cols(j.T, r1 - r0, j.H, 0, j.H, <const float *> j.G + lo * j.H, j.stride,
                           <const float *> j.Hs + lo * j.H, j.stride, <const float *> j.W,
                           j.n_win, j.ends, j.bp_starts, j.act, <float *> j.dZ + lo * j.H,
                           j.stride, <float *> j.carried + r0 * j.H, <float *> j.dz + 2 * r0 * j.H,
                           NULL, j.bs, lo, <float *> _part_panels(j, p), j.nr)
        return
    if j.simd and _simd_backward_part(j, lo, lo + r1 - r0) == 0:
        return
    if j.is_double:
        _backward(j.T, r1 - r0, j.H, <const double *> j.G + lo * j.H, j.stride,
                  <const double *> j.Hs + lo * j.H, j.stride, <const double *> j.W, j.n_win,
                  j.ends, j.bp_starts, j.act, <double *> j.dZ + lo * j.H, j.stride,
                  <double *> j.carried + r0 * j.H, <double *> j.dz + r0 * j.H, j.small, j.bs, lo)
    else:
        _backward(j.T, r1 - r0, j.H, <const float *> j.G + lo * j.H, j.stride,
                  <const float *> j.Hs + lo * j.H, j.stride, <const float *> j.W, j.n_win,
                  j.ends, j.bp_starts, j.act, <float *> j.dZ + lo * j.H, j.stride,
                  <float *> j.carried + r0 * j.H, <float *> j.dz + r0 * j.H, j.small, j.bs, lo)


cdef Py_ssize_t _setup_job(_Job *job, fb_barrier *barrier, Py_ssize_t T, Py_ssize_t B, Py_ssize_t H,
                           Py_ssize_t b0, Py_ssize_t b1, int act, int threads, int path, int split,
                           bint is_double) except -1:
    """Fill the shape and split of a kernel job (the arrays are the caller's); returns the part count."""
    cdef Py_ssize_t n
    if threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads}")
    cdef int mode = _split_mode(threads, b1 - b0, H, split, is_double)
    job.cols = mode == 1 or mode == 2
    job.nr = fbw_panel(is_double) if mode >= 2 else 0
    job.P = NULL                # set by _attach_panels
    if mode == 2:
        n = min(threads, (H + job.nr - 1) // job.nr)
    else:
        n = min(threads, H) if job.cols else _n_parts(threads, b1 - b0)
    job.n = n
    barrier.count = 0
    barrier.sense = 0
    barrier.n = n
    job.barrier = barrier
    job.T = T
    job.H = H
    job.stride = B * H
    job.b0 = b0
    job.rows = b1 - b0
    job.act = act
    job.small = _pick((b1 - b0 + n - 1) // n, H, path)
    if path == 2 and not _simd_on:
        raise ValueError("_path=2: the small-batch SIMD kernels are off (FASTBPTT_SIMD=off)")
    job.simd = mode == 0 and (path == 2 or (path == -1 and _simd_on
                                               and _use_simd((b1 - b0 + n - 1) // n, H, is_double)))
    job.is_double = is_double
    return n


cdef object _attach_panels(_Job *job):
    """For a packed job (``job.nr`` > 0): a buffer for W's columns in panels (a copy for each part
    of a row split), 64-byte aligned, that ``job.P`` points into (the caller keeps it alive); None
    otherwise. Each thread fills its own."""
    if job.nr == 0:
        return None
    cdef Py_ssize_t itemsize = 8 if job.is_double else 4
    cdef Py_ssize_t panels = (job.H + job.nr - 1) // job.nr
    cdef Py_ssize_t copies = 1 if job.cols else job.n
    buf = np.empty(copies * panels * job.nr * job.H * itemsize + 64, dtype=np.uint8)
    cdef unsigned char[::1] view = buf
    cdef intptr_t addr = <intptr_t> &view[0]
    job.P = <void *> (addr + ((-addr) & 63))
    return buf


def _split_mode(int threads, Py_ssize_t rows, Py_ssize_t H, int split, bint is_double=False):
    """How a call on ``threads`` threads splits each step: 0 by rows, 1 by columns (BLAS per step),
    2 by columns packed once per call (wide.h; also on one thread: one part), 3 by rows, each part
    on the packed loop with a copy of all of W."""
    if split not in (-1, 0, 1, 2, 3):
        raise ValueError(f"_split: expected -1 (auto), 0 (rows), 1 (columns), 2 (packed columns) or "
                         f"3 (packed rows), got {split}")
    if split >= 2:
        return split
    if split == -1 and _use_packed(threads, rows, H, is_double):
        w_bytes = H * H * (8 if is_double else 4)
        if threads > 1 and (rows >= 8 * threads and w_bytes <= MAX_W_FOR_PACKED_ROWS
                            or rows >= 32 * threads and w_bytes <= 4 * MAX_W_FOR_PACKED_ROWS):
            return 3
        return 2
    if threads < 2:
        return 0
    if split != -1:
        return split
    return int(H >= 2 * MIN_H_FOR_COLUMN_SPLIT or (H >= MIN_H_FOR_COLUMN_SPLIT and rows >= 16 * threads))


def _use_packed(int threads, Py_ssize_t rows, Py_ssize_t H, bint is_double=False):
    """Whether "auto" takes the packed column split: where it measured faster (docs/kernels_wide.md)."""
    if fbw_level < 2:               # only the AVX-512 loop was measured against BLAS (AVX2 on this CPU
        return False                # lost to its AVX-512 BLAS at B=128): elsewhere a forced path
    if is_double and H >= 2 * MIN_H_FOR_PACKED and rows > 16:
        return False                # f64 slices of 4-8 MB: BLAS won on 1 thread (0.7-0.9x), tied on 2
    if not is_double and threads > 1 and (H >= 384 and rows >= 16 or H >= 256 and 32 <= rows <= 64):
        return True     # f32 on 2 threads (Xeon): 1.27-1.49x the row split at H=256, 1.2-2.6x at 384
    return H >= MIN_H_FOR_PACKED or (threads == 1 and H >= MIN_H_FOR_PACKED_ONE_THREAD and rows >= 8)


def _split_cols(int threads, Py_ssize_t rows, Py_ssize_t H, int split):
    """Whether a call on ``threads`` threads splits the columns of every step (else the rows)."""
    return _split_mode(threads, rows, H, split) in (1, 2)


def _n_parts(int threads, Py_ssize_t rows):
    if threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads}")
    return min(threads, rows)


def _pick(Py_ssize_t B, Py_ssize_t H, int path):
    if path == -1:
        return _use_small(B, H)
    if path in (0, 1, 2):
        return path == 1
    raise ValueError(f"_path: expected -1 (auto), 0 (BLAS), 1 (small loop) or 2 (small-batch SIMD "
                     f"kernels), got {path}")


def forward_recurrence(const floating[:, :, ::1] A, const floating[:, ::1] W_hhT,
                       floating[:, :, ::1] Hs, int act, rows=None, int threads=1, batch_sizes=None,
                       int _path=-1, int _split=-1):
    """Fill ``Hs[1:]`` with h_t = f(A[t] + Hs[t]·W_hhT); see :mod:`fastbptt.backends.reference`.

    Parameters
    ----------
    A : C-contiguous ndarray of shape (T, B, H), float32 or float64. Read only.
    W_hhT : C-contiguous ndarray of shape (H, H), same dtype. Read only.
    Hs : C-contiguous ndarray of shape (T+1, B, H), same dtype; ``Hs[0]`` is
        h0, ``Hs[1:]`` is written.
    act : int
        ``ACT_TANH`` (0) or ``ACT_RELU`` (1).
    rows : (b0, b1), optional
        Compute only the sequences ``b0 .. b1-1`` of the batch (all if None);
        calls on disjoint rows may run on several threads at once.
    threads : int, optional
        Split the call into this many parts (by rows; by columns at large H, see ``_split_mode``),
        one per thread of fastbptt's C team (see ``TEAM``).
    batch_sizes : int64 ndarray of shape (T,), optional
        Step t runs on rows ``0 .. batch_sizes[t]-1`` only (non-increasing counts: the
        rows sorted by length, longest first); None: every row.
    _path : int, optional
        -1 chooses per shape; 0 forces BLAS, 1 the small-shape loop, 2 the small-batch
        SIMD kernels at the level in force (``SIMD_IMPL``; tests).
    _split : int, optional
        -1 chooses per shape (``_split_mode``); with ``threads`` > 1, 0 splits the
        rows, 1 the columns of every step; 2 the columns, packed once per call
        for the loop of wide.h, 3 the rows, each part on that loop with its own
        copy of W, on any thread count (tests).
    """
    cdef Py_ssize_t T = A.shape[0], B = A.shape[1], H = A.shape[2]
    _check_act(act)
    if W_hhT.shape[0] != H or W_hhT.shape[1] != H:
        raise ValueError(f"W_hhT: expected shape ({H}, {H}), got ({W_hhT.shape[0]}, {W_hhT.shape[1]})")
    if Hs.shape[0] != T + 1 or Hs.shape[1] != B or Hs.shape[2] != H:
        raise ValueError(f"Hs: expected shape ({T + 1}, {B}, {H}), "
                         f"got ({Hs.shape[0]}, {Hs.shape[1]}, {Hs.shape[2]})")
    if T == 0 or B == 0 or H == 0:
        return
    cdef Py_ssize_t b0, b1, n
    b0, b1 = _rows(rows, B)
    cdef _Job job
    cdef fb_barrier barrier
    cdef const int64_t[::1] bs = check_batch_sizes(batch_sizes, T, B)
    n = _setup_job(&job, &barrier, T, B, H, b0, b1, act, threads, _path, _split, floating is double)
    job.bs = &bs[0] if bs is not None else NULL
    cdef const int64_t[::1] bounds = _work_bounds(bs, b0, b1, n, job.cols)
    job.bounds = &bounds[0] if bounds is not None else NULL
    panels = _attach_panels(&job)
    job.A = &A[0, 0, 0]
    job.W = &W_hhT[0, 0]
    job.Hs = &Hs[0, 0, 0]
    with nogil:
        run_parts(_forward_part, &job, n)


def backward_accumulate(const floating[:, :, ::1] G, const floating[:, :, ::1] Hs,
                        const floating[:, ::1] W_hh, const int64_t[::1] ends,
                        const int64_t[::1] bp_starts, int act, floating[:, :, ::1] dZ,
                        rows=None, int threads=1, batch_sizes=None, int _path=-1, int _split=-1):
    """Overwrite ``dZ`` with the pre-activation gradients summed over windows.

    See the kernel contract in :mod:`fastbptt.backends.reference`.

    Parameters
    ----------
    G : C-contiguous ndarray of shape (T, B, H), float32 or float64. Read only.
    Hs : C-contiguous ndarray of shape (T+1, B, H), same dtype. Read only.
    W_hh : C-contiguous ndarray of shape (H, H), same dtype. Read only.
    ends, bp_starts : C-contiguous int64 ndarrays of shape (n,)
        Window i backpropagates the losses of steps ``[ends[i-1], ends[i])``
        through steps ``[bp_starts[i], ends[i])``; ends increase to T.
    act : int
        ``ACT_TANH`` (0) or ``ACT_RELU`` (1).
    dZ : C-contiguous ndarray of shape (T, B, H), same dtype; overwritten.
    rows : (b0, b1), optional
        Compute only the sequences ``b0 .. b1-1`` of the batch (all if None);
        calls on disjoint rows may run on several threads at once.
    threads : int, optional
        Split the call into this many parts (by rows; by columns at large H, see ``_split_mode``),
        one per thread of fastbptt's C team (see ``TEAM``).
    batch_sizes : int64 ndarray of shape (T,), optional
        Step t runs on rows ``0 .. batch_sizes[t]-1`` only (non-increasing counts: the
        rows sorted by length, longest first); None: every row.
    _path : int, optional
        -1 chooses per shape; 0 forces BLAS, 1 the small-shape loop, 2 the small-batch
        SIMD kernels at the level in force (``SIMD_IMPL``; tests).
    _split : int, optional
        -1 chooses per shape (``_split_mode``); with ``threads`` > 1, 0 splits the
        rows, 1 the columns of every step; 2 the columns, packed once per call
        for the loop of wide.h, 3 the rows, each part on that loop with its own
        copy of W, on any thread count (tests).
    """
    cdef Py_ssize_t T = G.shape[0], B = G.shape[1], H = G.shape[2]
    cdef Py_ssize_t n_win = ends.shape[0]
    _check_act(act)
    if Hs.shape[0] != T + 1 or Hs.shape[1] != B or Hs.shape[2] != H:
        raise ValueError(f"Hs: expected shape ({T + 1}, {B}, {H}), "
                         f"got ({Hs.shape[0]}, {Hs.shape[1]}, {Hs.shape[2]})")
    if W_hh.shape[0] != H or W_hh.shape[1] != H:
        raise ValueError(f"W_hh: expected shape ({H}, {H}), got ({W_hh.shape[0]}, {W_hh.shape[1]})")
    if dZ.shape[0] != T or dZ.shape[1] != B or dZ.shape[2] != H:
        raise ValueError(f"dZ: expected shape ({T}, {B}, {H}), "
                         f"got ({dZ.shape[0]}, {dZ.shape[1]}, {dZ.shape[2]})")
    _check_windows(ends, bp_starts, T)
    if T == 0 or B == 0 or H == 0:
        return
    cdef Py_ssize_t b0, b1, n
    b0, b1 = _rows(rows, B)
    cdef _Job job
    cdef fb_barrier barrier
    cdef const int64_t[::1] bs = check_batch_sizes(batch_sizes, T, B)
    n = _setup_job(&job, &barrier, T, B, H, b0, b1, act, threads, _path, _split, floating is double)
    job.bs = &bs[0] if bs is not None else NULL
    cdef const int64_t[::1] bounds = _work_bounds(bs, b0, b1, n, job.cols)
    job.bounds = &bounds[0] if bounds is not None else NULL
    dtype = np.float32 if floating is float else np.float64
    cdef floating[:, ::1] carried = np.empty((b1 - b0, H), dtype=dtype)   # row r: batch row b0 + r
    cdef floating[:, ::1] dz = np.empty(((2 if job.cols or job.nr else 1) * (b1 - b0), H), dtype=dtype)
    panels = _attach_panels(&job)
    job.G = &G[0, 0, 0]
    job.Hs = <void *> &Hs[0, 0, 0]
    job.W = &W_hh[0, 0]
    job.dZ = &dZ[0, 0, 0]
    job.carried = &carried[0, 0]
    job.dz = &dz[0, 0]
    job.n_win = n_win
    job.ends = &ends[0] if n_win else NULL
    job.bp_starts = &bp_starts[0] if n_win else NULL
    with nogil:
        run_parts(_backward_part, &job, n)


def uses_small_loop(Py_ssize_t B, Py_ssize_t H):
    """Whether ``_path=-1`` sends a (B, H) problem to the small-shape loop (for tests and benchmarks)."""
    return _use_small(B, H)


def uses_simd(Py_ssize_t B, Py_ssize_t H, dtype=np.float64):
    """Whether ``_path=-1`` sends a part of B rows, hidden size H, to the small-batch SIMD kernels."""
    return _simd_on and _use_simd(B, H, np.dtype(dtype) == np.float64)


def _tanh_inplace(floating[::1] x, bint exp=False):
    """``x = tanh(x)`` (``exp``: ``exp(x)``) in place with the kernels' functions (tests compare them
    with NumPy's)."""
    if x.shape[0]:
        if floating is float:
            (fastbptt_expf if exp else fastbptt_tanhf)(&x[0], x.shape[0])
        else:
            (fastbptt_expd if exp else fastbptt_tanhd)(&x[0], x.shape[0])


def _set_matvec_level(int level):
    """Tests only: the small-shape product by 0 = the portable loop, 2 = AVX-512 (if the CPU has it).

    Returns the level now in force. Not thread-safe: call it only when no kernel runs.
    """
    return fastbptt_mv_set_level(level)


def _set_tanh_level(int level):
    """Tests only: 1 = libmvec's SSE tanh, 2 = its AVX-512 one (if the CPU has it).

    Returns the level now in force (0 in a libm build, where nothing changes).
    Not thread-safe: call it only when no kernel runs.
    """
    global TANH_IMPL
    got = fastbptt_tanh_set_level(level)
    TANH_IMPL = fastbptt_tanh_impl().decode()
    return got


def _set_fused_dz(int mode):
    """Tests only: the packed backward makes dz in its product (1), in a pass (0), or by the size
    of a thread's slice of W_hh (-1); returns the previous mode. Not thread-safe: call it only
    when no kernel runs."""
    global _fused_dz_mode
    if mode not in (-1, 0, 1):
        raise ValueError(f"mode: expected -1, 0 or 1, got {mode}")
    prev, _fused_dz_mode = _fused_dz_mode, mode
    return prev


def _set_wide_level(int level):
    """Tests only: the packed column split's loop by 2 = AVX-512, 1 = AVX2, 0 = plain C (if the CPU
    has it). Returns the level now in force. Not thread-safe: call it only when no kernel runs."""
    global WIDE_IMPL
    got = fbw_set_level(level)
    WIDE_IMPL = fbw_impl().decode()
    return got



# ---------------------------------------------------------------------------------------------
# one layer's whole loss and gradient in one call
# ---------------------------------------------------------------------------------------------
# At short chunks (T=25, B=1, H=100) the arithmetic of a step is ~15-30 µs and a dozen NumPy calls
# around the two kernels cost ~60 µs more; here the input projection, the recurrence, the head,
# the loss, the backward loop and the weight gradients run in one call without the GIL, on the
# caller's work arrays. On a team, each GEMM phase splits its rows between the threads, and where
# a phase's parts write the same gradient (the head's, the weight gradients split over the rows of
# dZ), the parts' partial sums are added in part order.

#: the losses of ``layer_loss_and_grad`` by name (as ``fastbptt.engine.losses.LOSSES``)
LOSS_CODES = {"mse": 0, "bce": 1, "ce": 2}


cdef struct _HeadCall:
    int loss
    bint is_double
    Py_ssize_t m, n_out, O, H
    const void *H_rows
    const void *W_hy
    const void *W_hyT           # (H, O): W_hy transposed (the logits' GEMM as NN: see _transpose)
    const void *b_y
    const void *Y
    const void *ones
    void *o
    void *G
    void *gw
    void *gb
    void *sums                  # (parts - 1, O·H + O): the gradients of parts 1, 2, ...
    bint accumulate             # part 0 adds its gradients to gw, gb (else overwrites them)
    double *totals              # (parts,): each part's loss sum
    Py_ssize_t *bad             # (parts,): each part's first row with a class id out of range, or -1


cdef struct _LayerCall:
    Py_ssize_t T, B, D, H, O, n_out, phase
    int loss
    bint seq, is_double
    const void *X
    const void *Y               # (n_out, O) of the dtype for mse/bce; (n_out,) int64 class ids for ce
    const void *h0
    const void *W_xh
    const void *W_hh
    const void *b_h
    const void *W_hy
    const void *b_y
    void *A
    void *W_hhT
    void *W_xhT                 # (D, H): W_xh transposed (A's GEMM as NN)
    void *Hs
    void *dOut
    void *dZ
    void *ones                  # (T·B,): ones, for the column sums
    void *gW_xh
    void *gW_hh
    void *gb_h
    void *gW_hy
    void *gb_y
    _HeadCall head              # the head's rows (the states of the loss steps, logits, dOut's rows)
    bint ksplit                 # the weight gradients split over rows of dZ (see _layer_phase)
    void *wsums                 # (parts - 1, H·D + H + H·H): then the weight gradients of parts 1, 2, ...


cdef void *_data(object a, str name, int typenum, Py_ssize_t size, bint write) except NULL:
    """The data of a C-contiguous ndarray of ``size`` elements of ``typenum`` (else TypeError/ValueError)."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name}: expected an ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray> a
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name}: expected dtype {cnp.PyArray_DescrFromType(typenum)}, got {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or cnp.PyArray_SIZE(arr) != size:
        raise ValueError(f"{name}: expected a C-contiguous array of {size} elements, got shape {a.shape} "
                         f"(C-contiguous: {bool(cnp.PyArray_IS_C_CONTIGUOUS(arr))})")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name}: expected a writeable array")
    if size == 0:
        return <void *> &_no_data
    return cnp.PyArray_DATA(arr)


cdef double _no_data = 0


cdef inline void _column_sums(const floating *M, Py_ssize_t n, Py_ssize_t w, Py_ssize_t ldm,
                              const floating *ones, floating beta, floating *out) noexcept nogil:
    """``out = M.sum(axis=0) + beta·out`` of an (n, w) ``M`` with row stride ``ldm`` as ``ones·M``, on BLAS."""
    _cgemm(False, False, 1, w, n, ones, n, M, ldm, beta, out, w)


cdef Py_ssize_t _loss_rows(int loss, Py_ssize_t n_out, Py_ssize_t O, floating *o, const void *Y,
                           Py_ssize_t m_rows, double *total_out) noexcept nogil:
    """The loss sum of ``m_rows`` logit rows ``o`` (targets ``Y``: their rows) into ``total_out``;
    ``o`` becomes ∂loss/∂o for torch's mean over ``n_out`` rows in all. Returns -1, or the first
    row whose class id is out of range. The arithmetic of ``fastbptt.engine.losses``: terms in
    the dtype, summed in double."""
    cdef Py_ssize_t N = n_out * O, i, j
    cdef const floating *y
    cdef const int64_t *ids
    cdef floating d, x, s, m, scale, e, inv_n, xc
    cdef double total = 0
    if loss == 0:                                       # mse: mean((o - y)²)
        y = <const floating *> Y
        scale = <floating> (2.0 / N)
        for i in range(m_rows * O):
            d = o[i] - y[i]
            total += d * d
            o[i] = scale * d
    elif loss == 1:                                     # bce with logits: max(o,0) - o·y + log(1 + e^-|o|)
        y = <const floating *> Y
        for i in range(m_rows * O):
            x = o[i]
            if floating is float:
                d = (x if x > 0 else 0) - x * y[i] + log1pf(expf(-fabsf(x)))
                s = 1 / (1 + expf(-x))
            else:
                d = (x if x > 0 else 0) - x * y[i] + log1p(exp(-fabs(x)))
                s = 1 / (1 + exp(-x))
            total += d
            o[i] = (s - y[i]) / <floating> N
    else:                                               # ce: mean of -log softmax(o)[y]
        ids = <const int64_t *> Y
        inv_n = <floating> (1.0 / n_out)
        for i in range(m_rows):
            if ids[i] < 0 or ids[i] >= O:
                return i
            m = o[i * O]
            for j in range(1, O):
                if o[i * O + j] > m:
                    m = o[i * O + j]
            xc = o[i * O + ids[i]] - m
            for j in range(O):
                o[i * O + j] = o[i * O + j] - m
            if floating is float:
                fastbptt_expf(o + i * O, O)
            else:
                fastbptt_expd(o + i * O, O)
            s = 0
            for j in range(O):
                s += o[i * O + j]
            if floating is float:
                total -= <floating> (xc - logf(s))
            else:
                total -= xc - log(s)
            scale = inv_n / s
            for j in range(O):
                o[i * O + j] *= scale
            o[i * O + ids[i]] -= inv_n
    total_out[0] = total
    return -1


#: the fused call's weight gradients are split over the rows of dZ (partial sums) rather than by
#: their output rows when dZ has at least this many rows per column: team of 2, small (3200 rows,
#: H = 64) 0.91x the time, medium (12800, 256) level, wide (6000, 800) 1.06x; large (12800, 1024)
#: 0.99x the whole step (each part's OpenBLAS packs its half of Hs once, not all of it)
cdef enum:
    _KSPLIT_ROWS = 8
KSPLIT_ROWS = _KSPLIT_ROWS

#: the head runs its rows in chunks of this many, so that each chunk's states, logits and dOut
#: stay in cache across its three GEMMs and the loss (rather than three passes over (T·B, H)
#: arrays): 1.65x faster on 16384 rows x H=128, O=8 (NumPy, one thread)
cdef enum:
    _HEAD_CHUNK = 512
HEAD_CHUNK = _HEAD_CHUNK


cdef extern from *:
    """
    /* d (c, r) = sᵀ for rows i0..i1 of s (r, c): 8 x 8 blocks through AVX registers where the CPU
       has AVX (float32), else eight rows at a time, each column of theirs one run of eight stores. */
    #define FB_TRANSPOSE_ROWS8(T)                                                                  \
        for (; i + 8 <= i1; i += 8)                                                                \
            for (Py_ssize_t j = 0; j < c; j++)                                                     \
                for (int k = 0; k < 8; k++) d[j * r + i + k] = s[(i + k) * c + j];               \
        for (; i < i1; i++)                                                                        \
            for (Py_ssize_t j = 0; j < c; j++) d[j * r + i] = s[i * c + j];
    static void fastbptt_transpose_f64(Py_ssize_t r, Py_ssize_t c, const double *s, double *d,
                                       Py_ssize_t i0, Py_ssize_t i1) {
        Py_ssize_t i = i0;
        FB_TRANSPOSE_ROWS8(double)
    }
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    __attribute__((target("avx")))
    static void fastbptt_transpose_f32_avx(Py_ssize_t r, Py_ssize_t c, const float *s, float *d,
                                           Py_ssize_t i0, Py_ssize_t i1) {
        Py_ssize_t i = i0;
        for (; i + 8 <= i1; i += 8) {
            Py_ssize_t j = 0;
            for (; j + 8 <= c; j += 8) {
                const float *p = s + i * c + j;
                __m256 r0 = _mm256_loadu_ps(p), r1 = _mm256_loadu_ps(p + c);
                __m256 r2 = _mm256_loadu_ps(p + 2 * c), r3 = _mm256_loadu_ps(p + 3 * c);
                __m256 r4 = _mm256_loadu_ps(p + 4 * c), r5 = _mm256_loadu_ps(p + 5 * c);
                __m256 r6 = _mm256_loadu_ps(p + 6 * c), r7 = _mm256_loadu_ps(p + 7 * c);
                __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
                __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float *q = d + j * r + i;
                _mm256_storeu_ps(q, _mm256_permute2f128_ps(u0, u4, 0x20));
                _mm256_storeu_ps(q + r, _mm256_permute2f128_ps(u1, u5, 0x20));
                _mm256_storeu_ps(q + 2 * r, _mm256_permute2f128_ps(u2, u6, 0x20));
                _mm256_storeu_ps(q + 3 * r, _mm256_permute2f128_ps(u3, u7, 0x20));
                _mm256_storeu_ps(q + 4 * r, _mm256_permute2f128_ps(u0, u4, 0x31));
                _mm256_storeu_ps(q + 5 * r, _mm256_permute2f128_ps(u1, u5, 0x31));
                _mm256_storeu_ps(q + 6 * r, _mm256_permute2f128_ps(u2, u6, 0x31));
                _mm256_storeu_ps(q + 7 * r, _mm256_permute2f128_ps(u3, u7, 0x31));
            }
            for (; j < c; j++)
                for (int k = 0; k < 8; k++) d[j * r + i + k] = s[(i + k) * c + j];
        }
        FB_TRANSPOSE_ROWS8(float)       /* (the rows left: fewer than eight) */
    }
    static int fastbptt_transpose_avx = -1;
    #endif
    static void fastbptt_transpose_f32(Py_ssize_t r, Py_ssize_t c, const float *s, float *d,
                                       Py_ssize_t i0, Py_ssize_t i1) {
    #if defined(__x86_64__) && defined(__GNUC__)
        if (fastbptt_transpose_avx < 0) {
            __builtin_cpu_init();
            fastbptt_transpose_avx = __builtin_cpu_supports("avx") != 0;
        }
        if (fastbptt_transpose_avx) {
            fastbptt_transpose_f32_avx(r, c, s, d, i0, i1);
            return;
        }
    #endif
        Py_ssize_t i = i0;
        FB_TRANSPOSE_ROWS8(float)
    }
    """
    void fastbptt_transpose_f32(Py_ssize_t r, Py_ssize_t c, const float *s, float *d, Py_ssize_t i0,
                                Py_ssize_t i1) noexcept nogil
    void fastbptt_transpose_f64(Py_ssize_t r, Py_ssize_t c, const double *s, double *d, Py_ssize_t i0,
                                Py_ssize_t i1) noexcept nogil


cdef inline void _transpose(Py_ssize_t r, Py_ssize_t c, const floating *s, floating *d, Py_ssize_t i0,
                            Py_ssize_t i1) noexcept nogil:
    """Rows i0..i1 of ``s`` (r, c) into columns of ``d`` (c, r) = sᵀ. GEMMs run on transposed copies:
    OpenBLAS's small-matrix A·Bᵀ took 2.4x the time of A·B at min-char's shapes (25 x 100 x 65:
    5.7 against 2.4 µs)."""
    if floating is float:
        fastbptt_transpose_f32(r, c, s, d, i0, i1)
    else:
        fastbptt_transpose_f64(r, c, s, d, i0, i1)


cdef Py_ssize_t _head_rows(int loss, Py_ssize_t n_out, Py_ssize_t O, Py_ssize_t H, Py_ssize_t m,
                           const floating *H_rows, const floating *W_hy, const floating *W_hyT,
                           const floating *b_y, const void *Y,
                           floating *o, floating *dOut, floating *gw, floating *gb, bint accumulate,
                           const floating *ones, double *total) noexcept nogil:
    """``m`` rows of the head: logits ``o`` = b_y + H_rows·W_hyᵀ, the loss (its sum into ``total``;
    torch's mean over ``n_out`` rows in all), ``o`` = ∂L/∂logits, ``dOut`` = o·W_hy, and ``gw``,
    ``gb`` = oᵀ·H_rows and o's column sums (added to them with ``accumulate``). In chunks of
    ``HEAD_CHUNK`` rows. Returns -1, or the first row whose class id is out of range."""
    cdef Py_ssize_t c0, k, i, bad
    cdef double part
    cdef floating beta
    total[0] = 0
    c0 = 0
    while c0 < m:
        k = min(<Py_ssize_t> _HEAD_CHUNK, m - c0)
        for i in range(k):
            memcpy(o + (c0 + i) * O, b_y, O * sizeof(floating))
        _cgemm(False, False, k, O, H, H_rows + c0 * H, H, W_hyT, O, <floating> 1, o + c0 * O, O)
        bad = _loss_rows(loss, n_out, O, o + c0 * O,
                         <const int64_t *> Y + c0 if loss == 2 else <const void *> (<const floating *> Y + c0 * O),
                         k, &part)
        if bad >= 0:
            return c0 + bad
        total[0] += part
        beta = 1 if accumulate or c0 > 0 else 0
        _cgemm(True, False, O, H, k, o + c0 * O, O, H_rows + c0 * H, H, beta, gw, H)
        _column_sums(o + c0 * O, k, O, O, ones, beta, gb)
        _cgemm(False, False, k, H, O, o + c0 * O, O, W_hy, H, <floating> 0, dOut + c0 * H, H)
        c0 += k
    return -1


cdef void _head_part_of(_HeadCall *h, Py_ssize_t p, Py_ssize_t n, floating *tag) noexcept nogil:
    cdef Py_ssize_t r0 = part_start(p, n, h.m), r1 = part_start(p + 1, n, h.m), O = h.O, H = h.H, bad
    cdef floating *gw = <floating *> h.gw if p == 0 else <floating *> h.sums + (p - 1) * (O * H + O)
    cdef floating *gb = <floating *> h.gb if p == 0 else <floating *> h.sums + (p - 1) * (O * H + O) + O * H
    bad = _head_rows(h.loss, h.n_out, O, H, r1 - r0, <const floating *> h.H_rows + r0 * H,
                     <const floating *> h.W_hy, <const floating *> h.W_hyT, <const floating *> h.b_y,
                     <const int64_t *> h.Y + r0 if h.loss == 2 else <const void *> (<const floating *> h.Y + r0 * O),
                     <floating *> h.o + r0 * O, <floating *> h.G + r0 * H, gw, gb, p == 0 and h.accumulate,
                     <const floating *> h.ones, &h.totals[p])
    h.bad[p] = -1 if bad < 0 else r0 + bad


cdef void _head_part(void *arg, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    cdef _HeadCall *h = <_HeadCall *> arg
    if h.is_double:
        _head_part_of(h, p, n, <double *> NULL)
    else:
        _head_part_of(h, p, n, <float *> NULL)


cdef inline void _add(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] += src[i]


cdef void _add_head_parts(_HeadCall *h, Py_ssize_t parts, floating *tag) noexcept nogil:
    """The head's gradients of parts 1, 2, ... added to part 0's, in part order."""
    cdef Py_ssize_t p, size = h.O * h.H + h.O
    cdef const floating *part
    for p in range(1, parts):
        part = <const floating *> h.sums + (p - 1) * size
        _add(<floating *> h.gw, part, h.O * h.H)
        _add(<floating *> h.gb, part + h.O * h.H, h.O)


def head_loss_and_grad(H_rows, W_hy, b_y, Y, int loss, Py_ssize_t n_out, dW_hy, db_y, G, int threads=1):
    """The head of some rows of a sequence loss, for full BPTT in blocks (``engine.checkpoint``).

    Logits ``b_y + H_rows·W_hyᵀ``, the loss (its sum is returned; torch's mean over ``n_out``
    rows in all), ``G = ∂L/∂logits·W_hy`` (overwritten), and ``∂L/∂W_hy``, ``∂L/∂b_y`` added to
    ``dW_hy``, ``db_y``; in chunks of ``HEAD_CHUNK`` rows, the rows split between ``threads``
    threads of the team (the parts' sums added in part order).

    Parameters
    ----------
    H_rows : (m, H) C-contiguous float32 or float64
    W_hy : (O, H); b_y : (O,)
    Y : (m, O) of the dtype (``loss`` mse, bce) or (m,) int64 class ids (ce)
    loss : a value of ``LOSS_CODES``
    n_out : the rows of the whole mean
    dW_hy : (O, H), db_y : (O,): added to
    G : (m, H): overwritten
    """
    if not cnp.PyArray_Check(H_rows) or cnp.PyArray_NDIM(<cnp.ndarray> H_rows) != 2:
        raise ValueError(f"H_rows: expected an ndarray of shape (m, H), got {getattr(H_rows, 'shape', type(H_rows))}")
    if not cnp.PyArray_Check(W_hy) or cnp.PyArray_NDIM(<cnp.ndarray> W_hy) != 2:
        raise ValueError(f"W_hy: expected an ndarray of shape (O, H), got {getattr(W_hy, 'shape', type(W_hy))}")
    if loss not in (0, 1, 2):
        raise ValueError(f"loss: expected 0 (mse), 1 (bce) or 2 (ce), got {loss}")
    cdef Py_ssize_t m = cnp.PyArray_DIMS(<cnp.ndarray> H_rows)[0], H = cnp.PyArray_DIMS(<cnp.ndarray> H_rows)[1]
    cdef Py_ssize_t O = cnp.PyArray_DIMS(<cnp.ndarray> W_hy)[0], p, i
    cdef int tn = cnp.PyArray_TYPE(<cnp.ndarray> W_hy)
    if tn != cnp.NPY_DOUBLE and tn != cnp.NPY_FLOAT:
        raise TypeError(f"W_hy: expected float32 or float64, got {W_hy.dtype}")
    if n_out < m or threads < 1:
        raise ValueError(f"n_out, threads: expected n_out >= {m} rows and threads >= 1, got {n_out} and {threads}")
    cdef _HeadCall h
    h.loss, h.is_double, h.m, h.n_out, h.O, h.H = loss, tn == cnp.NPY_DOUBLE, m, n_out, O, H
    h.H_rows = _data(H_rows, "H_rows", tn, m * H, False)
    h.W_hy = _data(W_hy, "W_hy", tn, O * H, False)
    W_hyT = np.ascontiguousarray(W_hy.T)
    h.W_hyT = _data(W_hyT, "W_hyT", tn, O * H, False)
    h.b_y = _data(b_y, "b_y", tn, O, False)
    h.Y = _data(Y, "Y", cnp.NPY_INT64 if loss == 2 else tn, m if loss == 2 else m * O, False)
    h.gw = _data(dW_hy, "dW_hy", tn, O * H, True)
    h.gb = _data(db_y, "db_y", tn, O, True)
    h.G = _data(G, "G", tn, m * H, True)
    if m == 0:
        return 0.0
    cdef Py_ssize_t parts = min(threads, m)
    dtype = np.float64 if h.is_double else np.float32
    o = np.empty(m * O, dtype)
    ones = np.ones(min(m, <Py_ssize_t> _HEAD_CHUNK), dtype)
    sums = np.empty(max(1, (parts - 1) * (O * H + O)), dtype)
    cdef double[::1] totals = np.empty(parts, np.float64)
    cdef Py_ssize_t[::1] bad = np.empty(parts, np.intp)
    h.o = _data(o, "o", tn, m * O, True)
    h.ones = _data(ones, "ones", tn, ones.shape[0], False)
    h.sums = _data(sums, "sums", tn, sums.shape[0], True)
    h.accumulate = True
    h.totals = &totals[0]
    h.bad = &bad[0]
    with nogil:
        run_parts(_head_part, &h, parts)
    cdef double total = 0
    for p in range(parts):
        if bad[p] >= 0:
            raise ValueError(f"Y: expected class ids in [0, {O}), got {Y.reshape(-1)[bad[p]]} at row {bad[p]}")
        total += totals[p]
    if h.is_double:
        _add_head_parts(&h, parts, <double *> NULL)
    else:
        _add_head_parts(&h, parts, <float *> NULL)
    return total


cdef void _layer_phase(_LayerCall *c, Py_ssize_t p, Py_ssize_t n, floating *tag) noexcept nogil:
    """Part p of n of one phase of the call (``tag`` only picks the dtype):

    0. rows of A = b_h + X·W_xhᵀ (and of the ones; W_hhᵀ's columns; part 0: Hs[0] = h0);
    1. rows of the head: logits, loss, ∂L/∂logits, its rows of dOut and its part of dW_hy, db_y;
    2. the weight gradients dW_xh, db_h, dW_hh: by their output rows (the columns of dZ), or, when
       ``ksplit`` (many rows of dZ for its columns: ``KSPLIT_ROWS``), over rows of dZ (part 0 into
       the gradients, the others into partial sums added in part order after the phase): each part
       then packs only its rows of the GEMMs' operands, where the split by output rows packs all
       of them in each part.
    """
    cdef Py_ssize_t T = c.T, B = c.B, D = c.D, H = c.H, O = c.O, TB = c.T * c.B, r0, r1, i
    cdef const floating *W_hh = <const floating *> c.W_hh
    cdef floating *W_hhT = <floating *> c.W_hhT
    cdef floating *A = <floating *> c.A
    cdef floating *Hs = <floating *> c.Hs
    cdef floating *ones = <floating *> c.ones
    cdef floating *dZ = <floating *> c.dZ
    cdef floating *gw
    cdef floating *gb
    cdef Py_ssize_t last
    if c.phase == 0:
        r0 = part_start(p, n, TB)
        r1 = part_start(p + 1, n, TB)
        for i in range(r0, r1):
            memcpy(A + i * H, c.b_h, H * sizeof(floating))
            ones[i] = 1
        _cgemm(False, False, r1 - r0, H, D, <const floating *> c.X + r0 * D, D,
               <const floating *> c.W_xhT, H, <floating> 1, A + r0 * H, H)
        # the kernels' step product takes W_hhᵀ contiguous; the head's logits W_hyᵀ
        _transpose(H, H, W_hh, W_hhT, part_start(p, n, H), part_start(p + 1, n, H))
        _transpose(O, H, <const floating *> c.W_hy, <floating *> c.head.W_hyT, part_start(p, n, O),
                   part_start(p + 1, n, O))
        if p == 0:
            memcpy(Hs, c.h0, B * H * sizeof(floating))
    elif c.phase == 1:
        if not c.seq:                           # only the last step has a loss: the rest of dOut is zero
            last = (T - 1) * B * H
            memset(<floating *> c.dOut + part_start(p, n, last), 0,
                   (part_start(p + 1, n, last) - part_start(p, n, last)) * sizeof(floating))
        _head_part_of(&c.head, p, n, tag)
    elif not c.ksplit:          # by output rows (columns of dZ): no partial sums
        r0 = part_start(p, n, H)
        r1 = part_start(p + 1, n, H)
        _cgemm(True, False, r1 - r0, D, TB, dZ + r0, H, <const floating *> c.X, D, <floating> 0,
               <floating *> c.gW_xh + r0 * D, D)
        _column_sums(dZ + r0, TB, r1 - r0, H, ones, <floating> 0, <floating *> c.gb_h + r0)
        _cgemm(True, False, r1 - r0, H, TB, dZ + r0, H, Hs, H, <floating> 0, <floating *> c.gW_hh + r0 * H, H)
    else:                       # by rows of dZ, into partial sums
        r0 = part_start(p, n, TB)
        r1 = part_start(p + 1, n, TB)
        gw = <floating *> c.gW_xh if p == 0 else <floating *> c.wsums + (p - 1) * (H * D + H + H * H)
        gb = <floating *> c.gb_h if p == 0 else gw + H * D
        _cgemm(True, False, H, D, r1 - r0, dZ + r0 * H, H, <const floating *> c.X + r0 * D, D, <floating> 0,
               gw, D)
        _column_sums(dZ + r0 * H, r1 - r0, H, H, ones, <floating> 0, gb)
        _cgemm(True, False, H, H, r1 - r0, dZ + r0 * H, H, Hs + r0 * H, H, <floating> 0,
               <floating *> c.gW_hh if p == 0 else gb + H, H)


cdef void _layer_part(void *arg, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    cdef _LayerCall *c = <_LayerCall *> arg
    if c.is_double:
        _layer_phase(c, p, n, <double *> NULL)
    else:
        _layer_phase(c, p, n, <float *> NULL)


cdef Py_ssize_t _layer_run(_LayerCall *c, _Job *fjob, Py_ssize_t fparts, _Job *bjob, Py_ssize_t bparts,
                           Py_ssize_t parts, floating *tag, double *value) noexcept nogil:
    """The whole call (``tag`` only picks the dtype); returns -1, or a row with a bad class id."""
    cdef Py_ssize_t p, nw, nh = min(parts, c.n_out), size = c.H * c.D + c.H + c.H * c.H
    cdef const floating *part
    cdef double total = 0
    _transpose(c.H, c.D, <const floating *> c.W_xh, <floating *> c.W_xhT, 0, c.H)
    c.phase = 0
    run_parts(_layer_part, c, min(parts, c.T * c.B))
    fjob.A = c.A
    fjob.W = c.W_hhT
    fjob.Hs = c.Hs
    run_parts(_forward_part, fjob, fparts)
    c.phase = 1
    run_parts(_layer_part, c, nh)
    for p in range(nh):
        if c.head.bad[p] >= 0:
            return c.head.bad[p]
        total += c.head.totals[p]
    _add_head_parts(&c.head, nh, tag)
    value[0] = total / (c.n_out if c.loss == 2 else c.n_out * c.O)
    bjob.G = c.dOut
    bjob.Hs = c.Hs
    bjob.W = c.W_hh
    bjob.dZ = c.dZ
    run_parts(_backward_part, bjob, bparts)
    c.phase = 2
    nw = min(parts, c.T * c.B) if c.ksplit else min(parts, c.H)
    run_parts(_layer_part, c, nw)
    for p in range(1, nw if c.ksplit else 1):   # the weight gradients: the parts' sums in part order
        part = <const floating *> c.wsums + (p - 1) * size
        _add(<floating *> c.gW_xh, part, c.H * c.D)
        _add(<floating *> c.gb_h, part + c.H * c.D, c.H)
        _add(<floating *> c.gW_hh, part + c.H * c.D + c.H, c.H * c.H)
    return -1


def layer_loss_and_grad(X, Y, h0, weights, grads, work, const int64_t[::1] ends,
                        const int64_t[::1] bp_starts, int loss, bint sequence, int act, int threads=1,
                        int gemm_threads=1):
    """One unidirectional layer with its head: the loss, and every gradient, in one call.

    What ``fastbptt.engine.model.loss_and_grad`` computes for that model without
    lengths: A = X·W_xhᵀ + b_h, the forward recurrence, the head, the loss
    (torch's mean), ∂L/∂h from the head, the backward loop over the windows
    (see :func:`backward_accumulate`) and the weight gradients.

    Parameters
    ----------
    X : (T, B, D) C-contiguous float32 or float64
    Y : the targets: (T·B or B, O) of the dtype (mse, bce), or (T·B or B,) int64 class ids (ce)
    h0 : (B, H) of the dtype
    weights : (W_xh (H, D), W_hh (H, H), b_h (H,), W_hy (O, H), b_y (O,)), C-contiguous
    grads : five arrays of the same shapes, overwritten with the gradients
    work : (A (T, B, H), W_hhT (H, H), Hs (T+1, B, H), logits (T·B or B, O), dOut (T, B, H),
        dZ (T, B, H), carried (B, H), dz (2B, H), ones (T·B,)): overwritten; after the call
        ``Hs`` holds h0 and the states (``Hs[T]``: the final one)
    ends, bp_starts : the windows (see :func:`backward_accumulate`)
    loss : a value of ``LOSS_CODES``
    sequence : True: a loss at every step (Y has T·B rows); False: at the last step only (B rows)
    act : ``ACT_TANH`` (0) or ``ACT_RELU`` (1)
    threads, gemm_threads : int, optional
        The team sizes of the two kernels (see :func:`forward_recurrence`) and of the GEMM
        phases (their rows split between the threads; each GEMM on one BLAS call per thread).

    Returns
    -------
    float : the loss.
    """
    if len(weights) != 5 or len(grads) != 5 or len(work) != 9:
        raise ValueError(f"weights, grads, work: expected 5, 5 and 9 arrays, got {len(weights)}, "
                         f"{len(grads)} and {len(work)}")
    if not cnp.PyArray_Check(X) or cnp.PyArray_NDIM(<cnp.ndarray> X) != 3:
        raise ValueError(f"X: expected an ndarray of shape (T, B, D), got {getattr(X, 'shape', type(X))}")
    _check_act(act)
    if loss not in (0, 1, 2):
        raise ValueError(f"loss: expected 0 (mse), 1 (bce) or 2 (ce), got {loss}")
    if gemm_threads < 1:
        raise ValueError(f"gemm_threads: expected an int >= 1, got {gemm_threads}")
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(<cnp.ndarray> X)
    cdef _LayerCall c
    cdef Py_ssize_t T = dims[0], B = dims[1], D = dims[2], H, O
    W_xh, W_hh, b_h, W_hy, b_y = weights
    if not cnp.PyArray_Check(W_xh) or cnp.PyArray_NDIM(<cnp.ndarray> W_xh) != 2 or \
            not cnp.PyArray_Check(W_hy) or cnp.PyArray_NDIM(<cnp.ndarray> W_hy) != 2:
        raise ValueError("weights: expected W_xh (H, D) and W_hy (O, H) ndarrays")
    H = cnp.PyArray_DIMS(<cnp.ndarray> W_xh)[0]
    O = cnp.PyArray_DIMS(<cnp.ndarray> W_hy)[0]
    if T < 1 or B < 1 or H < 1 or O < 1:
        raise ValueError(f"X, weights: expected T, B, H, O >= 1, got {T}, {B}, {H}, {O}")
    cdef int tn = cnp.PyArray_TYPE(<cnp.ndarray> W_xh)     # the parameters' dtype is the call's
    if tn != cnp.NPY_DOUBLE and tn != cnp.NPY_FLOAT:
        raise TypeError(f"weights: expected float32 or float64 arrays, got {W_xh.dtype}")
    cdef bint is_double = tn == cnp.NPY_DOUBLE
    cdef Py_ssize_t n_out = T * B if sequence else B
    cdef Py_ssize_t n_win = ends.shape[0]
    _check_windows(ends, bp_starts, T)
    c.T, c.B, c.D, c.H, c.O, c.n_out = T, B, D, H, O, n_out
    c.loss, c.seq, c.is_double = loss, sequence, is_double
    c.X = _data(X, "X", tn, T * B * D, False)
    if loss == 2:
        c.Y = _data(Y, "Y", cnp.NPY_INT64, n_out, False)
    else:
        c.Y = _data(Y, "Y", tn, n_out * O, False)
    c.h0 = _data(h0, "h0", tn, B * H, False)
    c.W_xh = _data(W_xh, "W_xh", tn, H * D, False)
    c.W_hh = _data(W_hh, "W_hh", tn, H * H, False)
    c.b_h = _data(b_h, "b_h", tn, H, False)
    c.W_hy = _data(W_hy, "W_hy", tn, O * H, False)
    c.b_y = _data(b_y, "b_y", tn, O, False)
    c.gW_xh = _data(grads[0], "grads[0]", tn, H * D, True)
    c.gW_hh = _data(grads[1], "grads[1]", tn, H * H, True)
    c.gb_h = _data(grads[2], "grads[2]", tn, H, True)
    c.gW_hy = _data(grads[3], "grads[3]", tn, O * H, True)
    c.gb_y = _data(grads[4], "grads[4]", tn, O, True)
    c.A = _data(work[0], "A", tn, T * B * H, True)
    c.W_hhT = _data(work[1], "W_hhT", tn, H * H, True)
    c.Hs = _data(work[2], "Hs", tn, (T + 1) * B * H, True)
    c.dOut = _data(work[4], "dOut", tn, T * B * H, True)
    c.dZ = _data(work[5], "dZ", tn, T * B * H, True)
    cdef void *carried = _data(work[6], "carried", tn, B * H, True)
    cdef void *dz = _data(work[7], "dz", tn, 2 * B * H, True)
    c.ones = _data(work[8], "ones", tn, T * B, True)

    cdef Py_ssize_t parts = min(gemm_threads, max(T * B, H)), itemsize = 8 if is_double else 4
    c.ksplit = T * B >= _KSPLIT_ROWS * H
    # the head: the states of the loss steps (from step 1, or the last), their rows of dOut
    c.head.loss, c.head.is_double, c.head.m, c.head.n_out, c.head.O, c.head.H = loss, is_double, n_out, n_out, O, H
    c.head.H_rows = <const char *> c.Hs + (B * H if sequence else T * B * H) * itemsize
    c.head.W_hy, c.head.b_y, c.head.Y, c.head.ones = c.W_hy, c.b_y, c.Y, c.ones
    c.head.o = _data(work[3], "logits", tn, n_out * O, True)
    c.head.G = <char *> c.dOut + (0 if sequence else (T - 1) * B * H) * itemsize
    c.head.gw, c.head.gb, c.head.accumulate = c.gW_hy, c.gb_y, False
    cdef _Job fjob, bjob
    cdef fb_barrier fbar, bbar
    cdef Py_ssize_t fparts = _setup_job(&fjob, &fbar, T, B, H, 0, B, act, threads, -1, -1, is_double)
    fjob.bs = NULL
    fjob.bounds = NULL
    fpanels = _attach_panels(&fjob)
    cdef Py_ssize_t bparts = _setup_job(&bjob, &bbar, T, B, H, 0, B, act, threads, -1, -1, is_double)
    bjob.bs = NULL
    bjob.bounds = NULL
    bpanels = _attach_panels(&bjob)
    bjob.carried = carried
    bjob.dz = dz
    bjob.n_win = n_win
    bjob.ends = &ends[0] if n_win else NULL
    bjob.bp_starts = &bp_starts[0] if n_win else NULL
    # the call's own arrays in one block (an np.empty and a typed view each cost ~0.5 µs, in calls
    # of ~50 µs), in this order: the parts' losses, bad rows and head sums, the weight sums
    # (ksplit), W_xhᵀ and W_hyᵀ; nothing from here to free() raises
    cdef Py_ssize_t sizes[6]
    cdef char *at[6]
    cdef Py_ssize_t k, total = 0
    sizes[0] = parts * sizeof(double)
    sizes[1] = parts * sizeof(Py_ssize_t)
    sizes[2] = (parts - 1) * (O * H + O) * itemsize
    sizes[3] = ((min(parts, T * B) - 1) if c.ksplit else 0) * (H * D + H + H * H) * itemsize
    sizes[4] = H * D * itemsize
    sizes[5] = O * H * itemsize
    for k in range(6):
        total += (sizes[k] + 63) // 64 * 64
    cdef char *block = <char *> malloc(total + 64)
    if block == NULL:
        raise MemoryError(f"layer_loss_and_grad: {total} bytes of work arrays")
    at[0] = <char *> ((<intptr_t> block + 63) // 64 * 64)
    for k in range(1, 6):
        at[k] = at[k - 1] + (sizes[k - 1] + 63) // 64 * 64
    c.head.totals = <double *> at[0]
    c.head.bad = <Py_ssize_t *> at[1]
    c.head.sums = at[2]
    c.wsums = at[3]
    c.W_xhT = at[4]
    c.head.W_hyT = at[5]
    cdef double value = 0
    cdef Py_ssize_t bad_row
    with nogil:
        if is_double:
            bad_row = _layer_run(&c, &fjob, fparts, &bjob, bparts, parts, <double *> NULL, &value)
        else:
            bad_row = _layer_run(&c, &fjob, fparts, &bjob, bparts, parts, <float *> NULL, &value)
        free(block)
    if bad_row >= 0:
        raise ValueError(f"Y: expected class ids in [0, {O}), got {Y.reshape(-1)[bad_row]} at row {bad_row}")
    return value
