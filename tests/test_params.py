"""RNNParams: initialisation, packing, copying."""

import numpy as np
import pytest

import fastbptt


def test_init_is_seeded_and_uniform_like_torch():
    p = fastbptt.RNNParams.init(4, 64, 3, dtype=np.float64, seed=7)
    q = fastbptt.RNNParams.init(4, 64, 3, dtype=np.float64, seed=7)
    assert p == q
    assert p != fastbptt.RNNParams.init(4, 64, 3, dtype=np.float64, seed=8)
    bound = 1 / np.sqrt(64)
    flat = p.flatten()
    assert np.all(np.abs(flat) <= bound) and np.abs(flat).max() > 0.95 * bound
    assert (p.input_size, p.hidden_size, p.output_size) == (4, 64, 3)
    assert p.W_xh.shape == (64, 4) and p.W_hy.shape == (3, 64) and p.b_y.shape == (3,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_and_packing(dtype):
    p = fastbptt.RNNParams.init(2, 5, 3, dtype=dtype, seed=0)
    assert p.dtype == dtype and all(a.dtype == dtype for a in p.arrays())
    flat = p.flatten()
    assert flat.shape == (p.size,) == (5 * 2 + 25 + 5 + 15 + 3,)
    assert p.unflatten(flat) == p
    q = p.copy()
    q.W_hh[0, 0] += 1
    assert q != p
    with pytest.raises(ValueError, match="flat: expected shape"):
        p.unflatten(flat[:-1])
