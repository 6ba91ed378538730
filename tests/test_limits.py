"""Bounded resources and bad input: huge truncation, non-finite parameters, float32 overflow,
memory that is not there, thread counts, and checkpoint files that are not what they claim."""

import json
import os
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import _io, _threads
from fastbptt import datasets as ds
from fastbptt.estimator import RNN


@pytest.fixture(autouse=True)
def quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "auto" may fall back to NumPy
        yield


def snapshot(m):
    return (m.params.copy(), json.dumps(m.optimizer_.state_dict()["step"]), json.dumps(m._rng.bit_generator.state),
            json.dumps(m.history_))


# ------------------------------------------------------------------------ huge truncation

HUGE = [10**30, (1, 10**30), (10**30, 10**30), 2**63, (7, 2**64)]


@pytest.mark.parametrize("truncation", HUGE, ids=str)
def test_huge_truncation_is_clamped_to_T_in_the_functional_api(truncation):
    params = fastbptt.RNNParams.init(2, 4, 1, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(10, 3, 2)), rng.normal(size=(10, 3, 1))
    k1 = truncation[0] if isinstance(truncation, tuple) else None
    same = None if k1 is None or k1 > 10 else (k1, 10)          # k, k2 >= T: no cut
    want = fastbptt.loss_and_grad(params, X, Y, truncation=same, backend="numpy")
    got = fastbptt.loss_and_grad(params, X, Y, truncation=truncation, backend="numpy")
    assert got[0] == want[0] and got[1] == want[1]


