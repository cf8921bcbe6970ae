"""Update rules: how one schedule's masks are recomputed at a mask update.

A rule is a function ``rule(plan, sparsity, inputs) -> MaskUpdate``: given a
:class:`~optax_prune._plan.SchedulePlan`, the schedule's sparsity (a float32
scalar as the schedule gave it: the distribution clips it to [0, 1], NaN
counting as 0) and the :class:`MaskInputs` of the step, it returns the new
keep-masks, target sparsities and pruned unit counts of ``plan.leaves``, in
that order. The transformation calls it inside a ``lax.cond`` on the
schedule's ``update`` flag and does nothing else with masks, so a new rule
(drop-and-grow, one-shot scores) is a new function here, not a branch there.

:func:`prune_smallest` is gradual pruning, one stage per line:
scores -> unit scores -> counts -> kernel -> expand.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from optax_prune import _coupling
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _placement
from optax_prune import _plan
from optax_prune import _scores
from optax_prune import _thresholds


class MaskInputs(NamedTuple):
  """What a rule may read at a mask update; leaves are indexed like params'."""

  params: Sequence[jax.Array]
  updates: Sequence[jax.Array]  # What the transformation received.
  masks: Sequence[Any]  # Current bool keep-masks; MaskedNode where unpruned.
  pruned_units: Sequence[Any]  # int32 units each leaf has lost; None if unpruned.
  key: jax.Array  # This step's PRNG key (`_scores.step_key`).
  count: jax.Array  # int32 scalar: the step (the state's count before it).
  # The raw gradient, where the caller passes it (`update(..., grads=grads)`,
  # or a wrapper that owns the optimizer, `_sparse`); else None: a chained
  # link sees only the updates.
  grads: Optional[Sequence[jax.Array]] = None


class MaskUpdate(NamedTuple):
  """What a rule returns, one entry per leaf of ``plan.leaves``."""

  masks: list[jax.Array]  # bool keep-masks, shaped and placed like the leaves.
  # Vectors over the leaves (or lists of scalars), as the state holds them:
  # one op per schedule, not one per leaf, in the compiled step.
  targets: jax.Array  # float32: the sparsity asked of each.
  pruned_units: jax.Array  # int32: units each leaf has lost.


class MaskRule(Protocol):
  """The rule protocol (see the module docstring)."""

  def __call__(
      self, plan: _plan.SchedulePlan, sparsity: jax.Array, inputs: MaskInputs
  ) -> MaskUpdate:
    ...


def prune_smallest(
    plan: _plan.SchedulePlan, sparsity: jax.Array, inputs: MaskInputs
) -> MaskUpdate:
  """Gradual pruning: each group loses its share of units, smallest score first.

  Exactly the count that the distribution gives each group is pruned, from
  the scores of ``plan.score``; entries pruned before score 0 and no group
  loses fewer units than it has already, so masks only grow while the
  sparsity rises.
  """
  leaves = plan.leaves
  # 1-2. Scores, whole on each device where the granularity reshapes them; unit scores.
  scores, shardings, units = {}, {}, {}
  for leaf in leaves:
    i = leaf.index
    signal = inputs.updates[i] if inputs.grads is None else inputs.grads[i]
    scores[i], shardings[i], units[i] = leaf_scores(
        plan.score, leaf.granularity, inputs.params[i], signal, inputs.masks[i],
        _scores.leaf_key(inputs.key, i))
  # 3. Counts: how many units each row (a group, or a layer of a stack ranked
  # per layer) loses.
  counts, shares = plan.distribution.counts(
      [n for g in plan.groups for n in g.row_units],
      [shape for g in plan.groups for shape in g.row_shapes], sparsity,
      pruned=pruned_per_row(plan, inputs.pruned_units))
  # 4. Kernel: groups that share a method share one call (one search loop).
  keeps = keep_units(plan, units, counts)
  # 5. Expand the unit decisions to masks, placed like their leaves.
  masks = [expand(leaf.granularity, keeps[leaf.index][0], scores[leaf.index],
                  shardings[leaf.index]) for leaf in leaves]
  return MaskUpdate(masks=masks, targets=per_leaf(plan, shares),
                    pruned_units=pruned_units(plan, counts, keeps))


def pruned_per_row(plan: _plan.SchedulePlan, pruned: Sequence[Any]) -> jax.Array:
  """int32 units each row of ``plan`` has lost, from the per-leaf entries of
  ``pruned`` (a vector over its layers for a stack)."""
  rows = []
  for g in plan.groups:
    lost = [jnp.reshape(pruned[leaf.index], -1) for leaf in g.leaves]
    rows.append(lost[0] if g.by_layer else
                sum(jnp.sum(x, dtype=jnp.int32) for x in lost).reshape(1))
  return jnp.concatenate(rows).astype(jnp.int32)


