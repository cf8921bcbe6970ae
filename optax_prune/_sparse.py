"""Sparse training: masks at their target from the first step.

* :func:`rigl` and :func:`set_training`: dynamic sparse training. A wrapper
  owns the inner optimizer (as ``optax.MultiSteps`` does), because the last
  link of a chain can neither read the raw gradient (RigL grows by
  ``|grad|``) nor write the inner state (moments of grown weights reset).
* :func:`static_sparse`: a fixed random mask, a chained link.
* :func:`straight_through`: masks on a schedule over dense weights that keep
  training (STE), a chained link that holds the dense weights in its state.

All reuse the pruning machinery: the config, the plan, a rule of ``_rules``
(:func:`_rules.drop_and_grow` for dynamic sparse training) and
``_transform.mask_step``, so counts are exact and ranked by the same
gather-free kernels.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_prune import _checks
from optax_prune import _config
from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _plan
from optax_prune import _rules
from optax_prune import _schedules
from optax_prune import _scores
from optax_prune import _transform

_RANDOM = _scores.resolve("random")


@dataclasses.dataclass(frozen=True)
class FixedSparsity:
  """A constant sparsity whose masks are recomputed every ``frequency`` steps
  in ``(0, end_step)`` (never, with ``frequency=0``)."""

  sparsity: float
  frequency: int = 0
  end_step: int = 0

  def __call__(self, step) -> _schedules.PruningTarget:
    step = jnp.asarray(step, jnp.int32)
    update = jnp.zeros((), bool)
    if self.frequency:
      update = (step > 0) & (step < self.end_step) & (step % self.frequency == 0)
    return _schedules.PruningTarget(jnp.asarray(self.sparsity, jnp.float32), update)


@dataclasses.dataclass(frozen=True)
class CosineDropFraction:
  r"""RigL's drop fraction: :math:`f(t) = \frac{f_0}{2}(1 + \cos(\pi t / T))`
  for :math:`t < T`, 0 after."""

  initial: float
  end_step: int

  def __call__(self, step):
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / max(self.end_step, 1), 1.0)
    return 0.5 * self.initial * (1.0 + jnp.cos(jnp.pi * progress))


class SparseTrainingState(NamedTuple):
  """State of :func:`rigl` and :func:`set_training`: the inner optimizer's
  state and the masks (a :class:`MagnitudePruningState`, which
  ``find_pruning_state``, ``sparsity_summary`` and ``pruning_metrics`` read)."""

  inner_state: Any
  masks: _transform.MagnitudePruningState


def _grow_by_gradient(param, grad, key):
  del param, key
  return grad


def _grow_at_random(param, grad, key):
  del grad
  return jax.random.uniform(key, param.shape, jnp.float32)


def _drop_fraction(drop_fraction: Any, end_step: int) -> Callable:
  if _checks.is_number(drop_fraction):
    return CosineDropFraction(_checks.fraction("drop_fraction", drop_fraction), end_step)
  if not callable(drop_fraction):
    raise ValueError(
        "`drop_fraction` must be a number in [0, 1] (RigL's cosine decay from it"
        " to 0 at `end_step`) or a function `step -> fraction` such as"
        f" `optax.constant_schedule(0.3)`; got {drop_fraction!r}.")
  try:
    out = jax.eval_shape(drop_fraction, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as e:  # Any failure here is the function's, not ours.
    raise ValueError(f"`drop_fraction` could not be evaluated on an int32 step: {e}") from e
  if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f"`drop_fraction` must return a float scalar for a step; it returned {out!r}.")
  return drop_fraction


def _unstructured_only(name: str, granularity: Any) -> None:
  bad = [g for g in _paths.spec_values(granularity, _config.is_granularity_leaf)
         if not isinstance(g, (type(None), _granularity.Unstructured))]
  if bad:
    raise ValueError(
        f"`{name}` drops and grows single weights: `granularity` must be None or"
        f" `unstructured()`; got {bad[0]!r}. Drop-and-grow over N:M groups, blocks"
        " or channels is not built (the grown units would have to respect the"
        " structure); use `static_sparse` or `magnitude_pruning` for those.")


def _drop_and_grow(
    name: str, grow_score: _rules.GrowScore, inner: optax.GradientTransformation,
    sparsity: float, *, end_step: int, frequency: int, drop_fraction: Any,
    regrow_dropped: bool, where: Any, distribution: str, granularity: Any,
    threshold: str, seed: int, packed_masks: bool, layer_axis: Any,
) -> optax.GradientTransformationExtraArgs:
  if isinstance(inner, optax.MultiSteps):
    raise ValueError(
        f"`{name}` cannot wrap `optax.MultiSteps`: wrap it the other way round,"
        f" `optax.MultiSteps({name}(optax.adam(...), ...), every_k_schedule)`, so"
        " that micro-batches are not counted as steps.")
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        f"`inner` must be an optax GradientTransformation (the optimizer that"
        f" `{name}` wraps, such as `optax.adam(1e-3)`); got {inner!r}.")
  if getattr(inner.update, "__qualname__", "").startswith("identity."):
    warnings.warn(
        f"`{name}`'s `inner` is `optax.identity()`, the sign of chaining it after"
        f" another optimizer (`optax.chain(optax.adam(...), {name}(optax.identity(),"
        f" ...))`): it would then grow by that optimizer's step instead of the"
        " gradient and never reset its moments. It must own the optimizer:"
        f" `{name}(optax.adam(...), ...)`.", stacklevel=3)
  sparsity = _checks.fraction("sparsity", sparsity)
  end_step = _checks.integer("end_step", end_step, 0, _checks.INT32_MAX)
  frequency = _checks.integer("frequency", frequency, 1, _checks.INT32_MAX)
  if not isinstance(regrow_dropped, bool):
    raise ValueError(f"`regrow_dropped` must be True or False; got {regrow_dropped!r}.")
  _unstructured_only(name, granularity)
  config = _config.make_config(
      FixedSparsity(sparsity, frequency, end_step), where=where, threshold=threshold,
      distribution=distribution, seed=seed, packed_masks=packed_masks,
      layer_axis=layer_axis)
  rule = _rules.drop_and_grow(
      grow_score, _drop_fraction(drop_fraction, end_step), regrow_dropped)
  link = _transform.masking(config, rule, initial_score=_RANDOM, regrows=True)
  inner = optax.with_extra_args_support(inner)
  layout = config.mask_layout

  def init_fn(params):
    return SparseTrainingState(inner.init(params), link.init(params))

  def update_fn(updates, state, params=None, *, update_masks=None, grads=None,
                **extra_args):
    # `updates` is the raw gradient: this wrapper owns the optimizer. A `grads=`
    # keyword (the convention for chained links) would be the same tree.
    del grads
    grads = updates
    if params is None:
      raise ValueError(_transform.NO_PARAMS_MSG)
    plan = _plan.make_plan(config, params)
    param_leaves = plan.treedef.flatten_up_to(params)
    old = _transform.read_masks(plan, layout, state.masks, param_leaves)
    # The inner optimizer sees the gradient of the sparse model: pruned
    # entries get none, so clipping norms and moments ignore them.
    masked = [jnp.where(m, g, jnp.zeros((), g.dtype)) if p else g for g, m, p in
              zip(plan.treedef.flatten_up_to(grads), old, plan.pruned)]
    inner_updates, inner_state = inner.update(
        plan.treedef.unflatten(masked), state.inner_state, params, **extra_args)
    updates, masks = link.update(inner_updates, state.masks, params,
                                 update_masks=update_masks, grads=grads)

    # Grown weights start afresh: their params-shaped optimizer state (momentum,
    # Adam's mu and nu) goes back to what `init` gives (0 for those). Elementwise
    # on every step, not under a conditional: XLA fuses it into the optimizer's
    # own write of that state, where a `lax.cond` would copy the state.
    new = _transform.read_masks(plan, layout, masks, param_leaves)
    grown = plan.treedef.unflatten(
        [n & ~o if p else False for n, o, p in zip(new, old, plan.pruned)])
    inner_state = reset_where(inner, inner_state, params, grown)
    return updates, SparseTrainingState(inner_state, masks)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reset_where(inner: optax.GradientTransformation, inner_state: Any, params: Any,
                where: Any) -> Any:
  """``inner_state`` with every params-shaped leaf set to its ``init`` value
  where ``where`` (a params-like tree of bool arrays, or ``False`` for a leaf
  left alone) is True.

  The leaves are found with ``optax.tree_utils.tree_map_params``, so any optax
  optimizer works; a leaf in a params-shaped tree but of another shape
  (Adafactor's factored row and column moments) is left alone, as are
  ``MaskedNode`` placeholders (``optax.masked``, ``optax.multi_transform``).
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)

  def mark(leaf, grown, param):
    same = not is_masked(leaf) and jnp.shape(leaf) == jnp.shape(param)
    return grown if same and grown is not False else False

  marks = optax.tree_utils.tree_map_params(
      inner, mark, inner_state, where, params, transform_non_params=lambda _: False,
      is_leaf=is_masked)
  return jax.tree.map(
      lambda leaf, fresh, grown: leaf if grown is False else jnp.where(
          grown, fresh, leaf).astype(jnp.result_type(leaf)),
      inner_state, inner.init(params), marks, is_leaf=is_masked)


