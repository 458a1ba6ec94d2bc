"""Curve smoothing shared by the range test's rules and the figures. Pure Python."""

from __future__ import annotations


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first value is not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out
