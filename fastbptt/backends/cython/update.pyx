"""The optimizers' element-wise rules in one pass each (see :mod:`fastbptt.optim`).

Each function computes, element by element, exactly the operations of the
NumPy code of the optimizer's ``_update``, in the same order and in the
arrays' dtype (a Python float hyperparameter is first rounded to that dtype,
as NumPy does with a scalar), so the results are bit-identical to it: one
vectorised pass over the flat arrays instead of five to ten, each with its
own temporaries. The C compiler may not fuse a multiply and an add (this
file is built with -ffp-contract=off), and nothing here is ``fastmath``; the
loops are in ``update_rules_body.h``.

A buffer given as None is read as zeros (the first step). ``p`` is one flat
array, or a tuple of C-contiguous arrays of the dtype (the parameters, read
one after the other where they are, without a copy into one array first).
Nothing is written but the ``new_*`` arrays; ``g`` is read only. With ``clip``
> 0 each rule reads ``g`` clamped into ``[-clip, clip]`` (as :func:`clamp`,
``clip`` rounded to the dtype). Each rule returns 0 when every gradient value
and every value it wrote is finite, else ``OUT_BAD`` (a value written is not)
| ``GRAD_BAD`` (a gradient value is not: then nothing it wrote means anything).
"""

import numpy as np

cimport numpy as cnp
from cython cimport floating
from libc.math cimport pow, sqrt
from libc.string cimport memcpy

cnp.import_array()


cdef extern from "update_rules.h" nogil:
    enum: FBU_MAX_PARTS
    ctypedef struct fbu_parts:
        const char *data[FBU_MAX_PARTS]
        Py_ssize_t size[FBU_MAX_PARTS]
        Py_ssize_t k
    int fbu_nonfinite_f32(const float *x, Py_ssize_t n)
    int fbu_nonfinite_f64(const double *x, Py_ssize_t n)
    void fbu_clamp_f32(float *x, Py_ssize_t n, float c)
    void fbu_clamp_f64(double *x, Py_ssize_t n, double c)
    int fbu_sgd_f32(const fbu_parts *p, const float *g, const float *buf, float *new_buf, float *new_p,
                    float lr, float mom, float wd, int has_wd, int has_mom, int nesterov, int first, float clip)
    int fbu_sgd_f64(const fbu_parts *p, const double *g, const double *buf, double *new_buf, double *new_p,
                    double lr, double mom, double wd, int has_wd, int has_mom, int nesterov, int first,
                    double clip)
    int fbu_adam_f32(const fbu_parts *p, const float *g, const float *m, const float *v, float *new_m,
                     float *new_v, float *new_p, float w, float b2, float b2c, float step, float corr, float eps,
                     float wd, int has_wd, int low, float clip)
    int fbu_adam_f64(const fbu_parts *p, const double *g, const double *m, const double *v, double *new_m,
                     double *new_v, double *new_p, double w, double b2, double b2c, double step, double corr,
                     double eps, double wd, int has_wd, int low, double clip)
    int fbu_rmsprop_f32(const fbu_parts *p, const float *g, const float *v, const float *buf, float *new_v,
                        float *new_buf, float *new_p, float lr, float a, float ac, float eps, float mom, int has_mom,
                        float clip)
    int fbu_rmsprop_f64(const fbu_parts *p, const double *g, const double *v, const double *buf, double *new_v,
                        double *new_buf, double *new_p, double lr, double a, double ac, double eps, double mom,
                        int has_mom, double clip)
    int fbu_adagrad_f32(const fbu_parts *p, const float *g, const float *s, float *new_s, float *new_p,
                        float lr, float eps, float clip)
    int fbu_adagrad_f64(const fbu_parts *p, const double *g, const double *s, double *new_s, double *new_p,
                        double lr, double eps, double clip)
    int fbu_level
    enum: FBU_OUT_BAD
    enum: FBU_GRAD_BAD
    int fbu_best()
    int fbu_set_level(int level)


cdef inline Py_ssize_t _n(const floating[::1] a) noexcept:
    return -1 if a is None else a.shape[0]


cdef int _sizes(Py_ssize_t n, str names, tuple sizes) except -1:
    """ValueError unless every array has ``n`` elements (a size of -1: an array given as None)."""
    for name, got in zip(names.split(), sizes):
        if got != -1 and got != n:
            raise ValueError(f"{name}: expected {n} elements like p, got {got}")
    return 0


cdef inline const floating *_or_zeros(const floating[::1] a, const floating[::1] zeros) noexcept:
    return &zeros[0] if a is None else &a[0]


OUT_BAD, GRAD_BAD = FBU_OUT_BAD, FBU_GRAD_BAD

#: the instruction sets of the rules, by level; AVX2 (else the best the CPU has) is picked at import
LEVELS = ("base", "avx2", "avx512")
fbu_set_level(fbu_best())


def _set_level(name):
    """Run the rules at ``name`` (one of ``LEVELS``, or "auto": as at import); returns the
    name in force. RuntimeError for a level this CPU lacks (nothing changes). For tests: the
    results are the same at every level."""
    level = fbu_best() if name == "auto" else LEVELS.index(name)
    if fbu_set_level(level) != level:
        raise RuntimeError(f"level: this CPU cannot run {name!r}")
    return LEVELS[fbu_level]