@pytest.mark.parametrize("truncation", HUGE, ids=str)
def test_huge_truncation_in_the_estimator(truncation):
    X, Y = ds.sine_wave(6, 10, seed=0)
    m = RNN(1, 4, 1, truncation=truncation, batch_size=3, seed=0, backend="numpy")
    m.fit(X, Y, progress=False)
    k1 = truncation[0] if isinstance(truncation, tuple) else None
    points = 1 if k1 is None or k1 >= 10 else -(-10 // k1)
    assert m.optimizer_.step_count == 2 * points and np.isfinite(m.history_["loss"][0])


@pytest.mark.parametrize("truncation", [0, -1, (0, 5), (5, 2), (1.5, 3), "10", (1, 2, 3)], ids=str)
def test_bad_truncation_is_refused_before_the_random_state_moves(truncation):
    X, Y = ds.sine_wave(6, 10, seed=0)
    with pytest.raises(ValueError, match="truncation"):
        RNN(1, 4, 1, truncation=truncation)
    m = RNN(1, 4, 1, seed=0, backend="numpy")
    before = snapshot(m)
    m.truncation = truncation                       # set behind the constructor's back
    with pytest.raises((ValueError, TypeError)):
        m.fit(X, Y, progress=False)
    assert snapshot(m) == before


# ------------------------------------------------------------------- non-finite parameters

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_are_refused_by_every_call(bad):
    params = fastbptt.RNNParams.init(2, 4, 1, seed=0)
    params.W_hh[1, 2] = bad
    X, Y = np.zeros((5, 2)), np.zeros((5, 1))
    for call in (lambda: fastbptt.forward(params, X), lambda: fastbptt.loss_and_grad(params, X, Y),
                 lambda: fastbptt.rnn(params, X), lambda: fastbptt.rnn_vjp(params, X)):
        with pytest.raises(ValueError, match=r"params\.W_hh: expected finite parameters, found .* \(1, 2\)"):
            call()
    m = RNN(2, 4, 1, seed=0, backend="numpy")
    m.params.b_y[0] = bad
    for call in (lambda: m.fit(np.zeros((3, 5, 2)), np.zeros((3, 5, 1)), progress=False),
                 lambda: m.predict(np.zeros((3, 5, 2))), lambda: m.save("never-written.npz")):
        with pytest.raises(ValueError, match=r"params\.b_y: expected finite parameters"):
            call()
    assert not os.path.exists("never-written.npz") and m.optimizer_.step_count == 0


def test_params_of_another_shape_assigned_to_the_estimator_are_refused():
    m = RNN(2, 4, 1, seed=0, backend="numpy")
    m.params = fastbptt.RNNParams.init(2, 5, 1, seed=0)
    with pytest.raises(ValueError, match="params: expected"):
        m.fit(np.zeros((3, 5, 2)), np.zeros((3, 5, 1)), progress=False)
    m.params = "weights"
    with pytest.raises(TypeError, match="params: expected an RNNParams"):
        m.predict(np.zeros((3, 5, 2)))


# ------------------------------------------------------------------- overflowing float32

def test_a_finite_value_that_does_not_fit_float32_says_so():
    params = fastbptt.RNNParams.init(2, 4, 1, seed=0)            # float32
    X, Y = np.zeros((5, 3, 2)), np.zeros((5, 3, 1))
    big = X.copy()
    big[2, 1, 0] = 1e39
    with pytest.raises(ValueError, match=r"X: the value 1e\+39 at index \(2, 1, 0\) overflows float32"):
        fastbptt.loss_and_grad(params, big, Y)
    with pytest.raises(ValueError, match=r"h0: the value -1e\+40 at index \(0, 1, 3\) overflows float32"):
        fastbptt.forward(params, X, h0=np.where(np.arange(12).reshape(3, 4) == 7, -1e40, 0.0))
    inf = X.copy()
    inf[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="X: expected finite values, found inf"):
        fastbptt.forward(params, inf)
    m = RNN(2, 4, 1, seed=0, backend="numpy")
    with pytest.raises(ValueError, match=r"X: the value 1e\+39 at index \(1, 2, 0\) overflows float32"):
        m.fit(np.swapaxes(big, 0, 1), np.zeros((3, 5, 1)), progress=False)


def test_mse_targets_whose_squared_error_overflows_are_refused():
    params = fastbptt.RNNParams.init(2, 4, 1, seed=0)
    X, Y = np.zeros((5, 3, 2)), np.zeros((5, 3, 1))
    Y[4, 2, 0] = 1e30
    with pytest.raises(ValueError, match=r"Y: the target 1e\+30 at index \(4, 2, 0\) overflows float32 in the squared"):
        fastbptt.loss_and_grad(params, X, Y)
    value = fastbptt.loss_and_grad(params.astype(np.float64), X, Y)[0]      # fine in float64
    assert np.isfinite(value) and value == pytest.approx(1e60 / 15, rel=1e-6)
    m = RNN(2, 4, 1, seed=0, backend="numpy")
    with pytest.raises(ValueError, match=r"Y: the target 1e\+30 .* overflows float32"):
        m.fit(np.zeros((3, 5, 2)), np.swapaxes(Y, 0, 1), progress=False)
    assert m.optimizer_.step_count == 0


# ------------------------------------------------------------------------------ memory

def test_a_call_that_needs_more_memory_than_the_machine_has_is_refused_at_once():
    params = fastbptt.RNNParams.init(3, 1024, 2, seed=0)
    X = np.broadcast_to(np.zeros(3, dtype=np.float32), (10**7, 64, 3))     # no memory behind it
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MemoryError, match=r"X: this call needs about \d.* TB of memory \(T=10000000, "
                                              r"B=64, D=3, H=1024, float32.*nothing was allocated"):
            fastbptt.loss_and_grad(params, X, np.broadcast_to(np.zeros(2, dtype=np.float32), (10**7, 64, 2)))
        with pytest.raises(MemoryError, match="X: this call needs about"):
            fastbptt.forward(params, X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50 << 20


def test_the_estimator_refuses_too_big_data_and_models_before_copying():
    m = RNN(3, 1024, 2, seed=0, backend="numpy")
    before = snapshot(m)
    X = np.broadcast_to(np.zeros(3), (64, 10**7, 3))
    Y = np.broadcast_to(np.zeros(2), (64, 10**7, 2))
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match=r"X: this call needs about .* \(N=64, T=10000000"):
        m.fit(X, Y, progress=False)
    with pytest.raises(MemoryError, match="X: this call needs about"):
        m.predict(X)
    assert time.perf_counter() - t0 < 5 and snapshot(m) == before
    with pytest.raises(MemoryError, match="hidden_size: this call needs about"):
        RNN(3, 10**7, 2)


# ------------------------------------------------------------------------------ threads

def test_thread_count_is_capped_at_the_cpus_here():
    _threads._warned.clear()
    with pytest.warns(RuntimeWarning, match="more than the"):
        fastbptt.set_num_threads(1000)
    try:
        assert fastbptt.get_num_threads() == _threads._cpu_count()
    finally:
        fastbptt.set_num_threads(None)


# ------------------------------------------------------------------------- checkpoints

def _saved(tmp_path, **kw):
    X, Y = ds.sine_wave(8, 6, seed=0)
    m = RNN(1, 4, 1, seed=0, backend="numpy", **kw)
    m.fit(X, Y, progress=False)
    path = tmp_path / "m.npz"
    m.save(path)
    return m, path


def _rewrite(path, out, edit_meta=None, edit_arrays=None):
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(str(files["__meta__"]))
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(files, meta)
    files["__meta__"] = np.array(json.dumps(meta))
    with open(out, "wb") as f:
        np.savez(f, **files)
    return out


