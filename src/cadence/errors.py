"""What can stop a command, as exception types the CLI maps to exit codes in one place (``cli.main``).

``FieldError`` is bad input (exit 2); ``Interrupted`` is a signal that was honoured after a checkpoint
(exit 128 + signal); ``Diverged`` is a non-finite loss or weights (exit 1). Torch-free, so the CLI can
map them without importing the trainer.
"""

from __future__ import annotations

import signal


class FieldError(ValueError):
    """Bad input at ``field`` (e.g. ``schedule.pct_start``); ``file`` is filled in by whoever read it."""

    def __init__(self, field: str, value: object, message: str, file: str | None = None):
        self.field, self.value, self.message, self.file = field, value, message, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.field}: {self.value!r}: {self.message}"

    def within(self, prefix: str = "", file: str | None = None) -> FieldError:
        """The same error, with ``prefix`` put before the field path and/or the file named."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return FieldError(field, self.value, self.message, file or self.file)


class Diverged(FloatingPointError):
    """A non-finite loss (``train.on_nonfinite: stop``) or non-finite weights; nothing diverged was saved."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written.
    ``resume``: the command that continues the work (printed by the CLI)."""

    def __init__(self, signum: int, step: int, resume: str = ""):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.resume = signum, step, resume
