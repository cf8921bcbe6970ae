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


def prune_count(sparsity: jax.Array, n) -> jax.Array:
  """``round(sparsity * n)`` exactly, half to even, as uint32.

  ``sparsity`` is a float32 scalar or array in [0, 1] (it may be traced);
  ``n`` a static size below 2**31, or a sequence of them (then one count per
  size: the arithmetic runs once on vectors, so XLA compiles it in constant
  size, whatever the number of leaves). The float is split into its integer
  mantissa ``m`` and a power of two, ``s = m / 2**shift``, and ``m * n`` (up
  to 55 bits) is formed in 12-bit limbs so that every partial product fits in
  int32.

  Args:
    sparsity: float32 scalar or array in [0, 1], broadcast against ``n``.
    n: number of entries, 0 <= n < 2**31; an int or a sequence of ints.

  Returns:
    uint32, of the shape of ``sparsity`` broadcast against ``n``.
  """
  sizes = np.asarray(n, np.int64)
  if sizes.size and not ((sizes >= 0).all() and (sizes <= MAX_GROUP_SIZE).all()):
    raise ValueError(f"group size must be in [0, 2**31 - 1]; got {n}.")
  bits = lax.bitcast_convert_type(jnp.asarray(sparsity, jnp.float32), jnp.uint32)
  exponent = ((bits >> 23) & 0xFF).astype(jnp.int32)
  fraction = bits & jnp.uint32(0x7FFFFF)
  mantissa = jnp.where(exponent > 0, fraction | jnp.uint32(0x800000), fraction)
  shift = jnp.where(exponent > 0, 150 - exponent, 149)  # s = m * 2**-shift.

  m_limbs = [mantissa & 0xFFF, mantissa >> 12]
  n_limbs = [(sizes >> (12 * j)) & 0xFFF for j in range(3)]
  # Column sums of the limb products (< 2**25 each), then carry into 12 bits.
  limbs, carry = [], jnp.uint32(0)
  for t in range(5):
    column = carry
    for i, m_limb in enumerate(m_limbs):
      j = t - i
      if 0 <= j < len(n_limbs) and n_limbs[j].any():
        column = column + m_limb * jnp.asarray(n_limbs[j], jnp.uint32)
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
  count = jnp.where(half & (sticky | ((base & 1) == 1)), base + 1, base)
  return jnp.broadcast_to(count, jnp.broadcast_shapes(jnp.shape(bits), sizes.shape))


def erk_ratio(shape: Sequence[int]) -> float:
  """``sum(shape) / prod(shape)``; 0 for an empty leaf (it has nothing to prune)."""
  size = math.prod(shape)
  return sum(shape) / size if size else 0.0


def uniform_prune_counts(sizes: Sequence[int], sparsity: jax.Array) -> jax.Array:
  """``round(s * n_l)`` per leaf: a uint32 vector of ``len(sizes)``."""
  return prune_count(clip_sparsity(sparsity), np.asarray(sizes, np.int64).reshape(-1))


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


def fill_in_order(amount: jax.Array, room: jax.Array) -> jax.Array:
  """Shares of ``amount`` (int32 scalar >= 0) taken by the entries of ``room``
  (int32 vector >= 0) in order, each as much as it has room for.

  The sequential rule ``take_i = min(room_i, amount - taken before i)``, as
  vector operations (an exclusive cumulative sum): its compiled size does not
  grow with the number of entries, where a loop over them in Python would be
  copied by XLA into every fusion that reads a count.
  """
  before = jnp.cumsum(room, dtype=jnp.int32) - room
  return jnp.clip(amount - before, 0, room)