def test_load_checks_the_header_against_the_arrays_before_allocating(tmp_path):
    """A tiny file claiming hidden_size=12000 once cost 1.7 GB and 4.8 s before it was refused."""
    _, path = _saved(tmp_path)

    def huge(meta):
        meta["config"]["hidden_size"] = 12000

    bad = _rewrite(path, tmp_path / "huge.npz", huge)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"params/W_xh has shape \(4, 1\) .* implies \(12000, 1\)"):
            RNN.load(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20 and time.perf_counter() - t0 < 2

    def many_layers(meta):
        meta["config"]["num_layers"] = 10**9

    with pytest.raises(ValueError, match="num_layers=1000000000 does not match"):
        RNN.load(_rewrite(path, tmp_path / "layers.npz", many_layers))

    def extra(files, meta):
        files["params/W_extra"] = np.zeros(3, np.float32)
        meta["checksums"]["params/W_extra"] = "0"

    with pytest.raises(ValueError, match="not a valid"):
        RNN.load(_rewrite(path, tmp_path / "extra.npz", edit_arrays=extra))

    def bad_state(files, meta):
        files["state"] = np.zeros((3, 5), np.float32)
        import hashlib
        meta["checksums"]["state"] = hashlib.sha256(files["state"].tobytes()).hexdigest()

    with pytest.raises(ValueError, match="state has shape"):
        RNN.load(_rewrite(path, tmp_path / "state.npz", edit_arrays=bad_state))


def test_load_opens_only_regular_files(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    result = []

    def go():
        try:
            RNN.load(fifo)
        except Exception as exc:        # noqa: BLE001 - checked below
            result.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "RNN.load blocked on a FIFO"
    assert isinstance(result[0], ValueError) and "not a regular file" in str(result[0])
    with pytest.raises(ValueError, match="is a directory"):
        RNN.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        RNN.load(tmp_path / "missing.npz")
    if os.path.exists("/dev/null"):
        with pytest.raises(ValueError, match="not a regular file"):
            RNN.load("/dev/null")


def test_save_removes_stale_temporary_files_of_the_same_checkpoint(tmp_path):
    m, path = _saved(tmp_path)
    dead = 2**22 + 12345                       # above pid_max's default: no such process
    stale = [f".m.npz.{dead}.0123abcd.tmp", f".m.npz.{os.getpid()}.89abcdef.tmp", ".m.npz.ab_cd12X.tmp"]
    alive = [f".m.npz.1.0123abcd.tmp", ".m.npz.zzzzzzz1.tmp", ".other.npz.123.0123abcd.tmp", "notes.txt"]
    for name in stale + alive:
        (tmp_path / name).write_bytes(b"x" * 1000)
    old = time.time() - 7200
    os.utime(tmp_path / ".m.npz.ab_cd12X.tmp", (old, old))     # an older version's mkstemp name, 2 h old
    m.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.npz"] + alive)
    assert RNN.load(path).params == m.params


def test_save_refuses_a_folder_and_leaves_nothing(tmp_path):
    m, _ = _saved(tmp_path)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        m.save(tmp_path / "d")
    with pytest.raises(OSError):
        m.save(tmp_path / "nowhere" / "m.npz")
    assert sorted(os.listdir(tmp_path)) == ["d", "m.npz"]


def test_atomic_write_keeps_the_umask_and_cleans_up_on_failure(tmp_path):
    umask = os.umask(0o027)
    try:
        _io.write_json({"a": 1}, tmp_path / "x.json")
        assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
        assert os.umask(0o027) == 0o027                            # unchanged by the write
    finally:
        os.umask(umask)

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _io.atomic_write(tmp_path / "x.json", fail)
    assert sorted(os.listdir(tmp_path)) == ["x.json"] and json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


# ------------------------------------------------------------- the reproduced history_ bug

def test_an_interrupt_during_validation_keeps_history_aligned_and_saveable(tmp_path, monkeypatch):
    """Ctrl-C in the validation pass once left ``loss`` one longer than ``val_loss``: unloadable files."""
    X, Y = ds.sine_wave(8, 6, seed=0)
    Xv, Yv = ds.sine_wave(4, 6, seed=1)
    m = RNN(1, 4, 1, seed=0, backend="numpy")
    m.fit(X, Y, validation_data=(Xv, Yv), progress=False)
    real = RNN._evaluate

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(RNN, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.fit(X, Y, validation_data=(Xv, Yv), progress=False)
    monkeypatch.setattr(RNN, "_evaluate", real)
    assert {k: len(v) for k, v in m.history_.items()} == {"loss": 1, "seq_per_s": 1, "val_loss": 1}
    m.save(tmp_path / "m.npz")
    loaded = RNN.load(tmp_path / "m.npz")
    loaded.fit(X, Y, validation_data=(Xv, Yv), progress=False)
    assert len(loaded.history_["val_loss"]) == 2
