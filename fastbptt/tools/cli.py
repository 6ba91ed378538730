"""The ``fastbptt`` command: ``info``, ``bench``, ``compare``, ``tbptt`` and ``train``.

Run ``fastbptt --help`` or ``python -m fastbptt --help``. A user error (bad
option, missing file, unusable checkpoint) prints ``fastbptt: error: ...`` and
a hint to ``--help`` on stderr and exits with status 2, without a traceback.
"""

import argparse
import json
import math
import os
import stat
import sys
import tempfile
import time

import numpy as np

from .._io import write_json

PROG = "fastbptt"
TRAIN_TASKS = ("char", "adding", "echo", "copy", "sine")


class UserError(ValueError):
    """A mistake in the command line or its files; reported without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument prints the one-line error and a hint, not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options.\n")


# ------------------------------------------------------------------ helpers
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _truncation(text):
    from .tbptt_study import parse_variant
    try:
        return parse_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _writable_path(path, what):
    """Fail before a long run if ``path`` cannot be written: its folder is missing or not writable,
    or it is a folder. (A file is created and removed in the folder to find out.)"""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{what}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what}: {path!r} is a folder, expected a file name")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastbptt-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write into folder {folder!r} ({exc.strerror or exc})") from None
    return path


def _regular_file(path, what, expected="file"):
    """UserError unless ``path`` is an existing regular file (a folder, a device such as /dev/null or a
    FIFO is named as such rather than reported missing)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what}: no such file: {path!r}") from None
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path!r} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what}: {path!r} is a folder, expected a {expected}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what}: {path!r} is not a regular file (a device, FIFO or socket), expected a {expected}")
    return path


def _say(text):
    print(text, file=sys.stderr, flush=True)


#: Seconds to wait for a Dask scheduler given by ``--scheduler``.
CONNECT_TIMEOUT_S = 10


def _connect(address):
    """A ``distributed.Client`` on the scheduler at ``address``; UserError if dask is missing or the
    scheduler cannot be reached. (dask is imported here only: the extra is optional.)"""
    try:
        from distributed import Client
    except ImportError as exc:
        raise UserError(f"--scheduler needs dask.distributed, which is not installed ({exc}); "
                        "install the extra: pip install 'fastbptt[dask]'") from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, ValueError (bad protocol), ...
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--scheduler: cannot connect to the Dask scheduler at {address!r} ({why})") from None


class _maybe_client:
    """``with _maybe_client(address) as client``: a connected client, closed afterwards; None without
    an address."""

    def __init__(self, address):
        self.address = address
        self.client = None

    def __enter__(self):
        if self.address is not None:
            self.client = _connect(self.address)
            _say(f"scheduler {self.address}: {len(self.client.nthreads())} workers")
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        return False