def erk_prune_counts(
    sizes: Sequence[int], ratios: Sequence[float], sparsity: jax.Array
) -> jax.Array:
  """Per-leaf prune counts (a uint32 vector) summing exactly to
  ``round(s * sum(sizes))``.

  Each leaf's count is rounded from its ERK density, keeping at least one
  unit of every leaf; the few units that the rounding (and float32 in the
  densities) leave over or short are then taken from, or given to, the leaves
  that are not dense, in order. No leaf is pruned whole unless the total
  leaves fewer kept units than there are leaves (at ``s = 1``, all are).
  """
  sparsity = clip_sparsity(sparsity)
  sizes = np.asarray(sizes, np.int64).reshape(-1)
  total = prune_count(sparsity, int(sizes.sum())).astype(jnp.int32)
  if not sizes.size:
    return jnp.zeros((0,), jnp.uint32)
  densities = erk_densities(sizes, ratios, sparsity)
  n = jnp.asarray(sizes, jnp.int32)
  # At most n - 1 each: a density that rounds to no kept unit would prune the
  # leaf whole, which no one asked for.
  counts = jnp.minimum(prune_count(1.0 - densities, sizes).astype(jnp.int32),
                       jnp.maximum(n - 1, 0))
  residual = total - jnp.sum(counts, dtype=jnp.int32)
  sparse = densities < 1.0
  # Passes, each taking what fits, leaf by leaf in order: leaves that are not
  # dense (so dense ones stay dense) keeping one unit, then any leaf keeping
  # one, then any leaf. Within a pass the residual keeps its sign.
  for allowed, keep in ((sparse, 1), (True, 1), (True, 0)):
    up = jnp.where(allowed, jnp.maximum(n - keep - counts, 0), 0)
    down = jnp.where(allowed, counts, 0)
    step = (fill_in_order(jnp.maximum(residual, 0), up)
            - fill_in_order(jnp.maximum(-residual, 0), down))
    counts, residual = counts + step, residual - jnp.sum(step, dtype=jnp.int32)
  return counts.astype(jnp.uint32)


# Jitted by its static sizes and ratios: called eagerly (at `init`, in
# `prune`), its many small ops compile once instead of one by one; inside a
# jitted step it is inlined as before.
_erk_prune_counts_jitted = jax.jit(erk_prune_counts, static_argnums=(0, 1))


def nested_counts(counts, pruned) -> jax.Array:
  """``counts`` moved so that no group loses fewer units than ``pruned`` (what
  it has lost already), with the same sum; a uint32 vector.

  Rounding can give a leaf one unit fewer at a higher ERK sparsity, which
  would revive a pruned unit. Each group is raised to its floor and the
  difference taken back from the groups above theirs, in order: possible
  because the total has not fallen. When it has (a falling schedule), counts
  are left as they are, as uniform counts are.
  """
  counts = jnp.asarray(counts).astype(jnp.int32).reshape(-1)
  pruned = jnp.asarray(pruned).astype(jnp.int32).reshape(-1)
  rising = jnp.sum(counts, dtype=jnp.int32) >= jnp.sum(pruned, dtype=jnp.int32)
  floors = jnp.where(rising, pruned, 0)
  raised = jnp.maximum(counts, floors)
  excess = jnp.sum(raised, dtype=jnp.int32) - jnp.sum(counts, dtype=jnp.int32)
  return (raised - fill_in_order(excess, raised - floors)).astype(jnp.uint32)


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
      sparsity: jax.Array, pruned: Optional[jax.Array] = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Units to prune per group, and the sparsity that asks of each group.

    Args:
      sizes: units per group.
      shapes: per group, the shape of its (first) leaf.
      sparsity: float32 scalar, the schedule's sparsity; clipped to [0, 1],
        NaN counts as 0.
      pruned: optional int32 vector, per group the units it has lost already.

    Returns:
      ``(counts, shares)``: vectors over the groups, a uint32 count in
      [0, size] and the float32 sparsity asked of each.
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
    return uniform_prune_counts(sizes, sparsity), jnp.full(len(sizes), sparsity)


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
    counts = _erk_prune_counts_jitted(tuple(int(n) for n in sizes),
                                      tuple(erk_ratio(s) for s in shapes), sparsity)
    if pruned is not None:
      counts = nested_counts(counts, pruned)
    return counts, counts.astype(jnp.float32) / np.maximum(np.asarray(sizes, np.float32), 1)


def resolve(name: str, by_default: bool = False) -> Distribution:
  """The distribution called ``name``; a ``ValueError`` naming the argument."""
  _checks.one_of("distribution", name, DISTRIBUTIONS)
  return {"uniform": Uniform(), "erk": ERK(by_default=by_default)}[name]
