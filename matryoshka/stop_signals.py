"""Stop a training run cleanly on SIGINT or SIGTERM: at the end of the current step, with a checkpoint.

Ctrl-C, ``kill``, a batch scheduler's pre-emption (Slurm sends SIGTERM, then SIGKILL after a grace
period) and ``torchrun``'s shutdown all end a run with SIGINT or SIGTERM.  Acting on them mid-step
would leave the SAE half-updated (Adam has stepped, the decoder is not yet re-normalised) and lose
every step since the last checkpoint.  While :func:`matryoshka.train.train` runs, these two signals
are only recorded; the trainer finishes the step, writes a checkpoint of it (with a
``checkpoint_dir``) and raises :class:`TrainingInterrupted`.

* A second signal is not deferred: the handlers that were there before come back and the signal is
  sent again, so a run stuck inside a step still dies on the second Ctrl-C or ``kill``.
* Data-parallel runs stop together: a rank may receive the signal a step after another, so the
  ranks agree at the next metric read-out (every ``log_every`` steps), where they already wait for
  each other; one all-reduce there.
* Python lets only the main thread set signal handlers: a run in another thread keeps the signals'
  usual behaviour, and so does a signal that is ignored (``nohup``, a background job of a script)
  or has a handler that was not set from Python.

A study's parent process trains nothing itself: there :class:`TerminateAsInterrupt` turns SIGTERM
into an :class:`Interrupted` exception, as Ctrl-C is a ``KeyboardInterrupt``, so that it keeps the
runs that finish (:func:`matryoshka.experiments.common.run_many`).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from .distributed import Ranks

__all__ = ["Interrupted", "TrainingInterrupted", "DeferredSignals", "TerminateAsInterrupt"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop on ``signal`` (SIGINT or SIGTERM).  A ``KeyboardInterrupt``, so that an
    ``except Exception`` does not swallow it."""

    def __init__(self, message: str, signum: signal.Signals) -> None:
        super().__init__(message)
        self.signal = signum

    def __reduce__(self):
        # Picklable with its fields, so that it crosses from a study's worker process to the parent.
        return type(self), (str(self), self.signal)

    @property
    def exit_code(self) -> int:
        """The shell's exit status for a process the signal ended: ``128 + signal number``."""
        return 128 + int(self.signal)


class TrainingInterrupted(Interrupted):
    """:func:`~matryoshka.train.train` stopped at a step boundary on SIGINT or SIGTERM.

    ``signal``: the signal; ``step``: the steps done (the SAE holds their parameters);
    ``checkpoint``: the checkpoint written for that step (``None`` without a ``checkpoint_dir``, and
    on ranks other than 0, which do not write); ``result``: the run's history so far.
    """

    def __init__(self, message: str, signum: signal.Signals, step: int, checkpoint: Path | None, result) -> None:
        super().__init__(message, signum)
        self.step, self.checkpoint, self.result = step, checkpoint, result

    def __reduce__(self):
        return type(self), (str(self), self.signal, self.step, self.checkpoint, self.result)


class DeferredSignals:
    """While entered (main thread only), SIGINT and SIGTERM are recorded in ``received``, not acted on."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in SIGNALS:
            handler = signal.getsignal(s)
            # Left alone: an ignored signal (nohup, a background job of a script) stays ignored, and
            # a handler installed outside Python could not be put back.
            if handler not in (signal.SIG_IGN, None):
                self._previous[s] = handler
                signal.signal(s, self._defer)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _defer(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def stop_now(self, ranks: Ranks | None, at_read_out: bool, device: torch.device) -> bool:
        """Whether the run stops after this step: in one process, when a signal came; under data
        parallelism only at a read-out, when one came to any rank (every rank gets the same answer)."""
        if ranks is None:
            return self.received is not None
        if not at_read_out:
            return False
        # The largest signal number received on any rank (0: none); SIGTERM wins over SIGINT.
        signum = int(ranks.max_(torch.tensor([int(self.received or 0)], device=device)))
        if signum and self.received is None:
            self.received = signal.Signals(signum)
        return bool(signum)


class TerminateAsInterrupt:
    """While entered (main thread only), SIGTERM raises :class:`Interrupted` in the main thread, as
    Ctrl-C raises ``KeyboardInterrupt``: for a process that trains nothing itself, such as a study's
    parent waiting on its worker processes, so that ``kill`` lets it keep what has finished instead
    of dying at once.  A second SIGTERM is acted on as before (the previous handler comes back
    with the first), and an ignored SIGTERM stays ignored."""

    def __init__(self) -> None:
        self._previous: object = None

    def __enter__(self) -> TerminateAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGTERM)
            if handler not in (signal.SIG_IGN, None):
                self._previous = handler
                signal.signal(signal.SIGTERM, self._interrupt)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _interrupt(self, signum: int, frame) -> None:
        self._restore()
        raise Interrupted("stopped by SIGTERM", signal.Signals(signum))

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
