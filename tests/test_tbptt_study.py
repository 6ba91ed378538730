"""The truncation study (``fastbptt tbptt``): its learnability experiment, its tables and figures,
and the ``--quick`` run end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbptt.tools import tbptt_study as S


@pytest.mark.parametrize("text,variant,label", [("full", None, "full"), ("10", 10, "k=10"), ("k=5", 5, "k=5"),
                                                ("10,50", (10, 50), "(10,50)"),
                                                ("artbp,0.05", ("artbp", 0.05), "artbp(0.05)"),
                                                ("artbp(0.2)", ("artbp", 0.2), "artbp(0.2)")])
def test_variants_parse_and_label(text, variant, label):
    assert S.parse_variant(text) == variant
    assert S.variant_label(variant) == label
    assert S.parse_variant(label) == variant                  # a label reads back


@pytest.mark.parametrize("text", ["artbp", "artbp,0", "artbp,1.5", "0", "5,3", "x"])
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError, match="variant: expected"):
        S.parse_variant(text)


def _tiny(**kw):
    cfg = dict(tasks=("adding",), inits=("irnn",), variants=(None, 2), distances=(3,), seeds=1, budget=40,
               eval_every=20, n_val=16, hidden=4, jobs=1)
    cfg.update(kw)
    return S.LearnConfig(**cfg)


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_a_cell_is_deterministic_and_stops_at_success(task):
    cfg = _tiny(tasks=(task,))
    a = S.learn_distance_cell(cfg, task, "irnn", None, 3, 0)
    b = S.learn_distance_cell(cfg, task, "irnn", None, 3, 0)
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    assert a["T"] == (3 + cfg.pad if task == "adding" else 3 + cfg.copy_length)
    assert [n for n, _ in a["val_curve"]] == [20, 40]          # validated every eval_every mini-batches
    assert not a["success"] and a["batches"] is None          # 40 mini-batches of a 4-unit model: no success
    # success as soon as the validation loss is below the stated fraction of the baseline
    easy = S.learn_distance_cell(_tiny(tasks=(task,), success_fraction=100.0), task, "irnn", None, 3, 0)
    assert easy["success"] and easy["batches"] == 20 and len(easy["val_curve"]) == 1
    assert easy["steps"] == 20                                 # full BPTT: one optimizer step a mini-batch
    assert easy["threshold"] == pytest.approx(100.0 * easy["baseline"])


def test_the_baselines_are_the_memoryless_losses():
    spec, make, (Xv, Yv) = S.learn_task("adding", 10, _tiny(n_val=4000), 0)
    assert spec["baseline"] == pytest.approx(np.mean((Yv - 1.0) ** 2), rel=0.05)
    spec, make, (Xv, Yv) = S.learn_task("copy", 10, _tiny(n_val=10), 0)
    cfg = _tiny()
    assert spec["T"] == 10 + cfg.copy_length and Xv.shape == (10, spec["T"])
    assert spec["baseline"] == pytest.approx(cfg.copy_length * np.log(cfg.copy_symbols) / spec["T"])
    # the recalled symbol is exactly d steps after it was shown
    assert np.array_equal(Yv[:, 10], Xv[:, 0]) and np.all(Yv[:, :10] == 0)
    X0, _ = make(0)
    assert X0.shape[0] == cfg.batch_size * cfg.eval_every and not np.array_equal(X0, make(1)[0])


def test_distances_run_in_order_and_a_variant_that_failed_everywhere_stops(monkeypatch):
    """A stand-in cell: k learns d < k, full learns everything; pruning skips the larger distances."""
    ran = []

    def fake(cfg, task, init, variant, d, seed, threads=1):
        ran.append((S.variant_label(variant), d, seed))
        ok = variant is None or d < variant or (variant == 25 and seed == 0)
        return {"task": task, "init": init, "variant": S.variant_label(variant), "d": d, "seed": seed,
                "success": ok, "batches": 10 * d if ok else None, "wall_s": 1.0, "val_curve": [],
                "baseline": 1.0}
    monkeypatch.setattr(S, "learn_distance_cell", fake)
    cfg = _tiny(variants=(None, 10, 25), distances=(40, 5, 20), seeds=3)
    res = S.run_learnability(cfg)
    assert [d for _, d, _ in ran] == sorted(d for _, d, _ in ran)          # increasing distances
    assert ("k=10", 20, 0) in ran and ("k=10", 40, 0) not in ran         # failed all seeds at 20
    assert ("k=25", 40, 2) in ran
    s = res["summary"]["adding"]["irnn"]
    assert s["full"]["max_d"] == 40 and s["k=10"]["max_d"] == 5 and s["k=25"]["max_d"] == 20
    assert s["k=25"]["by_d"]["40"]["success_rate"] == pytest.approx(1 / 3)      # one seed of three: not learned
    assert s["full"]["by_d"]["40"] == {"success_rate": 1.0, "n": 3, "median_batches": 400.0, "median_wall_s": 1.0}
    assert ["adding", "irnn", "k=10", 40] in [list(p) for p in res["pruned"]]
    text = "\n".join(S.format_learnability(res))
    assert "3/3   400   1.0s" in text and "0/3" in text
    no_prune = S.run_learnability(_tiny(variants=(None, 10), distances=(5, 20, 40), seeds=1, prune=False))
    assert not no_prune["pruned"] and len(no_prune["cells"]) == 6


@pytest.mark.parametrize("kw,match", [(dict(tasks=("nope",)), "learn_tasks: "), (dict(inits=("he",)), "inits: "),
                                      (dict(tasks=("copy",), distances=(1, 5)), "distances: .*copy_length=1")])
def test_bad_learnability_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        S.run_learnability(_tiny(**kw))


def test_two_processes_give_the_results_of_one():
    cfg = _tiny(variants=(None, 2, ("artbp", 0.3)), seeds=2)
    one = S.run_learnability(cfg)
    two = S.run_learnability(S.LearnConfig(**{**cfg.__dict__, "jobs": 2}))
    strip = [{k: v for k, v in c.items() if k != "wall_s"} for c in one["cells"]]
    assert strip == [{k: v for k, v in c.items() if k != "wall_s"} for c in two["cells"]]


def test_quick_runs_end_to_end(tmp_path):
    """``fastbptt tbptt --quick`` as CI runs it: tables, JSON and the three figures (~15 s on a quiet
    machine, ~50 s with the 2 cores shared 5 ways; no time is asserted)."""
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "tbptt", "--quick", "--json", str(tmp_path / "r.json"),
                           "--plot", str(tmp_path / "t"), "--silent"], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quick run" in proc.stderr and "learnability: success = validation loss <" in proc.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    learn = res["learnability"]
    assert set(learn["summary"]) == {"adding", "copy"}
    labels = learn["config"]["variants"]
    assert "artbp(0.05)" in labels and "full" in labels
    for c in learn["cells"]:
        assert c["variant"] in labels and c["wall_s"] > 0 and c["val_curve"]
        assert c["success"] == (c["val_curve"][-1][1] < c["threshold"])
    for name in ("learnability", "curves", "fidelity"):
        assert (tmp_path / f"t_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["throughput"]) == set(S.TASKS) and res["variants"][-1] == "artbp(0.05)"
