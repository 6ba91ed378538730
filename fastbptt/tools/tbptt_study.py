"""The truncation study behind ``fastbptt tbptt``: what truncated BPTT costs and buys.

For each variant -- full BPTT, ``k`` in {5, 10, 25, 50} and ``(k1, k2)`` in
{(5, 10), (10, 20), (10, 50)} (see ``fastbptt.loss_and_grad``, ``truncation``) -- on the same data:

1. **gradient throughput**: time steps per second (T·B / seconds) of one
   :func:`fastbptt.loss_and_grad` call with that truncation on a character-
   model batch;
2. **gradient fidelity**: cosine similarity, per parameter, of the variant's
   gradient to the full-BPTT gradient on the same batch and weights, at
   initialisation and after training (the weights of the full-BPTT model
   trained in part 3, where W_hh is stronger). Without the trainer, a W_hh
   rescaled to spectral radius 1 stands in for trained weights (labelled so);
3. **what it learns** (needs :class:`fastbptt.estimator.RNN`): each variant
   trains with the estimator's truncation-aware ``fit`` on the adding problem
   (T = 50 and 100; mse on the last step) and a character model (cross-entropy
   on every step) within the same budget of time steps (the same epochs over
   the same data), and the study reports the validation loss reached, the
   learning curve and the training throughput of ``fit``, beside each task's
   baseline (adding: 1/6, the MSE of predicting the mean; char: log V, a
   uniform guess).

:func:`run_study` returns a JSON-ready dict; :func:`format_study` prints it.
"""

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..functional import loss_and_grad
from ..params import RNNParams

#: The variants of the study, in table order.
VARIANTS = (None, 5, 10, 25, 50, (5, 10), (10, 20), (10, 50))
TASKS = ("adding50", "adding100", "char")


def variant_label(v):
    """``"full"``, ``"k=5"`` or ``"(5,10)"``."""
    if v is None:
        return "full"
    if isinstance(v, int):
        return f"k={v}"
    return f"({v[0]},{v[1]})"


