"""``fastbptt tbptt --scheduler`` and ``fastbptt bench --scheduler``: the cells run on a LocalCluster
and give the local run's results (apart from the timings, measured on the workers)."""

import json
import os

import pytest

pytest.importorskip("distributed")

from distributed import LocalCluster                       # noqa: E402

from fastbptt.tools import cli                              # noqa: E402
from fastbptt.tools.cli import main                         # noqa: E402

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                "MALLOC_TRIM_THRESHOLD_")
# figures that are timings (or where they were taken); everything else must match the local run
_TIMING_KEYS = {"times_s", "best_s", "median_s", "compile_s", "steps_per_s", "gflops", "wall_s", "median_wall_s",
                "elapsed_s", "worker", "threads", "by_threads"}


@pytest.fixture(scope="module")
def address():
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()
        for k, v in saved.items():          # LocalCluster sets these in the parent process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _strip(obj):
    """``obj`` without its timing figures."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _run(argv, path):
    assert main(argv + ["--silent", "--json", str(path)]) == 0
    with open(path) as fh:
        return json.load(fh)


TBPTT = ["tbptt", "--quick", "--tasks", "adding50", "char", "--variants", "full", "5", "3,6", "artbp,0.3",
         "--learn-tasks", "adding", "copy", "--distances", "3", "6", "--seeds", "2", "--budget", "40",
         "--hidden", "8", "--char-hidden", "8"]


def test_tbptt_on_the_cluster_equals_the_local_run(address, tmp_path, capsys):
    local = _run(TBPTT, tmp_path / "local.json")
    remote = _run(TBPTT + ["--scheduler", address], tmp_path / "remote.json")
    out = capsys.readouterr().out
    assert "on the Dask scheduler" in out
    for key in ("config", "variants", "baselines", "fidelity", "throughput"):
        assert _strip(remote[key]) == _strip(local[key]), key
    notes = remote["learnability"].pop("notes")                  # the learnability runs went to the cluster
    assert notes[0].startswith("each learnability run ran as one task on the Dask scheduler tcp://")
    assert notes[1:] == local["learnability"].pop("notes")
    assert _strip(remote["learnability"]) == _strip(local["learnability"])
    labels = ["full", "k=5", "(3,6)", "artbp(0.3)"]
    assert remote["learnability"]["config"]["variants"] == labels
    cells = remote["learnability"]["cells"]
    assert {(c["task"], c["variant"], c["d"], c["seed"]) for c in cells if c["d"] == 3} == {
        (t, v, 3, s) for t in ("adding", "copy") for v in labels for s in (0, 1)}
    assert all(c["wall_s"] > 0 for c in cells)                    # timed on a worker
    for task in ("adding50", "char"):
        assert list(remote["throughput"][task]["variants"]) == labels
        for cell in remote["throughput"][task]["variants"].values():
            assert cell["steps_per_s"] > 0                 # timed on a worker


def test_bench_on_the_cluster_equals_the_local_run(address, tmp_path):
    argv = ["bench", "--quick", "--shapes", "20,2,3,4", "10,3,2,5", "--backends", "numpy", "--repeats", "1"]
    local = _run(argv, tmp_path / "local.json")
    remote = _run(argv + ["--scheduler", address], tmp_path / "remote.json")
    assert _strip(remote["results"]) == _strip(local["results"])
    assert [(c["shape"], c["impl"]) for c in remote["results"]] == [("T20_B2_D3_H4", "numpy"), ("T10_B3_D2_H5", "numpy")]
    workers = {c["worker"] for c in remote["results"]}
    assert all(w and w.startswith("tcp://") for w in workers)
    assert all(c["median_s"] > 0 for c in remote["results"])
    assert remote["meta"]["scheduler"] == address and local["meta"]["scheduler"] is None


@pytest.mark.parametrize("command", [["tbptt", "--quick"], ["bench", "--quick", "--shapes", "20,2,3,4"]])
def test_bad_scheduler_address_is_a_one_line_error(command, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT_S", 1)
    assert main(command + ["--scheduler", "tcp://127.0.0.1:9", "--silent"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the Dask scheduler at 'tcp://127.0.0.1:9'" in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fastbptt: error: --scheduler")
