"""The Numba backend: the two sequential kernels of :mod:`fastbptt.backends.reference`, jitted.

The contract (shapes, what is read and written, the windows) is the module
docstring of :mod:`fastbptt.backends.reference`; this module adds only speed:

- One fused pass per step. Forward: ``Hs[t+1] = Hs[t] @ W_hhT``, then
  ``Hs[t+1] = f(Hs[t+1] + A[t])`` in place. Backward, per window and step:
  ``δ += G[t]`` (loss steps only), ``dz = δ ⊙ f'(h_t)``, ``dZ[t] (+)= dz``,
  ``δ = dz @ W_hh``. The window loop runs inside the compiled code; the two
  (B, H) work buffers are allocated once per call, never inside the loop.
- The per-step product (B, H)·(H, H) is either a hand-written loop (output
  axis innermost and contiguous, so LLVM vectorises it) or BLAS gemm: NumPy's
  own cblas gemm where it is found (:data:`HAVE_NUMPY_CBLAS`), the BLAS of the
  big GEMMs around the kernels, else ``np.dot(x, W, out)`` (SciPy's BLAS).
  Which one is a per-shape rule, :func:`_gemm_route`, measured there.
- tanh: a scalar ``math.tanh`` costs ~13-25 ns per element (a libm call per
  element). :func:`_tanh_scalar` computes tanh in a form LLVM vectorises
  (expm1 by Cody-Waite range reduction and a Taylor polynomial, scaled by an
  exact power of two): ~1.3-1.5 ns per element in float64, within 3 ulp of
  the exact tanh (5e-16 relative of ``np.tanh``); :func:`_tanh_scalar32`, the
  same in float32 arithmetic, ~0.8 ns, within 2.5 ulp. Neither is a
  low-order approximation: every step is accurate to the working precision.
- No ``fastmath``: it would reassociate the sums and break tight parity.
- A kernel runs with the GIL released on the batch ``rows`` it is given:
  time is sequential, the batch is not, so ``threads=n`` runs one call per
  part of the batch on fastbptt's pool of Python threads (Numba's threading
  layer is not used).
- ``cache=True`` where Numba finds a writable cache directory; where none is
  (read-only install, no writable home, ``NUMBA_CACHE_DIR`` unusable) the
  kernels are defined with ``cache=False`` instead, silently:
  :data:`CACHING` says which.

float32 and float64 inputs specialise the same jitted functions.
"""

import ctypes
from functools import partial
import math

import llvmlite.binding
import numba
import numpy as np
from numba import types
from numba.extending import overload

from ..engine.blas import numpy_cblas
from .._validation import check_batch_sizes, is_int
from .._threads import parts, row_parts, run
from .reference import ACT_TANH   # an int: Numba freezes it as a compile-time constant

NAME = "numba"

CACHING = True   # False once any kernel had to be defined without an on-disk cache


def _jit(func=None, **options):
    """``numba.njit(cache=True, **options)``, or ``cache=False`` where nothing can be cached.

    Numba looks for a writable cache directory (``NUMBA_CACHE_DIR``, the
    package's ``__pycache__``, the user's cache directory) when the function
    is decorated, and raises ``RuntimeError`` when it finds none.
    """
    def wrap(f):
        global CACHING
        try:
            return numba.njit(cache=True, **options)(f)
        except RuntimeError:
            CACHING = False
            return numba.njit(cache=False, **options)(f)
    return wrap if func is None else wrap(func)


# --------------------------------------------------------------------------------------------
# activations on one (B, H) step, in place
# --------------------------------------------------------------------------------------------

_LN2_HI = 6.93147180369123816490e-01   # ln 2 split so that k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00


