"""What can stop a command, as exception types the CLI maps to exit codes in one place (``cli.main``).

``FieldError`` is bad input (exit 2); ``Interrupted`` is a signal that was honoured after a checkpoint
(exit 128 + signal); ``Diverged`` is a non-finite loss or weights (exit 1). Torch-free, so the CLI can
map them without importing the trainer.
"""

from __future__ import annotations

import reprlib
import signal

_SHORT = reprlib.Repr()  # a value in a message is bounded: a YAML alias bomb is not expanded
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 6, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 120, 120, 60


class FieldError(ValueError):
    """Bad input at ``field`` (e.g. ``schedule.pct_start``); ``file`` is filled in by whoever read it."""

    def __init__(self, field: str, value: object, message: str, file: str | None = None):
        self.field, self.value, self.message, self.file = field, value, message, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.field}: {_SHORT.repr(self.value)}: {self.message}"

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


class Terminated(BaseException):
    """SIGTERM outside a training step (start-up, the range test, the report): raised by the CLI's
    handler so that clean-ups run (a new run's folder is removed) and the exit says so in one line."""
