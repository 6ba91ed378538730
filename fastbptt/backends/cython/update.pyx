"""The optimizers' element-wise rules in one pass each (see :mod:`fastbptt.optim`).

Each function computes, element by element, exactly the operations of the
NumPy code of the optimizer's ``_update``, in the same order and in the
arrays' dtype (a Python float hyperparameter is first rounded to that dtype,
as NumPy does with a scalar), so the results are bit-identical to it: one
pass over the flat arrays instead of five to ten, each with its own
temporaries. The C compiler may not fuse a multiply and an add: this file is
built for the x86-64 baseline (no FMA), and nothing here is ``fastmath``.

A buffer given as None is read as zeros (the first step). Nothing is written
but the ``new_*`` arrays; ``g`` is read only.
"""

from cython cimport floating
from libc.math cimport pow, sqrt, sqrtf


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline Py_ssize_t _n(const floating[::1] a) noexcept:
    return -1 if a is None else a.shape[0]


cdef int _sizes(Py_ssize_t n, str names, tuple sizes) except -1:
    """ValueError unless every array has ``n`` elements (a size of -1: an array given as None)."""
    for name, got in zip(names.split(), sizes):
        if got != -1 and got != n:
            raise ValueError(f"{name}: expected {n} elements like p, got {got}")
    return 0


def sgd(const floating[::1] p, const floating[::1] g, const floating[::1] buf, floating[::1] new_buf,
        floating[::1] new_p, double lr, double momentum, bint nesterov, double weight_decay):
    """``new_p = p - lr·g'``; with momentum, ``new_buf = momentum·buf + g`` (``buf`` None: ``g``) and
    ``g' = g + momentum·new_buf`` (nesterov) or ``new_buf``; ``g`` first gets ``+ wd·p``."""
    cdef Py_ssize_t i, n = p.shape[0]
    _sizes(n, "g new_p buf new_buf", (g.shape[0], new_p.shape[0], _n(buf), _n(new_buf)))
    if momentum and new_buf is None:
        raise ValueError("new_buf: expected an array with momentum, got None")
    cdef floating lr_ = <floating> lr, mom = <floating> momentum, wd = <floating> weight_decay, gi, b
    cdef bint has_wd = weight_decay != 0, has_mom = momentum != 0, first = buf is None
    with nogil:
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + p[i] * wd
            if has_mom:
                b = gi if first else buf[i] * mom + gi
                new_buf[i] = b
                gi = gi + b * mom if nesterov else b
            new_p[i] = p[i] - gi * lr_


def adam(const floating[::1] p, const floating[::1] g, const floating[::1] m, const floating[::1] v,
         floating[::1] new_m, floating[::1] new_v, floating[::1] new_p, double lr, double beta1,
         double beta2, double eps, double weight_decay, long t):
    """torch's Adam (see :class:`fastbptt.optim.Adam`): ``m`` lerped toward ``g``, ``v`` the
    average of ``g²``, bias-corrected, at step ``t``."""
    cdef Py_ssize_t i, n = p.shape[0]
    _sizes(n, "g new_p new_m new_v m v", (g.shape[0], new_p.shape[0], new_m.shape[0], new_v.shape[0], _n(m), _n(v)))
    cdef double w = 1.0 - beta1
    cdef bint low = w < 0.5, has_wd = weight_decay != 0, first = m is None or v is None
    cdef floating wd = <floating> weight_decay, w_ = <floating> (w if low else 1.0 - w)
    cdef floating b2c = <floating> (1.0 - beta2), b2 = <floating> beta2, eps_ = <floating> eps
    cdef floating step = <floating> (lr / (1.0 - pow(beta1, <double> t)))
    cdef floating corr = <floating> sqrt(1.0 - pow(beta2, <double> t))
    cdef floating gi, mi, vi, d, nm, nv, den, zero = 0
    with nogil:
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + p[i] * wd
            mi = zero if first else m[i]
            vi = zero if first else v[i]
            d = gi - mi
            nm = d * w_ + mi if low else gi - d * w_
            nv = vi * b2 + (gi * gi) * b2c
            new_m[i] = nm
            new_v[i] = nv
            den = _sqrt(nv) / corr + eps_
            new_p[i] = p[i] - (nm * step) / den


def rmsprop(const floating[::1] p, const floating[::1] g, const floating[::1] v, const floating[::1] buf,
            floating[::1] new_v, floating[::1] new_buf, floating[::1] new_p, double lr, double alpha,
            double eps, double momentum):
    """torch's RMSprop (see :class:`fastbptt.optim.RMSprop`); ``new_buf`` only with momentum > 0."""
    cdef Py_ssize_t i, n = p.shape[0]
    _sizes(n, "g new_p new_v v buf new_buf", (g.shape[0], new_p.shape[0], new_v.shape[0], _n(v), _n(buf), _n(new_buf)))
    if momentum > 0 and new_buf is None:
        raise ValueError("new_buf: expected an array with momentum, got None")
    cdef floating a_ = <floating> alpha, ac = <floating> (1.0 - alpha), eps_ = <floating> eps
    cdef floating lr_ = <floating> lr, mom = <floating> momentum, gi, nv, avg, b, zero = 0
    cdef bint has_mom = momentum > 0, first_v = v is None, first_b = buf is None
    with nogil:
        for i in range(n):
            gi = g[i]
            nv = (zero if first_v else v[i]) * a_ + (gi * gi) * ac
            new_v[i] = nv
            avg = _sqrt(nv) + eps_
            if has_mom:
                b = (zero if first_b else buf[i]) * mom + gi / avg
                new_buf[i] = b
                new_p[i] = p[i] - b * lr_
            else:
                new_p[i] = p[i] - (gi * lr_) / avg


def adagrad(const floating[::1] p, const floating[::1] g, const floating[::1] s, floating[::1] new_s,
            floating[::1] new_p, double lr, double eps):
    """``new_s = s + g²``, ``new_p = p - lr·g / (√new_s + eps)`` (see :class:`fastbptt.optim.Adagrad`)."""
    cdef Py_ssize_t i, n = p.shape[0]
    _sizes(n, "g new_p new_s s", (g.shape[0], new_p.shape[0], new_s.shape[0], _n(s)))
    cdef floating lr_ = <floating> lr, eps_ = <floating> eps, gi, ns, zero = 0
    cdef bint first = s is None
    with nogil:
        for i in range(n):
            gi = g[i]
            ns = (zero if first else s[i]) + gi * gi
            new_s[i] = ns
            new_p[i] = p[i] - (gi * lr_) / (_sqrt(ns) + eps_)
