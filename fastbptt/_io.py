"""Atomic file writes: a file is either the old one or the whole new one, never half-written.

The new content goes to a temporary file beside the target, named
``.NAME.PID.RANDOM.tmp``, which is flushed, fsynced and then renamed over
the target (``os.replace`` is atomic on POSIX). An exception -- a
``KeyboardInterrupt`` at any line included -- removes the temporary file.
A process killed meanwhile (SIGKILL, a crash, a power cut) cannot clean up,
so every write first removes the stale temporary files of the same target:
those of processes that no longer run (and of this process, when no write
of it is using them), and, from older versions, unnamed ones more than an
hour old.
"""

import json
import os
import re
import secrets
import time

_in_flight = set()      # temporary files this process is writing now (add/discard/in: one C call each,
                        # atomic under the GIL: no lock an interrupt could leave held)
_OLD_STALE_S = 3600


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):     # another user's process, or cannot tell: keep its file
        return True
    return True


def clean_stale_temps(path):
    """Remove the temporary files an interrupted or killed write of ``path`` left behind; returns
    their names."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    ours = re.compile(re.escape(f".{base}.") + r"(\d+)\.[0-9a-f]{8}\.tmp$")
    older = re.compile(re.escape(f".{base}.") + r"[A-Za-z0-9_]{8}\.tmp$")   # tempfile.mkstemp's names
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        full = os.path.join(folder, name)
        m = ours.match(name)
        if m:
            pid = int(m.group(1))
            stale = full not in _in_flight and (pid == os.getpid() or not _pid_alive(pid))
        elif older.match(name):
            try:
                stale = now - os.lstat(full).st_mtime > _OLD_STALE_S
            except OSError:
                stale = False
        else:
            continue
        if stale:
            try:
                os.unlink(full)
                removed.append(name)
            except OSError:
                pass
    return removed


def atomic_write(path, write, *, binary=True):
    """Write ``path`` through ``write(f)`` on a temporary file beside it, then rename.

    Parameters
    ----------
    path : str or os.PathLike
    write : callable(file object)
        Writes the whole content; ``f`` is opened ``"wb"`` (``binary=True``) or ``"w"``.
    binary : bool

    The temporary file is created with the usual mode (0666 less the umask,
    without changing the process's umask), flushed and fsynced before
    ``os.replace`` puts it in place, and removed if anything fails. Stale
    temporary files of earlier writes of ``path`` are removed first.
    """
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    clean_stale_temps(path)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = None
    try:
        _in_flight.add(tmp)
        f = open(tmp, "xb" if binary else "x")
        write(f)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _in_flight.discard(tmp)
    except BaseException:
        if f is not None:
            f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _in_flight.discard(tmp)
        raise


def write_json(obj, path):
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    def write(f):
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    atomic_write(path, write, binary=False)
