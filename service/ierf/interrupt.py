"""Cooperative interruption of long engine calls.

A server thread running one caller's work may learn, mid-call, that nobody waits for the answer any
more: the caller cancelled, or its deadline passed. torch cannot stop an op, but the engine's loops can
stop between steps: SRD's forward between graph nodes; the gradient baselines (gradient, input x gradient,
integrated gradients, SmoothGrad) before each model forward, so integrated gradients between its batches
of path points. The CAM methods and LRP run one pass each and have no checkpoint. A caller
that wants this wraps the call in :func:`interruptible`; ``check()`` returns why to stop, or None.

Thread-local, so other threads' calls are unaffected; outside :func:`interruptible` a checkpoint costs
one attribute lookup. The model is left as it was, as after any exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


class Interrupted(Exception):
    """Raised at a checkpoint when the check asked to stop; the call's partial work is discarded. Not a
    ValueError or RuntimeError, so no handler of bad input or of torch's errors takes it for one."""


@contextmanager
def interruptible(check: Callable[[], str | None]) -> Iterator[None]:
    """Engine calls made in this block on this thread stop at their next checkpoint once ``check()``
    returns a reason (raising :class:`Interrupted` with it). Blocks nest: the innermost check applies."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


def checkpoint() -> None:
    """Where a long engine call may stop (see :func:`interruptible`)."""
    check = getattr(_local, "check", None)
    if check is not None:
        reason = check()
        if reason:
            raise Interrupted(reason)
