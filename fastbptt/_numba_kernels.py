"""The Numba backend: the two sequential kernels of :mod:`fastbptt.reference`, jitted.

The contract (shapes, what is read and written, the windows) is the module
docstring of :mod:`fastbptt.reference`; this module adds only speed:

- One fused pass per step. Forward: ``Hs[t+1] = Hs[t] @ W_hhT``, then
  ``Hs[t+1] = f(Hs[t+1] + A[t])`` in place. Backward, per window and step:
  ``δ += G[t]`` (loss steps only), ``dz = δ ⊙ f'(h_t)``, ``dZ[t] (+)= dz``,
  ``δ = dz @ W_hh``. The window loop runs inside the compiled code; the two
  (B, H) work buffers are allocated once per call, never inside the loop.
- The per-step product (B, H)·(H, H) is either a hand-written loop (output
  axis innermost and contiguous, so LLVM vectorises it) or BLAS gemm through
  ``np.dot(x, W, out)`` (Numba calls the gemm of SciPy's BLAS). Which one is
  a per-shape rule, :func:`_use_blas`, measured below.
- tanh: a scalar ``math.tanh`` costs ~13-25 ns per element (a libm call per
  element). :func:`_tanh_scalar` computes tanh in a form LLVM vectorises
  (expm1 by Cody-Waite range reduction and a Taylor polynomial, scaled by an
  exact power of two): ~1.3-1.5 ns per element in float64, within 3 ulp of
  the exact tanh (5e-16 relative of ``np.tanh``); :func:`_tanh_scalar32`, the
  same in float32 arithmetic, ~0.8 ns, within 2.5 ulp. Neither is a
  low-order approximation: every step is accurate to the working precision.
- No ``fastmath``: it would reassociate the sums and break tight parity.
  Single-threaded: time is sequential, and the per-step products are too
  small for Numba threads to pay on two cores (the BLAS pool is the caller's
  to manage).
- ``cache=True`` where Numba finds a writable cache directory; where none is
  (read-only install, no writable home, ``NUMBA_CACHE_DIR`` unusable) the
  kernels are defined with ``cache=False`` instead, silently:
  :data:`CACHING` says which.

float32 and float64 inputs specialise the same jitted functions.
"""

import math

import numba
import numpy as np

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


@_jit(inline="always", error_model="numpy")
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


@_jit(inline="always", error_model="numpy")
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


@_jit(inline="always", error_model="numpy")
def _activate_step(z, a, act):
    """z[b, j] = f(z[b, j] + a[b, j]) for one step: z, a of shape (B, H)."""
    B, H = z.shape
    if act == ACT_TANH and z.itemsize == 4:     # float32
        for b in range(B):
            for j in range(H):
                z[b, j] = _tanh_scalar32(z[b, j] + a[b, j])
    elif act == ACT_TANH:
        for b in range(B):
            for j in range(H):
                z[b, j] = _tanh_scalar(z[b, j] + a[b, j])
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


@_jit(inline="always")
def _step_product(x, W, out, use_blas):
    if use_blas:
        np.dot(x, W, out)
    else:
        _matmul_rows(x, W, out)


# --------------------------------------------------------------------------------------------
# the kernels
# --------------------------------------------------------------------------------------------

@_jit(error_model="numpy")
def _forward(A, W_hhT, Hs, act, use_blas):
    T = A.shape[0]
    for t in range(T):
        h_next = Hs[t + 1]
        _step_product(Hs[t], W_hhT, h_next, use_blas)   # Hs[t+1] = h_{t-1} @ W_hhᵀ
        _activate_step(h_next, A[t], act)                # Hs[t+1] = f(Hs[t+1] + A[t])


@_jit(error_model="numpy")
def _backward(G, Hs, W_hh, ends, bp_starts, act, dZ, use_blas):
    T, B, H = G.shape
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
            dZ[t, :, :] = 0
        for t in range(end - 1, bp_start - 1, -1):
            h = Hs[t + 1]
            carried = t < end - 1               # at the window's last step δ starts at zero
            own_step = t >= loss_start
            for b in range(B):
                for j in range(H):
                    d = delta[b, j] if carried else zero
                    if own_step:
                        d += G[t, b, j]              # δ_t = ∂L/∂h_t (direct) + carried
                    hv = h[b, j]
                    if act == ACT_TANH:
                        g = d * (one - hv * hv)      # dz_t = δ_t ⊙ (1 - h_t²)
                    else:
                        g = d if hv > zero else zero  # dz_t = δ_t ⊙ [h_t > 0]
                    dz[b, j] = g
                    if own_step:
                        dZ[t, b, j] = g
                    else:
                        dZ[t, b, j] += g
            if t > bp_start:
                _step_product(dz, W_hh, delta, use_blas)   # δ_{t-1} = W_hhᵀ dz_t
        loss_start = end
    for t in range(loss_start, T):      # none: ends[-1] = T by contract (the reference zeroes them)
        dZ[t, :, :] = 0


# --------------------------------------------------------------------------------------------
# the contract's entry points
# --------------------------------------------------------------------------------------------

def _use_blas(B, H, itemsize):
    """Whether the per-step product (B, H)·(H, H) goes to BLAS gemm (True) or the hand-written loop.

    Measured on 2 x Zen 4 (AVX-512), SciPy's OpenBLAS on one thread, forward +
    backward kernel time per step with tanh, as the ratio gemm / loop (> 1: the
    loop is faster; one run on a loaded machine, so +-15%):

        (B, H)     float32  float64        (B, H)     float32  float64
        (1, 16)     1.39     1.89          (2, 32)     0.78     0.60
        (1, 32)     1.29     1.95          (2, 64)     0.53     0.68
        (1, 64)     0.90     1.31          (4, 32)     0.55     0.65
        (1, 128)    0.94     1.15          (8, 32)     0.47     0.52

    and gemm is 2.5-4x faster than the loop from B·H² = 32·64² upwards. The loop
    wins only at batch 1, where gemm's fixed cost per call (~0.1 µs) is a large
    part of a matrix-vector product: up to H = 32 in float32, H = 128 in float64.
    """
    return not (B == 1 and H <= (32 if itemsize == 4 else 128))


def forward_recurrence(A, W_hhT, Hs, act):
    """Fill ``Hs[1:]``; see the kernel contract in :mod:`fastbptt.reference`."""
    assert A.dtype == W_hhT.dtype == Hs.dtype and Hs.shape[0] == A.shape[0] + 1
    _forward(A, W_hhT, Hs, int(act), _use_blas(A.shape[1], A.shape[2], A.itemsize))


def backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ):
    """Overwrite ``dZ`` with Σ_windows dz_t; see the kernel contract in :mod:`fastbptt.reference`."""
    assert G.dtype == Hs.dtype == W_hh.dtype == dZ.dtype and ends.shape == bp_starts.shape
    _backward(G, Hs, W_hh, ends, bp_starts, int(act), dZ, _use_blas(G.shape[1], G.shape[2], G.itemsize))