MAX_PARTS = FBU_MAX_PARTS     # more arrays than this: the caller gives them as one array


cdef int _parts(object p, Py_ssize_t n, int typenum, fbu_parts *parts) except -1:
    """``p``'s runs (data pointers and sizes): one 1-D array, or a tuple of C-contiguous arrays of
    ``typenum``, ``n`` elements in all; ValueError if ``p`` is not so."""
    cdef Py_ssize_t total = 0
    cdef cnp.ndarray a
    parts.k = 0
    for obj in ((p,) if type(p) is np.ndarray else p):
        if (type(obj) is not np.ndarray or parts.k == FBU_MAX_PARTS
                or cnp.PyArray_TYPE(<cnp.ndarray> obj) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray> obj)):
            raise ValueError(f"p: expected an array or a tuple of at most {FBU_MAX_PARTS} C-contiguous arrays "
                             f"of the gradient's dtype, got {type(obj).__name__} in it")
        a = <cnp.ndarray> obj
        parts.data[parts.k] = <const char *> cnp.PyArray_DATA(a)
        parts.size[parts.k] = cnp.PyArray_SIZE(a)
        total += parts.size[parts.k]
        parts.k += 1
    if total != n:
        raise ValueError(f"p: expected {n} elements like g, got {total}")
    return 0


cdef inline int _typenum(bint single) noexcept:
    return cnp.NPY_FLOAT32 if single else cnp.NPY_FLOAT64


def commit_parts(tuple arrays, const floating[::1] flat, dict d, str key, object value):
    """Copy ``flat``'s consecutive runs into ``arrays`` (C-contiguous, of its dtype, its size in all:
    checked first), then ``d[key] = value``: the writes of one optimizer step with no Python
    bytecode between the first and the last, so that no interrupt can fall between them."""
    cdef fbu_parts parts
    cdef Py_ssize_t i, off = 0
    _parts(arrays, flat.shape[0], _typenum(floating is float), &parts)
    for i in range(parts.k):
        if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> arrays[i]):
            raise ValueError(f"arrays[{i}]: expected a writable array")
    with nogil:
        for i in range(parts.k):
            memcpy(<char *> parts.data[i], &flat[off], parts.size[i] * sizeof(floating))
            off += parts.size[i]
    d[key] = value


cdef object _zeros(Py_ssize_t n, bint single):
    """Zeros: the first step's buffers (read, never written)."""
    return np.zeros(n, np.float32 if single else np.float64)


def check_clamp(floating[::1] x, double c):
    """The index of ``x``'s first NaN or inf, or -1 (one vectorised pass when there is none); when
    it is -1 and ``c`` > 0, also :func:`clamp` ``x`` into ``[-c, c]``."""
    cdef Py_ssize_t n = x.shape[0]
    cdef int bad
    if n == 0:
        return -1
    with nogil:
        bad = fbu_nonfinite_f32(&x[0], n) if floating is float else fbu_nonfinite_f64(&x[0], n)
        if not bad and c > 0:
            if floating is float:
                fbu_clamp_f32(&x[0], n, <float> c)
            else:
                fbu_clamp_f64(&x[0], n, c)
    return -1 if not bad else int(np.flatnonzero(~np.isfinite(np.asarray(x)))[0])


def clamp(floating[::1] x, double c):
    """``x`` into ``[-c, c]`` in place (``c`` rounded to the dtype), as ``np.minimum`` then
    ``np.maximum`` give it for finite values."""
    cdef Py_ssize_t n = x.shape[0]
    if n == 0:
        return
    with nogil:
        if floating is float:
            fbu_clamp_f32(&x[0], n, <float> c)
        else:
            fbu_clamp_f64(&x[0], n, c)


def sgd(object p, const floating[::1] g, const floating[::1] buf, floating[::1] new_buf,
        floating[::1] new_p, double lr, double momentum, bint nesterov, double weight_decay, double clip=0):
    """``new_p = p - lr·g'``; with momentum, ``new_buf = momentum·buf + g`` (``buf`` None: ``g``) and
    ``g' = g + momentum·new_buf`` (nesterov) or ``new_buf``; ``g`` first gets ``+ wd·p``."""
    cdef Py_ssize_t n = g.shape[0]
    _sizes(n, "new_p buf new_buf", (new_p.shape[0], _n(buf), _n(new_buf)))
    if momentum and new_buf is None:
        raise ValueError("new_buf: expected an array with momentum, got None")
    cdef fbu_parts parts
    _parts(p, n, _typenum(floating is float), &parts)
    if n == 0:
        return 0
    cdef bint has_mom = momentum != 0, first = buf is None
    cdef const floating *bp = NULL          # (not read on the first step)
    if not first:
        bp = &buf[0]
    cdef floating *nb = &new_buf[0] if has_mom else NULL
    cdef int bad
    with nogil:
        if floating is float:
            bad = fbu_sgd_f32(&parts, &g[0], bp, nb, &new_p[0], <float> lr, <float> momentum,
                              <float> weight_decay, weight_decay != 0, has_mom, nesterov, first, <float> clip)
        else:
            bad = fbu_sgd_f64(&parts, &g[0], bp, nb, &new_p[0], lr, momentum, weight_decay, weight_decay != 0,
                              has_mom, nesterov, first, clip)
    return bad


