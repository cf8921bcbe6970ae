"""The pruning transformation: masks in the optimizer state, exact zeros after
``optax.apply_updates``."""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _schedules
from optax_prune import _scores
from optax_prune import _thresholds

SCOPES = ("layer", "global")
THRESHOLDS = ("auto",) + _thresholds.METHODS
# Up to this many entries in a group, "auto" uses the sort reference: sorting a
# few thousand keys costs about one of the radix search's 31 counting passes.
# Only for groups whose leaves are known to be whole on each device
# (`_known_whole`): a sort gathers split leaves.
AUTO_SORT_MAX_SIZE = 2048

_NO_PARAMS_MSG = (
    "`magnitude_pruning` ranks the current parameters, so its `update` needs"
    " them: call `tx.update(updates, state, params)` (flax `TrainState` and"
    " `nnx.Optimizer` already do)."
)


def resolve_threshold(threshold: str, size: int, whole: bool = True) -> str:
  """The method that ``threshold`` means for a group of ``size`` entries.

  ``whole``: whether every leaf of the group is known not to be split over
  devices; "auto" never sorts a group that may be split (a sort gathers it).
  """
  if threshold == "auto":
    return "sort" if whole and size <= AUTO_SORT_MAX_SIZE else "bisect"
  return threshold


def _known_whole(leaf) -> bool:
  """Whether ``leaf`` is known not to be split over devices.

  Concrete arrays and Explicit mesh axes (in the type) tell; inside ``jit``
  under Auto mesh axes XLA places a leaf only later, so that is unknown.
  """
  if jax.device_count() == 1 or not isinstance(leaf, jax.Array):
    return True  # One device, or a host value (NumPy, Python number).
  if not isinstance(leaf, jax.core.Tracer):
    return leaf.sharding.is_fully_replicated
  sharding = jax.typeof(leaf).sharding
  mesh = sharding.mesh
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  return not mesh.empty and explicit and all(s is None for s in sharding.spec)


class MagnitudePruningState(NamedTuple):
  """State of :func:`magnitude_pruning`."""

  count: jax.Array  # int32 scalar: optimizer steps taken so far.
  masks: Any  # Like params: bool arrays (True = kept) for pruned leaves,
  #              `optax.MaskedNode()` for leaves that are never pruned.
  target_sparsity: Any  # Like `masks`: float32 scalars, the sparsity asked of
  #                       each pruned leaf at its last mask update (of its
  #                       units; with "erk", the leaf's own share).


class _Plan(NamedTuple):
  """The static, per-leaf decisions taken from the params' structure."""

  treedef: Any
  pruned: tuple[bool, ...]  # Per flat leaf.
  granularities: tuple[Any, ...]  # Per flat leaf (None where unpruned).
  groups: tuple[tuple[int, ...], ...]  # Leaf indices ranked together.
  group_schedules: tuple[Callable, ...]  # One schedule per group.
  group_methods: tuple[str, ...]  # Threshold method per group.


def _is_schedule_leaf(x) -> bool:
  return x is None or callable(x) or _schedules.is_sparsity_number(x)


def _spec_values(spec, is_leaf) -> list:
  """The values a per-leaf setting can take: a prefix tree's leaves, or rules'."""
  if isinstance(spec, _paths.PathRules):
    return spec.values()
  return jax.tree.leaves(spec, is_leaf=is_leaf)


def _per_leaf(spec, tree, path_leaves, is_leaf, name):
  """One value of ``spec`` per leaf of ``tree``: by path rules or by prefix."""
  if isinstance(spec, _paths.PathRules):
    return [spec.resolve(jax.tree_util.keystr(path)) for path, _ in path_leaves]
  return _broadcast_prefix(spec, tree, is_leaf, name)


def _broadcast_prefix(prefix, tree, is_leaf, name):
  """Values of the prefix tree ``prefix`` repeated over the leaves of ``tree``."""
  values, prefix_def = jax.tree.flatten(prefix, is_leaf=is_leaf)
  try:
    subtrees = prefix_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"`{name}` must be a single value or a pytree whose structure is a"
        f" prefix of the params' structure; they do not match: {e}"
    ) from e
  return [v for v, sub in zip(values, subtrees) for _ in jax.tree.leaves(sub)]


