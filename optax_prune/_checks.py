"""Argument checks shared by every public function: one rule per kind of value.

Each returns the value as a plain Python type or raises a ``ValueError`` that
names the argument, the accepted range and the value received. Booleans are
never numbers here (``axis=True`` is a mistake, not ``axis=1``); NumPy scalars
are accepted wherever Python ones are.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import numpy as np

INT32_MAX = 2**31 - 1


def is_number(x: Any) -> bool:
  """Whether ``x`` is a real number (Python or NumPy scalar), not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def is_integer(x: Any) -> bool:
  """Whether ``x`` is an integer (Python or NumPy scalar), not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def integer(
    name: str, value: Any, minimum: Optional[int] = None,
    maximum: Optional[int] = None,
) -> int:
  """``value`` as an int in [minimum, maximum] (either bound may be None)."""
  if minimum is not None and maximum is not None:
    what = f"an integer in [{minimum}, {maximum}]"
  elif minimum is not None:
    what = f"an integer >= {minimum}"
  else:
    what = "an integer" if maximum is None else f"an integer <= {maximum}"
  if not is_integer(value):
    raise ValueError(
        f"`{name}` must be {what}; got {value!r} of type {type(value).__name__}."
    )
  if (minimum is not None and value < minimum) or (
      maximum is not None and value > maximum):
    raise ValueError(f"`{name}` must be {what}; got {value}.")
  return int(value)


def fraction(name: str, value: Any) -> float:
  """``value`` as a float in [0, 1]."""
  if not is_number(value):
    raise ValueError(
        f"`{name}` must be a number in [0, 1]; got {value!r} of type"
        f" {type(value).__name__}."
    )
  if not 0.0 <= value <= 1.0:  # Also rejects NaN.
    raise ValueError(f"`{name}` must be in [0, 1]; got {value!r}.")
  return float(value)


def positive_number(name: str, value: Any) -> float:
  """``value`` as a finite float > 0."""
  if not is_number(value) or not (value > 0 and math.isfinite(value)):
    raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
  return float(value)


def one_of(name: str, value: Any, options: Sequence[str]) -> str:
  """``value`` if it is one of ``options``."""
  if not isinstance(value, str) or value not in options:
    raise ValueError(f"`{name}` must be one of {tuple(options)}; got {value!r}.")
  return value


def cached(fn: Any, *args: Any) -> Any:
  """``fn(*args)`` through its ``functools.lru_cache``, or computed afresh when
  an argument is unhashable (``fn`` must catch its own errors)."""
  try:
    return fn(*args)
  except TypeError:  # Unhashable: nothing to share.
    return fn.__wrapped__(*args)
