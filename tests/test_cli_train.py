"""``fastbptt train`` and ``fastbptt sample``: clear errors, checks before a long run, epoch lines as
they come, a baseline, interrupts that keep the work, huge truncations (run as subprocesses)."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastbptt.estimator import RNN


def run(args, *, cwd, timeout=180):
    return subprocess.run([sys.executable, "-m", "fastbptt", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, needle):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    return d


@pytest.mark.parametrize("args,needle", [
    (["train", "--text", "/dev/null"], "'/dev/null' is not a regular file (a device, FIFO or socket)"),
    (["train", "--text", "dir"], "--text: 'dir' is a folder, expected a UTF-8 text file"),
    (["train", "--text", "fifo"], "--text: 'fifo' is not a regular file"),
    (["train", "--resume", "fifo"], "--resume: 'fifo' is not a regular file"),
    (["train", "--resume", "dir"], "--resume: 'dir' is a folder"),
    (["sample", "fifo"], "MODEL: 'fifo' is not a regular file"),
    (["sample", "missing.npz"], "MODEL: no such file"),
    (["train", "--task", "sine", "--n", "8", "--out", "/proc/m.npz"], "--out: cannot write into folder '/proc'"),
], ids=["dev-null", "text-folder", "text-fifo", "resume-fifo", "resume-folder", "sample-fifo", "sample-missing",
        "out-unwritable"])
def test_files_that_are_not_what_they_should_be(args, needle, folder):
    t0 = time.perf_counter()
    proc = run(args, cwd=folder, timeout=60)
    assert_user_error(proc, needle)
    assert time.perf_counter() - t0 < 30                 # refused before any training
    assert "epoch" not in proc.stdout


def test_argument_errors_print_one_line_and_a_hint_not_the_usage(tmp_path):
    for args, prog in [(["train", "--bogus"], "fastbptt"), (["train", "--epochs", "-1"], "fastbptt train"),
                       (["train", "--task", "nope"], "fastbptt train"), ([], "fastbptt")]:
        proc = run(args, cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 2, proc.stderr
        assert lines[0].startswith(f"{prog}: error: ")
        assert lines[1] == f"Run '{prog} --help' for the options."
        assert "usage:" not in proc.stderr


def test_adding_task_defaults_learn_and_print_the_mean_predictor_baseline(tmp_path):
    proc = run(["train", "--task", "adding", "--progress", "off"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "training sequences of T=10" in out and "hidden_size=32" in out
    base = float(out.split("baseline: val_loss ")[1].split()[0])
    assert 0.1 < base < 0.25 and "predicting the training targets' mean" in out
    final = float(out.split("trained 20 epochs in ")[1].split("val_loss ")[1].split()[0])
    assert final * 3 < base                               # it learned


def test_epoch_lines_come_as_epochs_end_and_an_interrupt_saves_the_work(tmp_path):
    # (epochs enough that it still trains when the interrupt comes: 500 took ~17 s, and once a
    # starved reader saw epoch 2 only after the last, so the signal met a run that had ended)
    proc = subprocess.Popen([sys.executable, "-m", "fastbptt", "train", "--task", "sine", "--n", "4000",
                             "--epochs", "100000", "--hidden", "32", "--out", "m.npz", "--progress", "off"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.time() + 120
        while time.time() < deadline and not any(ln.startswith("epoch 2:") for ln in seen):
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen.append(proc.stdout.readline())
        assert any(ln.startswith("epoch 1: loss ") for ln in seen), seen
        assert proc.poll() is None                        # the lines came while it was still training
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "saved to m.npz" in err and "--resume m.npz" in err
    assert "Traceback" not in err
    model = RNN.load(tmp_path / "m.npz")
    assert len(model.history_["loss"]) >= 2 and model.optimizer_.step_count > 0
    assert json.loads((tmp_path / "m.npz.task.json").read_text())["name"] == "sine"
    again = run(["train", "--resume", "m.npz", "--epochs", "1", "--progress", "off"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert RNN.load(tmp_path / "m.npz").optimizer_.step_count > model.optimizer_.step_count


@pytest.mark.parametrize("truncation", ["1,1000000000000000000000000000000", "1000000000000000000000000000000",
                                        "3,99999999999999999999999"])
def test_huge_truncation_from_the_command_line(truncation, tmp_path):
    proc = run(["train", "--task", "adding", "--n", "64", "--T", "10", "--hidden", "4", "--epochs", "1",
                "--truncation", truncation, "--progress", "off"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "trained 1 epoch in" in proc.stdout     # singular


def test_sample_from_a_saved_character_model_and_epochs_zero(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "t.txt").write_text(text)
    proc = run(["train", "--text", "t.txt", "--T", "20", "--hidden", "16", "--epochs", "1", "--sample", "0",
                "--out", "c.npz", "--progress", "off"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run(["sample", "c.npz", "--length", "50", "--start", "the ", "--seed", "3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sample = proc.stdout[:-1]
    assert sample.startswith("the ") and len(sample) == 54 and set(sample) <= set(text)
    assert run(["sample", "c.npz", "--length", "50", "--start", "the ", "--seed", "3"],
               cwd=tmp_path).stdout == proc.stdout                                       # seeded
    assert_user_error(run(["sample", "c.npz", "--start", "QZ"], cwd=tmp_path), "not in the model's vocabulary")
    assert_user_error(run(["sample", "c.npz", "--temperature", "0"], cwd=tmp_path), "positive number")
    before = (tmp_path / "c.npz").read_bytes()
    proc = run(["train", "--resume", "c.npz", "--epochs", "0", "--sample", "30"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trained" not in proc.stdout and "sample (30 characters" in proc.stdout
    assert (tmp_path / "c.npz").read_bytes() == before              # nothing trained, nothing rewritten
    run(["train", "--task", "adding", "--n", "64", "--T", "5", "--epochs", "1", "--out", "a.npz",
         "--progress", "off"], cwd=tmp_path)
    assert_user_error(run(["sample", "a.npz"], cwd=tmp_path), "sampling needs a character model")
