"""The pruning transformation's arguments, checked once into a frozen config.

Every check that can be made before the params are seen is made here, at
construction, so a mistake is a ``ValueError`` naming the argument and never a
traceback from inside ``jit``. What needs the params (which leaves exist,
whether a granularity fits a leaf) is checked by ``_plan.make_plan`` at
``init``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _bits
from optax_prune import _checks
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _schedules
from optax_prune import _scores
from optax_prune import _thresholds

SCOPES = ("layer", "global")

_ARRAY_ARGUMENT_MSG = (
    "`{name}` is a JAX array; `magnitude_pruning`'s arguments are static (they"
    " decide what is compiled), and `optax.inject_hyperparams` turns numbers"
    " into arrays. Wrap the optimizer, not the pruning: `optax.chain("
    "optax.inject_hyperparams(optax.adamw)(learning_rate=...),"
    " optax_prune.magnitude_pruning(schedule))`. To move the target at run time,"
    " give a schedule that computes it from the step (see"
    " `optax_prune.from_optax_schedule`)."
)


@dataclasses.dataclass(frozen=True, eq=False)
class PruningConfig:
  """What ``magnitude_pruning`` was asked to do, checked (see its docstring)."""

  # A schedule, None (not pruned), a pytree prefix of those or `by_path`
  # rules; plain numbers are already `constant_schedule`s.
  schedule: Any
  # None (`_paths.default_where`), a predicate `(path, leaf) -> bool`, or a
  # pytree prefix of Python bools.
  where: Any
  scope: str
  threshold: str  # One of `_thresholds.THRESHOLDS`.
  granularity: Any  # As `schedule`, of granularities (None: unstructured).
  # As `schedule`, of ints (the axis that stacks layers) or None (none).
  layer_axis: Any
  distribution: _distributions.Distribution
  score: _scores.Score
  seed: int
  mask_layout: _bits.MaskLayout  # Bool masks or packed bits in the state.


def is_schedule_leaf(x: Any) -> bool:
  return x is None or callable(x) or _checks.is_number(x)


def is_layer_axis_leaf(x: Any) -> bool:
  return x is None or _checks.is_number(x)


def is_granularity_leaf(x: Any) -> bool:
  return x is None or isinstance(x, _granularity.Granularity)


def make_config(
    schedule: Any,
    *,
    where: Optional[Any] = None,
    scope: str = "layer",
    threshold: str = "auto",
    granularity: Any = None,
    distribution: Optional[str] = None,
    score: Any = "magnitude",
    seed: int = 0,
    packed_masks: bool = False,
    layer_axis: Any = None,
) -> PruningConfig:
  """Checks ``magnitude_pruning``'s arguments; returns them as a config."""
  for name, value in (("schedule", schedule), ("seed", seed)):
    if any(isinstance(x, jax.Array) for x in jax.tree.leaves(value)):
      raise ValueError(_ARRAY_ARGUMENT_MSG.format(name=name))
  if not isinstance(packed_masks, bool):
    raise ValueError(f"`packed_masks` must be True or False, got {packed_masks!r}.")
  _checks.one_of("scope", scope, SCOPES)
  _checks.one_of("threshold", threshold, _thresholds.THRESHOLDS)
  shared = (_distributions.resolve(default_distribution(schedule, scope, granularity),
                                   by_default=True)
            if distribution is None else _distributions.resolve(distribution))
  if shared.shares_budget and scope != "layer":
    raise ValueError(
        f"`distribution={distribution!r}` shares a target among leaves ranked"
        " on their own: it needs `scope='layer'` (global scope already ranks"
        " the leaves together)."
    )
  bad = [g for g in _paths.spec_values(granularity, is_granularity_leaf)
         if not is_granularity_leaf(g)]
  if bad:
    raise ValueError(
        "`granularity` must be None, a granularity (`optax_prune.unstructured()`,"
        " `n_of_m(...)`, `blocks(...)`, `channels(...)` or your own, see"
        " `optax_prune.Granularity`), a pytree of those or `by_path` rules; it"
        f" holds {bad[0]!r}."
    )
  for g in _paths.spec_values(granularity, is_granularity_leaf):
    try:
      hash(g)
    except TypeError:
      raise ValueError(
          f"`granularity` {g!r} must be hashable (a frozen dataclass): leaves"
          " with equal granularities are grouped."
      ) from None
  for axis in _paths.spec_values(layer_axis, is_layer_axis_leaf):
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
      raise ValueError(
          "`layer_axis` must be None, an int (the axis of a leaf that stacks"
          " layers, as `nn.scan` and `nnx.scan` make them), a pytree prefix of"
          f" those or `by_path` rules; it holds {axis!r}.")
  if where is not None and not callable(where):
    bad = [w for w in jax.tree.leaves(where) if not isinstance(w, (bool, jnp.bool_))]
    if bad:
      raise ValueError(
          "`where` must be None, a predicate `(path, leaf) -> bool`, or a"
          f" pytree of Python bools; it holds {bad[0]!r}."
      )
  return PruningConfig(
      schedule=_checked_schedules(schedule),
      where=where,
      scope=scope,
      threshold=threshold,
      granularity=granularity,
      layer_axis=layer_axis,
      distribution=shared,
      score=_scores.resolve(score),
      seed=_checks.integer("seed", seed, -2**63, 2**63 - 1),
      mask_layout=_bits.MaskLayout(packed=packed_masks),
  )