def _tanh_scalar(v):
    """tanh(v) in float64, written so that a loop of it vectorises (no libm call, no branch).

    With a = min(|v|, 20) and y = -2a: expm1(y) = 2^k (1 + expm1(r)) - 1, where
    y = k ln2 + r, |r| <= ln2/2, expm1(r) by its Taylor series to r^13
    (truncation < 4e-18), 2^k exact; then tanh(a) = -expm1(y) / (2 + expm1(y)),
    sign restored. tanh(20) rounds to 1 in float64, so the clamp is exact.
    """
    a = min(abs(v), 20.0)
    y = -2.0 * a
    k = math.floor(y * _INV_LN2 + 0.5)                  # in [-58, 0]
    r = (y - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    em1_r = r + r * r * p                               # expm1(r)
    scale = float(np.int64(1) << np.int64(k + 60.0)) * (1.0 / 1152921504606846976.0)  # 2^k, exact
    e = scale * em1_r + (scale - 1.0)                   # expm1(y), y <= 0
    return math.copysign(-e / (2.0 + e), v)


# the same in float32 arithmetic (twice the SIMD width): ln2 split for |k| < 2**8, Taylor to r^8
# (truncation < 2e-8 relative), tanh(10) rounds to 1 in float32
_F32_LN2_HI = np.float32(0.693145751953125)
_F32_LN2_LO = np.float32(1.428606765330187045e-06)
_F32_INV_LN2 = np.float32(_INV_LN2)
_F32_ONE, _F32_TWO, _F32_HALF, _F32_CLAMP = np.float32(1), np.float32(2), np.float32(0.5), np.float32(10)
_F32_TAYLOR = tuple(np.float32(1 / math.factorial(n)) for n in range(8, 1, -1))   # 1/8! ... 1/2!
_F32_TWO_M30 = np.float32(2.0 ** -30)


def _tanh_scalar32(v):
    """tanh(v) for a float32 v in float32 arithmetic; the algorithm of :func:`_tanh_scalar`."""
    a = min(abs(v), _F32_CLAMP)
    y = -_F32_TWO * a
    k = np.float32(math.floor(y * _F32_INV_LN2 + _F32_HALF))    # in [-29, 0]
    r = (y - k * _F32_LN2_HI) - k * _F32_LN2_LO
    c8, c7, c6, c5, c4, c3, c2 = _F32_TAYLOR
    p = c8
    p = p * r + c7
    p = p * r + c6
    p = p * r + c5
    p = p * r + c4
    p = p * r + c3
    p = p * r + c2
    em1_r = r + r * r * p                                        # expm1(r)
    scale = np.float32(np.int32(1) << np.int32(k + np.float32(30))) * _F32_TWO_M30   # 2^k, exact
    e = scale * em1_r + (scale - _F32_ONE)
    return np.float32(math.copysign(-e / (_F32_TWO + e), v))


def _tanh(v):
    """tanh in the working precision of ``v``: :func:`_tanh_scalar32` or :func:`_tanh_scalar`.

    Chosen by type when the caller compiles, so that each dtype compiles one of them.
    """
    return np.tanh(v)


@overload(_tanh, inline="always", jit_options={"error_model": "numpy"})
def _tanh_impl(v):
    return _tanh_scalar32 if v == types.float32 else _tanh_scalar


@_jit(inline="always", error_model="numpy")
def _activate_step(z, a, act):
    """z[b, j] = f(z[b, j] + a[b, j]) for one step: z, a of shape (B, H)."""
    B, H = z.shape
    if act == ACT_TANH:
        for b in range(B):
            for j in range(H):
                z[b, j] = _tanh(z[b, j] + a[b, j])
    else:
        for b in range(B):
            for j in range(H):
                v = z[b, j] + a[b, j]
                z[b, j] = v if v > 0 else 0


# --------------------------------------------------------------------------------------------
# the per-step product out = x @ W, (B, H) x (H, H)
# --------------------------------------------------------------------------------------------

@_jit(inline="always")
def _matmul_rows(x, W, out):
    """out = x @ W, the contiguous output axis innermost (vectorised): out[b] = Σ_i x[b, i] W[i].

    Four rows of W per pass over out[b] (a quarter of the loads and stores of out),
    the additions still in the order i = 0, 1, 2, ...
    """
    B, H = x.shape
    for b in range(B):
        xb0 = x[b, 0]
        for j in range(H):
            out[b, j] = xb0 * W[0, j]
        i = 1
        while i + 3 < H:
            x0 = x[b, i]
            x1 = x[b, i + 1]
            x2 = x[b, i + 2]
            x3 = x[b, i + 3]
            for j in range(H):
                out[b, j] = (((out[b, j] + x0 * W[i, j]) + x1 * W[i + 1, j])
                             + x2 * W[i + 2, j]) + x3 * W[i + 3, j]
            i += 4
        while i < H:
            xbi = x[b, i]
            for j in range(H):
                out[b, j] += xbi * W[i, j]
            i += 1


# gemm of NumPy's own BLAS. Numba's np.dot calls SciPy's OpenBLAS; NumPy's wheels bundle another
# (newer) OpenBLAS, which also runs the big GEMMs of fastbptt.engine.core. Calling NumPy's keeps the whole
# training step on one BLAS thread pool (two pools on two cores fight: PERF_NOTES), and its sgemm
# was ~10% faster at (64, 256)·(256, 256) and (128, 1024)·(1024, 1024) (OpenBLAS 0.3.31 vs 0.3.30,
# one thread), with less overhead per call (0.44 vs 0.53 µs at (1, 64)·(64, 64)).
# The kernels call it by symbol name, resolved when the code is linked (also from the disk cache),
# so the names are always registered: to NumPy's cblas_?gemm when found (ILP64 symbols only: the
# integer width must be known), otherwise to a placeholder that is never called (the wrappers
# then take np.dot).

_GEMM_LOOP, _GEMM_NUMBA_DOT, _GEMM_NUMPY_CBLAS = 0, 1, 2
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111


def _cblas_prototype(c_float):
    return ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64, ctypes.c_int64, c_float, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int64, c_float, ctypes.c_void_p, ctypes.c_int64)


