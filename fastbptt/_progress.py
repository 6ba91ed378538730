"""A progress bar for ``RNN.fit``: tqdm when it is installed, else a small fallback."""

import sys
import time


def _want(progress, stream):
    if progress is None:
        isatty = getattr(stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except Exception:
            return False
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected None, True or False, got {progress!r}")
    return progress


class _Null:
    def update(self, n, **stats):
        pass

    def close(self):
        pass


class _Fallback:
    """One carriage-returned line on stderr, redrawn at most 10 times a second."""

    def __init__(self, total, desc, stream):
        self.total, self.desc, self.stream = total, desc, stream
        self.n, self.last = 0, 0.0

    def update(self, n, **stats):
        self.n += n
        now = time.perf_counter()
        if now - self.last < 0.1 and self.n < self.total:
            return
        self.last = now
        extra = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        self.stream.write(f"\r{self.desc}: {self.n}/{self.total} seq {extra}")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


class _Tqdm:
    def __init__(self, tqdm, total, desc, stream):
        self.bar = tqdm(total=total, desc=desc, unit="seq", file=stream, leave=True)

    def update(self, n, **stats):
        if stats:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


def make_progress(progress, total, desc, stream=None):
    """A bar with ``update(n_sequences, **stats)`` and ``close()``.

    ``progress=None`` shows it only when ``stream`` (stderr) is a terminal;
    tqdm is imported lazily and used when installed.
    """
    stream = sys.stderr if stream is None else stream
    if not _want(progress, stream):
        return _Null()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Fallback(total, desc, stream)
    return _Tqdm(tqdm, total, desc, stream)
