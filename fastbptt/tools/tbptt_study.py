"""The truncation study behind ``fastbptt tbptt``: what truncated BPTT costs and what it can learn.

Variants: full BPTT, ``k`` in {5, 10, 25, 50}, ``(k1, k2)`` in {(5, 10), (10, 50)}
and ARTBP ``("artbp", c)`` (see ``fastbptt.loss_and_grad``, ``truncation``).

1. **learnability** (:func:`run_learnability`, needs :class:`fastbptt.RNN`):
   tasks whose dependency spans exactly d steps -- the adding problem with
   its markers d apart and a copy-memory recall d steps later -- trained
   from IRNN (relu, W_hh = I) and orthogonal (tanh) initialisations over
   several seeds, for growing d; per variant and d, the success rate
   (validation loss below a stated fraction of the baseline within a budget
   of mini-batches), the mini-batches to success and the wall time; and the
   largest d each variant learns;
2. **gradient throughput**: time steps per second (T·B / seconds) of one
   :func:`fastbptt.loss_and_grad` call with that truncation;
3. **gradient fidelity**: cosine similarity of each variant's gradient to
   the full-BPTT gradient on the same batch and weights, at initialisation
   and with W_hh rescaled to spectral radius 1 (a stand-in for trained
   weights, labelled ``rho=1``), on the adding problem (T = 50, 100) and a
   character model. ARTBP's figure is one draw (seed ``seed``).

:func:`run_study` returns a JSON-ready dict; :func:`format_study` prints it,
:func:`plot_study` draws it.
"""

import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from ..functional import loss_and_grad
from ..params import RNNParams

#: The variants of the study, in table order (gradient throughput and fidelity).
VARIANTS = (None, 5, 10, 25, 50, (5, 10), (10, 50), ("artbp", 0.05))
TASKS = ("adding50", "adding100", "char")


def variant_label(v):
    """``"full"``, ``"k=5"``, ``"(5,10)"`` or ``"artbp(0.05)"``."""
    if v is None:
        return "full"
    if isinstance(v, int):
        return f"k={v}"
    if v[0] == "artbp":
        return f"artbp({v[1]:g})"
    return f"({v[0]},{v[1]})"


def parse_variant(text):
    """``"full"``, ``"5"`` / ``"k=5"``, ``"5,10"`` / ``"(5,10)"`` or ``"artbp,0.05"`` / ``"artbp(0.05)"``
    -> None, 5, (5, 10) or ("artbp", 0.05)."""
    if not isinstance(text, str):
        raise TypeError(f"variant: expected a str, got {type(text).__name__}")
    s = text.strip().replace(" ", "")
    if s in ("full", "none", "None"):
        return None
    if s.startswith("artbp"):
        try:
            c = float(s[len("artbp"):].strip("(),:="))
        except ValueError:
            c = -1.0
        if 0 < c < 1:
            return ("artbp", c)
        raise ValueError(f"variant: expected 'artbp,c' with 0 < c < 1 (e.g. 'artbp,0.05'), got {text!r}")
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

    ``learn`` is the learnability experiment's :class:`LearnConfig` (None: not
    run); the other fields size the throughput and fidelity measures.
    """

    variants: tuple = VARIANTS
    tasks: tuple = TASKS
    hidden: int = 64                  # adding problem
    char_hidden: int = 128
    n_train: int = 256                # sequences made per task (fidelity and throughput use a batch)
    n_val: int = 64
    char_T: int = 100
    char_chars: int = 100_000         # corpus characters
    batch_size: int = 32
    fidelity_batch: int = 32
    throughput_repeats: int = 5
    seed: int = 0
    backend: str = "auto"
    learn: object = None
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.learn is None:
            self.learn = LearnConfig(backend=self.backend)

    @classmethod
    def quick(cls, **overrides):
        cfg = dict(hidden=32, char_hidden=64, n_train=64, n_val=16, char_T=50, char_chars=20_000,
                   fidelity_batch=16, throughput_repeats=3)
        cfg.update(overrides)
        if cfg.get("learn") is None:
            cfg["learn"] = LearnConfig.quick(backend=cfg.get("backend", "auto"))
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

    ``spec`` holds the model's sizes and loss: ``D, O, H, T, loss, output, baseline``.
    """
    from .. import datasets

    if name in ("adding50", "adding100"):
        T = int(name[len("adding"):])
        train = datasets.adding_problem(cfg.n_train, T, seed=cfg.seed)
        val = datasets.adding_problem(cfg.n_val, T, seed=cfg.seed + 1)
        spec = dict(D=2, O=1, H=cfg.hidden, T=T, loss="mse", output="last",
                    baseline=1 / 6)     # predicting the mean (1.0): MSE 1/6
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
                    output="sequence", baseline=float(np.log(len(vocab))))  # uniform prediction
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