_DST_ARGS = r"""
  Args:
    inner: the optimizer to wrap (``optax.adam(1e-3)``, a chain, ...); it
      receives the gradient with pruned entries zeroed.
    sparsity: the target, in [0, 1], held from the first step: each leaf's
      share (``distribution``) of ``round(s * n)`` entries is pruned at
      ``init`` at random (from ``seed``) and its count never changes.
    end_step: masks are frozen from this step on (RigL: 75% of training).
    frequency: steps between mask updates (:math:`\Delta T`, RigL's 100), >= 1.
    drop_fraction: a number :math:`f_0` in [0, 1] (default 0.3): the fraction
      of each leaf's kept weights dropped at step :math:`t`, decayed by a
      cosine, :math:`\frac{f_0}{2}(1 + \cos(\pi t / T))` with :math:`T` =
      ``end_step``; or a function ``step -> fraction`` (for a constant
      fraction, ``optax.constant_schedule(0.3)``).
    regrow_dropped: whether a weight dropped at a step may be grown at that
      step (True: as in RigL's algorithm and jaxpruner; it keeps its value and
      moments). False grows only entries pruned before the step (a departure
      from the papers; at most ``n - k`` entries then move).
    where: which leaves are sparse, as in :func:`magnitude_pruning`.
    distribution: ``"erk"`` (default, as in RigL) or ``"uniform"``.
    granularity: ``None`` or ``unstructured()``; other granularities are
      refused (a ``ValueError``): drop-and-grow over N:M groups, blocks or
      channels is not built.
    threshold: the kernel, as in :func:`magnitude_pruning` (all exact).
    seed: integer seed of the initial masks (and of SET's growth).
    packed_masks: store masks as bits, as in :func:`magnitude_pruning`.
    layer_axis: leaves that stack layers, as in :func:`magnitude_pruning`:
      each layer keeps its own count, drops and grows its own ``d``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SparseTrainingState` and whose ``update(grads, state, params)``
    takes the raw gradient (it owns the optimizer: do not chain another
    optimizer before it; wrap it in ``optax.MultiSteps``, not the other way
    round, so that micro-batches are not counted as steps) and
    ``update_masks`` as :func:`magnitude_pruning` does. Masks are updated at
    the multiples of ``frequency`` in ``(0, end_step)``. The first forward
    pass sees the params as given (``init`` cannot change them); pruned
    entries are exactly 0 from the first ``optax.apply_updates`` on.
"""