def parse_variant(text):
    """``"full"``, ``"5"`` / ``"k=5"`` or ``"5,10"`` / ``"(5,10)"`` -> None, 5 or (5, 10)."""
    if not isinstance(text, str):
        raise TypeError(f"variant: expected a str, got {type(text).__name__}")
    s = text.strip().replace(" ", "")
    if s in ("full", "none", "None"):
        return None
    s = s.removeprefix("k=").strip("()")
    try:
        parts = [int(p) for p in s.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return (parts[0], parts[1])
    raise ValueError(f"variant: expected 'full', k >= 1 (e.g. '10') or k1,k2 with 1 <= k1 <= k2 "
                     f"(e.g. '10,20'), got {text!r}")


@dataclass
class StudyConfig:
    """Sizes of the study. :meth:`quick` is a small version that runs in seconds.

    ``epochs`` is the budget: every variant sees ``epochs`` passes over the
    same ``n_train`` sequences, i.e. the same number of time steps.
    """

    variants: tuple = VARIANTS
    tasks: tuple = TASKS
    hidden: int = 64                  # adding problem
    char_hidden: int = 128
    n_train: int = 2000               # adding problem sequences
    n_val: int = 500
    char_T: int = 100
    char_chars: int = 100_000         # corpus characters (train + val)
    epochs: int = 10                  # adding problem
    char_epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-2                  # Adam, character model
    adding_lr: float = 1e-3           # Adam, adding problem (1e-2 spikes there)
    clip_norm: float = 1.0
    fidelity_batch: int = 32
    throughput_repeats: int = 5
    seed: int = 0
    backend: str = "auto"
    notes: list = field(default_factory=list)

    @classmethod
    def quick(cls, **overrides):
        cfg = dict(hidden=32, char_hidden=64, n_train=256, n_val=128, char_T=50, char_chars=20_000,
                   epochs=3, char_epochs=1, fidelity_batch=16, throughput_repeats=3)
        cfg.update(overrides)
        return cls(**cfg)


def estimator_unavailable_reason():
    """``None`` if :class:`fastbptt.estimator.RNN` imports, else why not."""
    try:
        from ..estimator import RNN  # noqa: F401
    except Exception as exc:
        return f"fastbptt.estimator.RNN is not available ({type(exc).__name__}: {exc})"
    return None


# ------------------------------------------------------------------ data
def make_task(name, cfg):
    """``(spec, (X, Y), (X_val, Y_val))`` samples-first, as the estimator takes them.

    ``spec`` holds the model's sizes and loss: ``D, O, H, T, loss, output, epochs``.
    """
    from .. import datasets

    if name in ("adding50", "adding100"):
        T = int(name[len("adding"):])
        train = datasets.adding_problem(cfg.n_train, T, seed=cfg.seed)
        val = datasets.adding_problem(cfg.n_val, T, seed=cfg.seed + 1)
        spec = dict(D=2, O=1, H=cfg.hidden, T=T, loss="mse", output="last", epochs=cfg.epochs,
                    lr=cfg.adding_lr, baseline=1 / 6)     # predicting the mean (1.0): MSE 1/6
        return spec, train, val
    if name == "char":
        text = datasets.char_corpus(cfg.char_chars)
        vocab = datasets.CharVocab(text)
        ids = vocab.encode(text)
        T = cfg.char_T
        n = (len(ids) - 1) // T
        if n < 2:
            raise ValueError(f"char_chars: {cfg.char_chars} characters give fewer than 2 windows of T={T}")
        X_ids = ids[:n * T].reshape(n, T)
        Y_ids = ids[1:n * T + 1].reshape(n, T)
        n_val = max(1, n // 10)
        # index input: the estimator one-hot encodes each mini-batch itself
        spec = dict(D=len(vocab), O=len(vocab), H=cfg.char_hidden, T=T, loss="ce",
                    output="sequence", epochs=cfg.char_epochs, lr=cfg.lr,
                    baseline=float(np.log(len(vocab))))  # uniform prediction
        return spec, (X_ids[n_val:], Y_ids[n_val:]), (X_ids[:n_val], Y_ids[:n_val])
    raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")


def _time_major(X, Y, output, D):
    """Samples-first (N, T, ...) -> the functional API's time-major (T, N, ...).

    Integer token ids X (N, T) are one-hot encoded to D classes.
    """
    from ..datasets import one_hot

    if X.ndim == 2:
        X = one_hot(X, D)
    Xt = np.ascontiguousarray(np.swapaxes(X, 0, 1))
    Yt = np.ascontiguousarray(np.swapaxes(Y, 0, 1)) if output == "sequence" else Y
    return Xt, Yt


# --------------------------------------------------------------- measures
def cosine(a, b):
    """Cosine similarity of two arrays (1.0 when both are zero)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def gradient_fidelity(params, X, Y, variants, *, loss, output, backend="auto"):
    """Cosine similarity per parameter of each variant's gradient to full BPTT's.

    Parameters
    ----------
    params : RNNParams
    X : ndarray of shape (T, B, D);  Y : targets for ``loss``/``output``
    variants : iterable of None, int or (k1, k2)

    Returns
    -------
    dict
        ``{label: {"W_xh": cos, "W_hh": cos, "b_h": cos, "W_hy": cos, "b_y": cos, "all": cos}}``,
        ``"all"`` over the packed parameter vector.
    """
    _, full, _ = loss_and_grad(params, X, Y, loss=loss, output=output, backend=backend)
    out = {}
    for v in variants:
        _, g, _ = loss_and_grad(params, X, Y, loss=loss, output=output, truncation=v, backend=backend)
        row = {name: cosine(a, getattr(full, name)) for name, a in g.items()}
        row["all"] = cosine(g.flatten(), full.flatten())
        out[variant_label(v)] = row
    return out


def gradient_throughput(params, X, Y, variants, *, loss, output, backend="auto", repeats=5):
    """Time steps per second (T·B / median seconds) of one gradient per variant."""
    from .bench import time_callable

    T, B = X.shape[:2]
    out = {}
    for v in variants:                  # warm every variant first (JIT, caches)
        loss_and_grad(params, X, Y, loss=loss, output=output, truncation=v, backend=backend)
    for v in variants:
        def step(v=v):
            loss_and_grad(params, X, Y, loss=loss, output=output, truncation=v, backend=backend)
        times = time_callable(step, repeats=repeats, min_sample_s=0.02, budget_s=3.0)
        med = float(np.median(times))
        out[variant_label(v)] = {"median_s": med, "best_s": min(times), "steps_per_s": T * B / med}
    return out


def spectral_radius(W):
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(W, dtype=np.float64)))))


def _with_radius(params, rho):
    p = params.copy()
    p.W_hh *= p.dtype.type(rho / spectral_radius(p.W_hh))
    return p


def learn(task_spec, train, val, variant, cfg):
    """Train one variant with the estimator; the validation curve, final loss and throughput."""
    from ..estimator import RNN

    model = RNN(task_spec["D"], task_spec["H"], task_spec["O"], loss=task_spec["loss"],
                output=task_spec["output"], optimizer="adam", lr=task_spec["lr"], truncation=variant,
                clip_norm=cfg.clip_norm, batch_size=cfg.batch_size, backend=cfg.backend,
                seed=cfg.seed)
    X, Y = train
    # warm up on a throw-away model (JIT compile, caches) so the timing is of training only
    RNN(task_spec["D"], task_spec["H"], task_spec["O"], loss=task_spec["loss"],
        output=task_spec["output"], truncation=variant, batch_size=cfg.batch_size,
        backend=cfg.backend, seed=cfg.seed).fit(X[:cfg.batch_size], Y[:cfg.batch_size], progress=False)
    t0 = time.perf_counter()
    model.fit(X, Y, epochs=task_spec["epochs"], validation_data=val, progress=False)
    wall = time.perf_counter() - t0
    steps = X.shape[0] * X.shape[1] * task_spec["epochs"]
    val_curve = [float(v) for v in model.history_["val_loss"]]
    return {"val_loss": val_curve[-1], "val_curve": val_curve,
            "train_curve": [float(v) for v in model.history_["loss"]],
            "time_steps": int(steps), "wall_s": wall, "steps_per_s": steps / wall}, model


# ----------------------------------------------------------------- study
def run_study(cfg=None, *, progress=None, client=None):
    """Run the study; returns ``{"config", "throughput", "fidelity", "learning", "notes"}``.

    Parameters
    ----------
    cfg : StudyConfig, optional
    progress : callable(str), optional
        Called with a short line before each part (with ``client``: as each cell comes back).
    client : distributed.Client, optional
        Run each (task, variant) cell as one task on this Dask cluster (``client.map``): the
        results are the local run's, apart from the timings, which are measured on the workers.
    """
    cfg = StudyConfig() if cfg is None else cfg
    say = progress or (lambda s: None)
    variants = tuple(cfg.variants)
    if not variants:
        raise ValueError("variants: expected at least one variant, got none")
    tasks = tuple(cfg.tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: expected names among {', '.join(TASKS)}, got {t!r}")
    if not tasks:
        raise ValueError("tasks: expected at least one task, got none")
    notes = list(cfg.notes)
    no_estimator = estimator_unavailable_reason()
    if no_estimator:
        notes.append(f"learning curves skipped: {no_estimator}")

    # variants including full, so fidelity/throughput always have their baseline
    all_variants = variants if None in variants else (None,) + variants
    results = {"config": {k: v for k, v in asdict(cfg).items() if k != "notes"},
               "variants": [variant_label(v) for v in all_variants],
               "throughput": {}, "fidelity": {}, "learning": {}, "baselines": {}, "notes": notes}

    if client is not None:
        _run_on_client(client, cfg, tasks, all_variants, no_estimator, results, say)
        return results
    for task in tasks:
        results["learning"][task] = {}
        results["baselines"][task] = make_task(task, cfg)[0]["baseline"]
        trained = None
        if not no_estimator:
            for v in all_variants:
                say(f"learning: {task} {variant_label(v)}")
                res, params = learn_cell(cfg, task, v)
                results["learning"][task][variant_label(v)] = res
                if v is None:
                    trained = params
        say(f"fidelity and throughput: {task}")
        results["fidelity"][task], results["throughput"][task] = measure_cell(cfg, task, all_variants, trained)
    return results


def learn_cell(cfg, task, variant, threads=None):
    """One learning cell: ``variant`` trained on ``task`` (:func:`learn`); returns ``(result, params)``,
    the trained parameters for full BPTT (``variant is None``) only. Makes its own data, so it runs
    as well on a Dask worker; ``threads`` fixes fastbptt's team there (:func:`fastbptt.set_num_threads`)."""
    with _team(threads):
        spec, train, val = make_task(task, cfg)
        res, model = learn(spec, train, val, variant, cfg)
        return res, (model.params.copy() if variant is None else None)


def measure_cell(cfg, task, variants, trained, threads=None):
    """Gradient fidelity and throughput of ``variants`` on ``task``: ``(fidelity, throughput)``.

    Fidelity on one batch of the training data, at initialisation and at ``trained`` (the full-BPTT
    model's weights; without them a W_hh of spectral radius 1), the same weights for every variant;
    throughput on a batch of ``batch_size``. Each variant's figures depend on that variant alone (and
    full BPTT), so a subset of the variants gives the same numbers as the whole.
    """
    with _team(threads):
        spec, train, _ = make_task(task, cfg)
        nb = min(cfg.fidelity_batch, train[0].shape[0])
        Xb, Yb = _time_major(train[0][:nb], train[1][:nb], spec["output"], spec["D"])
        init = RNNParams.init(spec["D"], spec["H"], spec["O"], dtype=np.float32, seed=cfg.seed)
        states = {"init": init}
        if trained is not None:
            states["trained"] = trained
        else:
            states["rho=1"] = _with_radius(init, 1.0)
        fid = {}
        for state, params in states.items():
            fid[state] = {"spectral_radius": spectral_radius(params.W_hh),
                          "cos": gradient_fidelity(params, Xb, Yb, variants, loss=spec["loss"],
                                                   output=spec["output"], backend=cfg.backend)}
        Xt, Yt = _time_major(train[0][:cfg.batch_size], train[1][:cfg.batch_size], spec["output"],
                            spec["D"])
        tp = {"T": spec["T"], "B": int(Xt.shape[1]), "D": spec["D"], "H": spec["H"],
              "variants": gradient_throughput(init, Xt, Yt, variants, loss=spec["loss"],
                                              output=spec["output"], backend=cfg.backend,
                                              repeats=cfg.throughput_repeats)}
        return fid, tp


class _team:
    """Fix fastbptt's team of threads at ``threads`` while active (``None``: leave it)."""

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        from .. import _threads
        self._prev = _threads._forced
        if self.threads is not None:
            _threads.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        from .. import _threads
        _threads._forced = self._prev
        return False


def _run_on_client(client, cfg, tasks, all_variants, no_estimator, results, say):
    """The study's cells as tasks on a Dask cluster, results merged as the local run has them: first
    every (task, variant) learning cell, then every (task, variant) fidelity + throughput cell (it
    needs the full-BPTT model trained in the first round). Each cell is timed on its worker."""
    from .. import _threads
    from .bench import map_on_client

    threads = _threads.get_num_threads()          # the team this process would use, on every worker
    pairs = [(t, v) for t in tasks for v in all_variants]
    trained = {}
    for task in tasks:
        results["learning"][task] = {}
        results["baselines"][task] = make_task(task, cfg)[0]["baseline"]
    if not no_estimator:
        say(f"learning: {len(pairs)} cells on the cluster")
        learned = map_on_client(client, learn_cell, [cfg] * len(pairs), [t for t, _ in pairs],
                                [v for _, v in pairs], threads=threads,
                                labels=[f"learning: {t} {variant_label(v)}" for t, v in pairs], progress=say)
        for (task, v), (res, params) in zip(pairs, learned):
            results["learning"][task][variant_label(v)] = res
            if v is None:
                trained[task] = params
    say(f"fidelity and throughput: {len(pairs)} cells on the cluster")
    measured = map_on_client(client, measure_cell, [cfg] * len(pairs), [t for t, _ in pairs],
                             [(v,) for _, v in pairs], [trained.get(t) for t, _ in pairs], threads=threads,
                             labels=[f"fidelity and throughput: {t} {variant_label(v)}" for t, v in pairs],
                             progress=say)
    for (task, v), (fid, tp) in zip(pairs, measured):
        fid_all = results["fidelity"].setdefault(task, {})
        for state, f in fid.items():
            fid_all.setdefault(state, {"spectral_radius": f["spectral_radius"], "cos": {}})["cos"].update(f["cos"])
        tp_all = results["throughput"].setdefault(task, dict(tp, variants={}))
        tp_all["variants"].update(tp["variants"])
    results["notes"].append(f"each (task, variant) cell ran as one task on the Dask scheduler "
                            f"{client.scheduler.address}; timings measured on the workers")


def format_study(res):
    """The study as plain-text tables, one block per task."""
    lines = []
    for task, tp in res["throughput"].items():
        lines.append(f"{task}: T={tp['T']}, B={tp['B']}, D={tp['D']}, H={tp['H']}")
        fid = res["fidelity"][task]
        learning = res["learning"].get(task, {})
        states = list(fid)
        head = f"{'variant':<9} {'grad steps/s':>12} {'vs full':>7}"
        for s in states:
            head += f" {'cos W_hh ' + s:>15} {'cos all ' + s:>14}"
        if learning:
            head += f" {'val loss':>9} {'fit steps/s':>11}"
        lines.append(head)
        full_rate = tp["variants"]["full"]["steps_per_s"]
        for label in res["variants"]:
            t = tp["variants"][label]
            row = f"{label:<9} {t['steps_per_s']:>12.0f} {t['steps_per_s'] / full_rate:>6.2f}x"
            for s in states:
                c = fid[s]["cos"][label]
                row += f" {c['W_hh']:>15.4f} {c['all']:>14.4f}"
            if learning:
                r = learning.get(label)
                row += (f" {r['val_loss']:>9.4f} {r['steps_per_s']:>11.0f}" if r else f" {'-':>9} {'-':>11}")
            lines.append(row)
        radii = ", ".join(f"{s}: {fid[s]['spectral_radius']:.2f}" for s in states)
        lines.append(f"  spectral radius of W_hh: {radii}")
        if learning:
            any_r = next(iter(learning.values()))
            lines.append(f"  learning budget: {any_r['time_steps']} time steps per variant "
                         f"(validation loss after the last epoch; baseline "
                         f"{res['baselines'][task]:.4f})")
        lines.append("")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip()


def plot_study(res, path_prefix):
    """Two PNGs: ``<prefix>_fidelity.png`` (throughput vs fidelity) and ``<prefix>_curves.png``.

    Returns the list of files written.
    """
    from .bench import require_matplotlib, save_figure

    plt = require_matplotlib()
    written = []
    tasks = list(res["throughput"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        fid = res["fidelity"][task]
        for s, marker in zip(fid, "os^"):
            xs = [res["throughput"][task]["variants"][v]["steps_per_s"] for v in res["variants"]]
            ys = [fid[s]["cos"][v]["all"] for v in res["variants"]]
            ax.scatter(xs, ys, marker=marker, label=f"weights: {s}")
            for x, y, v in zip(xs, ys, res["variants"]):
                ax.annotate(v, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("gradient throughput (time steps/s)")
        ax.set_ylabel("cosine to full-BPTT gradient")
        ax.set_title(task)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    path = f"{path_prefix}_fidelity.png"
    save_figure(fig, path)
    plt.close(fig)
    written.append(path)
    learned = [t for t in tasks if res["learning"].get(t)]
    if learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(5 * len(learned), 4), squeeze=False)
        for ax, task in zip(axes[0], learned):
            for v, r in res["learning"][task].items():
                ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], label=v, marker=".")
            ax.axhline(res["baselines"][task], ls="--", color="k", lw=0.8, label="baseline")
            ax.set_xlabel("epoch (same time-step budget for every variant)")
            ax.set_ylabel("validation loss")
            ax.set_title(task)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        path = f"{path_prefix}_curves.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written
