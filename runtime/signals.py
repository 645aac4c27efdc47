"""Termination signals as exceptions, so that a `kill` cleans up as Ctrl-C does.

Python's default SIGTERM and SIGHUP actions end the process at once, leaving staged output folders
behind. Inside `terminate_on_signals()` they raise `Terminated`, a BaseException like
KeyboardInterrupt, in the main thread, so every `except BaseException` / `finally` cleanup runs.
`exit_on_signals()` adds what the command line does with them: a one-line message and the shell's
exit status for a signal, 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """The process was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def terminate_on_signals(signals=SIGNALS) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated in the main thread (once: a repeated signal is
    ignored, so it cannot cut short the cleanup the first one started). The old handlers come back after.
    Outside the main thread, where Python allows no handler, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """terminate_on_signals(), and a Terminated or KeyboardInterrupt that ends the block exits the process
    with status 128 + the signal's number and a one-line message on stderr, instead of a traceback."""
    try:
        with terminate_on_signals():
            yield
    except Terminated as e:
        _stopped(e.name, e.signum, getattr(e, "kept", None))
    except KeyboardInterrupt as e:
        _stopped("Ctrl-C", signal.SIGINT, getattr(e, "kept", None))


def _stopped(what: str, signum: int, kept=None) -> None:
    """`kept`: the staging folders runtime/outputs.py kept for resuming, where it kept any."""
    if kept:
        folders = ", ".join(f"'{f}'" for f in kept)
        print(f"mgc: stopped by {what}; the tensors written so far are kept in {folders}: run the same command "
              "again to resume", file=sys.stderr, flush=True)
    else:
        print(f"mgc: stopped by {what}; outputs not yet complete were removed", file=sys.stderr, flush=True)
    raise SystemExit(128 + int(signum))
