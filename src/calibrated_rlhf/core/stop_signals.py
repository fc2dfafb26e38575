"""SIGTERM and SIGINT as a request to stop, honoured at the next update boundary instead of mid-write.

Batch schedulers (Slurm, Kubernetes) send SIGTERM some seconds before SIGKILL. While :func:`install`'s
handlers are in place:

- inside a training loop (:func:`deferred`), a signal only records itself: the loop checks
  :func:`requested` after each update, writes a checkpoint and raises :class:`StopRequested`, so the
  updates done since the last scheduled checkpoint are kept;
- anywhere else, or on a second signal, the handler raises :class:`StopRequested` at once: nothing else
  would look at the flag, and the stop must come within a bounded time.

:class:`StopRequested` is an ``Exception`` (not a ``BaseException`` as ``KeyboardInterrupt`` is) so that the
runner's error handling runs: staging folders are removed by their context managers, and the run's
failure hooks end the tracking run (as KILLED, ``calibrated_rlhf.runtime.crash_recovery``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: int | None = None  # the first signal since install()
_deferring = 0  # depth of deferred() blocks


class StopRequested(Exception):
    """The process was asked to stop (``signum``); raised where it stopped (``where``)."""

    def __init__(self, signum: int, where: str = "") -> None:
        self.signum = signum
        self.where = where
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (f" {where}" if where else ""))


def _handle(signum: int, frame: Any) -> None:
    global _received
    first = _received is None
    _received = signum
    if _deferring and first:
        log.warning("%s received: stopping after the current update, with a checkpoint (send it again to stop "
                    "now)", signal.Signals(signum).name)
        return
    raise StopRequested(signum, "before the next update boundary" if _deferring else "")


def install() -> dict[int, Any] | None:
    """Put the handlers in place and clear any earlier request; returns the handlers they replace (for
    :func:`restore`), or None off the main thread, where Python cannot install signal handlers."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        return None
    _received = None
    return {s: signal.signal(s, _handle) for s in SIGNALS}


def restore(previous: dict[int, Any] | None) -> None:
    """Put back the handlers :func:`install` replaced."""
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def requested() -> int | None:
    """The signal received since :func:`install`, or None."""
    return _received


@contextmanager
def deferred() -> Iterator[None]:
    """A training loop that checks :func:`requested` at its update boundaries: a first signal waits for it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def raise_if_requested(where: str = "") -> None:
    """Raise :class:`StopRequested` if a signal came: where a loop has finished what it must not leave half done."""
    if _received is not None:
        raise StopRequested(_received, where)