def seeded(v, seed=0):
    """ARTBP's ``("artbp", c)`` with a seed, for the functional API (one fixed draw); others as given."""
    return ("artbp", v[1], seed) if isinstance(v, tuple) and v[0] == "artbp" else v


def gradient_fidelity(params, X, Y, variants, *, loss, output, backend="auto"):
    """Cosine similarity per parameter of each variant's gradient to full BPTT's.

    Parameters
    ----------
    params : RNNParams
    X : ndarray of shape (T, B, D);  Y : targets for ``loss``/``output``
    variants : iterable of None, int, (k1, k2) or ("artbp", c)
        ARTBP is drawn once, with seed 0 (:func:`seeded`).

    Returns
    -------
    dict
        ``{label: {"W_xh": cos, "W_hh": cos, "b_h": cos, "W_hy": cos, "b_y": cos, "all": cos}}``,
        ``"all"`` over the packed parameter vector.
    """
    _, full, _ = loss_and_grad(params, X, Y, loss=loss, output=output, backend=backend)
    out = {}
    for v in variants:
        _, g, _ = loss_and_grad(params, X, Y, loss=loss, output=output, truncation=seeded(v), backend=backend)
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
        loss_and_grad(params, X, Y, loss=loss, output=output, truncation=seeded(v), backend=backend)
    for v in variants:
        def step(v=seeded(v)):
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


