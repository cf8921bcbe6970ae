"""How many units each leaf loses: exact counts, and how a schedule's
sparsity is shared among its leaves.

Counts are exact: a group of :math:`n` units at sparsity :math:`s` loses
:math:`\\mathrm{round}(s n)` (half to even), computed in integer arithmetic
from the float32 bits of :math:`s` (:func:`prune_count`). A schedule's
``distribution`` shares its sparsity (:class:`Uniform`, :class:`ERK`):

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
  :math:`\\mathrm{round}(s N)` units in total, no leaf more than it holds and
  none whole while :math:`s < 1` leaves a unit for each.

Both run on a traced sparsity inside ``jit``: the schedule may ramp :math:`s`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_prune import _checks

DISTRIBUTIONS = ("uniform", "erk")
# Largest group size (units) for which a count fits our int32 arithmetic.
MAX_GROUP_SIZE = 2**31 - 1


def clip_sparsity(sparsity: jax.Array) -> jax.Array:
  """float32 sparsity clipped to [0, 1]; NaN counts as 0."""
  sparsity = jnp.asarray(sparsity, jnp.float32)
  return jnp.where(jnp.isnan(sparsity), 0.0, jnp.clip(sparsity, 0.0, 1.0))


def prune_count(sparsity: jax.Array, n: int) -> jax.Array:
  """``round(sparsity * n)`` exactly, half to even, as uint32.

  ``sparsity`` is a float32 scalar in [0, 1] (it may be traced); ``n`` is a
  static size below 2**31. The float is split into its integer mantissa ``m``
  and a power of two, ``s = m / 2**shift``, and ``m * n`` (up to 55 bits) is
  formed in 12-bit limbs so that every partial product fits in int32.

  Args:
    sparsity: float32 scalar in [0, 1].
    n: number of entries, 0 <= n < 2**31.

  Returns:
    uint32 scalar.
  """
  if not 0 <= n <= MAX_GROUP_SIZE:
    raise ValueError(f"group size must be in [0, 2**31 - 1]; got {n}.")
  bits = lax.bitcast_convert_type(jnp.asarray(sparsity, jnp.float32), jnp.uint32)
  exponent = ((bits >> 23) & 0xFF).astype(jnp.int32)
  fraction = bits & jnp.uint32(0x7FFFFF)
  mantissa = jnp.where(exponent > 0, fraction | jnp.uint32(0x800000), fraction)
  shift = jnp.where(exponent > 0, 150 - exponent, 149)  # s = m * 2**-shift.

  m_limbs = [mantissa & 0xFFF, mantissa >> 12]
  n_limbs = [(n >> (12 * j)) & 0xFFF for j in range(3)]
  # Column sums of the limb products (< 2**25 each), then carry into 12 bits.
  limbs, carry = [], jnp.uint32(0)
  for t in range(5):
    column = carry
    for i, m_limb in enumerate(m_limbs):
      j = t - i
      if 0 <= j < len(n_limbs) and n_limbs[j]:
        column = column + m_limb * jnp.uint32(n_limbs[j])
    limbs.append(column & 0xFFF)
    carry = column >> 12

  # twice = floor(2 * s * n) = (m * n) >> (shift - 1); sticky: bits shifted out.
  down = shift - 1
  twice, sticky = jnp.uint32(0), jnp.bool_(False)
  for t, limb in enumerate(limbs):
    offset = 12 * t - down  # Where this limb's lowest bit lands.
    left = jnp.clip(offset, 0, 31).astype(jnp.uint32)
    right = jnp.clip(-offset, 0, 31).astype(jnp.uint32)
    gone = -offset >= 12  # The whole limb is shifted out.
    twice = twice + jnp.where(
        gone, 0, jnp.where(offset >= 0, limb << left, limb >> right)
    )
    lost = jnp.where(gone, limb, limb & ((jnp.uint32(1) << right) - 1))
    sticky = sticky | ((offset < 0) & (lost != 0))
  base = twice >> 1
  half = (twice & 1) == 1
  # Above one half: round up; exactly one half: round to even.
  return jnp.where(half & (sticky | ((base & 1) == 1)), base + 1, base)




def erk_ratio(shape: Sequence[int]) -> float:
  """``sum(shape) / prod(shape)``; 0 for an empty leaf (it has nothing to prune)."""
  size = math.prod(shape)
  return sum(shape) / size if size else 0.0


def uniform_prune_counts(sizes: Sequence[int], sparsity: jax.Array) -> list[jax.Array]:
  """``round(s * n_l)`` per leaf (uint32)."""
  sparsity = clip_sparsity(sparsity)
  return [prune_count(sparsity, n) for n in sizes]


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

  Each leaf's count is rounded from its ERK density, keeping at least one
  unit of every leaf; the few units that the rounding (and float32 in the
  densities) leave over or short are then taken from, or given to, the leaves
  that are not dense, in order. No leaf is pruned whole unless the total
  leaves fewer kept units than there are leaves (at ``s = 1``, all are).
  """
  sparsity = clip_sparsity(sparsity)
  total = prune_count(sparsity, sum(sizes)).astype(jnp.int32)
  if not sizes:
    return []
  densities = erk_densities(sizes, ratios, sparsity)
  # At most n - 1 each: a density that rounds to no kept unit would prune the
  # leaf whole, which no one asked for.
  counts = [
      jnp.minimum(prune_count(1.0 - densities[i], n).astype(jnp.int32), max(n - 1, 0))
      for i, n in enumerate(sizes)
  ]
  residual = total - sum(counts)
  sparse = [densities[i] < 1.0 for i in range(len(sizes))]
  # Passes, each taking what fits: leaves that are not dense (so dense ones
  # stay dense) keeping one unit, then any leaf keeping one, then any leaf.
  for only_sparse, keep in ((True, 1), (False, 1), (False, 0)):
    for i, n in enumerate(sizes):
      allowed = sparse[i] if only_sparse else jnp.bool_(True)
      room_up = jnp.maximum(n - keep - counts[i], 0)
      step = jnp.clip(residual, -counts[i], room_up)
      step = jnp.where(allowed, step, 0)
      counts[i] = counts[i] + step
      residual = residual - step
  return [c.astype(jnp.uint32) for c in counts]


