"""What ``RNN.fit`` shows while it trains: a bar while an epoch runs, one line when it ends.

The bar (a terminal only: it is redrawn in place with a carriage return, at
most ten times a second) shows the epoch, the share of it done, the rate in
sequences per second, the time left in the epoch and the running loss::

    epoch 3/10  45% 450/1000 seq  1.23k seq/s  ETA 0:00:01  loss 0.1234

When the epoch ends the bar is replaced by its summary line, written and
flushed at once -- in a terminal and when the output is piped or logged::

    epoch 3/10: loss 0.1234, val_loss 0.2345, 1.23k seq/s, 0.8 s
"""

import math
import sys
import time

__all__ = ["make_progress", "epoch_line"]

_REDRAW_S = 0.1
MODES = (None, True, False, "bar")


def _isatty(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except Exception:
        return False


def check_progress(progress):
    """``progress`` as given, or a TypeError naming the choices."""
    if not (progress is None or isinstance(progress, bool) or progress == "bar"):
        raise TypeError(f"progress: expected None, True, False or 'bar', got {progress!r}")
    return progress


def _rate(x):
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _clock(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def epoch_line(logs, index=None, epochs=None):
    """``epoch 3/10: loss 0.1234, val_loss 0.2345, 1.23k seq/s, 0.8 s`` from an epoch's logs (``index``
    of ``epochs`` in this fit; else the model's epoch number)."""
    head = f"epoch {index}/{epochs}" if index and epochs else f"epoch {logs['epoch']}"
    parts = [f"loss {logs['loss']:.4f}"]
    if "val_loss" in logs:
        parts.append(f"val_loss {logs['val_loss']:.4f}")
    if "seq_per_s" in logs:
        parts.append(f"{_rate(logs['seq_per_s'])} seq/s")
    if "time_s" in logs:
        parts.append(f"{logs['time_s']:.1f} s")
    return f"{head}: {', '.join(parts)}"


class _Progress:
    """A bar (``bar``: only on a terminal) and one line per epoch (``lines``) on ``stream``."""

    def __init__(self, stream, bar, lines, epochs, per_epoch):
        self.stream, self.bar, self.lines = stream, bar, lines
        self.epochs, self.per_epoch = epochs, per_epoch
        self.index, self.n, self.t0, self.last, self.width = 0, 0, 0.0, 0.0, 0
        self.stats = {}

    def start_epoch(self, index):
        self.index, self.n, self.stats = index, 0, {}
        self.t0 = self.last = time.perf_counter()
        if self.bar:
            self._draw(self.t0)

    def update(self, n, **stats):
        """``n`` more sequences done; ``stats`` (``loss``, ``val_loss``, ...) shown on the bar."""
        self.n += n
        self.stats.update(stats)
        if self.bar:
            now = time.perf_counter()
            if now - self.last >= _REDRAW_S:
                self._draw(now)

    def _draw(self, now):
        self.last = now
        elapsed = now - self.t0
        frac = self.n / self.per_epoch if self.per_epoch else 1.0
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        eta = (self.per_epoch - self.n) / rate if self.n and rate > 0 else float("nan")
        text = (f"epoch {self.index}/{self.epochs} {100 * frac:3.0f}% {self.n}/{self.per_epoch} seq  "
                f"{_rate(rate) if self.n else '?'} seq/s  ETA {_clock(eta)}"
                + "".join(f"  {k} {v:.4g}" for k, v in self.stats.items()))
        self._write("\r" + text + " " * max(0, self.width - len(text)))
        self.width = len(text)

    def _clear(self):
        if self.width:
            self._write("\r" + " " * self.width + "\r")
            self.width = 0

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()

    def end_epoch(self, logs):
        """The epoch is over: its line replaces the bar (``logs`` as given to callbacks)."""
        if self.bar:
            self._clear()
        if self.lines:
            self._write(epoch_line(logs, self.index, self.epochs) + "\n")

    def close(self):
        if self.bar:
            self._clear()


class _Null:
    def start_epoch(self, index):
        pass

    def update(self, n, **stats):
        pass

    def end_epoch(self, logs):
        pass

    def close(self):
        pass


def make_progress(progress, epochs, per_epoch, stream=None):
    """The progress display of one ``fit``: ``start_epoch``, ``update``, ``end_epoch``, ``close``.

    ``progress``: ``None`` shows the bar and the epoch lines when ``stream``
    (stderr) is a terminal, nothing otherwise; ``True`` the epoch lines always
    and the bar on a terminal; ``"bar"`` the bar only (on a terminal: for a
    caller that prints its own epoch lines); ``False`` nothing.
    """
    check_progress(progress)
    stream = sys.stderr if stream is None else stream
    tty = _isatty(stream)
    bar = tty and progress is not False
    lines = progress is True or (progress is None and tty)
    if not (bar or lines):
        return _Null()
    return _Progress(stream, bar, lines, epochs, per_epoch)
