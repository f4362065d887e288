"""Counters of the tiers, as rates."""

from __future__ import annotations


def hit_rate(hits: int, misses: int, none: float | None = None) -> float | None:
    """hits / (hits + misses); `none` where there was no access."""
    n = hits + misses
    return hits / n if n else none