def _register_cblas():
    found = numpy_cblas()
    keep = []   # placeholders must outlive the module's use of their addresses
    for kind, c_float in (("s", ctypes.c_float), ("d", ctypes.c_double)):
        if found is None:
            keep.append(_cblas_prototype(c_float)(lambda *args: None))
            address = ctypes.cast(keep[-1], ctypes.c_void_p).value
        else:
            address = found[kind]
        llvmlite.binding.add_symbol(f"fastbptt_numpy_cblas_{kind}gemm", address)
    return found is not None, keep


HAVE_NUMPY_CBLAS, _placeholders = _register_cblas()

#: ``threads=n`` splits the batch rows between n Python threads (:func:`fastbptt._threads.run`):
#: the kernels release the GIL, and each sequence of a batch is independent
TEAM = False


def _cblas_type(ft):
    i32, i64, ptr = types.int32, types.int64, types.CPointer(ft)
    return types.void(i32, i32, i32, i64, i64, i64, ft, ptr, i64, ptr, i64, ft, ptr, i64)


_numpy_sgemm = types.ExternalFunction("fastbptt_numpy_cblas_sgemm", _cblas_type(types.float32))
_numpy_dgemm = types.ExternalFunction("fastbptt_numpy_cblas_dgemm", _cblas_type(types.float64))


def _numpy_gemm(x, W, out):
    """out = x @ W through NumPy's cblas gemm, row-major, for C-contiguous 2-D arrays."""


@overload(_numpy_gemm)
def _numpy_gemm_impl(x, W, out):
    gemm, one, zero = ((_numpy_sgemm, np.float32(1), np.float32(0)) if x.dtype == types.float32
                       else (_numpy_dgemm, 1.0, 0.0))

    def impl(x, W, out):
        m, k = x.shape
        n = W.shape[1]
        gemm(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k,
             one, x.ctypes, k, W.ctypes, n, zero, out.ctypes, n)
    return impl


@_jit(inline="always")
def _step_product(x, W, out, gemm):
    """out = x @ W, (B, H)·(H, H), by the route ``gemm`` names (one of the _GEMM_* codes)."""
    if gemm == _GEMM_NUMPY_CBLAS:
        _numpy_gemm(x, W, out)
    elif gemm == _GEMM_NUMBA_DOT:
        np.dot(x, W, out)
    else:
        _matmul_rows(x, W, out)


# --------------------------------------------------------------------------------------------
# the kernels
# --------------------------------------------------------------------------------------------

@_jit(inline="always")
def _n_active(bs, t, b0, b1):
    """Rows of [b0, b1) active at step t: [b0, b0 + n) (``bs`` empty: all of them)."""
    if bs.shape[0] == 0:
        return b1 - b0
    n = min(bs[t], b1) - b0
    return n if n > 0 else 0


