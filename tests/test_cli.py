"""The ``fastbptt`` command, run as ``python -m fastbptt`` in a subprocess.

The subprocess inherits this process's environment (so it finds the same
fastbptt: the installed package, or the source tree on PYTHONPATH in a
development checkout); nothing is derived from the test file's location.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbptt


def run(args, *, cwd, env=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "fastbptt", *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    return proc


def test_info_lists_versions_backends_and_threads(tmp_path):
    proc = run(["info"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fastbptt {fastbptt.__version__}" in out
    assert f"numpy {np.__version__}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("backends available"))
    assert line.split(": ", 1)[1].split(", ") == fastbptt.available_backends()
    from fastbptt.backends import unavailable_backends
    for name in unavailable_backends():
        assert f"backend {name} missing:" in out
    assert "thread pools" in out and "OMP_NUM_THREADS=" in out and "OPENBLAS_CORETYPE=" in out

    proc = run(["info", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fastbptt"] == fastbptt.__version__
    assert info["backends_available"] == fastbptt.available_backends()
    assert isinstance(info["threadpools"], list)


def test_bench_quick_tiny_shapes_json_plot_compare(tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = run(["bench", "--quick", "--shapes", "20,2,3,4", "30,3,4,5", "--json", str(out_json),
                "--plot", str(out_png), "--silent"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "QUICK RUN" in proc.stdout and "quick run" in proc.stderr
    assert "benchmark took" in proc.stdout
    res = json.loads(out_json.read_text())
    impls = {c["impl"] for c in res["results"]}
    assert set(fastbptt.available_backends()) <= impls
    from fastbptt.tools.peers import available_peers
    assert set(available_peers()) <= impls          # every installed peer is compared
    assert {(c["T"], c["B"], c["D"], c["H"]) for c in res["results"]} == {(20, 2, 3, 4), (30, 3, 4, 5)}
    assert len(res["results"]) == 2 * len(impls)
    for c in res["results"]:
        assert c["dtype"] == "float32"
        assert 0 < c["best_s"] <= c["median_s"]
        assert len(c["times_s"]) >= 3
        assert c["compile_s"] >= 0
        assert c["max_rel_err"] < 1e-4, c             # float32 vs the float64 reference
        assert c["steps_per_s"] == pytest.approx(1 / c["median_s"])
    assert res["meta"]["quick"] is True and res["meta"]["threads"] == 2
    for c in res["results"]:                          # a peer's row is its best of 1 and 2 threads
        if c["kind"] == "peer":
            assert set(c["by_threads"]) == {"1", "2"} or (c["impl"] == "jax" and os.cpu_count() == 1)
            assert c["median_s"] == min(t["median_s"] for t in c["by_threads"].values())
            assert all(t["max_rel_err"] < 1e-4 for t in c["by_threads"].values())
            if c["impl"] == "jax" and os.cpu_count() == 2:     # XLA's 1-thread setting: a worker process
                assert c["by_threads"]["1"]["where"] == "worker"
    for c in res["results"]:                          # each impl has a row in the table
        assert any(line.startswith(c["impl"] + " ") for line in proc.stdout.splitlines())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run(["compare", str(out_json), str(out_json)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()[1:]
    assert len(rows) == len(res["results"])
    assert all(row.rstrip().endswith("1.00x") for row in rows)


def test_bench_stack_with_its_single_layer_twins(tmp_path):
    """A stacked cell (custom T,B,D,H,L,bi) and one layer of each of its layers' shapes: the gradients
    are checked field by field, torch runs at 1 and 2 threads, the per-layer ratio is printed.
    (jax's stacks: test_peers.py; its worker process: the test above.)"""
    from fastbptt.tools.peers import available_peers
    impls = ["numpy"] + [p for p in available_peers() if p == "torch"]
    proc = run(["bench", "--quick", "--shapes", "12,3,4,5,2,bi", "12,3,4,5", "12,3,10,5", "--backends", *impls,
                "--json", "r.json", "--silent"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    cells = {(c["shape"], c["impl"]): c for c in res["results"]}
    stack = "T12_B3_D4_H5_L2_bi"
    names = fastbptt.RNNParams.init(4, 5, 8, num_layers=2, bidirectional=True).names()
    for impl in impls:
        c = cells[(stack, impl)]
        assert (c["num_layers"], c["bidirectional"]) == (2, True)
        assert tuple(c["rel_err_by_field"]) == names            # every (layer, direction) and the head
        assert c["max_rel_err"] == max(c["rel_err_by_field"].values()) < 1e-4, c
        if impl != "numpy":                                       # a peer: its best of 1 and 2 threads
            assert set(c["by_threads"]) == {"1", "2"}
            assert c["median_s"] == min(t["median_s"] for t in c["by_threads"].values())
            assert c["by_threads"][str(c["threads"])]["median_s"] == c["median_s"]
    assert cells[("T12_B3_D4_H5", "numpy")]["num_layers"] == 1
    ratios = {r["impl"]: r for r in res["stack_ratios"]}
    assert set(ratios) == set(impls)
    for impl, r in ratios.items():
        l0, l1 = cells[("T12_B3_D4_H5", impl)]["median_s"], cells[("T12_B3_D10_H5", impl)]["median_s"]
        assert r["twins"] == {"4": "T12_B3_D4_H5", "10": "T12_B3_D10_H5"}
        assert r["ratio"] == pytest.approx(cells[(stack, impl)]["median_s"] / (2 * l0 + 2 * l1))
        assert r["ratio_vs_first"] == pytest.approx(cells[(stack, impl)]["median_s"] / (4 * l0))
    assert "per (layer, direction) cost of a stack" in proc.stdout
    assert "T=12, B=3, D=4, H=5, O=8, 2 layers, bidirectional" in proc.stdout


def test_bench_selected_backend_float64(tmp_path):
    proc = run(["bench", "--quick", "--shapes", "25,2,3,4", "--backends", "numpy", "--dtype", "float64",
                "--repeats", "3", "--json", "r.json", "--silent"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert [c["impl"] for c in res["results"]] == ["numpy"]
    assert res["results"][0]["dtype"] == "float64"
    assert res["results"][0]["max_rel_err"] < 1e-12


def test_tbptt_tiny(tmp_path):
    """Throughput and fidelity only (``--learn-tasks`` with no task skips the learnability runs;
    tests/test_tbptt_study.py runs the whole ``--quick``)."""
    proc = run(["tbptt", "--quick", "--tasks", "adding50", "--variants", "full", "5", "10,20", "artbp,0.1",
                "--learn-tasks", "--json", "s.json", "--silent"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["variants"] == ["full", "k=5", "(10,20)", "artbp(0.1)"]
    assert res["learnability"] is None and "learnability" not in proc.stdout
    for label in res["variants"]:
        assert any(line.startswith(label + " ") for line in proc.stdout.splitlines())
        assert res["throughput"]["adding50"]["variants"][label]["steps_per_s"] > 0
    for state in res["fidelity"]["adding50"].values():
        assert state["cos"]["full"]["all"] == pytest.approx(1.0)
        for row in state["cos"].values():
            assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 for v in row.values())
        for label in ("k=5", "artbp(0.1)"):         # output layer: no time recursion
            assert state["cos"][label]["W_hy"] == pytest.approx(1.0)
        assert state["cos"]["artbp(0.1)"]["W_hh"] < 1 - 1e-6       # one draw of the cuts: not full BPTT


def test_tbptt_bad_distance_for_copy_is_a_one_line_error(tmp_path):
    proc = run(["tbptt", "--quick", "--learn-tasks", "copy", "--distances", "1", "4"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fastbptt: error: --distances: the copy task needs")


def test_train_with_artbp_resumes_exactly(tmp_path):
    from fastbptt.estimator import RNN
    common = ["--task", "adding", "--n", "64", "--T", "12", "--hidden", "8", "--progress", "off",
              "--truncation", "artbp,0.2"]
    assert run(["train", *common, "--epochs", "1", "--out", "a.npz"], cwd=tmp_path).returncode == 0
    proc = run(["train", "--resume", "a.npz", "--epochs", "1", "--out", "b.npz", "--progress", "off"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run(["train", *common, "--epochs", "2", "--out", "c.npz"], cwd=tmp_path).returncode == 0
    resumed, straight = RNN.load(tmp_path / "b.npz"), RNN.load(tmp_path / "c.npz")
    assert straight.truncation == ("artbp", 0.2, None)
    assert resumed.params == straight.params


def test_train_then_resume(tmp_path):
    from fastbptt.estimator import RNN
    common = ["--task", "adding", "--n", "64", "--T", "12", "--hidden", "8", "--progress", "off"]
    proc = run(["train", *common, "--epochs", "2", "--out", "m.npz"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2:" in proc.stdout
    assert RNN.load(tmp_path / "m.npz").hidden_size == 8
    proc = run(["train", "--resume", "m.npz", "--epochs", "1", "--out", "m2.npz", "--progress", "off"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "after 2 epochs" in proc.stdout and "epoch 3:" in proc.stdout
    resumed = RNN.load(tmp_path / "m2.npz")
    assert len(resumed.history_["loss"]) == 3
    # resuming continues exactly as the uninterrupted run would
    proc = run(["train", *common, "--epochs", "3", "--out", "m3.npz"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    straight = RNN.load(tmp_path / "m3.npz")
    assert resumed.params == straight.params


def test_train_char_model_on_a_text_file_prints_a_sample(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "t.txt").write_text(text)
    proc = run(["train", "--text", "t.txt", "--T", "20", "--hidden", "16", "--epochs", "1",
                "--sample", "30", "--progress", "off"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fastbptt-char.npz").exists()
    lines = proc.stdout.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("sample (30 characters"))
    sample = "\n".join(lines[i + 1:])
    assert len(sample) == 31 and set(sample) <= set(text) | {"\n"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    (d / "notjson.json").write_text("{not json")
    (d / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (d / "fake.npz").write_text("not a checkpoint")
    (d / "fake.npz.task.json").write_text(json.dumps(
        {"format": "fastbptt-train-task", "name": "adding", "T": 10, "n": 10, "seed": 0,
         "text": None, "chars": 100, "vocab": None}))
    return d


USER_ERRORS = {
    "no-command": ([], "required"),
    "bad-shape": (["bench", "--shapes", "1,2,3"], "shape"),
    "bad-shape-layers": (["bench", "--shapes", "5,1,1,1,0"], "shape"),
    "bad-shape-direction": (["bench", "--shapes", "5,1,1,1,2,both"], "shape"),
    "bad-backend": (["bench", "--backends", "fortran"], "invalid choice"),
    "bad-threads": (["bench", "--threads", "0"], "positive int"),
    "json-folder-missing": (["bench", "--shapes", "5,1,1,1", "--json", "no/such/dir/r.json"], "--json"),
    "compare-missing": (["compare", "nope.json", "nope2.json"], "nope.json"),
    "compare-not-json": (["compare", "notjson.json", "notjson.json"], "not a JSON file"),
    "bad-variant": (["tbptt", "--variants", "10,5"], "k1 <= k2"),
    "train-bad-truncation": (["train", "--truncation", "0"], "variant"),
    "train-missing-text": (["train", "--text", "missing.txt"], "no such file"),
    "train-binary-text": (["train", "--text", "bin.txt"], "UTF-8"),
    "train-text-and-task": (["train", "--text", "bin.txt", "--task", "sine"], "cannot be combined"),
    "resume-missing": (["train", "--resume", "missing.npz"], "no such file"),
    "resume-not-ours": (["train", "--resume", "notjson.json"], "not written by"),
    "resume-corrupt": (["train", "--resume", "fake.npz"], "not a valid"),
    "resume-with-task": (["train", "--resume", "fake.npz", "--task", "adding"], "leave out"),
    "resume-with-model-options": (["train", "--resume", "fake.npz", "--hidden", "8", "--lr", "0.1"],
                                  "leave out --hidden, --lr"),
    "out-folder-missing": (["train", "--task", "sine", "--n", "8", "--out", "no/dir/m.npz"], "--out"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_with_a_message_and_no_traceback(case, folder):
    args, needle = USER_ERRORS[case]
    proc = run(args, cwd=folder)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "error:" in proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = run(["bench", "--shapes", "5,1,1,1", "--plot", "r.png"], cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert "matplotlib" in proc.stderr and "pip install" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.png").exists()
