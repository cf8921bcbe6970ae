"""How one overall sparsity is shared among the leaves of a schedule.

* ``"uniform"``: every leaf at the scheduled sparsity :math:`s`; leaf
  :math:`l` of :math:`n_l` units loses :math:`\\mathrm{round}(s n_l)`.
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020, RigL). Leaf :math:`l` of
  shape :math:`(d_1, \\dots, d_k)` gets density

  .. math::

    \\rho_l = \\min\\left(1, \\epsilon \\frac{\\sum_i d_i}{\\prod_i d_i}\\right),

  with :math:`\\epsilon` solved so that :math:`\\sum_l \\rho_l n_l = (1 - s) N`
  (leaves that would exceed density 1 are kept dense and :math:`\\epsilon` is
  solved again over the rest). Small layers stay denser, large ones are
  pruned harder. The integer counts then lose exactly
  :math:`\\mathrm{round}(s N)` units in total, no leaf more than it holds.

Both run on a traced sparsity inside ``jit``: the schedule may ramp :math:`s`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _thresholds

DISTRIBUTIONS = ("uniform", "erk")


def erk_ratio(shape: Sequence[int]) -> float:
  """``sum(shape) / prod(shape)``; 0 for an empty leaf (it has nothing to prune)."""
  size = math.prod(shape)
  return sum(shape) / size if size else 0.0


def uniform_prune_counts(sizes: Sequence[int], sparsity: jax.Array) -> list[jax.Array]:
  """``round(s * n_l)`` per leaf (uint32)."""
  sparsity = _thresholds.clip_sparsity(sparsity)
  return [_thresholds.prune_count(sparsity, n) for n in sizes]


def erk_densities(sizes, ratios, sparsity) -> jax.Array:
  """ERK densities (float32, shape (L,)) for a traced overall ``sparsity``.

  Water-filling: with the leaves sorted by ratio, the ``j`` densest are capped
  at 1 for the smallest ``j`` whose solved :math:`\\epsilon` keeps the rest at
  or below 1. All ``L + 1`` candidates are formed at once (static shapes).
  """
  order = np.argsort(-np.asarray(ratios, float), kind="stable")
  n = np.asarray(sizes, np.float64)[order]
  r = np.asarray(ratios, np.float64)[order]
  keep_total = (1.0 - sparsity) * float(n.sum())
  capped = np.concatenate([[0.0], np.cumsum(n)])  # Entries held dense, per j.
  rest = np.concatenate([np.cumsum((r * n)[::-1])[::-1], [0.0]])  # sum r n, i >= j.
  capped, rest = jnp.asarray(capped, jnp.float32), jnp.asarray(rest, jnp.float32)
  epsilon = (keep_total - capped) / jnp.where(rest > 0, rest, 1.0)
  next_ratio = jnp.asarray(np.concatenate([r, [0.0]]), jnp.float32)
  valid = (epsilon * next_ratio <= 1.0) | (rest == 0)
  j = jnp.argmax(valid)  # The first valid j (the last one always is).
  position = jnp.arange(len(sizes))
  density_sorted = jnp.where(
      position < j, 1.0, jnp.clip(epsilon[j] * jnp.asarray(r, jnp.float32), 0.0, 1.0)
  )
  return density_sorted[jnp.asarray(np.argsort(order))]


def erk_prune_counts(
    sizes: Sequence[int], ratios: Sequence[float], sparsity: jax.Array
) -> list[jax.Array]:
  """Per-leaf prune counts (uint32) summing exactly to ``round(s * sum(sizes))``.

  Each leaf's count is rounded from its ERK density; the few units that the
  rounding (and float32 in the densities) leave over or short are then taken
  from, or given to, the leaves that are not dense, in order, never beyond a
  leaf's size.
  """
  sparsity = _thresholds.clip_sparsity(sparsity)
  total = _thresholds.prune_count(sparsity, sum(sizes)).astype(jnp.int32)
  if not sizes:
    return []
  densities = erk_densities(sizes, ratios, sparsity)
  counts = [
      _thresholds.prune_count(1.0 - densities[i], n).astype(jnp.int32)
      for i, n in enumerate(sizes)
  ]
  residual = total - sum(counts)
  sparse = [densities[i] < 1.0 for i in range(len(sizes))]
  # Two passes: first only leaves that are not dense (so dense ones stay
  # dense), then any leaf; each takes what fits.
  for only_sparse in (True, False):
    for i, n in enumerate(sizes):
      allowed = sparse[i] if only_sparse else jnp.bool_(True)
      room_up, room_down = n - counts[i], counts[i]
      step = jnp.clip(residual, -room_down, room_up)
      step = jnp.where(allowed, step, 0)
      counts[i] = counts[i] + step
      residual = residual - step
  return [c.astype(jnp.uint32) for c in counts]