# --------------------------------------------------------------------- info
def cmd_info(args):
    from .. import __version__
    from ..backends import ENV_VAR, available_backends, unavailable_backends
    from .bench import machine_info

    info = machine_info()
    available = available_backends()
    missing = unavailable_backends()
    from ..backends import dispatch_info
    dispatch = dispatch_info()
    if args.json:
        info.update({"backends_available": available, "backends_missing": missing, "dispatch": dispatch})
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"fastbptt {__version__}")
    print(f"python {info['python']} on {info['platform']} ({info['cpu_count']} CPUs)")
    print(f"backends available (order of preference): {', '.join(available)}")
    for name, reason in missing.items():
        print(f"backend {name} missing: {reason}")
    print(f"numpy {info['numpy']}, scipy {info['scipy']}, numba {info['numba'] or 'not installed'}")
    print(f"peers: torch {info['torch'] or 'not installed'}, jax {info['jax'] or 'not installed'}")
    print("BLAS / OpenMP thread pools (threadpoolctl):")
    pools = info["threadpools"]
    if isinstance(pools, str):
        print(f"  {pools}")
    else:
        for p in pools:
            print(f"  {p['internal_api']} {p['version']} ({p['user_api']}), {p['num_threads']} threads"
                  f"{', ' + p['architecture'] if p.get('architecture') else ''}: {p['prefix']}")
    from .._threads import ENV_VAR as THREADS_VAR, MIN_SPLIT_FLOPS, MIN_SPLIT_FLOPS_C_TEAM, get_num_threads
    print("thread settings:")
    print(f"  fastbptt threads per call: {get_num_threads()} (BLAS on 1 thread inside a call; a phase "
          f"is split from {MIN_SPLIT_FLOPS_C_TEAM:.2g} flops on the C team, {MIN_SPLIT_FLOPS:.2g} on the Python pool)")
    # (OPENBLAS_CORETYPE: a kernel set forced below what the CPU has, e.g. Haswell's on an AVX-512 CPU)
    for var in (THREADS_VAR, "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "XLA_FLAGS", ENV_VAR):
        print(f"  {var}={os.environ.get(var, '(unset)')}")
    if "numba" in available:
        try:
            import numba
            layer = numba.config.THREADING_LAYER
            print(f"  numba: {numba.get_num_threads()} threads, threading layer {layer!r}")
        except Exception:  # pragma: no cover - diagnostic only
            pass
    _print_dispatch(dispatch)
    return 0


def _print_dispatch(d):
    """What ``backend="auto"`` learned (:func:`fastbptt.backends.dispatch_info`), for ``fastbptt info``."""
    state = "on" if d["learning"] else "off: the shipped table's choice, fixed"
    print(f"dispatcher (backend='auto'): learning {state} ({d['learn_variable']}="
          f"{os.environ.get(d['learn_variable'], '(unset)')})")
    print(f"  cache: {d['cache']}")
    print("  fingerprint: " + ", ".join(f"{k} {v}" for k, v in d["fingerprint"].items()))
    if d["learning"]:
        print(f"  learned: {len(d['learned'])} shape(s)" + (":" if d["learned"] else ""))
        for key, e in sorted(d["learned"].items()):
            medians = e.get("median_s") or {}
            timed = ", ".join(f"{c} {m * 1e3:.3g}" for c, m in sorted(medians.items(), key=lambda x: x[1]))
            print(f"    {key}: {e['backend']} on {e['threads']} thread{'s' if e['threads'] > 1 else ''}"
                  + (f" (median ms: {timed})" if timed else ""))


# -------------------------------------------------------------------- bench
def cmd_bench(args):
    from . import bench

    if args.plot:
        bench.require_matplotlib()
        _writable_path(args.plot, "--plot")
    if args.json:
        _writable_path(args.json, "--json")
    shapes = args.shapes or list(bench.SHAPES)
    for s in shapes:
        bench.parse_shape(s)                      # fail before running anything
    if args.quick:
        _say(f"quick run: T of the named shapes divided by {bench.QUICK_T_DIVISOR} (at least "
             f"{bench.QUICK_MIN_T}), 3 samples per cell: figures are indicative only")
    with _maybe_client(args.scheduler) as client:
        t0 = time.perf_counter()
        results = bench.run_benchmark(shapes, args.backends, dtype=np.dtype(args.dtype), threads=args.threads,
                                      quick=args.quick, repeats=args.repeats, check=not args.no_check,
                                      progress=None if args.silent else (lambda s: _say(f"  timing {s}")),
                                      client=client)
        elapsed = time.perf_counter() - t0
    results["meta"]["elapsed_s"] = elapsed
    print(bench.format_table(results))
    print(f"\nbenchmark took {elapsed:.1f} s")
    if args.json:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    if args.plot:
        bench.plot_results(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_compare(args):
    from . import bench

    print(bench.compare_table(bench.read_json(args.old), bench.read_json(args.new)))
    return 0


# -------------------------------------------------------------------- tbptt
def cmd_tbptt(args):
    from . import tbptt_study as S
    from .bench import require_matplotlib

    if args.plot:
        require_matplotlib()
        _writable_path(args.plot + "_fidelity.png", "--plot")
    if args.json:
        _writable_path(args.json, "--json")
    overrides, learn = {"backend": args.backend}, {"backend": args.backend}
    if args.variants:
        overrides["variants"] = learn["variants"] = tuple(dict.fromkeys(args.variants))
    if args.tasks is not None:
        overrides["tasks"] = tuple(dict.fromkeys(args.tasks))
    if args.learn_tasks is not None:
        learn["tasks"] = tuple(dict.fromkeys(args.learn_tasks))
    for name in ("inits", "distances"):
        if getattr(args, name):
            learn[name] = tuple(sorted(set(getattr(args, name)))) if name == "distances" else \
                tuple(dict.fromkeys(getattr(args, name)))
    for name in ("seeds", "budget", "hidden", "jobs"):
        if getattr(args, name) is not None:
            learn[name] = getattr(args, name)
    for name in ("char_hidden", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.seed is not None:
        learn["seed"] = args.seed
    if args.quick:
        from dataclasses import replace
        overrides["learn"] = replace(S.LearnConfig.quick(), **learn)
        cfg = S.StudyConfig.quick(**overrides)
        _say("quick run: small models, few seeds and distances, a short budget: figures are indicative only")
    else:
        cfg = S.StudyConfig(learn=S.LearnConfig(**learn), **overrides)
    if "copy" in cfg.learn.tasks and min(cfg.learn.distances) <= cfg.learn.copy_length:
        raise UserError(f"--distances: the copy task needs every distance > {cfg.learn.copy_length}, "
                        f"got {min(cfg.learn.distances)}")
    with _maybe_client(args.scheduler) as client:
        t0 = time.perf_counter()
        res = S.run_study(cfg, progress=None if args.silent else (lambda s: _say(f"  {s}")), client=client)
        res["elapsed_s"] = time.perf_counter() - t0
    print(S.format_study(res))
    print(f"\nstudy took {res['elapsed_s']:.1f} s")
    if args.json:
        write_json(res, args.json)
        print(f"results written to {args.json}")
    if args.plot:
        for path in S.plot_study(res, args.plot):
            print(f"plot written to {path}")
    return 0


# -------------------------------------------------------------------- train
def _task_data(task):
    """Training and validation data for a task description (a dict); returns (spec, train, val)."""
    from .. import datasets

    name, T, n, seed = task["name"], task["T"], task["n"], task["seed"]
    n_val = max(1, n // 10)
    if name == "adding":
        if T < 2:
            raise UserError(f"--T: the adding problem needs T >= 2, got {T}")
        spec = dict(D=2, O=1, loss="mse", output="last")
        return spec, datasets.adding_problem(n, T, seed=seed), datasets.adding_problem(n_val, T, seed=seed + 1)
    if name == "echo":
        delay = min(5, T - 1)
        spec = dict(D=1, O=1, loss="bce", output="sequence")
        return (spec, datasets.delayed_echo(n, T, delay, seed=seed),
                datasets.delayed_echo(n_val, T, delay, seed=seed + 1))
    if name == "copy":
        spec = dict(D=10, O=10, loss="ce", output="sequence")     # 8 symbols + blank + delimiter
        return (spec, datasets.copy_memory(n, T, seed=seed, one_hot_input=False),
                datasets.copy_memory(n_val, T, seed=seed + 1, one_hot_input=False))
    if name == "sine":
        spec = dict(D=1, O=1, loss="mse", output="sequence")
        return spec, datasets.sine_wave(n, T, seed=seed), datasets.sine_wave(n_val, T, seed=seed + 1)
    # char model: the text (a file, or the built-in corpus) cut into windows of T characters
    if task.get("text"):
        text = _read_text(task["text"])
    else:
        text = datasets.char_corpus(task["chars"])
    vocab = datasets.CharVocab(task["vocab"])
    ids = vocab.encode(text)                      # ValueError names an unknown character
    windows = (len(ids) - 1) // T
    if windows < 2:
        raise UserError(f"--text: {len(ids)} characters make fewer than 2 windows of T={T} "
                        f"(use a longer text or a smaller --T)")
    X, Y = ids[:windows * T].reshape(windows, T), ids[1:windows * T + 1].reshape(windows, T)
    n_val = max(1, windows // 10)
    spec = dict(D=len(vocab), O=len(vocab), loss="ce", output="sequence")
    return spec, (X[n_val:], Y[n_val:]), (X[:n_val], Y[:n_val])


def _read_text(path):
    """The UTF-8 text of ``path``; UserError if missing, not a regular file, not UTF-8, or empty."""
    _regular_file(path, "--text", "UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"--text: {path!r} is not UTF-8 text ({exc.reason})") from None
    if not text:
        raise UserError(f"--text: {path!r} is empty")
    return text


def _sample_text(params, vocab_chars, start, length, seed, temperature=0.8):
    """``start`` and ``length`` characters sampled after it from a character model, one step at a time.

    The model reads ``start`` first (every character must be in the vocabulary), then each sampled
    character in turn, from a zero state.
    """
    from ..functional import forward
    from ..engine.losses import predict_from_logits

    index = {c: i for i, c in enumerate(vocab_chars)}
    unknown = sorted(set(start) - set(index))
    if unknown:
        raise UserError(f"--start: characters {''.join(unknown)!r} are not in the model's vocabulary")
    rng = np.random.default_rng(seed)
    V = len(vocab_chars)
    h = np.zeros(params.hidden_size, dtype=params.dtype)
    prime = np.zeros((len(start), V), dtype=params.dtype)
    prime[np.arange(len(start)), [index[c] for c in start]] = 1
    logits, Hs = forward(params, prime, h0=h)
    h, last = Hs[-1], logits[-1]
    x = np.zeros((1, V), dtype=params.dtype)
    out = [start]
    for _ in range(length):
        p = predict_from_logits(last.astype(np.float64) / temperature, "ce")
        cur = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab_chars[cur])
        x[:] = 0
        x[0, cur] = 1
        logits, Hs = forward(params, x, h0=h)
        h, last = Hs[-1], logits[0]
    return "".join(out)


def _task_path(out):
    return out + ".task.json"


def _baseline(spec, train, val):
    """``(value, what)``: the validation loss of the best constant prediction fitted on the training
    targets -- what a model must beat to have learned anything."""
    (_, Y), (_, Yv) = train, val
    if spec["loss"] == "mse":
        return float(np.mean((Yv - Y.mean(axis=0)) ** 2)), "predicting the training targets' mean"
    if spec["loss"] == "bce":
        p = float(np.clip(np.mean(Y), 1e-6, 1 - 1e-6))
        yv = np.asarray(Yv, dtype=np.float64)
        return float(-np.mean(yv * math.log(p) + (1 - yv) * math.log(1 - p))), "predicting the training frequency"
    counts = np.bincount(np.asarray(Y).ravel(), minlength=spec["O"]) + 1.0      # add-one: no log(0)
    logp = np.log(counts / counts.sum())
    return float(-np.mean(logp[np.asarray(Yv).ravel()])), "predicting the training class frequencies"


def _load_task(path):
    """The task description written beside a checkpoint by 'fastbptt train'."""
    task_file = _task_path(path)
    try:
        with open(task_file) as fh:
            task = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{task_file!r} is missing: {path!r} was not written by 'fastbptt train'") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{task_file!r} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {task_file!r} ({exc.strerror or exc})") from None
    if not isinstance(task, dict) or task.get("format") != "fastbptt-train-task":
        raise UserError(f"{task_file!r} is not a fastbptt train task file")
    return task


def _load_model(path, what):
    from ..estimator import RNN

    _regular_file(path, what, "model file")
    return RNN.load(path)


# options that shape a new model or its data; --resume takes them from the checkpoint
_MODEL_OPTIONS = {"T": None, "n": 2000, "chars": 200_000, "hidden": 128, "optimizer": "adam", "lr": None,
                  "truncation": None, "clip_norm": 1.0, "batch_size": 32, "backend": "auto"}
# the default sequence length per task, and other defaults of a task: settings a vanilla RNN learns
# with here, whatever the last bits of its arithmetic. The adding problem at T=20, H=32, lr 1e-2 left
# the mean predictor's plateau within 20 epochs for some seeds and builds only; at T=10 every seed
# tried ended 14-48x below it (0.5 s).
DEFAULT_T = {"char": 100, "adding": 10, "echo": 50, "copy": 20, "sine": 50}
TASK_DEFAULTS = {"adding": {"hidden": 32, "lr": 1e-2, "epochs": 20}}


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def cmd_train(args):
    from .tbptt_study import estimator_unavailable_reason

    reason = estimator_unavailable_reason()
    if reason:
        raise UserError(f"train needs the trainer: {reason}")
    from ..estimator import RNN

    given = [f"--{name.replace('_', '-')}" for name in _MODEL_OPTIONS if getattr(args, name) is not None]
    if args.resume:
        if args.task or args.text:
            raise UserError("--resume continues the checkpoint's own task: leave out --task and --text")
        if given:
            raise UserError(f"--resume continues the checkpoint's own model and data: leave out {', '.join(given)}")
        _regular_file(args.resume, "--resume", "model file")
        try:
            task = _load_task(args.resume)
        except UserError as exc:
            raise UserError(f"--resume: {exc}") from None
        model = _load_model(args.resume, "--resume")
        out = args.out or args.resume
    else:
        if args.text and args.task not in (None, "char"):
            raise UserError(f"--text trains a character model: it cannot be combined with --task {args.task}")
        name = args.task or "char"
        for option, default in {**_MODEL_OPTIONS, **TASK_DEFAULTS.get(name, {})}.items():
            if getattr(args, option) is None:
                setattr(args, option, default)
        task = {"format": "fastbptt-train-task", "name": name, "T": args.T or DEFAULT_T[name],
                "n": args.n, "seed": args.seed, "text": os.path.abspath(args.text) if args.text else None,
                "chars": args.chars, "vocab": None}
        if name == "char":
            from .. import datasets
            if args.text:
                text = _read_text(args.text)
            else:
                text = datasets.char_corpus(args.chars)
            task["vocab"] = datasets.CharVocab(text).chars
        out = args.out or f"fastbptt-{name}.npz"
        model = None
    if args.epochs is None:
        args.epochs = 1
    save = args.epochs > 0 or args.out is not None
    if save:
        _writable_path(out, "--out")              # before any training: a long run must not fail at the end

    spec, train, val = _task_data(task)
    if model is None:
        model = RNN(spec["D"], args.hidden, spec["O"], loss=spec["loss"], output=spec["output"],
                    optimizer=args.optimizer, lr=args.lr, truncation=args.truncation,
                    clip_norm=args.clip_norm, batch_size=args.batch_size, backend=args.backend,
                    seed=args.seed)
    elif (model.input_size, model.output_size, model.loss, model.output) != (
            spec["D"], spec["O"], spec["loss"], spec["output"]):
        raise UserError(f"--resume: the checkpoint's model (D={model.input_size}, O={model.output_size}, "
                        f"loss={model.loss}) does not fit its task file ({task['name']})")
    done = len(model.history_["loss"])
    base, how = _baseline(spec, train, val)
    print(f"task {task['name']}: {train[0].shape[0]} training sequences of T={task['T']}, "
          f"{val[0].shape[0]} validation; {model!r}")
    print(f"baseline: val_loss {base:.4f} ({how})", flush=True)
    if done:
        print(f"resuming from {args.resume} after {_plural(done, 'epoch')}", flush=True)

    def print_epoch(m, logs):
        print(f"epoch {logs['epoch']}: loss {logs['loss']:.4f}, val_loss {logs['val_loss']:.4f}, "
              f"{logs['seq_per_s']:.0f} seq/s", flush=True)

    progress = {"auto": "bar", "on": "bar", "off": False}[args.progress]      # the bar: on a terminal only
    t0 = time.perf_counter()
    if args.epochs:
        try:
            model.fit(train[0], train[1], epochs=args.epochs, validation_data=val, progress=progress,
                      callbacks=[print_epoch])
        except KeyboardInterrupt:
            model.save(out)
            write_json(task, _task_path(out))
            print(f"interrupted after {_plural(len(model.history_['loss']) - done, 'complete epoch')} of this "
                  f"run: the model at its last completed update point (optimizer step "
                  f"{model.optimizer_.step_count}) is saved to {out}; continue with "
                  f"'fastbptt train --resume {out}'", file=sys.stderr, flush=True)
            return 130
    elapsed = time.perf_counter() - t0
    h = model.history_
    if args.epochs:
        print(f"trained {_plural(args.epochs, 'epoch')} in {elapsed:.1f} s: val_loss {h['val_loss'][-1]:.4f} "
              f"(baseline {base:.4f})")
    if save:
        model.save(out)
        write_json(task, _task_path(out))
        print(f"checkpoint written to {out} (task in {_task_path(out)})")
    if task["name"] == "char" and args.sample > 0:
        start = "\n" if "\n" in task["vocab"] else task["vocab"][0]
        print(f"sample ({args.sample} characters, temperature 0.8):")
        print(_sample_text(model.params, task["vocab"], start, args.sample, seed=args.seed))
    return 0


def cmd_sample(args):
    """Sample from a character model saved by 'fastbptt train'."""
    task = _load_task(_regular_file(args.model, "MODEL", "model file"))
    if task.get("name") != "char" or not isinstance(task.get("vocab"), str):
        raise UserError(f"MODEL: {args.model!r} is a model of the {task.get('name')!r} task; sampling needs a "
                        "character model (fastbptt train --text FILE, or the built-in corpus)")
    model = _load_model(args.model, "MODEL")
    if model.input_size != len(task["vocab"]) or model.loss != "ce":
        raise UserError(f"MODEL: the model (D={model.input_size}) does not fit its vocabulary of "
                        f"{len(task['vocab'])} characters")
    if args.start is not None:
        start = args.start
    else:
        start = "\n" if "\n" in task["vocab"] else task["vocab"][0]
    print(_sample_text(model.params, task["vocab"], start, args.length, seed=args.seed,
                       temperature=args.temperature))
    return 0


# ------------------------------------------------------------------- parser
def build_parser():
    from .. import __version__
    from .bench import ALL_IMPLS, QUICK_MIN_T, QUICK_T_DIVISOR, SHAPES
    from .tbptt_study import INITS, LEARN_TASKS, TASKS

    parser = _Parser(
        prog=PROG, description="Fast, exact BPTT for Elman RNNs on the CPU: benchmarks, the "
        "truncation study and a small trainer.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, backends (and why one is missing), BLAS and threads")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "bench", help="time one training step per backend and peer; table, JSON, plot",
        description="Time one training step (float32 forward + full-BPTT gradient, mse, O=8) of every "
        "fastbptt backend and, when installed, PyTorch and JAX, on the same data. Shapes (T,B,D,H): "
        + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in SHAPES.items()) + ".")
    p.add_argument("--quick", action="store_true",
                   help=f"finish in under a minute: T of the named shapes divided by {QUICK_T_DIVISOR} "
                   f"(at least {QUICK_MIN_T}), 3 samples per cell")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"shape names ({', '.join(SHAPES)}) or custom T,B,D,H (default: all)")
    p.add_argument("--backends", nargs="+", metavar="IMPL", choices=ALL_IMPLS,
                   help=f"implementations among {', '.join(ALL_IMPLS)} (default: all that run here)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=_positive_int, default=2,
                   help="threads for BLAS, Numba and torch (default 2); XLA uses all cores")
    p.add_argument("--repeats", type=_positive_int, help="samples per cell (default 7, quick 3)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference check")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run each (shape, implementation) cell as one task on this Dask scheduler (e.g. tcp://host:8786; "
                   "needs fastbptt[dask]): the same results, timings measured on the workers")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="compare two JSON results of 'fastbptt bench'")
    p.add_argument("old", metavar="OLD.json")
    p.add_argument("new", metavar="NEW.json")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tbptt", help="the truncation study: what each truncation learns, its speed and fidelity",
                       description="Which dependency distance each truncation of BPTT can learn: the adding "
                       "problem and a copy-memory recall with a dependency of exactly d steps, IRNN and "
                       "orthogonal initialisations, several seeds per cell (success rate, mini-batches to "
                       "success, wall time); then each variant's gradient throughput and cosine similarity to "
                       "full BPTT's gradient on the adding problem (T=50, 100) and a character model.")
    p.add_argument("--quick", action="store_true", help="a small configuration (under a minute)")
    p.add_argument("--variants", nargs="+", type=_truncation, metavar="V",
                   help="truncations: full, k (e.g. 10), k1,k2 (e.g. 10,50) or artbp,c (e.g. artbp,0.05); "
                   "default: full 5 10 25 50 5,10 10,50 artbp,0.05")
    p.add_argument("--learn-tasks", nargs="*", choices=LEARN_TASKS,
                   help=f"learnability tasks (default: {' '.join(LEARN_TASKS)}; none: skip the experiment)")
    p.add_argument("--inits", nargs="+", choices=tuple(INITS), help="default: irnn orth")
    p.add_argument("--distances", nargs="+", type=_positive_int, metavar="D",
                   help="dependency distances (default: 5 10 20 40 80)")
    p.add_argument("--seeds", type=_positive_int, help="seeds per learnability cell (default 5)")
    p.add_argument("--budget", type=_positive_int, help="mini-batches per learnability run (default 2000)")
    p.add_argument("--hidden", type=_positive_int, help="hidden size of the learnability models (default 32)")
    p.add_argument("--jobs", type=_positive_int,
                   help="local processes for the learnability cells (default 1; each runs on one thread)")
    p.add_argument("--tasks", nargs="*", choices=TASKS,
                   help=f"fidelity and throughput tasks (default: {' '.join(TASKS)}; none: skip)")
    p.add_argument("--char-hidden", type=_positive_int, help="hidden size, character model (fidelity)")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", default="auto", choices=("auto", "cython", "numba", "numpy"))
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PREFIX",
                   help="write PREFIX_learnability.png, PREFIX_curves.png and PREFIX_fidelity.png "
                   "(needs matplotlib)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run each cell (a learnability run, a fidelity + throughput task and variant) as one "
                   "task on this Dask scheduler (e.g. tcp://host:8786; needs fastbptt[dask]): the same "
                   "results, timings measured on the workers")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_tbptt)

    p = sub.add_parser("train", help="train on a built-in task or a text file; save a checkpoint",
                       description="Train an RNN on a built-in task (adding, echo, copy, sine) or a "
                       "character model on a text file (--text; the built-in corpus by default), save a "
                       "checkpoint (PATH and PATH.task.json), and print a sample for character models. "
                       "--resume PATH continues a checkpoint.")
    p.add_argument("--task", choices=TRAIN_TASKS, help="default: char (character model)")
    p.add_argument("--text", metavar="PATH", help="UTF-8 text file for a character model")
    p.add_argument("--resume", metavar="PATH", help="continue training this checkpoint")
    p.add_argument("--out", metavar="PATH",
                   help="checkpoint to write (default: fastbptt-TASK.npz, or the --resume file)")
    p.add_argument("--epochs", type=_nonnegative_int,
                   help="default 1 (adding: 20); 0 trains nothing (with --resume: only sample)")
    p.add_argument("--T", type=_positive_int,
                   help="sequence length (copy: the delay); default: " + ", ".join(f"{k} {v}" for k, v in
                                                                                DEFAULT_T.items()))
    p.add_argument("--n", type=_positive_int, help="sequences of a generated task (default: 2000)")
    p.add_argument("--chars", type=_positive_int,
                   help="characters of the built-in corpus to use (default: 200000)")
    p.add_argument("--hidden", type=_positive_int, help="hidden size (default: 128; adding: 32)")
    p.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop", "adagrad"), help="default: adam")
    p.add_argument("--lr", type=_positive_float,
                   help="learning rate (default: the optimizer's; adding: 0.01)")
    p.add_argument("--truncation", type=_truncation, default=None,
                   help="full (default), k, k1,k2 or artbp,c (ARTBP: cuts drawn per mini-batch)")
    p.add_argument("--clip-norm", type=_positive_float, help="default: 1.0")
    p.add_argument("--batch-size", type=_positive_int, help="default: 32")
    p.add_argument("--backend", choices=("auto", "cython", "numba", "numpy"), help="default: auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=200, help="characters to sample (char models)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar while an epoch runs, on stderr when it is a terminal (auto, on) or "
                   "never (off); each epoch's line is printed when the epoch ends in every case")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample text from a character model saved by 'fastbptt train'",
                       description="Print text sampled from a character model written by 'fastbptt train' "
                       "(MODEL and MODEL.task.json, which holds its vocabulary).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--length", type=_positive_int, default=400, help="characters to sample (default 400)")
    p.add_argument("--temperature", type=_positive_float, default=0.8,
                   help="softmax temperature: lower is more conservative (default 0.8)")
    p.add_argument("--start", metavar="TEXT", help="text the model reads first (default: a newline)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv=None):
    """Entry point of the ``fastbptt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:              # training diverged: not a bug, not a user error
        print(f"{PROG}: training diverged: {exc} (try a smaller --lr or --clip-norm)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
