"""The pruning transformation: masks in the optimizer state, exact zeros after
``optax.apply_updates``.

A mask update is one straight path, a stage per module: arguments are checked
into a config (``_config``), planned against the params (``_plan``), and on a
schedule's update steps a rule (``_rules``) recomputes the masks; on every
step :func:`apply_masks` shapes the updates. This module only wires them.
"""

from __future__ import annotations

import dataclasses
import fractions
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_prune import _bits
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _placement
from optax_prune import _plan
from optax_prune import _rules
from optax_prune import _schedules
from optax_prune import _scores

_UPDATE_MASKS_MSG = (
    "`update_masks` must be None (a mask update where the schedule is due,"
    " decided inside the step), True or False (a Python bool, static under"
    " `jit`: a step compiled with or without the mask update); got {value!r}."
    " Pass it as a static argument: `jax.jit(step, static_argnames='update_masks')`."
)

NO_PARAMS_MSG = (
    "optax_prune's masks are ranked on the current parameters, so `update` needs"
    " them: call `tx.update(updates, state, params)` (flax `TrainState` and"
    " `nnx.Optimizer` already do)."
)


class MagnitudePruningState(NamedTuple):
  """State of :func:`magnitude_pruning`.

  ``masks`` has the params' structure, so ``optax.tree_utils.tree_map_params``
  maps it with the params (pass ``is_leaf=lambda x: isinstance(x,
  optax.MaskedNode)`` when ``rest`` trees are given, as for ``optax.masked``);
  ``count``, ``target_sparsity``, ``pruned_units`` and the three counters
  are not params-shaped and are left to
  ``transform_non_params``. Masks are read as ``mask != 0``, so a float cast
  of the state (to bf16, say) changes no decision.
  """

  count: jax.Array  # int32 scalar: optimizer steps taken so far.
  masks: Any  # Like params: bool arrays (True = kept) for pruned leaves,
  #              `optax.MaskedNode()` for leaves that are never pruned. With
  #              `packed_masks=True`, uint8 bits along the last axis
  #              (`unpack_masks` reads them).
  target_sparsity: jax.Array  # float32 (pruned leaves,): the sparsity asked
  #                             of each pruned leaf, in the order of
  #                             `jax.tree.leaves(masks)`, at its last mask
  #                             update (of its units; with "erk", its share).
  pruned_units: jax.Array  # int32 (parts,), same order: the units each
  #                          pruned leaf has lost (exact counts); a leaf
  #                          that stacks layers (`layer_axis`) takes one
  #                          entry per layer.
  # Per-step checks read one leaf, the smallest pruned one (the sentinel):
  # the mistakes they catch touch every leaf alike, and a read of all params
  # would cost 10-20% of a memory-bound step.
  pruned_nonzero: jax.Array  # int32 scalar: entries of the sentinel that the
  #                            masks in force prune but that were not 0 in the
  #                            params of the last update. Always 0 when this
  #                            transformation is last in the chain.
  zero_update_steps: jax.Array  # int32 scalar: steps whose incoming updates
  #                               were 0 on the sentinel. The schedule counts
  #                               them as steps: a step count made of
  #                               micro-batches (`chain(MultiSteps(...),
  #                               pruning)`) shows here.
  skipped_mask_updates: jax.Array  # int32 scalar: steps at which a schedule
  #                                  asked for new masks but the step was
  #                                  compiled with `update_masks=False`.


