"""Updates that an interrupt cannot cut in half.

Python raises a ``KeyboardInterrupt`` (or a trace hook any exception)
between two bytecodes -- never inside one call of a C function. A
training step writes several parameter arrays and swaps its optimizer's
state: done in Python statements, an interrupt between two of them leaves
some parameters updated and others not, or the step count off by one.

:func:`commit` does all the writes of one update in a single call of C
functions: ``collections.deque`` drains a ``map`` of ``operator.setitem``
over the targets, and ``ndarray.__setitem__`` (same shape and dtype) and
``dict.__setitem__`` run no Python code, so nothing can be raised between
the first write and the last. Everything that can fail -- computing the
new values, checking them, the shapes and the writability of the targets
-- happens before, and leaves the old state in place when it fails.
"""

from collections import deque
from itertools import chain, repeat
from operator import setitem

__all__ = ["commit"]

_ALL = Ellipsis


def commit(arrays, values, obj=None, **attributes):
    """``a[...] = v`` for every array and value, then ``obj.name = value`` for every attribute,
    with no Python bytecode between the first write and the last.

    ``arrays`` must be writable numpy arrays and ``values`` arrays of the same
    shapes and dtypes (checked by the caller: a failing write would stop the
    sequence half-way). Attributes go straight into ``vars(obj)`` (no
    ``__setattr__``, no properties).
    """
    arrays, values = list(arrays), list(values)       # no generator runs inside the writes
    targets = chain(arrays, repeat(vars(obj), len(attributes)) if attributes else ())
    keys = chain(repeat(_ALL, len(arrays)), attributes.keys())
    deque(map(setitem, targets, keys, chain(values, list(attributes.values()))), maxlen=0)