# ----------------------------------------------------------------- study
def run_study(cfg=None, *, progress=None, client=None):
    """Run the study; returns ``{"config", "variants", "learnability", "throughput", "fidelity", ...}``.

    Parameters
    ----------
    cfg : StudyConfig, optional
    progress : callable(str), optional
        Called with a short line before each part and as cells finish.
    client : distributed.Client, optional
        Run each cell -- a learnability (task, init, variant, d, seed) and a fidelity + throughput
        (task, variant) -- as one task on this Dask cluster (``client.map``): the results are the
        local run's, apart from the timings, which are measured on the workers.
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
    notes = list(cfg.notes)
    # variants including full, so fidelity/throughput always have their baseline
    all_variants = variants if None in variants else (None,) + variants
    results = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("notes", "learn")},
               "variants": [variant_label(v) for v in all_variants],
               "learnability": None, "throughput": {}, "fidelity": {}, "baselines": {}, "notes": notes}
    learn = cfg.learn
    if learn is not None and learn.tasks:
        no_estimator = estimator_unavailable_reason()
        if no_estimator:
            notes.append(f"learnability skipped: {no_estimator}")
        else:
            results["learnability"] = run_learnability(learn, progress=say, client=client)
            notes += results["learnability"]["notes"]
    if client is not None:
        _run_on_client(client, cfg, tasks, all_variants, results, say)
        return results
    for task in tasks:
        results["baselines"][task] = make_task(task, cfg)[0]["baseline"]
        say(f"fidelity and throughput: {task}")
        results["fidelity"][task], results["throughput"][task] = measure_cell(cfg, task, all_variants)
    return results


def measure_cell(cfg, task, variants, threads=None):
    """Gradient fidelity and throughput of ``variants`` on ``task``: ``(fidelity, throughput)``.

    Fidelity on one batch of the training data, at initialisation and with W_hh rescaled to spectral
    radius 1 (a stand-in for trained weights), the same weights for every variant;
    throughput on a batch of ``batch_size``. Each variant's figures depend on that variant alone (and
    full BPTT), so a subset of the variants gives the same numbers as the whole.
    """
    with _team(threads):
        spec, train, _ = make_task(task, cfg)
        nb = min(cfg.fidelity_batch, train[0].shape[0])
        Xb, Yb = _time_major(train[0][:nb], train[1][:nb], spec["output"], spec["D"])
        init = RNNParams.init(spec["D"], spec["H"], spec["O"], dtype=np.float32, seed=cfg.seed)
        states = {"init": init, "rho=1": _with_radius(init, 1.0)}
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


def _run_on_client(client, cfg, tasks, all_variants, results, say):
    """The fidelity + throughput cells as tasks on a Dask cluster, one per (task, variant), results
    merged as the local run has them. Each cell is timed on its worker."""
    from .. import _threads
    from .bench import map_on_client

    threads = _threads.get_num_threads()          # the team this process would use, on every worker
    pairs = [(t, v) for t in tasks for v in all_variants]
    for task in tasks:
        results["baselines"][task] = make_task(task, cfg)[0]["baseline"]
    say(f"fidelity and throughput: {len(pairs)} cells on the cluster")
    measured = map_on_client(client, measure_cell, [cfg] * len(pairs), [t for t, _ in pairs],
                             [(v,) for _, v in pairs], threads=threads,
                             labels=[f"fidelity and throughput: {t} {variant_label(v)}" for t, v in pairs],
                             progress=say)
    for (task, v), (fid, tp) in zip(pairs, measured):
        fid_all = results["fidelity"].setdefault(task, {})
        for state, f in fid.items():
            fid_all.setdefault(state, {"spectral_radius": f["spectral_radius"], "cos": {}})["cos"].update(f["cos"])
        tp_all = results["throughput"].setdefault(task, dict(tp, variants={}))
        tp_all["variants"].update(tp["variants"])
    results["notes"].append(f"each cell ran as one task on the Dask scheduler {client.scheduler.address}; "
                            "timings measured on the workers")


def format_learnability(learn):
    """The learnability experiment as plain-text tables, one per (task, init)."""
    cfg, summary = learn["config"], learn["summary"]
    dists = [str(d) for d in sorted(cfg["distances"])]
    lines = [f"learnability: success = validation loss < {cfg['success_fraction']:g} x baseline within "
             f"{cfg['budget']} mini-batches of {cfg['batch_size']} (Adam lr {cfg['lr']:g}, clip-norm "
             f"{cfg['clip_norm']:g}, H={cfg['hidden']}), {cfg['seeds']} seeds; a cell reads "
             "'successes/seeds median-mini-batches-to-success median-wall-s'", ""]
    pruned = {tuple(p) for p in learn.get("pruned", [])}
    for task, by_init in summary.items():
        for init, by_variant in by_init.items():
            act, scheme = INITS[init]
            lines.append(f"{task}, {init} ({act}, init={scheme}):")
            lines.append(f"{'variant':<12}" + "".join(f" {'d=' + d:>17}" for d in dists) + f" {'max d':>6}")
            for label in cfg["variants"]:
                g = by_variant.get(label)
                if g is None:
                    continue
                row = f"{label:<12}"
                for d in dists:
                    c = g["by_d"].get(d)
                    if c is None:
                        row += f" {'-' if (task, init, label, int(d)) in pruned else '':>17}"
                        continue
                    ok = round(c["success_rate"] * c["n"])
                    med = "" if c["median_batches"] is None else f"{c['median_batches']:.0f}"
                    text = f"{ok}/{c['n']} {med:>5} {c['median_wall_s']:5.1f}s"
                    row += f" {text:>17}"
                row += f" {'-' if g['max_d'] is None else g['max_d']:>6}"
                lines.append(row)
            lines.append("")
    lines.append("max d: the largest distance learned in at least half of the seeds; '-' under a distance: "
                 "not run, the variant had failed in every seed at a shorter one")
    return lines


def format_study(res):
    """The study as plain-text tables: learnability, then throughput and fidelity per task."""
    lines = []
    if res.get("learnability"):
        lines += format_learnability(res["learnability"]) + [""]
    for task, tp in res["throughput"].items():
        lines.append(f"{task}: T={tp['T']}, B={tp['B']}, D={tp['D']}, H={tp['H']}")
        fid = res["fidelity"][task]
        states = list(fid)
        head = f"{'variant':<12} {'grad steps/s':>12} {'vs full':>7}"
        for st in states:
            head += f" {'cos W_hh ' + st:>15} {'cos all ' + st:>14}"
        lines.append(head)
        full_rate = tp["variants"]["full"]["steps_per_s"]
        for label in res["variants"]:
            t = tp["variants"][label]
            row = f"{label:<12} {t['steps_per_s']:>12.0f} {t['steps_per_s'] / full_rate:>6.2f}x"
            for st in states:
                c = fid[st]["cos"][label]
                row += f" {c['W_hh']:>15.4f} {c['all']:>14.4f}"
            lines.append(row)
        radii = ", ".join(f"{st}: {fid[st]['spectral_radius']:.2f}" for st in states)
        lines.append(f"  spectral radius of W_hh: {radii}")
        lines.append("")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip()


#: one colour and marker per variant label, the same in every figure
def _style(labels):
    markers = "os^vD<>Pp*hX"
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    return {lab: dict(color=cmap(i % 10), marker=markers[i % len(markers)]) for i, lab in enumerate(labels)}


def plot_study(res, path_prefix):
    """PNGs: ``<prefix>_learnability.png`` (success rate against distance per variant, the main
    figure), ``<prefix>_curves.png`` (validation loss / baseline against mini-batches, median of the
    seeds with their range as a band) and ``<prefix>_fidelity.png`` (fidelity against throughput).

    Returns the list of files written.
    """
    from .bench import require_matplotlib, save_figure

    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    written = []
    style = _style(res["variants"] + [v for v in (res.get("learnability") or {}).get("config", {})
                                      .get("variants", []) if v not in res["variants"]])
    learn = res.get("learnability")
    if learn:
        summary, cfg = learn["summary"], learn["config"]
        panels = [(t, i) for t in summary for i in summary[t]]
        dists = sorted(cfg["distances"])
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
        n_var = len(cfg["variants"])
        for ax, (task, init) in zip(axes[0], panels):
            for j, label in enumerate(cfg["variants"]):
                g = summary[task][init].get(label)
                if g is None:
                    continue
                # a variant not run at a distance (pruned) counts as 0 there; small x offsets keep
                # overlapping lines apart
                ys = [g["by_d"][str(d)]["success_rate"] if str(d) in g["by_d"] else 0.0 for d in dists]
                xs = [d * 2 ** (0.06 * (j - (n_var - 1) / 2)) for d in dists]
                ax.plot(xs, ys, label=label, lw=1.2, ms=5, **style[label])
            ax.set_xscale("log", base=2)
            ax.set_xticks(dists, [str(d) for d in dists])
            ax.minorticks_off()
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("dependency distance d (steps)")
            ax.set_title(f"{task}, {init}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"success rate ({cfg['seeds']} seeds)")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        path = f"{path_prefix}_learnability.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
        written.append(_plot_curves(plt, learn, style, f"{path_prefix}_curves.png"))
    tasks = list(res["throughput"])
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            fid = res["fidelity"][task]
            for st, fill in zip(fid, ("full", "none")):
                for label in res["variants"]:
                    x = res["throughput"][task]["variants"][label]["steps_per_s"]
                    y = fid[st]["cos"][label]["all"]
                    kw = dict(style[label])
                    ax.scatter([x], [y], s=36, marker=kw["marker"], edgecolors=kw["color"],
                               facecolors=kw["color"] if fill == "full" else "none",
                               label=label if st == list(fid)[0] else None)
            # the variants are within ~2x of each other: a linear axis with a few labels in thousands
            # (a log axis over that range printed clashing 5.8x10^5-style minor labels)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:.0f}k"))
            ax.set_xlabel("gradient throughput (time steps/s)")
            ax.set_ylabel("cosine to the full-BPTT gradient")
            ax.set_title(f"{task} (filled: {list(fid)[0]}" + (f", open: {list(fid)[1]})" if len(fid) > 1 else ")"),
                         fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        path = f"{path_prefix}_fidelity.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _plot_curves(plt, learn, style, path):
    """Validation loss / baseline against mini-batches at one distance per (task, init): the median
    over seeds and the seeds' range as a band (a seed that stopped at success keeps its last value)."""
    from .bench import save_figure

    cfg = learn["config"]
    by = {}
    for r in learn["cells"]:
        by.setdefault((r["task"], r["init"]), {}).setdefault(r["d"], {}).setdefault(r["variant"], []).append(r)
    panels = list(by)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], panels):
        # the largest distance full BPTT learned (in half of the seeds), where the variants part ways
        # (else the shortest)
        learned = [dd for dd, vs in by[key].items()
                   if "full" in vs and 2 * sum(r["success"] for r in vs["full"]) >= len(vs["full"])]
        d = max(learned) if learned else min(by[key])
        for label in cfg["variants"]:
            runs = by[key][d].get(label)
            if not runs:
                continue
            xs = np.arange(cfg["eval_every"], cfg["budget"] + 1, cfg["eval_every"])
            ys = np.full((len(runs), len(xs)), np.nan)
            for i, r in enumerate(runs):
                vals = [v / r["baseline"] for _, v in r["val_curve"]]
                if vals:
                    ys[i, :len(vals)] = vals
                    ys[i, len(vals):] = vals[-1] if r["success"] else np.nan
            with warnings.catch_warnings():          # a column where every seed had stopped: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(ys, axis=0)
                lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
            c = style[label]["color"]
            ax.plot(xs, med, color=c, lw=1.2, label=label)
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
        ax.axhline(cfg["success_fraction"], ls="--", color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))       # a diverging seed's spike would flatten the rest
        ax.set_xlabel("mini-batches")
        ax.set_title(f"{key[0]}, {key[1]}, d={d}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss / baseline (dashed: success)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------ learnability
#: The learnability experiment's variants: ARTBP with c = 0.05 cuts once every 20 steps on average.
LEARN_VARIANTS = (None, 5, 10, 25, 50, (5, 10), (10, 50), ("artbp", 0.05))
LEARN_TASKS = ("adding", "copy")
#: init name -> (activation, RNNParams init)
INITS = {"irnn": ("relu", "identity"), "orth": ("tanh", "orthogonal")}
DISTANCES = (5, 10, 20, 40, 80)


@dataclass
class LearnConfig:
    """The learnability experiment: which dependency distance each variant learns.

    Every cell -- (task, init, variant, distance d, seed) -- trains a fresh
    model with Adam (``lr``), ``batch_size``, ``clip_norm`` on a fresh stream
    of sequences of length ``T = d + pad``, and validates every ``eval_every``
    mini-batches on ``n_val`` held-out sequences. It succeeds when the
    validation loss falls below ``success_fraction`` x the task's baseline
    within ``budget`` mini-batches (then it stops). Distances run in
    increasing order; a (task, init, variant) that failed in every seed at
    a distance is not run at larger ones (``prune``).

    Tasks (the dependency is exactly d steps):

    * ``adding``: :func:`fastbptt.datasets.adding_problem` with
      ``distance=d``, mse on the last step; baseline 1/6 (predicting the
      mean); reading only the last value (no memory) gives 1/12.
    * ``copy``: :func:`fastbptt.datasets.copy_memory` with ``copy_length``
      symbols of ``copy_symbols`` and ``delay = d - copy_length``, so that
      each symbol is recalled exactly d steps after it was shown (here T = d +
      copy_length, ``pad`` is not used); cross-entropy on every step;
      baseline ``copy_length·log(copy_symbols) / T`` (blanks known, symbols
      guessed). One symbol by default: with three, not even full BPTT
      learned d = 10 within a few thousand mini-batches in a pilot run.
    """

    tasks: tuple = LEARN_TASKS
    inits: tuple = ("irnn", "orth")
    variants: tuple = LEARN_VARIANTS
    distances: tuple = DISTANCES
    seeds: int = 5
    hidden: int = 32
    batch_size: int = 16
    lr: float = 1e-3
    clip_norm: float = 10.0
    budget: int = 2000                # mini-batches per cell
    eval_every: int = 100             # mini-batches between validations
    n_val: int = 256
    pad: int = 5
    copy_length: int = 1
    copy_symbols: int = 8
    success_fraction: float = 0.1
    prune: bool = True
    jobs: int = 1                     # local processes (2 did not pay on the shared 2-core machine)
    seed: int = 0
    backend: str = "auto"

    @classmethod
    def quick(cls, **overrides):
        cfg = dict(inits=("irnn",), variants=(None, 5, (5, 10), ("artbp", 0.05)), distances=(4, 8),
                   seeds=2, budget=600, eval_every=100, n_val=64, hidden=32)
        cfg.update(overrides)
        return cls(**cfg)


def learn_task(task, d, cfg, seed):
    """``(spec, make_batches, (X_val, Y_val))`` of one learnability cell; ``make_batches(r)`` gives the
    r-th round of ``eval_every`` mini-batches (a fresh stream: no sequence is seen twice)."""
    from .. import datasets

    n = cfg.batch_size * cfg.eval_every
    if task == "adding":
        T = d + cfg.pad
        spec = dict(D=2, O=1, T=T, loss="mse", output="last", baseline=1 / 6)

        def make(r, n=n):
            return datasets.adding_problem(n, T, distance=d, seed=[seed, d, r])
        val = datasets.adding_problem(cfg.n_val, T, distance=d, seed=[seed, d, 2**31])
        return spec, make, val
    if task == "copy":
        L, K = cfg.copy_length, cfg.copy_symbols
        if d <= L:
            raise ValueError(f"distances: the copy task needs d > copy_length={L}, got {d}")
        T = d + L
        spec = dict(D=K + 2, O=K + 2, T=T, loss="ce", output="sequence", baseline=L * float(np.log(K)) / T)

        def make(r, n=n):
            return datasets.copy_memory(n, d - L, n_symbols=K, length=L, seed=[seed, d, r], one_hot_input=False)
        val = datasets.copy_memory(cfg.n_val, d - L, n_symbols=K, length=L, seed=[seed, d, 2**31],
                                   one_hot_input=False)
        return spec, make, val
    raise ValueError(f"tasks: expected names among {', '.join(LEARN_TASKS)}, got {task!r}")


def learn_distance_cell(cfg, task, init, variant, d, seed, threads=1):
    """One learnability cell on one thread; returns a JSON-ready dict.

    ``success``, ``batches`` (mini-batches to success, or None), ``steps``
    (optimizer steps then), ``val_curve`` (``[mini-batches, val loss]`` pairs),
    ``wall_s`` (training and validation, the cell's own process), and the
    configuration of the cell. Runs as well on a Dask worker.
    """
    from ..estimator import RNN

    with _team(threads):
        act, init_name = INITS[init]
        spec, make, val = learn_task(task, d, cfg, seed)
        threshold = cfg.success_fraction * spec["baseline"]
        model = RNN(spec["D"], cfg.hidden, spec["O"], activation=act, loss=spec["loss"], output=spec["output"],
                    optimizer="adam", lr=cfg.lr, truncation=variant, clip_norm=cfg.clip_norm,
                    batch_size=cfg.batch_size, backend=cfg.backend, seed=seed, init=init_name)
        curve, success, batches, steps, diverged = [], False, None, None, None
        t0 = time.perf_counter()
        done = 0
        while done < cfg.budget:
            X, Y = make(done // cfg.eval_every)
            n = min(cfg.eval_every, cfg.budget - done) * cfg.batch_size
            try:
                model.fit(X[:n], Y[:n], progress=False)
            except FloatingPointError as exc:          # a diverged run is a failure, said so
                diverged = str(exc).split(";")[0]
                break
            done += n // cfg.batch_size
            v = float(model.evaluate(*val))
            curve.append([done, v])
            if v < threshold:
                success, batches, steps = True, done, int(model.optimizer_.step_count)
                break
        wall = time.perf_counter() - t0
    return {"task": task, "init": init, "variant": variant_label(variant), "d": int(d), "seed": int(seed),
            "T": spec["T"], "success": success, "batches": batches, "steps": steps,
            "final_val": curve[-1][1] if curve else float("nan"), "threshold": threshold,
            "baseline": spec["baseline"], "val_curve": curve, "wall_s": wall, "diverged": diverged}


def _run_cells(cells, cfg, client, say):
    """Run learnability cells (tuples of :func:`learn_distance_cell`'s arguments): on ``client``, in
    ``cfg.jobs`` local processes, or here; results in the order given."""
    labels = [f"learn: {t} {i} {variant_label(v)} d={d} seed={s}" for t, i, v, d, s in cells]
    if client is not None:
        from .bench import map_on_client
        return map_on_client(client, learn_distance_cell, [cfg] * len(cells), *zip(*cells), labels=labels,
                             progress=say)
    if cfg.jobs > 1 and len(cells) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(learn_distance_cell, cfg, *c) for c in cells]
            index = {f: i for i, f in enumerate(futures)}
            for f in cf.as_completed(futures):
                say(labels[index[f]])
            return [f.result() for f in futures]
    out = []
    for c, label in zip(cells, labels):
        say(label)
        out.append(learn_distance_cell(cfg, *c))
    return out


def run_learnability(cfg=None, *, progress=None, client=None):
    """Run the learnability experiment; returns ``{"config", "cells", "summary", "notes"}``.

    ``summary[task][init][variant]``: per distance, the success rate, the median mini-batches
    to success (over the successful seeds) and the median wall time; and ``max_d``, the largest
    distance learned in at least half of the seeds (None if none).
    """
    cfg = LearnConfig() if cfg is None else cfg
    say = progress or (lambda s: None)
    for t in cfg.tasks:
        if t not in LEARN_TASKS:
            raise ValueError(f"learn_tasks: expected names among {', '.join(LEARN_TASKS)}, got {t!r}")
    for i in cfg.inits:
        if i not in INITS:
            raise ValueError(f"inits: expected names among {', '.join(INITS)}, got {i!r}")
    if "copy" in cfg.tasks and min(cfg.distances) <= cfg.copy_length:
        raise ValueError(f"distances: the copy task needs every d > copy_length={cfg.copy_length}, "
                         f"got {min(cfg.distances)}")
    groups = [(t, i, v) for t in cfg.tasks for i in cfg.inits for v in cfg.variants]
    alive = set(range(len(groups)))
    cells_out, pruned = [], []
    for d in sorted(cfg.distances):
        cells = [(*groups[g], d, cfg.seed + s) for g in sorted(alive) for s in range(cfg.seeds)]
        if not cells:
            break
        say(f"distance {d}: {len(cells)} cells")
        res = _run_cells(cells, cfg, client, say)
        cells_out += res
        for g in sorted(alive):
            t, i, v = groups[g]
            if cfg.prune and not any(r["success"] for r in res
                                     if (r["task"], r["init"], r["variant"]) == (t, i, variant_label(v))):
                alive.discard(g)
                pruned += [(t, i, variant_label(v), dd) for dd in sorted(cfg.distances) if dd > d]
    summary = summarise(cells_out, cfg)
    notes = []
    if client is not None:
        notes.append(f"each learnability run ran as one task on the Dask scheduler {client.scheduler.address}")
    if pruned:
        notes.append(f"{len(pruned)} (task, init, variant, distance) combinations not run: the variant had "
                     "failed in every seed at a shorter distance (shown as '-')")
    return {"config": asdict(cfg) | {"variants": [variant_label(v) for v in cfg.variants]},
            "cells": cells_out, "summary": summary, "pruned": pruned, "notes": notes}


def summarise(cells, cfg):
    """Per (task, init, variant) and distance: success rate, median batches to success, wall time."""
    out = {}
    for r in cells:
        g = out.setdefault(r["task"], {}).setdefault(r["init"], {}).setdefault(r["variant"], {"by_d": {}})
        g["by_d"].setdefault(str(r["d"]), []).append(r)
    for task in out.values():
        for init in task.values():
            for label, g in init.items():
                by_d = {}
                for d, rs in g["by_d"].items():
                    ok = [r for r in rs if r["success"]]
                    by_d[d] = {"success_rate": len(ok) / len(rs), "n": len(rs),
                               "median_batches": float(np.median([r["batches"] for r in ok])) if ok else None,
                               "median_wall_s": float(np.median([r["wall_s"] for r in rs]))}
                learned = [int(d) for d, s in by_d.items() if s["success_rate"] >= 0.5]
                init[label] = {"by_d": by_d, "max_d": max(learned) if learned else None}
    return out