def leaf_scores(score: _scores.Score, granularity: Any, param: jax.Array,
                signal: jax.Array, mask: jax.Array, key: jax.Array):
  """Stages 1-2 for one leaf: ``(scores, sharding, unit scores)``.

  The scores are gathered whole on each device where the granularity
  reshapes them (``sharding``: where :func:`expand` puts the mask back; None
  otherwise).
  """
  scores = score(param, signal, mask, key)
  sharding = None
  if granularity.needs_whole_leaf:
    scores, sharding = _placement.gathered(scores)
  return scores, sharding, granularity.unit_scores(scores)


def expand(granularity: Any, unit_keep: jax.Array, scores: jax.Array, sharding: Any):
  """Stage 5 for one leaf: its keep-mask, placed like the leaf."""
  return _placement.put_back(granularity.expand(unit_keep, scores), sharding)


def per_leaf(plan: _plan.SchedulePlan, per_row: jax.Array) -> jax.Array:
  """A float vector over the rows of ``plan`` as one over ``plan.leaves``: a
  leaf takes its group's value; a stack ranked per layer, the mean of its
  layers' (one gather, and one segment sum where a stack is ranked per layer)."""
  per_row = jnp.asarray(per_row)
  rows_of = [range(start, start + g.rows) for start, g in zip(plan.row_starts, plan.groups)
             for _ in g.leaves]
  if not any(g.by_layer for g in plan.groups):
    return per_row[jnp.asarray([r[0] for r in rows_of], jnp.int32)]
  row_of = [r for rows in rows_of for r in rows]
  leaf_of = [k for k, rows in enumerate(rows_of) for _ in rows]
  return jax.ops.segment_sum(
      per_row[jnp.asarray(row_of, jnp.int32)], jnp.asarray(leaf_of, jnp.int32),
      len(rows_of), indices_are_sorted=True) / np.asarray([len(r) for r in rows_of],
                                                          np.float32)


def pruned_units(plan: _plan.SchedulePlan, counts: jax.Array, keeps: dict) -> jax.Array:
  """int32 units lost per part of ``plan.leaves`` (one per leaf, one per layer
  of a stack), as the state holds them: a lone leaf's or layer's is its row's
  count (the kernels prune exactly that many); leaves ranked together count
  their pruned units (per layer for a stack)."""
  row_of, counted, at = [], [], []
  for start, g in zip(plan.row_starts, plan.groups):
    for leaf in g.leaves:
      stacked = isinstance(leaf.granularity, _granularity.PerLayer)
      if g.by_layer or (len(g.leaves) == 1 and not stacked):
        row_of.extend(range(start, start + g.rows))
        continue
      lost = ~keeps[leaf.index][0]  # Ranked with others: count, per layer for a stack.
      lost = count_per_row(lost, stacked)
      at.extend(range(len(row_of), len(row_of) + lost.shape[0]))
      counted.append(lost)
      row_of.extend([start] * lost.shape[0])
  pruned = jnp.asarray(counts).astype(jnp.int32)[jnp.asarray(row_of, jnp.int32)]
  if counted:
    pruned = pruned.at[jnp.asarray(at, jnp.int32)].set(jnp.concatenate(counted))
  return pruned


def count_per_row(x: jax.Array, by_layer: bool) -> jax.Array:
  """int32 True entries of bool ``x``: per layer (its leading axis) if
  ``by_layer``, else one, as a vector. Sums over axes, not over a reshape:
  merging split axes would gather them under Auto mesh axes."""
  axes = tuple(range(1 if by_layer else 0, x.ndim))
  return _placement.replicated(jnp.sum(x, axis=axes, dtype=jnp.int32).reshape(-1))


def keep_units(plan: _plan.SchedulePlan, units: dict, counts: Sequence[jax.Array]) -> dict:
  """The kernel stage: each row of ``plan`` loses ``counts[row]`` units of
  smallest score (``units``: leaf index -> unit scores; a stack ranked per
  layer has one row per layer, its unit scores' leading axis).

  Groups that share a threshold method share one kernel call (one search
  loop). Returns leaf index -> (bool unit keep-mask, the index of its group).
  """
  keeps, starts = {}, plan.row_starts
  count = lambda j, g: (counts[starts[j]:starts[j] + g.rows] if g.by_layer
                        else counts[starts[j]])
  for method in sorted({g.method for g in plan.groups}):
    chosen = [j for j, g in enumerate(plan.groups) if g.method == method]
    found = _thresholds.keep_masks_for_counts(
        [[units[leaf.index] for leaf in plan.groups[j].leaves] for j in chosen],
        [count(j, plan.groups[j]) for j in chosen], method)
    for j, unit_keeps in zip(chosen, found):
      keeps.update({leaf.index: (keep, j)
                    for leaf, keep in zip(plan.groups[j].leaves, unit_keeps)})
  return keeps