def nested_counts(
    counts: Sequence[jax.Array], pruned: Sequence[jax.Array]
) -> list[jax.Array]:
  """``counts`` moved so that no group loses fewer units than ``pruned`` (what
  it has lost already), with the same sum; uint32.

  Rounding can give a leaf one unit fewer at a higher ERK sparsity, which
  would revive a pruned unit. Each group is raised to its floor and the
  difference taken back from the groups above theirs, in order: possible
  because the total has not fallen. When it has (a falling schedule), counts
  are left as they are, as uniform counts are.
  """
  counts = [jnp.asarray(c).astype(jnp.int32) for c in counts]
  pruned = [jnp.asarray(p).astype(jnp.int32) for p in pruned]
  rising = sum(counts) >= sum(pruned)
  floors = [jnp.where(rising, p, 0) for p in pruned]
  raised = [jnp.maximum(c, f) for c, f in zip(counts, floors)]
  excess = sum(raised) - sum(counts)
  out = []
  for c, f in zip(raised, floors):
    take = jnp.clip(excess, 0, c - f)
    out.append((c - take).astype(jnp.uint32))
    excess = excess - take
  return out


class Distribution(Protocol):
  """How a schedule's sparsity is shared among its groups."""

  name: str
  # Whether the groups of a schedule share one count (so their total units
  # must fit int32 together), or each has its own.
  shares_budget: bool

  def for_units(self, total: int) -> "Distribution":
    """The distribution to use for a schedule of ``total`` units (itself, or
    a fallback where its counts would not fit)."""

  def counts(
      self, sizes: Sequence[int], shapes: Sequence[Sequence[int]],
      sparsity: jax.Array, pruned: Optional[Sequence[jax.Array]] = None,
  ) -> tuple[list[jax.Array], list[jax.Array]]:
    """Units to prune per group, and the sparsity that asks of each group.

    Args:
      sizes: units per group.
      shapes: per group, the shape of its (first) leaf.
      sparsity: float32 scalar, the schedule's sparsity; clipped to [0, 1],
        NaN counts as 0.
      pruned: optional, per group, the units it has lost already.

    Returns:
      ``(counts, shares)``: per group a uint32 count in [0, size] and a
      float32 scalar, the sparsity asked of it.
    """


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Each group at the schedule's sparsity: ``round(s * n)`` units.

  Never fewer while ``s`` rises, so ``pruned`` is not needed.
  """

  name = "uniform"
  shares_budget = False

  def for_units(self, total):
    del total
    return self

  def counts(self, sizes, shapes, sparsity, pruned=None):
    del shapes, pruned
    sparsity = clip_sparsity(sparsity)
    return uniform_prune_counts(sizes, sparsity), [sparsity] * len(sizes)


@dataclasses.dataclass(frozen=True)
class ERK:
  """Erdos-Renyi-Kernel shares of one exact total (one leaf per group).

  With ``pruned``, no group loses fewer units than it has already while the
  total rises (:func:`nested_counts`). A group's share is its count over its
  units.
  """

  name = "erk"
  shares_budget = True
  # Chosen by default (not asked for): past 2**31 - 1 units a schedule falls
  # back to uniform instead of being refused.
  by_default: bool = False

  def for_units(self, total):
    # The shared count is int32 arithmetic (`prune_count`).
    return Uniform() if self.by_default and total > MAX_GROUP_SIZE else self

  def counts(self, sizes, shapes, sparsity, pruned=None):
    counts = erk_prune_counts(sizes, [erk_ratio(s) for s in shapes], sparsity)
    if pruned is not None:
      counts = nested_counts(counts, pruned)
    return counts, [c.astype(jnp.float32) / max(n, 1) for c, n in zip(counts, sizes)]


def resolve(name: str, by_default: bool = False) -> Distribution:
  """The distribution called ``name``; a ``ValueError`` naming the argument."""
  _checks.one_of("distribution", name, DISTRIBUTIONS)
  return {"uniform": Uniform(), "erk": ERK(by_default=by_default)}[name]
