"""Learning-rate schedules as pure functions of position. No torch, no I/O.

A schedule maps a position ``x`` in its span (optimizer steps or samples, counted from the start of
the span) to ``(multiplier, momentum)``: the multiplier scales the peak learning rate, and the
momentum is ``None`` unless the schedule cycles momentum.

Two layers:

* **Specs** (``Cosine``, ``OneCycle``, ...) are what a recipe writes: durations may be fractions of
  the span, or ``"N epochs" | "N steps" | "N samples"``.
* ``spec.build(span)`` resolves every duration against a :class:`Span` (which knows how epochs,
  steps and samples map onto positions) and returns a ``Curve``: ``x -> (multiplier, momentum)``.

With steps as the unit, every kind reproduces its ``torch.optim.lr_scheduler`` counterpart step for
step (see ``docs/schedules.md`` for the key-by-key mapping); the tests hold them to 1e-9.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Protocol

from cadence.errors import FieldError

Curve = Callable[[float], "tuple[float, float | None]"]

UNITS = ("epochs", "steps", "samples")


ScheduleError = FieldError  # a schedule parameter that cannot work, with its dotted path


# ---------------------------------------------------------------------------------------------
# Durations


_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)\s*$")
_UNIT_ALIASES = {
    "epoch": "epochs", "epochs": "epochs", "ep": "epochs",
    "step": "steps", "steps": "steps", "iter": "steps", "iters": "steps",
    "sample": "samples", "samples": "samples",
}
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9}


@dataclass(frozen=True)
class Duration:
    """A length of training: ``value`` in ``unit`` (``fraction`` of the enclosing span, or a unit)."""

    value: float
    unit: Literal["fraction", "epochs", "steps", "samples"] = "fraction"

    @classmethod
    def parse(cls, raw: object) -> Duration:
        """``0.3`` (fraction), ``"5 epochs"``, ``"1000 steps"``, ``"2M samples"``."""
        if isinstance(raw, Duration):
            return raw
        if isinstance(raw, bool):
            raise ValueError("expected a fraction or 'N epochs|steps|samples'")
        if isinstance(raw, (int, float)):
            if not 0 < raw <= 1:
                raise ValueError("a bare number is a fraction of the span and must be in (0, 1]; "
                                 "write '3 epochs', '500 steps' or '1M samples' for lengths")
            return cls(float(raw), "fraction")
        if isinstance(raw, str):
            text = raw.strip()
            m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbB])\s+([A-Za-z]+)\s*$", text)
            if m:
                number, unit = float(m.group(1)) * _SUFFIX[m.group(2).lower()], m.group(3)
            else:
                m = _DURATION_RE.match(text)
                if not m:
                    try:
                        return cls.parse(float(text))
                    except ValueError:
                        raise ValueError("expected a fraction or 'N epochs|steps|samples'") from None
                number, unit = float(m.group(1)), m.group(2)
            unit = _UNIT_ALIASES.get(unit.lower())
            if unit is None:
                raise ValueError("unit must be epochs, steps or samples")
            if number <= 0:
                raise ValueError("must be positive")
            return cls(number, unit)
        raise ValueError("expected a fraction or 'N epochs|steps|samples'")

    def __str__(self) -> str:
        return f"{self.value:g}" if self.unit == "fraction" else f"{self.value:g} {self.unit}"


class Span(Protocol):
    """Where a schedule runs: ``length`` progress units, final step at position ``last``."""

    length: float
    last: float

    def measure(self, duration: Duration, where: str) -> float:
        """``duration`` as a length in progress units, counted from the start of this span."""

    def sub(self, offset: float, length: float) -> Span:
        """The part of this span from ``offset`` for ``length`` units."""


# ---------------------------------------------------------------------------------------------
# Small curve helpers (fastai style: position in [0, 1] -> value)


def cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` at pct=0 to ``end`` at pct=1 (torch OneCycleLR's formula)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def linear_anneal(start: float, end: float, pct: float) -> float:
    """Straight line from ``start`` at pct=0 to ``end`` at pct=1 (torch OneCycleLR's formula)."""
    return (end - start) * pct + start


ANNEAL = {"cos": cos_anneal, "linear": linear_anneal}


def _span_ends(span: Span) -> float:
    """Size of the final step: ``length - last`` (1 when counting steps)."""
    return span.length - span.last


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass(kw_only=True)
class Warmup:
    """Ramp from ``start_factor`` x the schedule's first value up to it, before the schedule."""

    duration: Duration
    start_factor: float = 0.0
    shape: Literal["linear", "cos"] = "linear"

    def __post_init__(self):
        _check(0.0 <= self.start_factor <= 1.0, "start_factor", self.start_factor, "must be in [0, 1]")

    def ramp(self, pct: float) -> float:
        if self.shape == "linear":
            return self.start_factor + (1.0 - self.start_factor) * pct
        return self.start_factor + (1.0 - self.start_factor) * (1 - math.cos(math.pi * pct)) / 2


@dataclass(kw_only=True)
class ScheduleSpec:
    """Fields every kind has. ``scale`` multiplies the whole curve (useful inside a ``sequence``)."""

    kind: ClassVar[str]
    warmup: Warmup | None = None
    scale: float = 1.0

    def build(self, span: Span, where: str = "schedule") -> Curve:
        _check(0 < self.scale < math.inf, "scale", self.scale, "must be positive and finite", where)
        w = 0.0
        if self.warmup is not None:
            w = span.measure(self.warmup.duration, f"{where}.warmup.duration")
            if w >= span.length:
                raise ScheduleError(f"{where}.warmup.duration", str(self.warmup.duration),
                                    "leaves nothing of the span for the schedule")
        core = self._curve(span.sub(w, span.length - w) if w else span, where)
        scale, warmup = self.scale, self.warmup

        def curve(x: float) -> tuple[float, float | None]:
            if x < w:
                m0, mom0 = core(0.0)
                return scale * m0 * warmup.ramp(x / w), mom0
            m, mom = core(x - w)
            return scale * m, mom

        return curve

    def _curve(self, span: Span, where: str) -> Curve:  # pragma: no cover - abstract
        raise NotImplementedError

    def _len(self, span: Span, duration: Duration | None, name: str, where: str,
             default_whole: bool = True) -> float:
        """Resolve a duration field; it must be positive and fit in the span."""
        if duration is None:
            return span.length if default_whole else 0.0
        n = span.measure(duration, f"{where}.{name}")
        if n <= 0:
            raise ScheduleError(f"{where}.{name}", str(duration), "resolves to zero length")
        if n > span.length * (1 + 1e-9):
            raise ScheduleError(f"{where}.{name}", str(duration),
                                f"is longer than its scope ({span.length:g} units)")
        return n


def _check(cond: bool, name: str, value: object, message: str, where: str | None = None) -> None:
    if not cond:
        raise ScheduleError(f"{where}.{name}" if where else name, value, message)


@dataclass(kw_only=True)
class Constant(ScheduleSpec):
    """LR stays at peak (times ``scale``). torch: ``ConstantLR(factor=1)``/no scheduler."""

    kind: ClassVar[str] = "constant"

    def _curve(self, span, where):
        return lambda x: (1.0, None)


@dataclass(kw_only=True)
class Step(ScheduleSpec):
    """Multiply by ``gamma`` every ``step_size``. torch: ``StepLR(step_size, gamma)``."""

    kind: ClassVar[str] = "step"
    step_size: Duration
    gamma: float = 0.1

    def __post_init__(self):
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")

    def _curve(self, span, where):
        size = self._len(span, self.step_size, "step_size", where)
        gamma = self.gamma
        return lambda x: (gamma ** math.floor(x / size), None)


@dataclass(kw_only=True)
class MultiStep(ScheduleSpec):
    """Multiply by ``gamma`` at each milestone. torch: ``MultiStepLR(milestones, gamma)``."""

    kind: ClassVar[str] = "multistep"
    milestones: list[Duration]
    gamma: float = 0.1

    def __post_init__(self):
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        _check(len(self.milestones) > 0, "milestones", self.milestones, "needs at least one milestone")

    def _curve(self, span, where):
        marks = [self._len(span, m, f"milestones.{i}", where) for i, m in enumerate(self.milestones)]
        if marks != sorted(marks):
            raise ScheduleError(f"{where}.milestones", [str(m) for m in self.milestones],
                                "must be increasing")
        gamma = self.gamma
        return lambda x: (gamma ** bisect.bisect_right(marks, x), None)


@dataclass(kw_only=True)
class Exponential(ScheduleSpec):
    """Multiply by ``gamma`` per ``every`` (one step by default). torch: ``ExponentialLR(gamma)``."""

    kind: ClassVar[str] = "exponential"
    gamma: float
    every: Duration = field(default_factory=lambda: Duration(1, "steps"))

    def __post_init__(self):
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")

    def _curve(self, span, where):
        unit = self._len(span, self.every, "every", where)
        gamma = self.gamma
        return lambda x: (gamma ** (x / unit), None)


@dataclass(kw_only=True)
class Linear(ScheduleSpec):
    """From ``start_factor`` to ``end_factor`` over ``duration``, then hold; ``shape: cos`` follows
    half a cosine between them instead of a line (a smooth ramp up or down).
    torch (``shape: linear``): ``LinearLR(start_factor, end_factor, total_iters)``."""

    kind: ClassVar[str] = "linear"
    start_factor: float = 1.0
    end_factor: float = 0.0
    duration: Duration | None = None
    shape: Literal["linear", "cos"] = "linear"

    def __post_init__(self):
        for name in ("start_factor", "end_factor"):
            _check(0 <= getattr(self, name) < math.inf, name, getattr(self, name), "must be >= 0 and finite")

    def _curve(self, span, where):
        n = self._len(span, self.duration, "duration", where)
        a, b = self.start_factor, self.end_factor
        if self.shape == "cos":
            return lambda x: (a + (b - a) * (1 - math.cos(math.pi * min(x, n) / n)) / 2, None)
        return lambda x: (a + (b - a) * min(x, n) / n, None)


@dataclass(kw_only=True)
class Cosine(ScheduleSpec):
    """Half a cosine from 1 to ``floor`` over ``duration`` (the span by default), then hold.
    torch: ``CosineAnnealingLR(T_max=duration, eta_min=floor * lr)`` (closed form)."""

    kind: ClassVar[str] = "cosine"
    floor: float = 0.0
    duration: Duration | None = None

    def __post_init__(self):
        _check(0 <= self.floor < 1, "floor", self.floor, "must be in [0, 1): a fraction of the peak")

    def _curve(self, span, where):
        n = self._len(span, self.duration, "duration", where)
        lo = self.floor
        return lambda x: (lo + (1 - lo) * (1 + math.cos(math.pi * min(x, n) / n)) / 2, None)


@dataclass(kw_only=True)
class CosineRestarts(ScheduleSpec):
    """SGDR: cosine from the cycle's peak to ``floor`` over ``period``, restarting; each period is
    ``period_mult`` x the last and each peak ``decay`` x the last.
    torch: ``CosineAnnealingWarmRestarts(T_0=period, T_mult=period_mult, eta_min=floor * lr)``."""

    kind: ClassVar[str] = "cosine_restarts"
    period: Duration
    period_mult: float = 1.0
    floor: float = 0.0
    decay: float = 1.0

    def __post_init__(self):
        _check(self.period_mult >= 1, "period_mult", self.period_mult, "must be >= 1")
        _check(0 <= self.floor < 1, "floor", self.floor, "must be in [0, 1): a fraction of the peak")
        _check(0 < self.decay <= 1, "decay", self.decay, "must be in (0, 1]")

    def _curve(self, span, where):
        t0 = self._len(span, self.period, "period", where)
        mult, lo, decay = self.period_mult, self.floor, self.decay

        def curve(x: float):
            if mult == 1:
                cycle = math.floor(x / t0)
                t_cur, t_i = x - cycle * t0, t0
            else:  # subtract whole periods, as torch does step by step
                cycle, t_cur, t_i = 0, x, t0
                while t_cur >= t_i:
                    t_cur, t_i, cycle = t_cur - t_i, t_i * mult, cycle + 1
            peak = decay ** cycle
            return lo + (peak - lo) * (1 + math.cos(math.pi * t_cur / t_i)) / 2, None

        return curve


@dataclass(kw_only=True)
class OneCycle(ScheduleSpec):
    """Smith's one-cycle: from ``1/div_factor`` up to 1 over ``pct_start``, then down to
    ``1/(div_factor*final_div_factor)`` at the span's last step; ``three_phase`` comes back to
    ``1/div_factor`` first. Momentum, when given as ``[max, min]``, moves inversely.
    torch: ``OneCycleLR(max_lr=lr, total_steps, pct_start, anneal_strategy, div_factor,
    final_div_factor, three_phase, cycle_momentum, max_momentum, base_momentum)``."""

    kind: ClassVar[str] = "one_cycle"
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1.0e4
    anneal: Literal["cos", "linear"] = "cos"
    three_phase: bool = False
    momentum: tuple[float, float] | None = None

    def __post_init__(self):
        _check(0 < self.pct_start < 1, "pct_start", self.pct_start, "must be in (0, 1)")
        if self.three_phase:
            _check(self.pct_start < 0.5, "pct_start", self.pct_start, "must be < 0.5 with three_phase")
        _check(self.div_factor >= 1, "div_factor", self.div_factor, "must be >= 1")
        _check(self.final_div_factor >= 1, "final_div_factor", self.final_div_factor, "must be >= 1")
        _check_momentum(self.momentum)

    def _curve(self, span, where):
        step, length = _span_ends(span), span.length
        initial = 1.0 / self.div_factor
        final = initial / self.final_div_factor
        hi_m, lo_m = self.momentum if self.momentum else (None, None)
        e1 = self.pct_start * length - step
        if self.three_phase:
            phases = [(e1, initial, 1.0, hi_m, lo_m),
                      (2 * self.pct_start * length - 2 * step, 1.0, initial, lo_m, hi_m),
                      (length - step, initial, final, hi_m, hi_m)]
        else:
            phases = [(e1, initial, 1.0, hi_m, lo_m), (length - step, 1.0, final, lo_m, hi_m)]
        ends = [p[0] for p in phases]
        if ends[0] <= 0 or any(b <= a for a, b in zip(ends, ends[1:])):
            raise ScheduleError(f"{where}.pct_start", self.pct_start,
                                f"leaves a phase with no steps over a span of {length:g} units")
        anneal = ANNEAL[self.anneal]
        momentum = self.momentum is not None

        def curve(x: float):
            start = 0.0
            for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
                if x <= end or i == len(phases) - 1:
                    pct = (x - start) / (end - start)
                    return anneal(lr0, lr1, pct), (anneal(m0, m1, pct) if momentum else None)
                start = end
            raise AssertionError("unreachable")

        return curve


@dataclass(kw_only=True)
class Polynomial(ScheduleSpec):
    """``end_factor + (1 - end_factor) * (1 - x/duration) ** power``, then hold.
    torch: ``PolynomialLR(total_iters=duration, power)`` (with ``end_factor: 0``)."""

    kind: ClassVar[str] = "polynomial"
    power: float = 1.0
    end_factor: float = 0.0
    duration: Duration | None = None

    def __post_init__(self):
        _check(self.power > 0, "power", self.power, "must be positive")
        _check(0 <= self.end_factor < 1, "end_factor", self.end_factor, "must be in [0, 1)")

    def _curve(self, span, where):
        n = self._len(span, self.duration, "duration", where)
        p, lo = self.power, self.end_factor
        return lambda x: (lo + (1 - lo) * (1.0 - min(n, x) / n) ** p, None)


@dataclass(kw_only=True)
class Cyclic(ScheduleSpec):
    """Cyclical LR between ``base_factor`` and 1 (Smith 2017). Modes: ``triangular``,
    ``triangular2`` (amplitude halves each cycle), ``exp_range`` (amplitude x ``gamma`` per ``every``).
    Momentum, when given as ``[max, min]``, moves inversely.
    torch: ``CyclicLR(base_lr=base_factor * lr, max_lr=lr, step_size_up, step_size_down, mode,
    gamma, cycle_momentum, base_momentum=min, max_momentum=max)``."""

    kind: ClassVar[str] = "cyclic"
    step_size_up: Duration
    step_size_down: Duration | None = None
    base_factor: float = 0.1
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0
    every: Duration = field(default_factory=lambda: Duration(1, "steps"))
    momentum: tuple[float, float] | None = None

    def __post_init__(self):
        _check(0 <= self.base_factor < 1, "base_factor", self.base_factor, "must be in [0, 1)")
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        _check_momentum(self.momentum)

    def _curve(self, span, where):
        up = self._len(span, self.step_size_up, "step_size_up", where)
        down = up if self.step_size_down is None else self._len(
            span, self.step_size_down, "step_size_down", where)
        unit = self._len(span, self.every, "every", where)
        total, lo, mode, gamma = up + down, self.base_factor, self.mode, self.gamma
        ratio = up / total
        hi_m, lo_m = self.momentum if self.momentum else (None, None)

        def curve(x: float):
            cycle = math.floor(1 + x / total)
            pos = 1.0 + x / total - cycle
            factor = pos / ratio if pos <= ratio else (pos - 1) / (ratio - 1)
            if mode == "triangular":
                amp = 1.0
            elif mode == "triangular2":
                amp = 1 / (2.0 ** (cycle - 1))
            else:
                amp = gamma ** (x / unit)
            lr = lo + (1 - lo) * factor * amp
            mom = hi_m - (hi_m - lo_m) * factor * amp if hi_m is not None else None
            return lr, mom

        return curve


@dataclass(kw_only=True)
class WarmupStableDecay(ScheduleSpec):
    """Warmup-stable-decay (trapezoid): hold the peak, then fall to ``floor`` over the final
    ``decay`` of the span, reaching it on the last step. ``shape``: linear, cos or sqrt
    (``1 - sqrt(t)``). Put the warmup in ``warmup:``. torch has no counterpart."""

    kind: ClassVar[str] = "wsd"
    decay: Duration = field(default_factory=lambda: Duration(0.2))
    shape: Literal["linear", "cos", "sqrt"] = "linear"
    floor: float = 0.0

    def __post_init__(self):
        _check(0 <= self.floor < 1, "floor", self.floor, "must be in [0, 1)")

    def _curve(self, span, where):
        d = self._len(span, self.decay, "decay", where)
        begin, end = span.length - d, span.last
        lo, shape = self.floor, self.shape

        def curve(x: float):
            if x <= begin:
                return 1.0, None
            t = 1.0 if end <= begin else min((x - begin) / (end - begin), 1.0)
            f = {"linear": 1 - t, "cos": (1 + math.cos(math.pi * t)) / 2, "sqrt": 1 - math.sqrt(t)}[shape]
            return lo + (1 - lo) * f, None

        return curve


@dataclass(kw_only=True)
class Piece:
    """One piece of a ``sequence``: a schedule and how long it runs (the last may omit it)."""

    schedule: ScheduleSpec
    duration: Duration | None = None


@dataclass(kw_only=True)
class Sequence(ScheduleSpec):
    """Pieces one after another, each with its own clock. torch: ``SequentialLR``."""

    kind: ClassVar[str] = "sequence"
    pieces: list[Piece]

    def __post_init__(self):
        _check(len(self.pieces) > 0, "pieces", self.pieces, "needs at least one piece")
        for i, p in enumerate(self.pieces[:-1]):
            _check(p.duration is not None, f"pieces.{i}.duration", None,
                   "every piece but the last needs a duration")

    def _curve(self, span, where):
        starts, curves, offset = [], [], 0.0
        for i, piece in enumerate(self.pieces):
            here = f"{where}.pieces.{i}"
            sub0 = span.sub(offset, span.length - offset)
            if piece.duration is None:
                length = span.length - offset
            elif piece.duration.unit == "fraction":  # a fraction of the whole sequence, not of what is left
                length = span.measure(piece.duration, f"{here}.duration")
            else:
                length = sub0.measure(piece.duration, f"{here}.duration")
            if length <= 0 or offset + length > span.length * (1 + 1e-9):
                raise ScheduleError(f"{here}.duration", str(piece.duration),
                                    f"does not fit: the pieces before it leave {span.length - offset:g} units")
            if i == len(self.pieces) - 1 and offset + length < span.length * (1 - 1e-9):
                raise ScheduleError(f"{here}.duration", str(piece.duration),
                                    "the last piece must run to the end of the span: omit its duration")
            starts.append(offset)
            curves.append(piece.schedule.build(span.sub(offset, length), here))
            offset += length

        def curve(x: float):
            i = max(bisect.bisect_right(starts, x) - 1, 0)
            return curves[i](x - starts[i])

        return curve


def _check_momentum(m: tuple[float, float] | None) -> None:
    if m is not None:
        hi, lo = m
        _check(0 <= lo <= hi < 1, "momentum", list(m), "must be [max, min] with 0 <= min <= max < 1")


KINDS: dict[str, type[ScheduleSpec]] = {
    cls.kind: cls for cls in (Constant, Step, MultiStep, Exponential, Linear, Cosine, CosineRestarts,
                              OneCycle, Polynomial, Cyclic, WarmupStableDecay, Sequence)
}
