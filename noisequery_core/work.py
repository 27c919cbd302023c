"""The one contract for long work (build, import, index, merge, training, ranking): ``progress`` and ``check_cancel``.

Every long-running core function takes the same two optional keyword arguments, injected by the host
(the ComfyUI glue adapts them in one place, ``nodes/_host.NodeWork``; the CLI uses a tqdm bar and Ctrl-C):

``progress(done, total, message="")``
    Called with the units finished so far out of ``total`` (the unit is the function's own: images,
    rows, iterations), first with ``done == 0`` and last with ``done == total`` when the work completes.
    ``message`` is an optional short status line (e.g. NoiseCLR's current loss); hosts may show or ignore it.
    A progress callable may raise (ComfyUI's progress hook raises its interrupt): the core treats that
    exactly like an exception from ``check_cancel``.

``check_cancel()``
    Returns nothing when the work may go on and RAISES to stop it: ``errors.Cancelled`` from a host that
    has no exception of its own, or whatever the host raises (ComfyUI's interrupt, KeyboardInterrupt).
    The core calls it only at points where stopping loses no finished work: everything before is
    committed (a library batch still being written is awaited first) or checkpointed (NoiseCLR writes
    its checkpoint), and then the host's exception propagates unchanged, so the host reports a stop
    its usual way. Running the same work again resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .errors import Cancelled


class Progress(Protocol):
    """``progress(done, total, message="")``: see the module docstring."""

    def __call__(self, done: int, total: int, message: str = "") -> None: ...


CheckCancel = Callable[[], None]
"""``check_cancel()``: returns to go on, raises to stop (see the module docstring)."""


def no_progress(done: int, total: int, message: str = "") -> None:
    """The default ``progress``: reports nothing."""


def never_cancel() -> None:
    """The default ``check_cancel``: never stops the work."""


def cancel_when(stop: Callable[[], bool], what: str = "the work") -> CheckCancel:
    """A ``check_cancel`` for a host that can only poll a flag: raises ``Cancelled`` once ``stop()`` is true.

    ``what`` names the work in the message (e.g. "the import into /data/lib").
    """

    def check_cancel() -> None:
        if stop():
            raise Cancelled(f"{what} was stopped; finished work is kept, run it again to continue.")

    return check_cancel
