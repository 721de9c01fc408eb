"""Checks shared by routers and the layer; each error names its field.

positive_int, positive_fields and one_of are the kernels' own checks
(pallas_kernels.checks), offered here with in_range as moejax's one set.
"""
from __future__ import annotations

from typing import Any

from pallas_kernels.checks import one_of, positive_fields, positive_int

__all__ = ["in_range", "one_of", "positive_fields", "positive_int"]


def in_range(field: str, value: Any, low: float, high: float,
             low_open: bool = False, high_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
  if not ok:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    raise ValueError(f"{field} must be in {lo}{low}, {high}{hi}, got {value!r}")