def ranked_within(selected: jax.Array, values: jax.Array) -> jax.Array:
  """Scores that rank the ``selected`` entries by ``|values|`` above all others.

  Unselected entries score 0; selected ones score ``|v|`` moved up by one ulp
  (``nextafter``: strictly increasing, so their order, ties, ``inf`` and NaN
  are kept), so a selected 0 still outranks every unselected entry.
  """
  dtype = jnp.promote_types(values.dtype, jnp.float32)
  magnitude = jnp.abs(values.astype(dtype))
  return jnp.where(selected, jnp.nextafter(magnitude, jnp.asarray(jnp.inf, dtype)),
                   jnp.zeros((), dtype))


GrowScore = Callable[[jax.Array, Optional[jax.Array], jax.Array], jax.Array]


def drop_and_grow(
    grow_score: GrowScore, drop_fraction: Callable[[jax.Array], jax.Array],
    regrow_dropped: bool = True,
) -> MaskRule:
  r"""Dynamic sparse training (SET, RigL): drop the weakest kept weights, grow
  as many elsewhere, so every leaf keeps exactly its count.

  Per leaf with :math:`k` kept of :math:`n` entries and drop fraction
  :math:`f` = ``drop_fraction(count)`` (clipped to [0, 1]), :math:`d =
  \mathrm{round}(f k)` (in float32: exact below 2**24 kept entries, within one
  above; the same :math:`d` is dropped and grown, so counts never drift) kept
  entries of smallest ``|w|`` are dropped, then
  :math:`d` entries of largest ``|grow_score(param, grad, key)|`` are grown
  among the entries not kept after the drop: the dropped ones included
  (RigL's algorithm; such an entry keeps its value), or, with
  ``regrow_dropped=False``, only among those pruned before the step (then
  :math:`d \le n - k`). Ties go by position, as in the kernels. The
  schedule's sparsity is not read: the counts set at ``init`` never change.
  Unstructured leaves only (``_sparse`` refuses other granularities).
  """

  def rule(plan, sparsity, inputs):
    del sparsity  # The counts stay those of `init`.
    leaves = plan.leaves
    fraction = _distributions.clip_sparsity(drop_fraction(inputs.count))
    # Unit-shaped (a stack's layers first, `PerLayer`), and counted per row:
    # one per leaf, one per layer of a stack ranked per layer.
    units = lambda leaf, x: leaf.granularity.unit_scores(x)
    old = {leaf.index: units(leaf, inputs.masks[leaf.index]) for leaf in leaves}
    row_units = np.asarray([n for g in plan.groups for n in g.row_units], np.int32)
    kept = jnp.concatenate([count_per_row(old[leaf.index], g.by_layer)
                            for g in plan.groups for leaf in g.leaves])
    drop = jnp.round(fraction * kept.astype(jnp.float32)).astype(jnp.int32)
    if not regrow_dropped:
      drop = jnp.minimum(drop, row_units - kept)
    # Drop: all pruned entries and the `drop` smallest kept ones lose.
    after_drop = keep_units(plan, {
        leaf.index: ranked_within(old[leaf.index], units(leaf, inputs.params[leaf.index]))
        for leaf in leaves}, row_units - kept + drop)
    after_drop = {i: keep for i, (keep, _) in after_drop.items()}
    # Grow: the `drop` candidates of largest |grow score| win.
    candidates = {i: ~(after_drop[i] if regrow_dropped else old[i]) for i in old}
    scores = grow_scores_of_alike_leaves(grow_score, [
        (inputs.params[leaf.index], None if inputs.grads is None else inputs.grads[leaf.index])
        for leaf in leaves], inputs.key, [leaf.index for leaf in leaves])
    grown = keep_units(plan, {
        leaf.index: ranked_within(candidates[leaf.index], units(leaf, score))
        for leaf, score in zip(leaves, scores)}, row_units - drop)
    masks = [leaf.granularity.expand(after_drop[leaf.index] | grown[leaf.index][0],
                                     inputs.params[leaf.index]) for leaf in leaves]
    pruned = pruned_per_row(plan, inputs.pruned_units)
    return MaskUpdate(masks=masks, pruned_units=pruned, targets=per_leaf(
        plan, pruned.astype(jnp.float32) / np.maximum(row_units, 1).astype(np.float32)))

  return rule


