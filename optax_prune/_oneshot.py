"""One-shot pruning of trained params, without a training loop.

With ``input_norms`` (see :func:`input_norms`) the scores are Wanda's
activation-aware ``|w_ij| * ||x_j||``; with ``compare="output"`` weights are
ranked within each output feature, as Wanda does, instead of per leaf.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_prune import _checks
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _plan
from optax_prune import _schedules
from optax_prune import _scores
from optax_prune import _thresholds
from optax_prune import _transform

COMPARE = ("leaf", "output")


def prune(
    params: Any,
    sparsity: Any,
    *,
    grads: Optional[Any] = None,
    input_norms: Optional[dict] = None,
    compare: str = "leaf",
    where: Any = None,
    scope: str = "layer",
    threshold: str = "auto",
    granularity: Any = None,
    distribution: Optional[str] = None,
    score: Union[str, _scores.ScoreFn] = "magnitude",
    seed: int = 0,
    layer_axis: Any = None,
) -> tuple[Any, Any]:
  r"""Prunes trained params once: the mask update of :func:`magnitude_pruning`.

  In each group (a leaf with ``scope="layer"``, the leaves ranked together with
  ``scope="global"``, all leaves under ``"erk"``) exactly
  :math:`\mathrm{round}(s \cdot n)` units of smallest score are pruned, ties by
  position, with every granularity, scope, distribution, score and threshold
  method of the transformation (the same code: one jitted ``update`` at step
  0), so split leaves are pruned without gathering them with the gather-free
  method. Pruned entries become exactly 0; kept ones are unchanged, bit for
  bit.

  Activation-aware (Wanda, Sun et al. 2023): given ``input_norms`` from
  calibration data, the score of weight :math:`w_{ij}` (input feature
  :math:`j`) is :math:`|w_{ij}| \cdot \lVert x_j \rVert_2`; with
  ``compare="output"`` each output feature of a leaf (a column of a
  ``Dense`` kernel, an output channel of a ``Conv``) loses exactly
  :math:`\mathrm{round}(s \cdot K)` of its :math:`K` weights.

  Args:
    params: the trained params.
    sparsity: a number in [0, 1], or a pytree of those (``None``: not pruned)
      whose structure is a prefix of the params, or :func:`by_path` rules.
    grads: gradients like ``params``, for ``score="saliency"`` (``|w * g|``)
      or a score function that reads them; zeros if None.
    input_norms: ``{path: InputNorm}`` from :func:`input_norms`; every pruned
      leaf needs one. Only with ``score="magnitude"``.
    compare: ``"leaf"`` (rank as the transformation does: per leaf or group)
      or ``"output"`` (within each output feature, the same fraction of each;
      unstructured, layer scope, no ERK). Output axes come from ``input_norms``, else the
      leaf's last axis (flax kernels).
    where, scope, threshold, granularity, distribution, score, seed: as for
      :func:`magnitude_pruning`. With ``granularity=coupled_channels(groups)``
      whole channels of coupled groups are pruned, ranked by the granularity's
      ``importance`` (``"taylor"`` reads `grads`; given `input_norms`, by the
      channels' activation norms), and the result is what :func:`shrink`
      takes.
    layer_axis: as for :func:`magnitude_pruning`: each layer of a stack is
      pruned as its own leaf.

  Returns:
    ``(pruned_params, masks)``: the params with pruned entries set to 0, and
    the keep-masks (bool, ``optax.MaskedNode()`` for leaves not pruned), as
    ``find_pruning_state(opt_state).masks`` holds them.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> params = {"w": jnp.array([[0.1, -2.0], [0.3, 4.0]]), "b": jnp.ones(2)}
    >>> pruned, masks = optax_prune.prune(params, 0.5)
    >>> pruned["w"]
    Array([[ 0., -2.],
           [ 0.,  4.]], dtype=float32)
    >>> pruned, _ = optax_prune.prune(params, 0.5, compare="output")  # Per column.
    >>> pruned["w"]
    Array([[0. , 0. ],
           [0.3, 4. ]], dtype=float32)
  """
  check_sparsity(sparsity)
  _checks.one_of("compare", compare, COMPARE)
  if compare == "output" and (granularity is not None or scope != "layer"
                              or distribution not in (None, "uniform")):
    raise ValueError(
        "`compare='output'` ranks the entries of each output feature: it takes"
        " no `granularity`, and `scope='layer'`, `distribution='uniform'`.")
  if input_norms is not None and score != "magnitude":
    raise ValueError("`input_norms` make the score |w| * ||x||: leave `score='magnitude'`.")
  if isinstance(granularity, _granularity.CoupledChannels):
    if compare != "leaf":
      raise ValueError(
          "`compare='output'` ranks entries within outputs; `coupled_channels` ranks"
          " whole channels: leave `compare='leaf'`.")
    granularity = _coupled_for_prune(granularity, grads, input_norms)
    input_norms = None  # Now the channels' importance.
  config, rule, coupled = _transform.pruning_setup(
      sparsity, where=where, scope=scope, threshold=threshold,
      granularity=granularity, distribution=distribution, score=score, seed=seed,
      layer_axis=layer_axis)
  if coupled is not None:
    coupled.check_params(params)
  plan = _plan.make_plan(config, params)
  leaves = plan.treedef.flatten_up_to(params)
  norms = _norms_for(plan, input_norms)
  ranked = [x if n is None else jnp.abs(x).astype(jnp.float32) * n.norm
            for x, n in zip(leaves, norms)]
  if compare == "output":
    masks = [None] * len(leaves)
    for s in plan.schedules:
      fraction = float(s.schedule(0).sparsity)
      for leaf in s.leaves:
        norm = norms[leaf.index]
        outputs = norm.output_axes if norm is not None else (len(leaf.shape) - 1,)
        if isinstance(leaf.granularity, _granularity.PerLayer):  # Per layer too.
          outputs = tuple(sorted(set(outputs) | {leaf.granularity.axis}))
        masks[leaf.index] = _per_output(ranked[leaf.index], fraction, outputs)
    masks = plan.treedef.unflatten(
        [m if p else optax.MaskedNode() for m, p in zip(masks, plan.pruned)])
  else:
    tx = _transform.masking(config, rule, warn_whole=coupled is None)
    ranked_tree = plan.treedef.unflatten(ranked)
    state = tx.init(ranked_tree)
    if grads is None:
      grads = jax.tree.map(jnp.zeros_like, ranked_tree)
    _, state = _compiled_update(config, rule, coupled)(grads, state, ranked_tree)
    masks = state.masks
  mask_leaves = plan.treedef.flatten_up_to(masks)
  pruned = [jnp.where(m, x, jnp.zeros((), x.dtype)) if p else x
            for m, x, p in zip(mask_leaves, leaves, plan.pruned)]
  return plan.treedef.unflatten(pruned), masks


def check_sparsity(sparsity: Any) -> None:
  """One-shot sparsities: numbers in [0, 1], pytrees of those, `by_path` rules."""
  for value in _paths.spec_values(sparsity, _config.is_schedule_leaf):
    if value is not None and not _checks.is_number(value):
      raise ValueError(
          "`sparsity` must be a number in [0, 1], a pytree of those (None: not"
          " pruned) or `by_path` rules; schedules belong to"
          f" `magnitude_pruning`. Got {value!r}.")
    if value is not None:
      _checks.fraction("sparsity", value)


# Jitted mask updates by the value of their config, sparsities left out:
# calls with equal options and params of equal shapes (iterative pruning, a
# sweep over sparsities) compile once.
_COMPILED: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_COMPILED_MAX = 16


def _compiled_update(config: _config.PruningConfig, rule: Any, coupled: Any = None) -> Any:
  """``update(grads, state, params)``: the mask update of ``config`` jitted,
  shared by the calls whose configs (and coupled channel options, over the
  same groups) are equal but for the sparsities of their constant schedules.

  Those sparsities are an argument of the compiled function (the schedules
  are evaluated on traced values in any case), so a new sparsity does not
  compile again.
  """
  schedules, treedef = jax.tree_util.tree_flatten(config.schedule,
                                                  is_leaf=_config.is_schedule_leaf)
  constant = [isinstance(s, _schedules.ConstantSchedule) for s in schedules]
  values = jnp.asarray([s.sparsity for s, c in zip(schedules, constant) if c], jnp.float32)

  def with_sparsities(sparsities) -> _config.PruningConfig:
    filled = iter(sparsities)
    return dataclasses.replace(config, schedule=treedef.unflatten(
        [dataclasses.replace(s, sparsity=next(filled)) if c else s
         for s, c in zip(schedules, constant)]))

  erased = with_sparsities([0.0] * len(values))  # What the cache key sees.

  def update(sparsities, grads, state, params):
    tx = _transform.masking(with_sparsities(sparsities), rule, warn_whole=False)
    return tx.update(grads, state, params)

  fields = []
  for field in dataclasses.fields(erased):
    if coupled is not None and field.name == "where":
      continue  # The groups' own `selects`: the groups are in the key.
    leaves, fields_treedef = jax.tree_util.tree_flatten(
        getattr(erased, field.name), is_leaf=lambda x: x is None)
    fields.append((fields_treedef, tuple(leaves)))
  if coupled is not None and not coupled.activation_norms:
    # Equal options over the same groups (a new `coupled_channels(groups)` at
    # each call of a sweep): the cached update keeps those groups alive, so
    # their ids cannot name other groups while it is cached.
    coupled = (tuple(map(id, coupled.groups)), coupled.norm, coupled.round_to,
               coupled.importance)
  key = (tuple(fields), coupled)
  try:
    hash(key)
  except TypeError:  # An unhashable option (a list of rules, say): no sharing.
    return functools.partial(jax.jit(update), values)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(update)
    while len(_COMPILED) > _COMPILED_MAX:
      _COMPILED.popitem(last=False)
  _COMPILED.move_to_end(key)
  return functools.partial(_COMPILED[key], values)


def _coupled_for_prune(coupled: Any, grads: Any, input_norms: Optional[dict]) -> Any:
  """``coupled`` with the importance that ``prune``'s arguments give it."""
  if coupled.importance == "taylor" and grads is None:
    raise ValueError(
        "`coupled_channels(importance='taylor')` ranks channels by |sum of w * g|:"
        " pass the gradient, `prune(..., grads=grads)`.")
  if input_norms is None:
    return coupled
  if coupled.importance not in ("weight", "activation"):
    raise ValueError(
        f"`input_norms` rank coupled channels by their activation norms, not by"
        f" importance={coupled.importance!r}: pass one or the other.")
  return dataclasses.replace(
      coupled, importance="activation",
      activation_norms=_granularity.activation_norms(coupled.groups, input_norms))


def _norms_for(plan: _plan.Plan, input_norms: Optional[dict]) -> list:
  """Per leaf, its ``InputNorm`` (None where unpruned or without norms)."""
  out = [None] * len(plan.pruned)
  if input_norms is None:
    return out
  missing = []
  for s in plan.schedules:
    for leaf in s.leaves:
      norm = input_norms.get(leaf.path)
      if norm is None:
        missing.append(leaf.path)
        continue
      shape = np.shape(norm.norm)
      if len(shape) != len(leaf.shape) or any(
          a not in (1, b) for a, b in zip(shape, leaf.shape)):
        raise ValueError(
            f"`input_norms[{leaf.path!r}]` has shape {shape}, which does not"
            f" broadcast against the leaf {leaf.shape}: collect them from these params.")
      out[leaf.index] = norm
  if missing:
    raise ValueError(
        f"`input_norms` has no norms for the pruned leaves {missing}: they were"
        " not met as the weight of a matrix multiplication or convolution."
        " Leave them out with `where`, or collect the norms with the model"
        " that uses them.")
  return out


@functools.partial(jax.jit, static_argnums=1)
def _keep_per_column(columns: jax.Array, count: int) -> jax.Array:
  """Keeps all but the ``count`` smallest entries of each column (stable ranks)."""
  keys = _thresholds.magnitude_keys(columns)
  ranks = jnp.argsort(jnp.argsort(keys, axis=0, stable=True), axis=0)
  return ranks >= count


def _per_output(scores: jax.Array, sparsity: float, outputs: tuple[int, ...]) -> jax.Array:
  """Keep-mask pruning round(s * K) smallest of each output's K entries.

  Ranks by a stable argsort of the magnitude keys (NaN above inf, ties by
  position in the leaf's row-major order of the other axes).
  """
  shape = scores.shape
  inputs = tuple(a for a in range(len(shape)) if a not in outputs)
  order = inputs + tuple(outputs)
  k = math.prod(shape[a] for a in inputs)
  columns = jnp.transpose(scores, order).reshape(k, -1)
  count = int(_distributions.prune_count(jnp.float32(sparsity), k))
  kept = _keep_per_column(columns, count).reshape(tuple(shape[a] for a in order))
  return jnp.transpose(kept, np.argsort(order))
