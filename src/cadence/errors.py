"""The one error type for bad input: it names the field (a dotted path), the value and the reason."""

from __future__ import annotations


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