def grow_scores_of_alike_leaves(fn: Callable, args: Sequence[tuple], key: jax.Array,
                   indices: Sequence[int]) -> list:
  """``[fn(*args[k], leaf_key(key, indices[k])) for k]``, leaves whose
  arguments share shapes, dtypes and placement run as one instance of ``fn``
  (a ``lax.map`` that picks each leaf's arguments by ``lax.switch``): a
  random score compiles one PRNG stream per leaf shape, not one per leaf.
  Same values as the calls one by one (the keys are the leaves' own). The
  kernels' sibling for scalars is ``_thresholds._per_alike_leaf``; this one
  returns arrays, so it maps instead of writing into a loop carry."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))
  by_type: dict = {}
  for k, a in enumerate(args):
    by_type.setdefault(tuple(None if x is None else jax.typeof(x) for x in a), []).append(k)
  out: list = [None] * len(args)
  for members in by_type.values():
    if len(members) == 1:
      (k,) = members
      out[k] = fn(*args[k], keys[k])
      continue
    branches = [lambda a=args[k]: a for k in members]
    member_keys = keys[jnp.asarray(members, jnp.int32)]
    found = lax.map(lambda j: fn(*lax.switch(j, branches), member_keys[j]),
                    jnp.arange(len(members)))
    for j, k in enumerate(members):
      out[k] = found[j]
  return out


def prune_coupled(coupled: Any) -> MaskRule:
  r"""Structured pruning over coupled channel groups (see ``_coupling``).

  ``coupled`` is a ``_granularity.CoupledChannels``. Per group of :math:`C`
  channels, each channel's importance is ``coupled.importance_of(...)``
  (by default the sum over the group's parameter members of the L1 or L2
  norm of the member's slice at the channel), and exactly
  :math:`\max(\text{coupled.pruned\_count}(s, C), \text{pruned before})`
  channels of least importance are pruned (``round(s C)`` unless
  ``round_to`` moves it), ties by position; channels pruned before rank
  below every kept one, so masks only grow. A member's mask is the product
  of the keep vectors of the groups it belongs to, along their axes (a
  kernel between two groups loses rows and columns). Reported per leaf:
  pruned entries (units are entries) and their share as the target.
  """
  groups = coupled.groups

  def rule(plan, sparsity, inputs):
    leaves = {_paths_key(leaf.path): leaf for leaf in plan.leaves}
    sparsity = _distributions.clip_sparsity(sparsity)
    scores, signals = {}, {}
    for leaf in plan.leaves:
      i = leaf.index
      signals[i] = inputs.updates[i] if inputs.grads is None else inputs.grads[i]
      scores[i] = plan.score(inputs.params[i], signals[i], inputs.masks[i],
                             _scores.leaf_key(inputs.key, i))
    keeps = {leaf.index: [] for leaf in plan.leaves}
    ranked, counts = [], []
    for number, group in enumerate(groups):
      members = [(leaves[view[0]].index, view) for view in group.views()]
      unit = coupled.importance_of(number, members, scores, inputs.params, signals)
      kept_before = functools.reduce(jnp.logical_or, [
          jnp.any(mask, axis=_other_axes(mask, axis)) for mask, axis in (
              _coupling.channel_view(inputs.masks[i], *view[1:])
              for i, view in members)])
      counts.append(jnp.maximum(
          coupled.pruned_count(sparsity, group.size),
          (group.size - jnp.sum(kept_before, dtype=jnp.int32)).astype(jnp.uint32)))
      ranked.append([ranked_within(kept_before, unit)])
    # One call: groups of one width share one kernel instance.
    found = _thresholds.keep_masks_for_counts(ranked, counts, "sort")
    for group, (keep,) in zip(groups, found):
      for view in group.views():
        keeps[leaves[view[0]].index].append((view, keep))
    masks = []
    for leaf in plan.leaves:
      mask = jnp.ones(leaf.shape, bool)
      for (_, axis, outer, inner), keep in keeps[leaf.index]:
        view, channel_axis = _coupling.channel_view(mask, axis, outer, inner)
        shape = [1] * view.ndim
        shape[channel_axis] = keep.shape[0]
        mask = (view & keep.reshape(shape)).reshape(leaf.shape)
      masks.append(mask)
    pruned = jnp.stack([jnp.sum(~m, dtype=jnp.int32) for m in masks])
    sizes = np.maximum([m.size for m in masks], 1).astype(np.float32)
    return MaskUpdate(masks=masks, targets=pruned.astype(jnp.float32) / sizes,
                      pruned_units=pruned)

  return rule


def _paths_key(path: str) -> str:
  """A plan's leaf path as ``channel_groups`` names it (nnx's ``.value`` dropped)."""
  return path[:-len(".value")] if path.endswith(".value") else path


def _other_axes(x: jax.Array, axis: int) -> tuple[int, ...]:
  return tuple(a for a in range(x.ndim) if a != axis)