@_jit(error_model="numpy", nogil=True)
def _forward(A, W_hhT, Hs, act, gemm, b0, b1, bs):
    """The forward of batch rows [b0, b1): each step's rows ``Hs[t, b0:b1]`` are a C-contiguous block.

    ``bs`` holds the steps' active row counts (empty: every row, every step).
    """
    T = A.shape[0]
    for t in range(T):
        n = _n_active(bs, t, b0, b1)
        if n == 0:
            break
        h_next = Hs[t + 1, b0:b0 + n]
        _step_product(Hs[t, b0:b0 + n], W_hhT, h_next, gemm)   # Hs[t+1] = h_{t-1} @ W_hhᵀ
        _activate_step(h_next, A[t, b0:b0 + n], act)            # Hs[t+1] = f(Hs[t+1] + A[t])


@_jit(error_model="numpy", nogil=True)
def _backward(G, Hs, W_hh, ends, bp_starts, act, dZ, gemm, b0, b1, bs):
    """The backward of batch rows [b0, b1) (see ``_forward``)."""
    T, H = G.shape[0], G.shape[2]
    B = b1 - b0
    delta = np.empty((B, H), dtype=G.dtype)     # δ carried back from step t+1
    dz = np.empty((B, H), dtype=G.dtype)
    zero = np.zeros(1, dtype=G.dtype)[0]       # typed constants: float32 stays float32
    one = np.ones(1, dtype=G.dtype)[0]
    loss_start = 0          # first loss step of the current window (= previous end)
    for w in range(ends.shape[0]):
        end = ends[w]
        bp_start = bp_starts[w]
        # Earlier windows end at or before loss_start, so steps >= loss_start are the
        # window's own loss steps, and no earlier window has touched them: dZ[t] is written,
        # not added to. Steps in [loss_start, bp_start) lie in no window at all: zeroed.
        for t in range(loss_start, bp_start):
            dZ[t, b0:b1, :] = 0
        n_carried = 0           # rows whose δ was carried from step t+1 (0 at the window's last step)
        for t in range(end - 1, bp_start - 1, -1):
            n = _n_active(bs, t, b0, b1)
            h = Hs[t + 1, b0:b0 + n]
            g_t = G[t, b0:b0 + n]
            dz_t = dZ[t, b0:b0 + n]
            own_step = t >= loss_start
            for b in range(n):
                carried = b < n_carried          # a row's chain starts at zero at its last step
                for j in range(H):
                    d = delta[b, j] if carried else zero
                    if own_step:
                        d += g_t[b, j]               # δ_t = ∂L/∂h_t (direct) + carried
                    hv = h[b, j]
                    if act == ACT_TANH:
                        g = d * (one - hv * hv)      # dz_t = δ_t ⊙ (1 - h_t²)
                    else:
                        g = d if hv > zero else zero  # dz_t = δ_t ⊙ [h_t > 0]
                    dz[b, j] = g
                    if own_step:
                        dz_t[b, j] = g
                    else:
                        dz_t[b, j] += g
            n_carried = 0
            if t > bp_start and n > 0:
                _step_product(dz[:n], W_hh, delta[:n], gemm)       # δ_{t-1} = W_hhᵀ dz_t
                n_carried = n
        loss_start = end
    for t in range(loss_start, T):      # none: ends[-1] = T by contract (the reference zeroes them)
        dZ[t, b0:b1, :] = 0


# --------------------------------------------------------------------------------------------
# the contract's entry points
# --------------------------------------------------------------------------------------------

