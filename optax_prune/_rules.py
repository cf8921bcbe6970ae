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
import jax.numpy as jnp
import numpy as np

from optax_prune import _coupling
from optax_prune import _distributions
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
  # 3. Counts: how many units each group loses.
  counts, shares = plan.distribution.counts(
      [g.units for g in plan.groups],
      [g.leaves[0].shape for g in plan.groups], sparsity,
      pruned=jnp.stack([sum(inputs.pruned_units[leaf.index] for leaf in g.leaves)
                        for g in plan.groups]))
  # 4. Kernel: groups that share a method share one call (one search loop).
  keeps = keep_units(plan, units, counts)
  # 5. Expand the unit decisions to masks, placed like their leaves.
  masks = [expand(leaf.granularity, keeps[leaf.index][0], scores[leaf.index],
                  shardings[leaf.index]) for leaf in leaves]
  return MaskUpdate(masks=masks, targets=per_leaf(plan, shares),
                    pruned_units=pruned_units(plan, counts, keeps))


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


def per_leaf(plan: _plan.SchedulePlan, per_group: jax.Array) -> jax.Array:
  """A vector over ``plan.groups`` spread over ``plan.leaves`` (one gather)."""
  group_of = [j for j, g in enumerate(plan.groups) for _ in g.leaves]
  return jnp.asarray(per_group)[jnp.asarray(group_of, jnp.int32)]


def pruned_units(plan: _plan.SchedulePlan, counts: jax.Array, keeps: dict) -> jax.Array:
  """int32 units lost per leaf of ``plan.leaves``: a lone leaf's is its group's
  count (the kernels prune exactly that many); leaves ranked together count
  their pruned units."""
  pruned = per_leaf(plan, jnp.asarray(counts).astype(jnp.int32))
  shared = [k for k, leaf in enumerate(plan.leaves)
            if len(plan.groups[keeps[leaf.index][1]].leaves) > 1]
  if shared:
    counted = [jnp.sum(~keeps[plan.leaves[k].index][0], dtype=jnp.int32) for k in shared]
    pruned = pruned.at[jnp.asarray(shared, jnp.int32)].set(jnp.stack(counted))
  return pruned


def keep_units(plan: _plan.SchedulePlan, units: dict, counts: Sequence[jax.Array]) -> dict:
  """The kernel stage: each group of ``plan`` loses ``counts[g]`` units of
  smallest score (``units``: leaf index -> unit scores).

  Groups that share a threshold method share one kernel call (one search
  loop). Returns leaf index -> (bool unit keep-mask, the index of its group).
  """
  keeps = {}
  for method in sorted({g.method for g in plan.groups}):
    chosen = [j for j, g in enumerate(plan.groups) if g.method == method]
    found = _thresholds.keep_masks_for_counts(
        [[units[leaf.index] for leaf in plan.groups[j].leaves] for j in chosen],
        [counts[j] for j in chosen], method)
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
    old = {leaf.index: inputs.masks[leaf.index] for leaf in leaves}
    sizes = {leaf.index: leaf.units for leaf in leaves}
    kept = {i: jnp.sum(m, dtype=jnp.int32) for i, m in old.items()}
    drop = {i: jnp.round(fraction * kept[i].astype(jnp.float32)).astype(jnp.int32)
            for i in old}
    if not regrow_dropped:
      drop = {i: jnp.minimum(d, sizes[i] - kept[i]) for i, d in drop.items()}
    by_group = lambda per_leaf: [per_leaf[g.leaves[0].index] for g in plan.groups]
    # Drop: all pruned entries and the `drop` smallest kept ones lose.
    after_drop = keep_units(
        plan, {i: ranked_within(m, inputs.params[i]) for i, m in old.items()},
        by_group({i: sizes[i] - kept[i] + drop[i] for i in old}))
    after_drop = {i: keep for i, (keep, _) in after_drop.items()}
    # Grow: the `drop` candidates of largest |grow score| win.
    candidates = {i: ~(after_drop[i] if regrow_dropped else old[i]) for i in old}
    grown = keep_units(
        plan, {i: ranked_within(candidates[i], grow_score(
            inputs.params[i], None if inputs.grads is None else inputs.grads[i],
            _scores.leaf_key(inputs.key, i))) for i in old},
        by_group({i: sizes[i] - drop[i] for i in old}))
    masks = [after_drop[leaf.index] | grown[leaf.index][0] for leaf in leaves]
    pruned = jnp.stack([inputs.pruned_units[leaf.index] for leaf in leaves])
    units = np.maximum([leaf.units for leaf in leaves], 1).astype(np.float32)
    return MaskUpdate(masks=masks, targets=pruned.astype(jnp.float32) / units,
                      pruned_units=pruned)

  return rule


def prune_coupled(groups: Sequence[Any], channel_scores: Callable) -> MaskRule:
  r"""Structured pruning over coupled channel groups (see ``_coupling``).

  Per group of :math:`C` channels, a channel's score is the sum over the
  group's parameter members of ``channel_scores(member scores, view)`` (the
  L1 or L2 norm of the member's slice at the channel; ``view`` is the
  member's ``(path, axis, outer, inner)``, see ``ChannelGroup.views``), and exactly
  :math:`\max(\mathrm{round}(s C), \text{pruned before})` channels of
  smallest score are pruned, ties by position; channels pruned before rank
  below every kept one, so masks only grow. A member's mask is the product
  of the keep vectors of the groups it belongs to, along their axes (a
  kernel between two groups loses rows and columns). Reported per leaf:
  pruned entries (units are entries) and their share as the target.
  """

  def rule(plan, sparsity, inputs):
    leaves = {_paths_key(leaf.path): leaf for leaf in plan.leaves}
    sparsity = _distributions.clip_sparsity(sparsity)
    scores = {}
    for leaf in plan.leaves:
      i = leaf.index
      signal = inputs.updates[i] if inputs.grads is None else inputs.grads[i]
      scores[i] = plan.score(inputs.params[i], signal, inputs.masks[i],
                             _scores.leaf_key(inputs.key, i))
    keeps = {leaf.index: [] for leaf in plan.leaves}
    ranked, counts = [], []
    for group in groups:
      members = [(leaves[view[0]].index, view) for view in group.views()]
      unit = sum(channel_scores(scores[i], view) for i, view in members)
      kept_before = functools.reduce(jnp.logical_or, [
          jnp.any(mask, axis=_other_axes(mask, axis)) for mask, axis in (
              _coupling.channel_view(inputs.masks[i], *view[1:])
              for i, view in members)])
      counts.append(jnp.maximum(
          _distributions.prune_count(sparsity, group.size),
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
