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

from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp

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


class MaskUpdate(NamedTuple):
  """What a rule returns, one entry per leaf of ``plan.leaves``."""

  masks: list[jax.Array]  # bool keep-masks, shaped and placed like the leaves.
  targets: list[jax.Array]  # float32 scalars: the sparsity asked of each.
  pruned_units: list[jax.Array]  # int32 scalars: units each leaf has lost.


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
  # 1. Scores, whole on each device where the granularity reshapes them.
  scores, shardings = {}, {}
  for leaf in leaves:
    i = leaf.index
    score = plan.score(inputs.params[i], inputs.updates[i], inputs.masks[i],
                       _scores.leaf_key(inputs.key, i))
    if leaf.granularity.needs_whole_leaf:
      score, shardings[i] = _placement.gathered(score)
    scores[i] = score
  # 2. Unit scores.
  units = {leaf.index: leaf.granularity.unit_scores(scores[leaf.index]) for leaf in leaves}
  # 3. Counts: how many units each group loses.
  counts, shares = plan.distribution.counts(
      [g.units for g in plan.groups],
      [g.leaves[0].shape for g in plan.groups], sparsity,
      pruned=[sum(inputs.pruned_units[leaf.index] for leaf in g.leaves)
              for g in plan.groups])
  # 4. Kernel: groups that share a method share one call (one search loop).
  keeps = {}
  for method in sorted({g.method for g in plan.groups}):
    chosen = [j for j, g in enumerate(plan.groups) if g.method == method]
    found = _thresholds.keep_masks_for_counts(
        [[units[leaf.index] for leaf in plan.groups[j].leaves] for j in chosen],
        [counts[j] for j in chosen], method)
    for j, unit_keeps in zip(chosen, found):
      keeps.update({leaf.index: (keep, shares[j])
                    for leaf, keep in zip(plan.groups[j].leaves, unit_keeps)})
  # 5. Expand the unit decisions to masks, placed like their leaves.
  masks = [
      _placement.put_back(
          leaf.granularity.expand(keeps[leaf.index][0], scores[leaf.index]),
          shardings.get(leaf.index))
      for leaf in leaves
  ]
  return MaskUpdate(
      masks=masks,
      targets=[keeps[leaf.index][1] for leaf in leaves],
      pruned_units=[jnp.sum(~keeps[leaf.index][0], dtype=jnp.int32) for leaf in leaves],
  )