def default_distribution(schedule: Any, scope: str, granularity: Any) -> str:
  """``"erk"`` for one target shared by unstructured leaves ranked per layer,
  ``"uniform"`` otherwise.

  ERK lost least in ``benchmarks.defaults`` (gradual pruning to 0.9 and 0.95
  on three tasks; uniform lost most) without pruning any leaf whole, as a
  global ranking did. Per-leaf targets (a pytree of schedules, as
  ``sparsities_for_budget`` returns) and structured units keep their own
  sparsity per leaf; global scope ranks the leaves together instead. A
  schedule over 2**31 units or more falls back to uniform (see ``_plan``).
  """
  one_target = is_schedule_leaf(schedule) or isinstance(schedule, _paths.PathRules)
  unstructured = all(isinstance(g, (type(None), _granularity.Unstructured))
                     for g in _paths.spec_values(granularity, is_granularity_leaf))
  return "erk" if scope == "layer" and one_target and unstructured else "uniform"


def _checked_schedules(spec: Any) -> Any:
  """``spec`` with every schedule checked now (never inside jit) and numbers
  replaced by their ``constant_schedule``."""
  values = _paths.spec_values(spec, is_schedule_leaf)
  checked: dict[int, Callable] = {}
  for i, value in enumerate(values):
    if value is not None and id(value) not in checked:
      name = "schedule" if len(values) == 1 else f"schedule[{i}]"
      checked[id(value)] = _schedules.check_schedule(name, value)
  convert = lambda v: None if v is None else checked[id(v)]
  if isinstance(spec, _paths.PathRules):
    return _paths.PathRules(
        tuple((p, convert(v)) for p, v in spec.rules), convert(spec.default))
  return jax.tree.map(convert, spec, is_leaf=is_schedule_leaf)


def mask_update_steps(schedule: Any, num_steps: int) -> np.ndarray:
  """The steps in ``[0, num_steps)`` at which ``schedule`` recomputes masks.

  For a training loop that compiles its mask-update step apart from the others
  (``tx.update(..., update_masks=step in due)``, see ``magnitude_pruning``): no
  step then reads a flag on the host. All schedules are evaluated at once, in
  one jitted call per schedule.

  Args:
    schedule: what ``magnitude_pruning`` takes as ``schedule``: a sparsity, a
      schedule, a pytree of those (``None`` for unpruned subtrees) or
      :func:`by_path` rules. A step is listed when any of them updates there.
    num_steps: the number of optimizer steps, >= 0 (the state's ``count``
      runs 0, 1, ...).

  Returns:
    The sorted int64 NumPy array of those steps.

  Examples:
    >>> import optax_prune
    >>> schedule = optax_prune.polynomial_schedule(
    ...     0.9, begin_step=10, end_step=40, frequency=10)
    >>> optax_prune.mask_update_steps(schedule, 100)
    array([10, 20, 30, 40])
    >>> optax_prune.mask_update_steps({"a": 0.5, "b": None}, 100)
    array([0])
  """
  num_steps = _checks.integer("num_steps", num_steps, 0, _checks.INT32_MAX)
  steps = jnp.arange(num_steps, dtype=jnp.int32)
  due = np.zeros(num_steps, bool)
  for fn in _paths.spec_values(_checked_schedules(schedule), is_schedule_leaf):
    if fn is not None:
      flags = jax.jit(jax.vmap(lambda step, fn=fn: jnp.asarray(fn(step).update, bool)))(steps)
      due |= np.asarray(flags)
  return np.flatnonzero(due)