def rigl(
    inner: optax.GradientTransformation, sparsity: float, *, end_step: int,
    frequency: int = 100, drop_fraction: Union[float, Callable] = 0.3,
    regrow_dropped: bool = True, where: Any = None, distribution: str = "erk",
    granularity: Any = None, threshold: str = "auto", seed: int = 0,
    packed_masks: bool = False, layer_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RigL dynamic sparse training: drop the smallest weights, grow by ``|grad|``.

  Sparse from the first step. Every ``frequency`` steps before ``end_step``,
  each sparse leaf with :math:`k` kept weights drops the :math:`d =
  \mathrm{round}(f k)` kept weights of smallest :math:`|w|` and grows the
  :math:`d` pruned ones of largest :math:`|\nabla L|` (the raw, dense
  gradient), so its count is exact and the sparsity never drifts. Grown
  weights start at exactly 0 and their optimizer state (momentum, Adam's
  moments: every params-shaped leaf of ``inner``'s state) is reset to its
  ``init`` value; pruned weights are exactly 0 after every
  ``optax.apply_updates``. Ties go by position.
  """
  return _drop_and_grow(
      "rigl", _grow_by_gradient, inner, sparsity, end_step=end_step,
      frequency=frequency, drop_fraction=drop_fraction, regrow_dropped=regrow_dropped,
      where=where, distribution=distribution, granularity=granularity,
      threshold=threshold, seed=seed, packed_masks=packed_masks, layer_axis=layer_axis)


rigl.__doc__ += _DST_ARGS + r"""
  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = optax_prune.rigl(optax.adam(1e-2), 0.75, end_step=100, frequency=10)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> update = jax.jit(tx.update)  # One compile: a mask update is a `lax.cond`.
    >>> for _ in range(20):
    ...   updates, state = update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int(jnp.sum(params["w"] == 0))  # Exactly round(0.75 * 64) pruned.
    48

  References:
    Evci et al., `Rigging the Lottery: Making All Tickets Winners
    <https://arxiv.org/abs/1911.11134>`_, 2020.
"""


def set_training(
    inner: optax.GradientTransformation, sparsity: float, *, end_step: int,
    frequency: int = 100, drop_fraction: Union[float, Callable] = 0.3,
    regrow_dropped: bool = True, where: Any = None, distribution: str = "erk",
    granularity: Any = None, threshold: str = "auto", seed: int = 0,
    packed_masks: bool = False, layer_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SET (sparse evolutionary training): drop the smallest weights, grow at random.

  As :func:`rigl`, but the :math:`d` grown weights are drawn uniformly among
  the pruned entries (keys from ``seed`` and the step: reproducible, also
  after a resume), so no gradient is read.
  """
  return _drop_and_grow(
      "set_training", _grow_at_random, inner, sparsity, end_step=end_step,
      frequency=frequency, drop_fraction=drop_fraction, regrow_dropped=regrow_dropped,
      where=where, distribution=distribution, granularity=granularity,
      threshold=threshold, seed=seed, packed_masks=packed_masks, layer_axis=layer_axis)


set_training.__doc__ += _DST_ARGS + r"""
  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    >>> tx = optax_prune.set_training(optax.sgd(0.1), 0.5, end_step=50, frequency=5)
    >>> state = tx.init(params)
    >>> update = jax.jit(tx.update)  # One compile: a mask update is a `lax.cond`.
    >>> for _ in range(10):
    ...   updates, state = update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> masks = optax_prune.find_pruning_state(state).masks
    >>> int(jnp.sum(~masks["w"]))  # Exactly half pruned; grown weights start at 0.
    32

  References:
    Mocanu et al., `Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science
    <https://arxiv.org/abs/1707.04780>`_, 2018.
"""


def static_sparse(
    sparsity: float, *, where: Any = None, distribution: Optional[str] = None,
    granularity: Any = None, seed: int = 0, packed_masks: bool = False,
    layer_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: a fixed random mask from the first step.

  ``init`` prunes exactly the ``round(s * units)`` of each leaf (its
  ``distribution`` share) at random from ``seed``; the masks never change
  and pruned weights are exactly 0 after every ``optax.apply_updates``. The
  last link of a chain, like :func:`magnitude_pruning`; its state is a
  :class:`MagnitudePruningState`.

  Args:
    sparsity: the target, in [0, 1].
    where: which leaves are sparse, as in :func:`magnitude_pruning`.
    distribution: ``"erk"`` (default for unstructured leaves) or ``"uniform"``.
    granularity: what one decision prunes, as in :func:`magnitude_pruning`
      (random N:M groups, blocks or channels).
    seed: integer seed of the masks.
    packed_masks: store masks as bits, as in :func:`magnitude_pruning`.
    layer_axis: leaves that stack layers, as in :func:`magnitude_pruning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``, last in a chain.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.ones((4, 4))}
    >>> tx = optax.chain(optax.adam(1e-2), optax_prune.static_sparse(0.75))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> int(jnp.sum(optax.apply_updates(params, updates)["w"] == 0))
    12
  """
  config = _config.make_config(
      FixedSparsity(_checks.fraction("sparsity", sparsity)), where=where,
      granularity=granularity, distribution=distribution, seed=seed,
      packed_masks=packed_masks, layer_axis=layer_axis)
  return _transform.masking(config, _rules.prune_smallest, initial_score=_RANDOM)


class StraightThroughState(NamedTuple):
  """State of :func:`straight_through`: the masks and the dense weights.

  ``dense`` has the params' structure (``MaskedNode`` where a leaf is not
  masked): the weights that keep training, pruned entries included.
  """

  masks: _transform.MagnitudePruningState
  dense: Any


def straight_through(
    schedule: Any, *, where: Any = None, scope: str = "layer", threshold: str = "auto",
    granularity: Any = None, distribution: Optional[str] = None,
    score: Union[str, _scores.ScoreFn] = "magnitude", seed: int = 0,
    packed_masks: bool = False, layer_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Straight-through masks (STE): the model runs masked, dense weights train.

  The state holds a dense copy :math:`\bar w` of each masked leaf; the params
  the model sees are always :math:`w = m \odot \bar w`, so the forward pass
  is sparse and nothing has to be remembered in the loss function. Its
  gradient :math:`g = \nabla_w L` is applied to the dense weights (the
  straight-through estimator): :math:`\bar w' = \bar w + u` with :math:`u` the
  incoming update, and masks follow ``schedule`` as in
  :func:`magnitude_pruning`, ranked on :math:`|\bar w|` afresh at each
  update: a pruned weight that grows back among the largest returns (with
  its dense value). The update returned lands the params on :math:`m' \odot
  \bar w'`: pruned entries exactly 0, kept ones within one rounding of
  :math:`\bar w'`. The last link of a chain; costs one params-sized copy.

  Args:
    schedule: as in :func:`magnitude_pruning`.
    where: as in :func:`magnitude_pruning`.
    scope: as in :func:`magnitude_pruning`.
    threshold: as in :func:`magnitude_pruning`.
    granularity: as in :func:`magnitude_pruning`.
    distribution: as in :func:`magnitude_pruning`.
    score: ``"magnitude"`` (jaxpruner's SteMagnitudePruning), ``"random"``
      (SteRandomPruning: a new draw over all entries), ``"saliency"`` or a
      callable, as in :func:`magnitude_pruning`; every score ranks all
      entries afresh at each update (pruned ones are not scored 0), so
      pruned weights can return.
    seed: as in :func:`magnitude_pruning`.
    packed_masks: as in :func:`magnitude_pruning`.
    layer_axis: as in :func:`magnitude_pruning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``, last in a chain, whose state
    is a :class:`StraightThroughState`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[0.1, -2.0], [0.3, 4.0]])}
    >>> tx = optax.chain(optax.sgd(1.0), optax_prune.straight_through(0.5))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[-1.0, 0.0], [0.0, 0.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"]  # Masked: the two smallest pruned.
    Array([[ 0., -2.],
           [ 0.,  4.]], dtype=float32)
    >>> state[1].dense["w"]  # Dense: the pruned 0.1 went on training.
    Array([[ 1.1, -2. ],
           [ 0.3,  4. ]], dtype=float32)

  References:
    Bengio et al., `Estimating or Propagating Gradients Through Stochastic
    Neurons <https://arxiv.org/abs/1308.3432>`_, 2013.
  """
  config = _config.make_config(
      schedule, where=where, scope=scope, threshold=threshold, granularity=granularity,
      distribution=distribution, score=score, seed=seed, packed_masks=packed_masks,
      layer_axis=layer_axis)
  # Ranked afresh on the dense weights: no score is zeroed at pruned entries.
  config = dataclasses.replace(
      config, score=dataclasses.replace(config.score, zero_when_pruned=True))

  def init_fn(params):
    plan = _plan.make_plan(config, params)
    dense = [jnp.copy(x) if p else optax.MaskedNode()
             for x, p in zip(plan.treedef.flatten_up_to(params), plan.pruned)]
    return StraightThroughState(_transform.init_state(config, params),
                                plan.treedef.unflatten(dense))

  def update_fn(updates, state, params=None, *, update_masks=None, grads=None,
                **extra_args):
    del extra_args  # Meant for other links of the chain.
    if params is None:
      raise ValueError(_transform.NO_PARAMS_MSG)
    plan = _plan.make_plan(config, params)
    dense = _dense_leaves(plan, state.dense)
    step = _transform.mask_step(
        config, _rules.prune_smallest, updates, state.masks, params,
        ranked=plan.treedef.unflatten(dense), grads=grads, update_masks=update_masks)
    new_dense, out = [], []
    for u, p, d, m, pruned in zip(step.now.updates, step.now.params, dense, step.masks,
                                  plan.pruned):
      if not pruned:
        new_dense.append(d)
        out.append(u)
        continue
      d = (d + u).astype(d.dtype)  # As `optax.apply_updates` would.
      new_dense.append(d)
      out.append(jnp.where(m, d - p, -p).astype(jnp.result_type(u)))
    return plan.treedef.unflatten(out), StraightThroughState(
        step.state, plan.treedef.unflatten(new_dense))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _dense_leaves(plan: _plan.Plan, dense: Any) -> list:
  try:
    leaves = plan.treedef.flatten_up_to(dense)
  except (ValueError, TypeError):
    leaves = None
  if leaves is None or [_paths.is_masked(x) for x in leaves] != [not p for p in plan.pruned]:
    raise ValueError(
        "`params` do not match the straight-through state: it was built by"
        " `init` for params of another structure. Call `tx.init(params)` with"
        " the params you update.")
  return leaves