def adam(object p, const floating[::1] g, const floating[::1] m, const floating[::1] v,
         floating[::1] new_m, floating[::1] new_v, floating[::1] new_p, double lr, double beta1,
         double beta2, double eps, double weight_decay, long t, double clip=0):
    """torch's Adam (see :class:`fastbptt.optim.Adam`): ``m`` lerped toward ``g``, ``v`` the
    average of ``g²``, bias-corrected, at step ``t``."""
    cdef Py_ssize_t n = g.shape[0]
    _sizes(n, "new_p new_m new_v m v", (new_p.shape[0], new_m.shape[0], new_v.shape[0], _n(m), _n(v)))
    cdef fbu_parts parts
    _parts(p, n, _typenum(floating is float), &parts)
    if n == 0:
        return 0
    cdef double w = 1.0 - beta1
    cdef bint low = w < 0.5
    cdef const floating[::1] zeros = _zeros(n, floating is float) if m is None or v is None else None
    cdef const floating *mp = &zeros[0] if zeros is not None else &m[0]
    cdef const floating *vp = &zeros[0] if zeros is not None else &v[0]
    cdef double step = lr / (1.0 - pow(beta1, <double> t)), corr = sqrt(1.0 - pow(beta2, <double> t))
    cdef int bad
    with nogil:
        if floating is float:
            bad = fbu_adam_f32(&parts, &g[0], mp, vp, &new_m[0], &new_v[0], &new_p[0],
                               <float> (w if low else 1.0 - w), <float> beta2, <float> (1.0 - beta2),
                               <float> step, <float> corr, <float> eps, <float> weight_decay,
                               weight_decay != 0, low, <float> clip)
        else:
            bad = fbu_adam_f64(&parts, &g[0], mp, vp, &new_m[0], &new_v[0], &new_p[0], w if low else 1.0 - w,
                               beta2, 1.0 - beta2, step, corr, eps, weight_decay, weight_decay != 0, low, clip)
    return bad


def rmsprop(object p, const floating[::1] g, const floating[::1] v, const floating[::1] buf,
            floating[::1] new_v, floating[::1] new_buf, floating[::1] new_p, double lr, double alpha,
            double eps, double momentum, double clip=0):
    """torch's RMSprop (see :class:`fastbptt.optim.RMSprop`); ``new_buf`` only with momentum > 0."""
    cdef Py_ssize_t n = g.shape[0]
    _sizes(n, "new_p new_v v buf new_buf", (new_p.shape[0], new_v.shape[0], _n(v), _n(buf), _n(new_buf)))
    if momentum > 0 and new_buf is None:
        raise ValueError("new_buf: expected an array with momentum, got None")
    cdef fbu_parts parts
    _parts(p, n, _typenum(floating is float), &parts)
    if n == 0:
        return 0
    cdef bint has_mom = momentum > 0
    cdef const floating[::1] zeros = _zeros(n, floating is float) if v is None or (has_mom and buf is None) else None
    cdef const floating *vp = _or_zeros(v, zeros)
    cdef const floating *bp = _or_zeros(buf, zeros) if has_mom else NULL
    cdef floating *nb = &new_buf[0] if has_mom else NULL
    cdef int bad
    with nogil:
        if floating is float:
            bad = fbu_rmsprop_f32(&parts, &g[0], vp, bp, &new_v[0], nb, &new_p[0], <float> lr, <float> alpha,
                                  <float> (1.0 - alpha), <float> eps, <float> momentum, has_mom, <float> clip)
        else:
            bad = fbu_rmsprop_f64(&parts, &g[0], vp, bp, &new_v[0], nb, &new_p[0], lr, alpha, 1.0 - alpha, eps,
                                  momentum, has_mom, clip)
    return bad


def adagrad(object p, const floating[::1] g, const floating[::1] s, floating[::1] new_s,
            floating[::1] new_p, double lr, double eps, double clip=0):
    """``new_s = s + g²``, ``new_p = p - lr·g / (√new_s + eps)`` (see :class:`fastbptt.optim.Adagrad`)."""
    cdef Py_ssize_t n = g.shape[0]
    _sizes(n, "new_p new_s s", (new_p.shape[0], new_s.shape[0], _n(s)))
    cdef fbu_parts parts
    _parts(p, n, _typenum(floating is float), &parts)
    if n == 0:
        return 0
    cdef const floating[::1] zeros = _zeros(n, floating is float) if s is None else None
    cdef const floating *sp = _or_zeros(s, zeros)
    cdef int bad
    with nogil:
        if floating is float:
            bad = fbu_adagrad_f32(&parts, &g[0], sp, &new_s[0], &new_p[0], <float> lr, <float> eps, <float> clip)
        else:
            bad = fbu_adagrad_f64(&parts, &g[0], sp, &new_s[0], &new_p[0], lr, eps, clip)
    return bad
