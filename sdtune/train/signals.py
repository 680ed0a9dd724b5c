"""SIGINT and SIGTERM during training: finish the step, save a checkpoint, stop with `Interrupted`.

    with StopOnSignal() as stop:
        ...one step...
        if stop.signum:
            raise Interrupted(stop.signum, step, save())
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after step `step`, saved as checkpoint `saved` (None: none is kept)."""

    def __init__(self, signum: int, step: int, saved: Path | None):
        kept = (f"checkpoint saved in {saved}" if saved else
                "no checkpoint saved (output.keep_checkpoints=0: --resume starts over)")
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, {kept}")
        self.step, self.saved = step, saved
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopOnSignal:
    """While the loop runs, SIGINT and SIGTERM ask it to stop after the current step (`signum` is set); a
    second signal is reported and ignored. The handlers before it come back on exit. Signals can only be
    handled in the main thread: elsewhere nothing is installed."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.info(f"{name}: finishing this step, then saving a checkpoint")
        else:
            logger.info(f"{name} ignored: already stopping and saving a checkpoint (a checkpoint is written "
                        "whole or not at all, so killing the process loses at most the steps since the last one)")