def _is_granularity_leaf(x) -> bool:
  return x is None or isinstance(x, _granularity.Granularity)


def _default_where(path, leaf) -> bool:
  del path
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and jnp.ndim(leaf) >= 2


def magnitude_pruning(
    schedule: Union[_schedules.PruningSchedule, float, Any],
    *,
    where: Union[None, Callable[[Any, Any], bool], Any] = None,
    scope: str = "layer",
    threshold: str = "auto",
    granularity: Any = None,
    distribution: str = "uniform",
    score: Union[str, _scores.ScoreFn] = "magnitude",
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""Gradual magnitude pruning as the last link of an optax chain.

  The state holds a step count and a keep-mask per pruned leaf. At a step where
  the schedule says ``update``, the masks are recomputed from ``|params|`` (or
  another ``score``): in each leaf (``scope="layer"``) or over all leaves that
  share a schedule (``scope="global"``) exactly :math:`\mathrm{round}(s \cdot
  n)` units of smallest score are pruned, where :math:`s` is the scheduled
  sparsity (with ``distribution="erk"``, each leaf's share of it) and :math:`n`
  the number of units: entries by default, or N:M groups, blocks, channels (see
  ``granularity``). Entries already pruned score 0, so masks only grow while
  the sparsity rises. On every step the updates become

  .. math::

    u' = \begin{cases} u & \text{kept} \\ -p & \text{pruned} \end{cases}

  so that after ``optax.apply_updates`` kept weights are :math:`p + u` and
  pruned weights are exactly zero: momentum, Adam moments and weight decay
  earlier in the chain cannot revive them. Like
  ``optax.keep_params_nonnegative``, it must come last in a chain.

  Args:
    schedule: a schedule (``step -> PruningTarget``, see
      :func:`log_schedule`), a sparsity in [0, 1] (pruned once at step 0), or a
      pytree of those whose structure is a prefix of the params, giving leaves
      their own schedules; ``None`` in that pytree leaves a subtree unpruned.
    where: which leaves are pruned. ``None`` (default): floating leaves with
      ``ndim >= 2`` (kernels, not biases or norm scales). Or a predicate
      ``where(path, leaf) -> bool`` with ``path`` as in
      ``jax.tree_util.tree_flatten_with_path``, or a pytree of bools that is a
      prefix of the params, as in ``optax.masked``.
    scope: ``"layer"`` ranks each leaf on its own; ``"global"`` ranks all
      pruned leaves that share a schedule together (one threshold); the
      bisect method does so without concatenating them, the sort reference
      sorts their concatenated keys.
    threshold: ``"sort"`` (the ``jnp.sort`` reference), ``"bisect"`` (a radix
      search over the bits of ``|w|`` by counting passes, no sort), or
      ``"auto"`` (sort for groups of at most ``AUTO_SORT_MAX_SIZE`` entries
      that are known not to be split over devices, bisect otherwise). All
      give identical masks.
    granularity: what one decision prunes: ``None`` or
      :func:`unstructured` (entries), :func:`n_of_m`, :func:`blocks`,
      :func:`channels`; or a pytree of those that is a prefix of the params,
      or :func:`by_path` rules, for per-leaf choices. The sparsity then counts
      units (groups, blocks, channels). With ``scope="global"`` the leaves
      that share a schedule and a granularity are ranked together.
    distribution: how a schedule's sparsity is shared among its leaves with
      ``scope="layer"``: ``"uniform"`` (each leaf at the schedule's sparsity)
      or ``"erk"`` (Erdos-Renyi-Kernel densities; exactly
      ``round(s * total units)`` pruned over the leaves, none beyond 1).
      Leaves with their own schedule (or ``None``) in ``schedule`` are
      outside the distribution: that is how layers are kept dense.
    score: what ranks the entries: ``"magnitude"`` (``|w|``),
      ``"saliency"`` (``|w * u|`` with ``u`` the update this transformation
      receives), ``"random"`` (uniform, from ``seed`` and the step count:
      reproducible, also after a resume), or a callable
      ``score(param, update, key) -> array`` of the param's shape.
    seed: integer seed of the keys passed to ``score``.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[0.1, -2.0], [0.3, 4.0]]), "b": jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(0.0), optax_prune.magnitude_pruning(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[ 0., -2.],
           [ 0.,  4.]], dtype=float32)

  References:
    Zhu & Gupta, `To prune, or not to prune
    <https://arxiv.org/abs/1710.01878>`_, 2017; PaddlePaddle's dynamic and
    static pruning hooks; Evci et al., `Rigging the Lottery
    <https://arxiv.org/abs/1911.11134>`_, 2020 (ERK).
  """
  if scope not in SCOPES:
    raise ValueError(f"`scope` must be one of {SCOPES}; got {scope!r}.")
  if threshold not in THRESHOLDS:
    raise ValueError(
        f"`threshold` must be one of {THRESHOLDS}; got {threshold!r}."
    )
  if distribution not in _distributions.DISTRIBUTIONS:
    raise ValueError(
        f"`distribution` must be one of {_distributions.DISTRIBUTIONS}; got"
        f" {distribution!r}."
    )
  if distribution != "uniform" and scope != "layer":
    raise ValueError(
        f"`distribution={distribution!r}` shares a target among leaves ranked"
        " on their own: it needs `scope='layer'` (global scope already ranks"
        " the leaves together)."
    )
  score_fn = _scores.resolve(score)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"`seed` must be an integer; got {seed!r}.")
  seed = int(seed)
  bad = [g for g in _spec_values(granularity, _is_granularity_leaf)
         if not _is_granularity_leaf(g)]
  if bad:
    raise ValueError(
        "`granularity` must be None, a granularity (`optax_prune.unstructured()`,"
        " `n_of_m(...)`, `blocks(...)`, `channels(...)`), a pytree of those or"
        f" `by_path` rules; it holds {bad[0]!r}."
    )
  schedule_values = _spec_values(schedule, _is_schedule_leaf)
  # Check every schedule now, so a bad one never fails inside jit.
  checked = {}
  for i, value in enumerate(schedule_values):
    if value is not None and id(value) not in checked:
      name = "schedule" if len(schedule_values) == 1 else f"schedule[{i}]"
      checked[id(value)] = _schedules.check_schedule(name, value)
  if not callable(where) and where is not None:
    bad = [
        w for w in jax.tree.leaves(where) if not isinstance(w, (bool, jnp.bool_))
    ]
    if bad:
      raise ValueError(
          "`where` must be None, a predicate `(path, leaf) -> bool`, or a"
          f" pytree of Python bools; it holds {bad[0]!r}."
      )

  def make_plan(params) -> _Plan:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in path_leaves]
    if where is None or callable(where):
      predicate = where or _default_where
      chosen = [bool(predicate(path, leaf)) for path, leaf in path_leaves]
    else:
      chosen = [bool(w) for w in _broadcast_prefix(where, params, None, "where")]
    schedules = _per_leaf(
        schedule, params, path_leaves, _is_schedule_leaf, "schedule")
    granularities = _per_leaf(
        granularity, params, path_leaves, _is_granularity_leaf, "granularity")
    pruned = tuple(c and s is not None for c, s in zip(chosen, schedules))
    # An empty leaf has no units under any granularity: it must not take a
    # share of a global or ERK budget (a (0, 4) leaf has 4 empty channels).
    granularities = [
        (g if g and jnp.size(leaf) else _granularity.Unstructured()) if p else None
        for g, p, (_, leaf) in zip(granularities, pruned, path_leaves)
    ]
    units = []
    for (path, leaf), is_pruned, g in zip(path_leaves, pruned, granularities):
      dtype = jnp.result_type(leaf)
      name = jax.tree_util.keystr(path)
      if is_pruned and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`where` selects leaf {name} of dtype {dtype}, but only floating"
            " leaves can be pruned; exclude it from `where`."
        )
      if is_pruned:
        g.check(name, jnp.shape(leaf))
        _scores.check(score_fn, name, leaf)
      units.append(
          _granularity.unit_count(g, jnp.shape(leaf)) if is_pruned else 0)
    groups: dict = {}
    for i, is_pruned in enumerate(pruned):
      if is_pruned:
        key = (id(schedules[i]), granularities[i]) if scope == "global" else i
        groups.setdefault(key, []).append(i)
    group_list = tuple(tuple(g) for g in groups.values())
    if distribution == "erk":
      totals: dict = {}
      for i in (g[0] for g in group_list):
        totals[id(schedules[i])] = totals.get(id(schedules[i]), 0) + units[i]
      if max(totals.values(), default=0) > _thresholds.MAX_GROUP_SIZE:
        raise ValueError(
            "`distribution='erk'` shares one count among the leaves of a"
            f" schedule; they hold {max(totals.values())} units, and at most"
            " 2**31 - 1 are supported. Give some leaves their own schedule."
        )
    methods = []
    for group in group_list:
      size = sum(units[i] for i in group)
      if size > _thresholds.MAX_GROUP_SIZE:
        raise ValueError(
            f"a pruning group holds {size} entries; at most 2**31 - 1 are"
            " supported. Use `scope='layer'` or split the leaves."
        )
      whole = all(_known_whole(leaves[i]) for i in group)
      methods.append(resolve_threshold(threshold, size, whole))
    return _Plan(
        treedef=treedef,
        pruned=pruned,
        granularities=tuple(granularities),
        groups=group_list,
        group_schedules=tuple(checked[id(schedules[g[0]])] for g in group_list),
        group_methods=tuple(methods),
    )

  def init_fn(params):
    plan = make_plan(params)
    leaves = plan.treedef.flatten_up_to(params)
    # `ones_like` places each mask like its param, sharded ones included.
    masks = [
        jnp.ones_like(x, dtype=jnp.bool_) if p else optax.MaskedNode()
        for x, p in zip(leaves, plan.pruned)
    ]
    targets = [
        jnp.zeros((), jnp.float32) if p else optax.MaskedNode()
        for p in plan.pruned
    ]
    return MagnitudePruningState(
        count=jnp.zeros((), jnp.int32),
        masks=plan.treedef.unflatten(masks),
        target_sparsity=plan.treedef.unflatten(targets),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    plan = make_plan(params)
    masks = _flatten_like(state.masks, plan, "state.masks")
    targets = _flatten_like(state.target_sparsity, plan, "state.target_sparsity")
    param_leaves = plan.treedef.flatten_up_to(params)
    try:
      update_leaves = plan.treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"`updates` must have the structure of `params`: {e}"
      ) from e

    # One `lax.cond` per schedule: its groups are recomputed together.
    by_schedule: dict = {}
    for group, schedule, method in zip(
        plan.groups, plan.group_schedules, plan.group_methods
    ):
      by_schedule.setdefault(id(schedule), (schedule, []))[1].append(
          (group, method)
      )
    for schedule, jobs in by_schedule.values():
      target = schedule(state.count)
      sparsity = _thresholds.clip_sparsity(target.sparsity)
      indices = [i for group, _ in jobs for i in group]

      def recompute(jobs=jobs, sparsity=sparsity, indices=indices):
        found, shares = _recompute_masks(
            plan, jobs, sparsity, param_leaves, update_leaves, masks,
            state.count)
        return [found[i] for i in indices], [shares[i] for i in indices]

      old = ([masks[i] for i in indices], [targets[i] for i in indices])
      new_masks, new_targets = lax.cond(
          target.update, recompute, lambda old=old: old
      )
      for i, m, t in zip(indices, new_masks, new_targets):
        masks[i], targets[i] = m, t

    new_updates = [
        jnp.where(m, u, -p.astype(jnp.result_type(u))) if pruned else u
        for u, p, m, pruned in zip(update_leaves, param_leaves, masks, plan.pruned)
    ]
    new_state = MagnitudePruningState(
        count=optax.safe_int32_increment(state.count),
        masks=plan.treedef.unflatten(masks),
        target_sparsity=plan.treedef.unflatten(targets),
    )
    return plan.treedef.unflatten(new_updates), new_state

  def _recompute_masks(
      plan, jobs, sparsity, param_leaves, update_leaves, old_masks, count):
    """New keep-masks and targets, by leaf index, for one schedule's groups."""
    key = jax.random.fold_in(jax.random.key(seed), count)
    scores, unit_scores, sharding = {}, {}, {}
    for group, _ in jobs:
      for i in group:
        score = score_fn(
            param_leaves[i], update_leaves[i], jax.random.fold_in(key, i))
        if score_fn is not _scores.magnitude:
          # Pruned entries score 0, so that masks stay nested as the sparsity
          # rises whatever the score (a new random draw would bring pruned
          # weights back). Pruned weights are 0 already: magnitude needs no pass.
          score = jnp.where(old_masks[i], score, jnp.zeros((), score.dtype))
        # Under Explicit mesh axes the reshapes of structured units need the
        # leaf whole: gather its scores (as the sort reference does) and put
        # the mask back where the leaf lives. Auto axes leave this to XLA.
        sharding[i] = (
            None if isinstance(plan.granularities[i], _granularity.Unstructured)
            else _thresholds.explicit_sharding(param_leaves[i]))
        if sharding[i]:
          score = jax.sharding.reshard(score, P())
        scores[i] = score
        unit_scores[i] = plan.granularities[i].unit_scores(scores[i])
    sizes = [sum(unit_scores[i].size for i in group) for group, _ in jobs]
    if distribution == "erk":  # Layer scope: one leaf per group.
      ratios = [_distributions.erk_ratio(param_leaves[g[0]].shape) for g, _ in jobs]
      counts = _distributions.erk_prune_counts(sizes, ratios, sparsity)
      shares = [
          c.astype(jnp.float32) / max(n, 1) for c, n in zip(counts, sizes)
      ]
    else:
      counts = _distributions.uniform_prune_counts(sizes, sparsity)
      shares = [sparsity] * len(jobs)
    masks, targets = {}, {}
    # Groups that share a method share one kernel call (one search loop).
    for method in sorted({m for _, m in jobs}):
      chosen = [j for j, (_, m) in enumerate(jobs) if m == method]
      found = _thresholds.keep_masks_for_counts(
          [[unit_scores[i] for i in jobs[j][0]] for j in chosen],
          [counts[j] for j in chosen], method)
      for j, unit_keeps in zip(chosen, found):
        for i, unit_keep in zip(jobs[j][0], unit_keeps):
          mask = plan.granularities[i].expand(unit_keep, scores[i])
          masks[i] = jax.sharding.reshard(mask, sharding[i]) if sharding[i] else mask
          targets[i] = shares[j]
    return masks, targets

  return optax.GradientTransformation(init_fn, update_fn)


