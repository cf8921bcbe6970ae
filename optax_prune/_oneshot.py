"""One-shot pruning of trained params, without a training loop."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from optax_prune import _checks
from optax_prune import _config
from optax_prune import _paths
from optax_prune import _scores
from optax_prune import _transform


def prune(
    params: Any,
    sparsity: Any,
    *,
    grads: Optional[Any] = None,
    where: Any = None,
    scope: str = "layer",
    threshold: str = "auto",
    granularity: Any = None,
    distribution: str = "uniform",
    score: Union[str, _scores.ScoreFn] = "magnitude",
    seed: int = 0,
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

  Args:
    params: the trained params.
    sparsity: a number in [0, 1], or a pytree of those (``None``: not pruned)
      whose structure is a prefix of the params, or :func:`by_path` rules.
    grads: gradients like ``params``, for ``score="saliency"`` (``|w * g|``)
      or a score function that reads them; zeros if None.
    where, scope, threshold, granularity, distribution, score, seed: as for
      :func:`magnitude_pruning`.

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
  """
  values = _paths.spec_values(sparsity, _config.is_schedule_leaf)
  for value in values:
    if value is not None and not _checks.is_number(value):
      raise ValueError(
          "`sparsity` must be a number in [0, 1], a pytree of those (None: not"
          " pruned) or `by_path` rules; schedules belong to"
          f" `magnitude_pruning`. Got {value!r}.")
    if value is not None:
      _checks.fraction("sparsity", value)
  tx = _transform.magnitude_pruning(
      sparsity, where=where, scope=scope, threshold=threshold,
      granularity=granularity, distribution=distribution, score=score, seed=seed)
  state = tx.init(params)
  if grads is None:
    grads = jax.tree.map(jnp.zeros_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  masks = state.masks
  leaves, treedef = jax.tree.flatten(masks, is_leaf=_paths.is_masked)
  pruned = [x if _paths.is_masked(m) else jnp.where(m, x, jnp.zeros((), x.dtype))
            for m, x in zip(leaves, treedef.flatten_up_to(params))]
  return treedef.unflatten(pruned), masks
