"""Per-leaf settings chosen by the leaf's path: ``by_path``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class PathRules:
  """Ordered ``(pattern, value)`` rules and a default; see :func:`by_path`."""

  rules: tuple[tuple[str, Any], ...]
  default: Any

  def values(self) -> list:
    return [value for _, value in self.rules] + [self.default]

  def resolve(self, path: str) -> Any:
    for pattern, value in self.rules:
      if re.search(pattern, path):
        return value
    return self.default


def by_path(rules: Mapping[str, Any], default: Any) -> PathRules:
  r"""Per-leaf values chosen by regular expressions on the leaf's path.

  Usable for ``magnitude_pruning``'s ``schedule`` and ``granularity``. A
  leaf's path is ``jax.tree_util.keystr`` of its key path (such as
  ``"['Dense_0']['kernel']"``); the first pattern that ``re.search`` finds in
  it decides, else ``default``.

  Args:
    rules: ``{pattern: value}``, tried in order.
    default: the value of leaves that no pattern matches.

  Returns:
    Rules that ``magnitude_pruning`` resolves per leaf at ``init``.

  Examples:
    Keep the first and last layers dense, prune the rest along one schedule
    (with ``distribution="erk"`` the target is shared among the rest):

    >>> import optax_prune
    >>> schedule = optax_prune.by_path(  # Anchored: not Dense_30.
    ...     {r"\['Dense_(0|3)'\]": None}, default=optax_prune.polynomial_schedule(
    ...         0.9, begin_step=0, end_step=1000, frequency=100))
    >>> tx = optax_prune.magnitude_pruning(schedule, distribution="erk")
  """
  if not isinstance(rules, Mapping):
    raise ValueError(f"`rules` must be a mapping {{pattern: value}}; got {rules!r}.")
  for pattern in rules:
    if not isinstance(pattern, str):
      raise ValueError(f"`rules` keys must be regular expressions (str); got {pattern!r}.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"`rules` pattern {pattern!r} is not a regular expression: {e}") from e
  return PathRules(tuple(rules.items()), default)