def _flatten_like(tree, plan: _Plan, name: str) -> list:
  """Flattens a state field built by ``init`` for params of ``plan``."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  try:
    # Up to the params' leaves: a MaskedNode stands where a leaf is unpruned
    # (and params from `optax.masked` may hold MaskedNodes of their own).
    leaves = plan.treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    leaves = None
  if leaves is None or [is_masked(x) for x in leaves] != [
      not p for p in plan.pruned
  ]:
    raise ValueError(
        f"`params` do not match the pruning state: {name} was built by `init`"
        " for params of another structure. Call `tx.init(params)` with the"
        " params you update."
    )
  return leaves


def find_pruning_state(opt_state) -> MagnitudePruningState:
  """Finds the :class:`MagnitudePruningState` inside a (chained) optimizer state.

  Works on the states of ``optax.chain``, ``optax.inject_hyperparams``, flax
  ``TrainState.opt_state`` and ``nnx.Optimizer.opt_state``.

  Args:
    opt_state: any optimizer state pytree.

  Returns:
    The single pruning state found.

  Raises:
    ValueError: if there is none, or more than one.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5))
    >>> state = tx.init({"w": jnp.ones((2, 2))})
    >>> int(optax_prune.find_pruning_state(state).count)
    0
  """
  found = [
      x
      for x in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, MagnitudePruningState)
      )
      if isinstance(x, MagnitudePruningState)
  ]
  if len(found) != 1:
    raise ValueError(
        "`opt_state` must hold exactly one MagnitudePruningState (from"
        f" `optax_prune.magnitude_pruning`); found {len(found)}."
    )
  return found[0]
