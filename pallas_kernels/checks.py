"""Checks of settings fields; each error names its field."""
from __future__ import annotations

from typing import Any, Sequence


def positive_int(field: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def positive_fields(obj: Any, names: Sequence[str]) -> None:
  """positive_int for each named field of obj."""
  for name in names:
    positive_int(name, getattr(obj, name))


def one_of(field: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {tuple(choices)}, got {value!r}")
