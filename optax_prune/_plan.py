"""Planning: which leaves are pruned, how they are grouped, which method each
group uses. Static, from the config and the params' structure (shapes,
dtypes, placement), never from their values; tests call :func:`make_plan`
directly, without tracing.

The plan is laid out as a mask update uses it: per schedule (one
``lax.cond``), its groups (each ranked together: one leaf under layer scope,
the leaves that share the schedule and the granularity under global scope),
each with its threshold method.

Grouping rule: leaves share a schedule when their schedules are *equal*.
Built-in schedules and plain numbers compare by value (two ``0.8`` read from a
config are one schedule); functions of your own by identity. Under global
scope a group is the leaves of one schedule with equal granularities; with
``distribution="erk"`` the leaves of one schedule share one budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _placement
from optax_prune import _scores
from optax_prune import _thresholds


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """One pruned leaf."""

  index: int  # Position among the params' leaves (`jax.tree.leaves` order).
  path: str  # `jax.tree_util.keystr` of its path.
  shape: tuple[int, ...]
  granularity: Any  # A `Granularity`; `unstructured()` for an empty leaf;
  #                   `PerLayer` around it for a leaf that stacks layers.
  units: int  # Units it holds under its granularity (all its layers).
  layers: int = 1  # Layers it stacks along its layer axis (1: not stacked).

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """The shape of one layer (the leaf's, if it stacks none)."""
    g = self.granularity
    return (_granularity.layer_shape(self.shape, g.axis)
            if isinstance(g, _granularity.PerLayer) else self.shape)


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """Leaves ranked together, and the threshold method that ranks them."""

  leaves: tuple[LeafPlan, ...]
  method: str  # One of `_thresholds.METHODS`.
  # Layer scope over a leaf that stacks layers: each layer is ranked on its
  # own, a row of the counts; otherwise the group is one row.
  by_layer: bool = False

  @property
  def units(self) -> int:
    return sum(leaf.units for leaf in self.leaves)

  @property
  def rows(self) -> int:
    """Rows of the counts: sets of units ranked each on its own."""
    return self.leaves[0].layers if self.by_layer else 1

  @property
  def row_units(self) -> list[int]:
    return [self.units // self.rows] * self.rows

  @property
  def row_shapes(self) -> list[tuple[int, ...]]:
    """Per row, the shape of its (first) leaf or layer (ERK's ratio)."""
    return [self.leaves[0].layer_shape] * self.rows


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
  """The groups of one schedule: their masks are recomputed together."""

  schedule: Callable  # step -> PruningTarget.
  groups: tuple[GroupPlan, ...]
  distribution: _distributions.Distribution  # How the groups share the sparsity.
  score: _scores.Score
  seed: int

  @property
  def leaves(self) -> tuple[LeafPlan, ...]:
    return tuple(leaf for group in self.groups for leaf in group.leaves)

  @property
  def row_starts(self) -> list[int]:
    """Per group, where its rows start in the vector of counts."""
    return list(np.cumsum([0] + [g.rows for g in self.groups])[:-1])


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about a mask update for params of one structure."""

  treedef: Any
  pruned: tuple[bool, ...]  # Per leaf of the params.
  schedules: tuple[SchedulePlan, ...]
  # Per leaf of the params: the entries it takes in the state's
  # `pruned_units` (its layers if pruned, else 0).
  parts: tuple[int, ...] = ()

  @property
  def pruned_indices(self) -> tuple[int, ...]:
    """Leaf indices of the pruned leaves, in order (the state's targets)."""
    return tuple(i for i, p in enumerate(self.pruned) if p)

  @property
  def sentinel(self) -> Optional[int]:
    """The leaf that the per-step checks read: the smallest nonempty pruned
    one (None if there is none).

    A check over every leaf is one more read pass over all params, which
    costs 10-20% of a memory-bound step; the mistakes it catches (a link after
    the pruning, a ``MultiSteps`` before it) touch every leaf alike.
    """
    leaves = [leaf for s in self.schedules for leaf in s.leaves if math.prod(leaf.shape)]
    if not leaves:
      return None
    return min(leaves, key=lambda leaf: (math.prod(leaf.shape), leaf.index)).index


def make_plan(config: _config.PruningConfig, params: Any) -> Plan:
  """The plan for ``params`` (arrays, tracers or ``ShapeDtypeStruct``s).

  Raises:
    ValueError: a leaf chosen for pruning is not floating, a granularity does
      not fit a leaf, the score fails on a leaf, or a group holds 2**31 units
      or more.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not path_leaves:  # Nothing to prune (also optax's `tree_map_params` placeholder).
    return Plan(treedef=treedef, pruned=(), schedules=(), parts=())
  leaves = [leaf for _, leaf in path_leaves]
  paths = [jax.tree_util.keystr(path) for path, _ in path_leaves]
  schedules = _paths.per_leaf(
      config.schedule, params, _config.is_schedule_leaf, "schedule")
  granularities = _paths.per_leaf(
      config.granularity, params, _config.is_granularity_leaf, "granularity")
  layer_axes = _paths.per_leaf(
      config.layer_axis, params, _config.is_layer_axis_leaf, "layer_axis")
  pruned = tuple(
      chosen and schedule is not None
      for chosen, schedule in zip(_chosen(config.where, params, path_leaves), schedules))

  by_schedule: dict = {}  # Schedule key -> {group key -> [LeafPlan]}, in order.
  parts = [0] * len(leaves)
  for i in (i for i, p in enumerate(pruned) if p):
    leaf = _leaf_plan(config, i, paths[i], leaves[i], granularities[i], layer_axes[i])
    parts[i] = leaf.layers
    # Global scope ranks a stack's layers with the leaves of its granularity.
    g = leaf.granularity
    group = ((g.inner if isinstance(g, _granularity.PerLayer) else g,)
             if config.scope == "global" else (i,))
    groups = by_schedule.setdefault(_key(schedules[i]), (schedules[i], {}))[1]
    groups.setdefault(group, []).append(leaf)

  planned = []
  for schedule, groups in by_schedule.values():
    total = sum(leaf.units for group in groups.values() for leaf in group)
    distribution = config.distribution.for_units(total)
    if distribution.shares_budget and total > _distributions.MAX_GROUP_SIZE:
      raise ValueError(
          f"`distribution={distribution.name!r}` shares one count among the leaves of a"
          f" schedule; they hold {total} units, and at most 2**31 - 1 are"
          " supported. Give some leaves their own schedule, or pass"
          " `distribution='uniform'`."
      )
    planned.append(SchedulePlan(
        schedule=schedule,
        groups=tuple(_group_plan(config, group, leaves) for group in groups.values()),
        distribution=distribution,
        score=config.score,
        seed=config.seed,
    ))
  return Plan(treedef=treedef, pruned=pruned, schedules=tuple(planned), parts=tuple(parts))


def _chosen(where: Any, params: Any, path_leaves: list) -> list[bool]:
  """Per leaf, whether ``where`` selects it."""
  if where is None:
    return _paths.default_where(path_leaves, params)
  if not callable(where):
    return [bool(w) for w in _paths.per_leaf(where, params, None, "where")]
  try:
    chosen = [bool(where(_paths.normalized(path), leaf)) for path, leaf in path_leaves]
  except TypeError as e:
    raise ValueError(
        "`where` must be called as `where(path, leaf) -> bool` (two arguments,"
        f" `path` as in `jax.tree_util.tree_flatten_with_path`); calling it failed: {e}"
    ) from e
  if path_leaves and not any(chosen):
    raise ValueError(
        "`where` selects no leaf of the params, so nothing would be pruned."
        " Paths look like"
        f" {jax.tree_util.keystr(_paths.normalized(path_leaves[0][0]))!r}; check"
        " the predicate (an nnx Variable's `.value` is already dropped)."
    )
  return chosen


def _key(schedule: Callable) -> Any:
  """Equal schedules share a key; unhashable ones are keyed by identity."""
  try:
    hash(schedule)
  except TypeError:
    return id(schedule)
  return schedule


def _leaf_plan(config, index: int, path: str, leaf: Any, granularity: Any,
               layer_axis: Optional[int]) -> LeafPlan:
  dtype, shape = jnp.result_type(leaf), tuple(jnp.shape(leaf))
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"`where` selects leaf {path} of dtype {dtype}, but only floating"
        " leaves can be pruned; exclude it from `where`."
    )
  # An empty leaf has no units under any granularity: it must not take a
  # share of a global or ERK budget (a (0, 4) leaf has 4 empty channels).
  if granularity is None or not jnp.size(leaf):
    granularity = _granularity.Unstructured()
  layers = 1
  if layer_axis is not None:
    if not -len(shape) <= layer_axis < len(shape) or len(shape) < 2:
      raise ValueError(
          f"`layer_axis={layer_axis}` does not fit leaf {path} of shape {shape}:"
          f" it must name an axis in [-{len(shape)}, {len(shape) - 1}] of a leaf"
          " with at least 2 axes (the layers, and each layer's weights). Give"
          " this leaf `None` (a pytree prefix or `by_path` rules).")
    granularity = _granularity.PerLayer(granularity, layer_axis % len(shape))
    layers = shape[layer_axis % len(shape)]
  granularity.check(path, shape)
  config.score.check(path, leaf)
  return LeafPlan(index, path, shape, granularity,
                  _granularity.checked_unit_count(granularity, path, shape), layers)


def _group_plan(config, leaves: list[LeafPlan], params: list) -> GroupPlan:
  size = sum(leaf.units for leaf in leaves)
  if size > _distributions.MAX_GROUP_SIZE:
    raise ValueError(
        f"a pruning group holds {size} entries; at most 2**31 - 1 are"
        " supported. Use `scope='layer'` or split the leaves."
    )
  whole = all(_placement.known_whole(params[leaf.index]) for leaf in leaves)
  by_layer = config.scope == "layer" and isinstance(leaves[0].granularity,
                                                    _granularity.PerLayer)
  ranked = size // leaves[0].layers if by_layer else size
  return GroupPlan(tuple(leaves), _thresholds.choose_method(config.threshold, ranked, whole),
                   by_layer)
