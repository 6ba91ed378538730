"""fastbptt.dask: data-parallel fit on a LocalCluster equals the single-machine fit; faults; imports."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask.array")

import dask.array as da                                   # noqa: E402
from distributed import Client, LocalCluster               # noqa: E402

import fastbptt                                            # noqa: E402
import fastbptt.dask as fdask                              # noqa: E402

RTOL = 1e-8
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                "MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(scope="module")
def client():
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True)
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        for k, v in saved.items():          # LocalCluster sets these in the parent process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def data(N=40, T=12, D=3, O=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, T, D)), rng.standard_normal((N, T, O))


def close(a, b):
    for (name, p), q in zip(a.params.items(), b.params.arrays()):
        np.testing.assert_allclose(q, p, rtol=RTOL, atol=1e-12, err_msg=name)
    for key in ("loss", "val_loss"):
        if key in a.history_:
            np.testing.assert_allclose(b.history_[key], a.history_[key], rtol=RTOL, err_msg=key)
    assert a.optimizer_.step_count == b.optimizer_.step_count


CASES = {"full": dict(truncation=None), "k": dict(truncation=5), "k1k2": dict(truncation=(3, 5)),
         "last-k": dict(truncation=4, output="last")}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("stateful", [False, True], ids=["stateless", "stateful"])
def test_fit_equals_single_machine(client, case, stateful):
    X, Y = data()
    kw = dict(CASES[case], dtype=np.float64, seed=3, batch_size=8, lr=1e-2)
    if kw.get("output") == "last":
        Y = Y[:, -1]
    val = (X[:9], Y[:9])
    ref = fastbptt.RNN(3, 6, 2, **kw).fit(X, Y, epochs=2, stateful=stateful, validation_data=val)
    got = fdask.RNN(3, 6, 2, client=client, **kw).fit(X, Y, epochs=2, stateful=stateful, validation_data=val)
    close(ref, got)
    if stateful:
        np.testing.assert_allclose(got.state_, ref.state_, rtol=RTOL, atol=1e-12)


def test_dask_arrays_and_default_client(client):
    X, Y = data(N=37)
    kw = dict(dtype=np.float64, seed=5, batch_size=6, truncation=4, clip_norm=1.0, optimizer="sgd")
    ref = fastbptt.RNN(3, 5, 2, **kw).fit(X, Y, epochs=2)
    got = fdask.RNN(3, 5, 2, **kw).fit(da.from_array(X, chunks=(7, 12, 3)), da.from_array(Y, chunks=(10, 12, 2)),
                                       epochs=2, validation_data=(da.from_array(X[:5], chunks=2), Y[:5]))
    close(ref, got)
    # two fits of one epoch are one of two
    two = fdask.RNN(3, 5, 2, client=client, **kw)
    two.fit(X, Y).fit(X, Y)
    close(ref, two)


def test_bad_input(client):
    X, Y = data()
    m = fdask.RNN(3, 4, 2, client=client, dtype=np.float64, seed=0)
    before = m.params.copy()
    with pytest.raises(ValueError, match="X: expected shape"):
        m.fit(X[..., :2], Y)
    Xn = X.copy()
    Xn[33, 2, 1] = np.nan
    with pytest.raises(ValueError, match="X"):
        m.fit(Xn, Y)
    with pytest.raises(ValueError, match="rows 30..39"):
        m.fit(da.from_array(Xn, chunks=10), Y)
    with pytest.raises(ValueError, match="Y"):
        m.fit(da.from_array(X, chunks=10), Y[:, :3])
    assert m.params == before and m.history_["loss"] == []


def test_worker_lost_mid_fit_is_a_clear_error(client):
    X, Y = data()
    kw = dict(dtype=np.float64, seed=2, batch_size=8, lr=1e-2)
    ref = fastbptt.RNN(3, 6, 2, **kw).fit(X, Y, epochs=1)

    def kill_a_worker(model, logs):
        victim = sorted(client.nthreads())[0]
        try:
            client.run(os._exit, 1, workers=[victim])
        except Exception:
            pass

    m = fdask.RNN(3, 6, 2, client=client, **kw)
    with pytest.raises(RuntimeError, match=r"worker failed at epoch 2, update step 1 of the epoch"):
        m.fit(X, Y, epochs=2, callbacks=[kill_a_worker])
    close(ref, m)                                   # the last completed step: the end of epoch 1
    client.wait_for_workers(2, timeout=60)
    m.fit(X, Y)                                     # resumable
    assert len(m.history_["loss"]) == 2


def test_fit_waits_for_a_worker_then_names_the_empty_cluster(monkeypatch):
    X, Y = data(N=6)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    with LocalCluster(n_workers=0, dashboard_address=None, processes=False) as cluster, Client(cluster) as c:
        monkeypatch.setattr(fdask, "WORKER_WAIT", 0.5)
        m = fdask.RNN(3, 4, 2, client=c, dtype=np.float64, seed=1, batch_size=3)
        with pytest.raises(RuntimeError, match=r"no workers \(waited 0.5 s\)"):
            m.fit(X, Y)
        assert m.history_["loss"] == []
        cluster.scale(1)                            # a worker that comes up while fit waits is used
        monkeypatch.setattr(fdask, "WORKER_WAIT", 60.0)
        assert fdask.worker_addresses(c) and len(m.fit(X, Y).history_["loss"]) == 1
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_import_fastbptt_imports_no_dask_nor_sklearn():
    code = ("import sys, fastbptt; bad = [m for m in ('dask', 'distributed', 'sklearn') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
