"""Atomic file writes: a file is either the old one or the whole new one, never half-written."""

import json
import os
import tempfile


def atomic_write(path, write, *, binary=True):
    """Write ``path`` through ``write(f)`` on a temporary file beside it, then rename.

    Parameters
    ----------
    path : str or os.PathLike
    write : callable(file object)
        Writes the whole content; ``f`` is opened ``"wb"`` (``binary=True``) or ``"w"``.
    binary : bool

    The temporary file is flushed and fsynced before ``os.replace`` puts it in
    place, and removed if anything fails. The new file gets the usual mode
    (0666 less the umask; ``mkstemp`` alone would leave 0600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(obj, path):
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    def write(f):
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    atomic_write(path, write, binary=False)