def magnitude_pruning(
    schedule: Any,
    *,
    where: Any = None,
    scope: str = "layer",
    threshold: str = "auto",
    granularity: Any = None,
    distribution: Optional[str] = None,
    score: Union[str, _scores.ScoreFn] = "magnitude",
    seed: int = 0,
    packed_masks: bool = False,
    layer_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradual magnitude pruning as the last link of an optax chain.

  The state holds a step count and a keep-mask per pruned leaf. At a step where
  the schedule says ``update``, the masks are recomputed from ``|params|`` (or
  another ``score``): in each leaf (``scope="layer"``) or over all leaves that
  share a schedule (``scope="global"``) exactly :math:`\mathrm{round}(s \cdot
  n)` units of smallest score are pruned, where :math:`s` is the scheduled
  sparsity (by default each leaf's ERK share of it, see ``distribution``) and :math:`n`
  the number of units: entries by default, or N:M groups, blocks, channels (see
  ``granularity``). Entries already pruned score 0, so masks only grow while
  the sparsity rises. On every step the updates become

  .. math::

    u' = \begin{cases} u & \text{kept} \\ -p & \text{pruned} \end{cases}

  so that after ``optax.apply_updates`` kept weights are :math:`p + u` and
  pruned weights are exactly zero: momentum, Adam moments and weight decay
  earlier in the chain cannot revive them. Like
  ``optax.keep_params_nonnegative``, it must come last in a chain.

  By default one compiled step serves the whole run: a ``lax.cond`` on the
  schedule's ``update`` flag runs the mask update only where it is due (on
  GPU XLA reads that flag on the host, about 0.1 ms per step). A training
  loop that knows its step can compile the two kinds of step apart instead:
  ``update(..., update_masks=False)`` leaves out the mask update (no
  conditional, no host read), ``update_masks=True`` runs it unconditionally
  and keeps its result where a schedule is due. :func:`mask_update_steps`
  lists the steps that need ``True``; a due step run with ``False`` is
  counted in ``skipped_mask_updates`` and shown by ``sparsity_summary``.

  Args:
    schedule: a schedule (``step -> PruningTarget``, see
      :func:`log_schedule`), a sparsity in [0, 1] (pruned once at step 0), or a
      pytree of those whose structure is a prefix of the params, giving leaves
      their own schedules; ``None`` in that pytree leaves a subtree unpruned.
    where: which leaves are pruned. ``None`` (default): floating leaves with
      ``ndim >= 2`` named ``kernel`` (flax linen and nnx weights, attention
      projections included; not biases, norm scales or embeddings), or, in
      params without any ``kernel``, every floating leaf with ``ndim >= 2``.
      Or a predicate ``where(path, leaf) -> bool`` with ``path`` as in
      ``jax.tree_util.tree_flatten_with_path`` (an nnx ``Variable``'s
      trailing ``.value`` dropped; selecting no leaf is an error), or a pytree
      of bools that is a prefix of the params, as in ``optax.masked``.
    scope: ``"layer"`` ranks each leaf on its own; ``"global"`` ranks all
      pruned leaves that share a schedule together (one threshold); bisect
      and histogram do so without concatenating them, the sort reference
      sorts their concatenated keys.
    threshold: ``"sort"`` (the ``jnp.sort`` reference), ``"bisect"`` (a radix
      search over the bits of ``|w|`` by counting passes), ``"histogram"``
      (the same selection by histograms of 16-bit digits: two passes), or
      ``"auto"``: per group and backend (``AUTO_POLICIES``), sort for small
      groups known not to be split over devices (on GPU up to 2**26 entries),
      histogram for large ones, bisect between (CPU). All give identical
      masks; only sort gathers split leaves.
    granularity: what one decision prunes: ``None`` or
      :func:`unstructured` (entries), :func:`n_of_m`, :func:`blocks`,
      :func:`channels`; or a pytree of those that is a prefix of the params,
      or :func:`by_path` rules, for per-leaf choices. The sparsity then counts
      units (groups, blocks, channels). With ``scope="global"`` the leaves
      that share a schedule and a granularity are ranked together.
    distribution: how a schedule's sparsity is shared among its leaves with
      ``scope="layer"``: ``"uniform"`` (each leaf at the schedule's sparsity)
      or ``"erk"`` (Erdos-Renyi-Kernel densities: small leaves denser, large
      ones sparser; exactly ``round(s * total units)`` pruned over the
      leaves, none whole while ``s < 1``). Leaves with their own schedule (or
      ``None``) in ``schedule`` are outside the distribution: that is how
      layers are kept dense. ``None`` (default): ``"erk"`` when one schedule
      (a number, a schedule or :func:`by_path` rules) prunes unstructured
      leaves with ``scope="layer"``, ``"uniform"`` otherwise (per-leaf
      targets given as a pytree, structured granularities, global scope).
      ERK lost least accuracy in ``benchmarks.defaults``; pass
      ``"uniform"`` for every leaf at the scheduled sparsity.
    score: what ranks the entries: ``"magnitude"`` (``|w|``),
      ``"saliency"`` (``|w * g|``, a first-order estimate of the loss change:
      ``g`` is the raw gradient when ``update`` is given ``grads=``, and
      otherwise the update this link receives, which under Adam is Adam's
      step, not the gradient), ``"random"`` (uniform, from ``seed`` and the
      step count: reproducible, also after a resume), or a callable
      ``score(param, g, key) -> array`` of the param's shape, ``g`` as for
      saliency.
    seed: integer seed of the keys passed to ``score``.
    packed_masks: store the masks in the state as bits (uint8, 8 entries per
      byte along each leaf's last axis) instead of one bool per entry: 8x
      smaller, unpacked inside the jitted step where read. A packed mask keeps
      its param's ``PartitionSpec``; read it with :func:`unpack_masks`.
    layer_axis: for leaves that stack layers (``nn.scan``, ``nnx.scan``,
      ``lax.scan`` over a leading layer axis: a 24-layer transformer's query
      kernels as one ``(24, d, d)`` leaf), the axis that stacks them; each
      layer is then pruned as if it were its own leaf: ``round(s * n)`` units
      per layer under layer scope, each layer a layer of ERK, the
      granularity applied to each layer (``n_of_m(axis=...)`` and
      ``channels(axis=...)`` count a layer's axes), ranked with the other
      leaves, layer after layer, under global scope. ``None`` (default: no
      stacks), an int for every pruned leaf, a pytree prefix of those, or
      :func:`by_path` rules (``by_path({"layers": 0}, default=None)``).
      ``pruned_units`` in the state then holds one entry per layer of a
      stack; ``target_sparsity`` one per leaf (the mean of its layers').

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params`` and takes the keywords ``update_masks`` (``None``, ``True`` or
    ``False``, a Python bool: static under ``jit``) and ``grads`` (the raw
    gradient, like params, for ``score``: ``tx.update(grads, state, params,
    grads=grads)``); ``optax.chain`` and ``nnx.Optimizer.update`` pass them
    through.

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
  config, rule, coupled = pruning_setup(
      schedule, where=where, scope=scope, threshold=threshold,
      granularity=granularity, distribution=distribution, score=score, seed=seed,
      packed_masks=packed_masks, layer_axis=layer_axis)
  tx = masking(config, rule, warn_whole=coupled is None)
  if coupled is None:
    return tx

  def init_fn(params):
    coupled.check_params(params)
    return tx.init(params)

  return tx._replace(init=init_fn)


def pruning_setup(schedule: Any, *, granularity: Any, where: Any, scope: str,
                  distribution: Any, layer_axis: Any, **options) -> tuple:
  """``(config, rule, coupled)`` of the gradual pruning mask update.

  Shared by :func:`magnitude_pruning` and ``prune``. Coupled channels span
  leaves: the groups choose the leaves and bring a rule of their own
  (``coupled`` is then the ``CoupledChannels``, else None).
  """
  rule, coupled = _rules.prune_smallest, None
  if isinstance(granularity, _granularity.CoupledChannels):
    coupled, granularity = granularity, None
    coupled.checked_setup(schedule, where, scope, distribution)
    where, distribution = coupled.selects, "uniform"
    rule = _rules.prune_coupled(coupled)
  config = _config.make_config(
      schedule, where=where, scope=scope, granularity=granularity,
      distribution=distribution, layer_axis=layer_axis, **options)
  if coupled is not None and layer_axis is not None:
    raise ValueError(
        "`layer_axis` cannot be combined with `coupled_channels` yet: the channel"
        " groups of a scanned layer stack are not traced per layer. Prune the"
        " stack with a per-leaf granularity (`channels(axis=...)`, which"
        " `layer_axis` applies to each layer), or unscan the model.")
  return config, rule, coupled


def masking(
    config: _config.PruningConfig, rule: _rules.MaskRule, *,
    initial_score: Optional[_scores.Score] = None, regrows: bool = False,
    warn_whole: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """The chained transformation for ``config``, its masks recomputed by ``rule``.

  ``magnitude_pruning`` is ``masking(config, _rules.prune_smallest)``; another
  rule gives another method with the same state, plan and guarantees.

  Args:
    config: the checked arguments.
    rule: recomputes one schedule's masks at its update steps.
    initial_score: if given, ``init`` already prunes each schedule to its
      sparsity at step 0 by this score (sparse training starts sparse);
      otherwise the masks start all kept.
    regrows: whether ``rule`` may keep an entry that was pruned (drop and
      grow). A regrown entry then starts at exactly 0: the update is applied
      only where an entry is kept both before and after the step.
    warn_whole: warn at ``init`` about leaves pruned whole below sparsity 1
      (:func:`warn_whole_leaves`; its counts are those of ``prune_smallest``
      and ``drop_and_grow``, not of coupled channels).
  """

  def init_fn(params):
    if warn_whole:
      warn_whole_leaves(_plan.make_plan(config, params))
    return init_state(config, params, initial_score)

  def update_fn(updates, state, params=None, *, update_masks=None, grads=None,
                **extra_args):
    del extra_args  # Meant for other links of the chain.
    step = mask_step(config, rule, updates, state, params, grads=grads,
                     update_masks=update_masks)
    masks = step.masks
    if regrows:
      masks = [m & old if pruned else m
               for m, old, pruned in zip(masks, step.now.masks, step.plan.pruned)]
    return apply_masks(step.plan, step.now, masks), step.state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def init_state(config: _config.PruningConfig, params: Any,
               initial_score: Optional[_scores.Score] = None) -> MagnitudePruningState:
  """The state at step 0: all kept, or each schedule's step-0 sparsity pruned
  by ``initial_score`` (keys from ``seed`` and step 0)."""
  layout = config.mask_layout
  plan = _plan.make_plan(config, params)
  leaves = plan.treedef.flatten_up_to(params)
  masks = [_placement.ones_like(x) if p else optax.MaskedNode()
           for x, p in zip(leaves, plan.pruned)]
  targets = [jnp.zeros((), jnp.float32)] * len(leaves)
  pruned = [jnp.zeros(n, jnp.int32) if p else None for p, n in zip(plan.pruned, plan.parts)]
  if initial_score is not None:
    count = jnp.zeros((), jnp.int32)
    inputs = _rules.MaskInputs(params=leaves, updates=leaves, masks=list(masks),
                               pruned_units=list(pruned), count=count,
                               key=_scores.step_key(config.seed, count))
    for schedule in plan.schedules:
      new = _rules.prune_smallest(dataclasses.replace(schedule, score=initial_score),
                                  schedule.schedule(count).sparsity, inputs)
      for leaf, mask, target, lost in zip(
          schedule.leaves, new.masks, new.targets,
          _split(new.pruned_units, [leaf.layers for leaf in schedule.leaves])):
        masks[leaf.index], targets[leaf.index], pruned[leaf.index] = mask, target, lost
  stack = lambda values, dtype: jnp.concatenate(
      [jnp.zeros(0, dtype)] + [jnp.asarray(values[i], dtype).reshape(-1)
                               for i in plan.pruned_indices])
  return MagnitudePruningState(
      count=jnp.zeros((), jnp.int32),
      masks=plan.treedef.unflatten(
          [layout.store(m) if p else m for m, p in zip(masks, plan.pruned)]),
      target_sparsity=stack(targets, jnp.float32),
      pruned_units=stack(pruned, jnp.int32),
      pruned_nonzero=jnp.zeros((), jnp.int32),
      zero_update_steps=jnp.zeros((), jnp.int32),
      skipped_mask_updates=jnp.zeros((), jnp.int32),
  )


def warn_whole_leaves(plan: _plan.Plan) -> None:
  """Warns when a leaf (a layer of a stack, a global group) keeps no unit at
  its schedule's final sparsity ``s < 1``: ``round(s * n) = n`` for a small
  leaf with its own count (``round(0.9 * 4) = 4``); under a shared budget
  (ERK), when fewer units are kept than there are leaves (one leaf alone, or
  tiny ones). Numbers and built-in schedules only (their final sparsity is
  known). Exact rational arithmetic on the host: nothing is compiled."""
  whole, count = [], 0
  for schedule in plan.schedules:
    final = _schedules.final_sparsity(schedule.schedule)
    if final is None or not 0 < final < 1:
      continue
    s = fractions.Fraction(float(np.float32(final)))  # As `prune_count` reads it.
    rows = [(g.leaves[0].path + (f" layer {r}" if g.by_layer else "")
             + (f" and {len(g.leaves) - 1} more ranked with it" if len(g.leaves) > 1 else ""), n)
            for g in schedule.groups for r, n in enumerate(g.row_units) if n]
    if schedule.distribution.shares_budget and len(rows) > 1:
      kept = sum(n for _, n in rows) - round(s * sum(n for _, n in rows))
      if kept < len(rows):
        count += len(rows) - kept
        whole.append(f"{len(rows) - kept} of {', '.join(name for name, _ in rows[:3])}"
                     f"{' ...' if len(rows) > 3 else ''} (at {final:g}, {kept} units kept"
                     " over the leaves sharing it)")
    else:
      alone = [f"{name} ({n} units at {final:g})" for name, n in rows if round(s * n) == n]
      count, whole = count + len(alone), whole + alone
  if whole:
    warnings.warn(
        f"{count} pruned leaves (or layers) keep no unit at their final"
        f" sparsity, pruned whole: {', '.join(whole[:5])}. Give them a schedule of"
        " their own (None keeps a leaf dense) or a lower target; with several"
        " leaves, `distribution='erk'` keeps part of every one.", stacklevel=3)


class MaskStep(NamedTuple):
  """One step of a masking transformation, before the updates are shaped."""

  plan: _plan.Plan
  now: _rules.MaskInputs  # The step's inputs: params, updates, masks in force.
  masks: list  # bool keep-masks after the step (MaskedNode where unpruned).
  state: MagnitudePruningState  # The state after the step.


def mask_step(
    config: _config.PruningConfig, rule: _rules.MaskRule, updates: Any,
    state: MagnitudePruningState, params: Any, *, ranked: Any = None,
    grads: Any = None, update_masks: Optional[bool] = None,
) -> MaskStep:
  """Checks the arguments, recomputes the masks where due and advances the state.

  ``rule`` ranks ``ranked`` (default: ``params``; straight-through training
  passes its dense weights) and may read ``grads`` (the raw gradient, where a
  wrapper has it). The per-step checks read ``params``.
  """
  if params is None:
    raise ValueError(NO_PARAMS_MSG)
  if not (update_masks is None or isinstance(update_masks, (bool, np.bool_))):
    raise ValueError(_UPDATE_MASKS_MSG.format(value=update_masks))
  layout = config.mask_layout
  plan = _plan.make_plan(config, params)
  param_leaves = plan.treedef.flatten_up_to(params)
  ranked_leaves = param_leaves if ranked is None else _flatten(plan, ranked, "ranked")
  update_leaves = _flatten(plan, updates, "updates")
  grad_leaves = None if grads is None else _flatten(plan, grads, "grads")
  stored = _state_masks(plan, state, param_leaves, layout)

  def inputs():
    # Called where the masks are read: inside a mask update's branch, so
    # packed masks are unpacked there and not carried into the branch.
    return _rules.MaskInputs(
        params=ranked_leaves,
        updates=update_leaves,
        masks=_read(plan, layout, stored, param_leaves),
        pruned_units=_per_part(plan, jnp.asarray(state.pruned_units).astype(jnp.int32)),
        key=_scores.step_key(config.seed, state.count),
        count=jnp.asarray(state.count, jnp.int32),
        grads=grad_leaves,
    )

  now = inputs()._replace(params=param_leaves)
  new_stored, targets, pruned, skipped = new_masks(
      plan, rule, inputs, state, stored, layout, update_masks)
  return MaskStep(plan, now, _read(plan, layout, new_stored, param_leaves), MagnitudePruningState(
      count=optax.safe_int32_increment(state.count),
      masks=plan.treedef.unflatten(new_stored),
      target_sparsity=targets,
      pruned_units=pruned,
      pruned_nonzero=pruned_nonzero(plan, now),
      zero_update_steps=jnp.where(
          all_zero(plan, now), optax.safe_int32_increment(state.zero_update_steps),
          state.zero_update_steps),
      skipped_mask_updates=jnp.where(
          skipped, optax.safe_int32_increment(state.skipped_mask_updates),
          state.skipped_mask_updates),
  ))


def new_masks(
    plan: _plan.Plan, rule: _rules.MaskRule, inputs: Callable[[], _rules.MaskInputs],
    state: MagnitudePruningState, stored: list, layout: _bits.MaskLayout,
    update_masks: Optional[bool] = None,
) -> tuple[list, jax.Array, jax.Array, jax.Array]:
  """Masks as stored (flat, like params), targets, pruned units after this step,
  and whether a due mask update was skipped (bool scalar).

  Per schedule, on its ``update`` flag: with ``update_masks=None`` a
  ``lax.cond`` runs the rule only on update steps, with the schedule's
  sparsity and ``inputs()`` (built inside the branch), and its masks are
  stored in ``layout``; otherwise the stored masks pass through untouched.
  ``True`` runs the rule and selects its result by the flag (no conditional);
  ``False`` leaves the rule out of the step and reports a due flag as skipped.
  """
  masks = list(stored)
  targets = jnp.asarray(state.target_sparsity).astype(jnp.float32)
  pruned = jnp.asarray(state.pruned_units).astype(jnp.int32)

  def run(schedule, sparsity):
    new = rule(schedule, sparsity, inputs())
    return _rules.MaskUpdate(
        [layout.store(m) for m in new.masks],
        jnp.asarray(new.targets, jnp.float32).reshape(-1),  # A rule may give lists.
        jnp.asarray(new.pruned_units, jnp.int32).reshape(-1))

  decide = _DECIDE[update_masks]
  skipped = jnp.zeros((), bool)
  # Leaf -> its entry of `targets`, and its entries of `pruned` (its parts).
  position = {i: j for j, i in enumerate(plan.pruned_indices)}
  starts = np.cumsum([0] + [plan.parts[i] for i in plan.pruned_indices])
  parts = {i: range(starts[j], starts[j + 1]) for i, j in position.items()}
  for schedule in plan.schedules:
    target = schedule.schedule(state.count)
    indices = [leaf.index for leaf in schedule.leaves]
    # One gather and one scatter per schedule for each of the state's vectors.
    at = jnp.asarray([position[i] for i in indices], jnp.int32)
    at_parts = jnp.asarray([p for i in indices for p in parts[i]], jnp.int32)
    old = _rules.MaskUpdate([masks[i] for i in indices], targets[at], pruned[at_parts])
    new, skipped_here = decide(
        target.update, lambda s=schedule, x=target.sparsity: run(s, x), old)
    skipped = skipped | skipped_here
    for i, mask in zip(indices, new.masks):
      masks[i] = mask
    targets = targets.at[at].set(new.targets)
    pruned = pruned.at[at_parts].set(new.pruned_units)
  return masks, targets, pruned, skipped


# How a step meets a schedule's `update` flag, by `update_masks`: each takes
# (due, run, old) and returns (the new MaskUpdate, whether a due update was skipped).
_DECIDE = {
    # Inside the step: the rule runs only where due (on GPU the flag is read on the host).
    None: lambda due, run, old: (lax.cond(due, run, lambda: old), False),
    # Compiled with the update: the rule always runs, its result kept where due.
    True: lambda due, run, old: (
        jax.tree.map(lambda a, b: jnp.where(due, a, b), run(), old), False),
    # Compiled without it: nothing runs; a due flag is a skipped update.
    False: lambda due, run, old: (old, due),
}


def read_masks(plan: _plan.Plan, layout: _bits.MaskLayout, state: MagnitudePruningState,
               params: list) -> list:
  """The bool keep-masks of ``state`` (MaskedNode where unpruned), checked
  against the flat ``params``."""
  return _read(plan, layout, _state_masks(plan, state, params, layout), params)


def _read(plan: _plan.Plan, layout: _bits.MaskLayout, stored: list, params: list) -> list:
  """Stored masks as bool keep-masks (MaskedNode where unpruned)."""
  return [layout.read(m, jnp.shape(x)) if p else m
          for m, x, p in zip(stored, params, plan.pruned)]


def _per_part(plan: _plan.Plan, vector: jax.Array) -> list:
  """The state's ``pruned_units`` as a list over all leaves (None where
  unpruned): a scalar per leaf, a vector over the layers of a stack."""
  out = [None] * len(plan.pruned)
  stacked = {leaf.index: isinstance(leaf.granularity, _granularity.PerLayer)
             for s in plan.schedules for leaf in s.leaves}
  pieces = _split(vector, [plan.parts[i] for i in plan.pruned_indices])
  for i, piece in zip(plan.pruned_indices, pieces):
    out[i] = piece if stacked[i] else piece[0]
  return out


def _split(vector: jax.Array, sizes: Sequence[int]) -> list:
  """``vector`` cut into consecutive pieces of ``sizes``."""
  starts = np.cumsum([0] + list(sizes))
  return [vector[a:b] for a, b in zip(starts[:-1], starts[1:])]


def apply_masks(plan: _plan.Plan, inputs: _rules.MaskInputs, masks: list) -> Any:
  r"""The updates with :math:`u' = -p` at pruned entries, so that
  ``apply_updates`` lands them on exactly 0; unchanged elsewhere."""
  return plan.treedef.unflatten([
      jnp.where(m, u, -p.astype(jnp.result_type(u))) if pruned else u
      for u, p, m, pruned in zip(inputs.updates, inputs.params, masks, plan.pruned)
  ])


def pruned_nonzero(plan: _plan.Plan, inputs: _rules.MaskInputs) -> jax.Array:
  """Entries of the sentinel leaf (``plan.sentinel``, the smallest pruned one)
  that the masks in force prune but that are not 0 in ``inputs.params``.

  Pruned weights are exactly 0 after every step when this transformation is
  the last link of the chain; a link after it (``chain(pruning, adamw)``)
  moves them again, in every leaf. Counted in the state, never raised from
  inside the step; ``sparsity_summary`` counts every leaf on the host.
  """
  i = plan.sentinel
  if i is None:
    return jnp.zeros((), jnp.int32)
  return jnp.sum((inputs.params[i] != 0) & ~inputs.masks[i], dtype=jnp.int32)


def all_zero(plan: _plan.Plan, inputs: _rules.MaskInputs) -> jax.Array:
  """Whether the incoming updates of the sentinel leaf are all 0 (bool scalar).

  ``optax.MultiSteps`` before this link passes zeros to every leaf on every
  micro-batch but the last, so the schedule would count micro-batches;
  counted in the state (``zero_update_steps``), shown by ``sparsity_summary``.
  """
  i = plan.sentinel
  if i is None:
    return jnp.zeros((), bool)
  # A sum of |u| is 0 only if every entry is (NaN stays NaN); XLA's CPU
  # backend reduces it faster than a fused `any(u != 0)`.
  return jnp.sum(jnp.abs(inputs.updates[i]), dtype=jnp.float32) == 0


def _flatten(plan: _plan.Plan, tree: Any, name: str) -> list:
  try:
    return plan.treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`{name}` must have the structure of `params`: {e}") from e


def _state_masks(plan: _plan.Plan, state: MagnitudePruningState, params: list,
                 layout: _bits.MaskLayout) -> list:
  """The state's masks as stored (MaskedNode where unpruned), in their dtype.

  Raises a ``ValueError`` if the state was built for params of another
  structure, or with the other mask layout.
  """
  try:
    # Up to the params' leaves: a MaskedNode stands where a leaf is unpruned
    # (and params from `optax.masked` may hold MaskedNodes of their own).
    leaves = plan.treedef.flatten_up_to(state.masks)
  except (ValueError, TypeError):
    leaves = None
  if leaves is None or [_paths.is_masked(x) for x in leaves] != [
      not p for p in plan.pruned
  ] or jnp.shape(state.target_sparsity) != (len(plan.pruned_indices),) or (
      jnp.shape(state.pruned_units) != (sum(plan.parts),)) or any(
               jnp.shape(m) != layout.stored_shape(jnp.shape(x))
               for m, x, p in zip(leaves, params, plan.pruned) if p):
    raise ValueError(
        "`params` do not match the pruning state: it was built by `init`"
        " for params of another structure (or another `layer_axis`: a stack"
        " takes one `pruned_units` entry per layer). Call `tx.init(params)`"
        " with the params you update."
    )
  wrong = jnp.bool_ if layout.packed else jnp.uint8
  if any(m.dtype == wrong for m, p in zip(leaves, plan.pruned) if p):
    raise ValueError(
        f"The pruning state holds {'bool' if layout.packed else 'packed (uint8)'}"
        f" masks, but this transformation has `packed_masks={layout.packed}`:"
        " build it with the setting the state was made with (or `init` anew).")
  # A float cast of the whole state (`tree_map_params`) is undone here, and
  # masks placed otherwise than their params (`nnx.Optimizer` places its state
  # by the Variables' metadata) are placed like them.
  return [_placement.placed_like(layout.normalized(m), x) if p else m
          for m, x, p in zip(leaves, params, plan.pruned)]


def unpack_masks(masks: Any, params: Any) -> Any:
  """Bool keep-masks from a pruning state's ``masks``, packed or not.

  Args:
    masks: ``find_pruning_state(opt_state).masks``: bool masks, or the uint8
      bits of ``magnitude_pruning(..., packed_masks=True)``; ``MaskedNode``
      where a leaf is not pruned.
    params: the params (arrays or ``jax.ShapeDtypeStruct``), for the shapes.

  Returns:
    ``masks`` with each packed mask unpacked to a bool array of its param's
    shape; bool masks and ``MaskedNode`` as they are. Jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> params = {"w": jnp.array([[1.0, -3.0, 0.5], [2.0, 0.1, 4.0]])}
    >>> tx = optax_prune.magnitude_pruning(0.5, packed_masks=True)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> state.masks["w"]  # Bits, one row of 3 entries per byte.
    Array([[ 64],
           [160]], dtype=uint8)
    >>> optax_prune.unpack_masks(state.masks, params)["w"]
    Array([[False,  True, False],
           [ True, False,  True]], dtype=bool)
  """
  leaves, treedef = jax.tree.flatten(masks, is_leaf=_paths.is_masked)
  try:
    param_leaves = treedef.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`masks` must have the structure of `params`: {e}") from None
  return treedef.unflatten([
      m if _paths.is_masked(m) or not _bits.is_packed_for(m, jnp.shape(x))
      else _bits.unpack(m, jnp.shape(x)) for m, x in zip(leaves, param_leaves)])


def mask_weight_copies(tree: Any, opt_state: Any) -> Any:
  """``tree`` with the pruned entries of every params-shaped subtree set to 0.

  Some optimizers keep a copy of the weights that the pruning link never
  sees: ``optax.contrib.schedule_free_adamw``'s ``z`` (its
  ``schedule_free_eval_params`` mix the params with it), ``optax.lookahead``'s
  slow weights (in ``LookaheadParams``; the fast ones are reset to them at
  every sync). Those copies stay dense; call this on the optimizer state and
  on the params after every step (inside the jitted step) to keep them
  sparse. Jittable; the masks are those of ``find_pruning_state(opt_state)``.
  Every params-shaped subtree is masked, the optimizer's moments included
  (their pruned entries are never read); not for ``straight_through``, whose
  state holds dense weights on purpose.

  Args:
    tree: any pytree (an optimizer state, ``LookaheadParams``, the params);
      each subtree with the params' structure is masked, the rest is kept.
    opt_state: the optimizer state that holds the pruning state.

  Returns:
    ``tree`` with pruned entries at 0 in its params-shaped subtrees.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[0.1, -2.0], [0.3, 4.0]])}
    >>> tx = optax.lookahead(optax.chain(optax.sgd(0.1), optax_prune.magnitude_pruning(0.5)),
    ...                      sync_period=2, slow_step_size=0.5)
    >>> params = optax.LookaheadParams.init_synced(params)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params.fast)  # Of the fast weights.
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax_prune.mask_weight_copies(optax.apply_updates(params, updates), state)
    >>> params.slow["w"]  # Not synced yet: the initial weights, masked.
    Array([[ 0., -2.],
           [ 0.,  4.]], dtype=float32)
  """
  masks = find_pruning_state(opt_state).masks
  structure = jax.tree.structure(masks, is_leaf=_paths.is_masked)
  is_params = lambda x: jax.tree.structure(x) == structure

  def masked(subtree):
    read = unpack_masks(masks, subtree)
    return structure.unflatten([
        x if _paths.is_masked(m) else jnp.where(m, x, jnp.zeros((), x.dtype))
        for x, m in zip(structure.flatten_up_to(subtree),
                        structure.flatten_up_to(read))])

  return jax.tree.map(lambda x: masked(x) if is_params(x) else x, tree, is_leaf=is_params)


def pruning_states(tree: Any) -> list[MagnitudePruningState]:
  """Every :class:`MagnitudePruningState` inside ``tree``, in leaf order."""
  is_state = lambda x: isinstance(x, MagnitudePruningState)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


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
  found = pruning_states(opt_state)
  if len(found) != 1:
    hint = (" Two pruning links (one per `optax.multi_transform` branch, say) are"
            " one link with a pytree of schedules: `magnitude_pruning({'a': s1,"
            " 'b': s2})`, None for a subtree left dense; or pass the state of one"
            " branch.") if found else (
        " Pass the optimizer state itself: `train_state.opt_state` for a flax"
        " `TrainState`, `optimizer.opt_state` for an `nnx.Optimizer` (not"
        " `nnx.state(optimizer)`), the state `tx.init` returned for a plain"
        " optax chain.")
    raise ValueError(
        "`opt_state` must hold exactly one MagnitudePruningState (from"
        f" `optax_prune.magnitude_pruning`); found {len(found)}.{hint}"
    )
  return found[0]