def _gemm_route(B, H, itemsize, have_numpy_cblas=None):
    """How the per-step product (B, H)·(H, H) is computed: a ``_GEMM_*`` code.

    Measured on 2 x Zen 4 (AVX-512), OpenBLAS on one thread, forward + backward
    kernel time per step with tanh (one run each on a loaded machine: +-15%).

    NumPy's cblas gemm against the loop, ratio cblas / loop (< 1: cblas faster):

        (B, H)     float32  float64        (B, H)     float32  float64
        (1, 16)     0.96     1.02          (1, 96)     0.87     1.03
        (1, 32)     0.86     0.88          (1, 128)    1.03     1.09
        (1, 64)     0.70     0.89          (2, 16)     0.72     0.70

    so with it the loop never pays: always gemm. NumPy's cblas against np.dot
    (SciPy's OpenBLAS), ratio np.dot / cblas: 1.36 / 1.57 (float32 / float64) at
    (1, 64), 1.0 at (32, 64) and (16, 128), 1.10 / 0.99 at (64, 256), 1.20 / 1.01
    at (128, 1024).

    Without NumPy's cblas, np.dot against the loop, ratio np.dot / loop (> 1:
    the loop is faster):

        (B, H)     float32  float64        (B, H)     float32  float64
        (1, 16)     1.39     1.89          (2, 32)     0.78     0.60
        (1, 32)     1.29     1.95          (2, 64)     0.53     0.68
        (1, 64)     0.90     1.31          (4, 32)     0.55     0.65
        (1, 128)    0.94     1.15          (8, 32)     0.47     0.52

    and np.dot is 2.5-4x faster from B·H² = 32·64² upwards: the loop is taken at
    batch 1 up to H = 32 in float32, H = 128 in float64, where np.dot's fixed
    cost per call (~0.5 µs) is a large part of a matrix-vector product.
    """
    if have_numpy_cblas is None:
        have_numpy_cblas = HAVE_NUMPY_CBLAS
    if have_numpy_cblas:
        return _GEMM_NUMPY_CBLAS
    if B == 1 and H <= (32 if itemsize == 4 else 128):
        return _GEMM_LOOP
    return _GEMM_NUMBA_DOT


def _rows(rows, B):
    b0, b1 = (0, B) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= b0 < b1 <= B:
        raise ValueError(f"rows: expected (b0, b1) with 0 <= b0 < b1 <= B={B}, got {rows!r}")
    return b0, b1


def _on_threads(kernel, B, threads, rows, args):
    """Run ``kernel(*args, b0, b1)`` on the batch rows (or ``rows``), split between ``threads`` Python threads."""
    if not is_int(threads) or threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
    b0, b1 = _rows(rows, B)
    if threads == 1 or b1 - b0 == 1:
        kernel(*args, b0, b1)
        return
    bs = args[-1]
    if bs.shape[0]:             # a variable-length batch: parts of equal work, not of equal rows
        ranges = row_parts(bs, b0, b1, threads)
    else:
        ranges = [(b0 + r0, b0 + r1) for r0, r1 in parts(b1 - b0, threads)]
    run([partial(kernel, *args, r0, r1) for r0, r1 in ranges])


def _forward_rows(A, W_hhT, Hs, act, bs, b0, b1):
    _forward(A, W_hhT, Hs, act, _gemm_route(b1 - b0, A.shape[2], A.itemsize), b0, b1, bs)


def _backward_rows(G, Hs, W_hh, ends, bp_starts, act, dZ, bs, b0, b1):
    _backward(G, Hs, W_hh, ends, bp_starts, act, dZ, _gemm_route(b1 - b0, G.shape[2], G.itemsize), b0, b1, bs)


_ALL_ROWS = np.empty(0, dtype=np.int64)


def _batch_sizes(batch_sizes, T, B):
    bs = check_batch_sizes(batch_sizes, T, B)
    return _ALL_ROWS if bs is None else bs


def forward_recurrence(A, W_hhT, Hs, act, threads=1, batch_sizes=None, rows=None):
    """Fill ``Hs[1:]``; see the kernel contract in :mod:`fastbptt.backends.reference`.

    ``rows=(b0, b1)`` computes only those sequences of the batch (calls on
    disjoint rows may run at once); ``threads`` splits the rows between threads.
    """
    assert A.dtype == W_hhT.dtype == Hs.dtype and Hs.shape[0] == A.shape[0] + 1
    bs = _batch_sizes(batch_sizes, A.shape[0], A.shape[1])
    _on_threads(_forward_rows, A.shape[1], threads, rows, (A, W_hhT, Hs, int(act), bs))


def backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, threads=1, batch_sizes=None, rows=None):
    """Overwrite ``dZ`` with Σ_windows dz_t; see :mod:`fastbptt.backends.reference` (and ``rows``,
    ``threads`` as for :func:`forward_recurrence`)."""
    assert G.dtype == Hs.dtype == W_hh.dtype == dZ.dtype and ends.shape == bp_starts.shape
    bs = _batch_sizes(batch_sizes, G.shape[0], G.shape[1])
    _on_threads(_backward_rows, G.shape[1], threads, rows, (G, Hs, W_hh, ends, bp_starts, int(act), dZ, bs))
