"""Exact magnitude masks: which entries of a group of arrays to prune.

Every method computes the same mask. Entries are ranked by a uint32 key, the
bit pattern of ``|x|`` (float32 bits with the sign cleared; bf16 and f16 widen
to float32 exactly). For non-negative floats that bit pattern is ordered like
the value, so:

* zeros (of either sign) rank lowest and are pruned first;
* ``+inf`` ranks above every finite value and NaN above ``inf``: non-finite
  weights are kept until sparsity 1, so a divergence stays visible;
* ties (equal keys) are broken by position: the leaf earlier in the group
  first, then the lower row-major flat index, so masks are deterministic.

The number pruned in a group of ``n`` entries at sparsity ``s`` is exactly
``round(s * n)`` (round half to even, as Python's ``round``), computed in
integer arithmetic from the float32 bits of ``s``: no float rounding error even
for leaves of more than 2**24 entries.

Methods:

* ``"sort"`` (reference): sorts each leaf's keys once and reads the threshold
  off them with ``searchsorted``; ties are ranked with a cumulative sum. Memory:
  a sorted copy of the keys and an int32 rank per entry.
* ``"bisect"`` (fast): finds the threshold key by a radix search over its 31
  bits, each round counting entries below a few candidates with one fused
  reduction over the parameters. No sort, no copy of the parameters: only
  scalar temporaries. Ties at the threshold, when a leaf must keep some of
  them, are split by a second search over the flat index, only when needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("sort", "bisect")
# Bits decided per round of the radix search: 2**bits - 1 candidates per pass.
_RADIX_BITS = 1
# Largest group size (entries) for which the count fits our int32 arithmetic.
MAX_GROUP_SIZE = 2**31 - 1
_SIGN_OFF = 0x7FFFFFFF


def magnitude_keys(x: jax.Array) -> jax.Array:
  """uint32 keys ordered like ``|x|``, with NaN above ``inf``."""
  if x.dtype != jnp.float32:
    x = x.astype(jnp.float32)  # Exact for bf16, f16; f64 rounds to nearest.
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  return bits & jnp.uint32(_SIGN_OFF)


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


def _flat_index(shape: Sequence[int]) -> jax.Array:
  """Row-major flat index of every entry, built from iotas (no reshape)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask, dtype=jnp.uint32)


def _radix_select(count_below, k: jax.Array, bits: int, radix_bits: int):
  """Largest ``t`` in [0, 2**bits) with ``count_below(t) < k`` (0 if none).

  ``count_below`` must be non-decreasing in ``t``; it is called with a vector
  of candidates and returns their counts. For ``k >= 1`` the result is the
  k-th smallest key (1-based) in the counted set. Each round decides
  ``radix_bits`` bits, most significant first, in a ``fori_loop`` (a small
  program that compiles fast whatever the number of rounds).
  """
  rounds = -(-bits // radix_bits)
  digits = jnp.arange(1, 2**radix_bits, dtype=jnp.uint32)

  def one_round(r, found):
    low = jnp.maximum(bits - (r + 1) * radix_bits, 0).astype(jnp.uint32)
    width = (bits - r * radix_bits) - low.astype(jnp.int32)  # Last round: fewer.
    allowed = digits < (jnp.uint32(1) << width.astype(jnp.uint32))
    candidates = found | (digits << low)
    below = (count_below(candidates) < k) & allowed
    return found | (jnp.sum(below, dtype=jnp.uint32) << low)

  return lax.fori_loop(0, rounds, one_round, jnp.uint32(0))


def _ties_to_prune(equal_counts, remaining):
  """Splits ``remaining`` ties over leaves in order: earlier leaves first."""
  out = []
  for equal in equal_counts:
    take = jnp.minimum(equal, remaining)
    out.append(take)
    remaining = remaining - take
  return out


def masks_by_bisection(
    leaves: Sequence[jax.Array], sparsity: jax.Array
) -> list[jax.Array]:
  """Keep-masks (True = kept) for a group of arrays; see the module docstring."""
  n = sum(x.size for x in leaves)
  k = prune_count(sparsity, n)

  def count_below(candidates):
    total = jnp.zeros(candidates.shape, jnp.uint32)
    for x in leaves:
      keys = magnitude_keys(x)[..., None]
      total = total + jnp.sum(
          keys < candidates, axis=tuple(range(x.ndim)), dtype=jnp.uint32
      )
    return total

  threshold = _radix_select(count_below, k, 31, _RADIX_BITS)
  less = [_count(magnitude_keys(x) < threshold) for x in leaves]
  equal = [_count(magnitude_keys(x) == threshold) for x in leaves]
  remaining = k - sum(less)  # Ties at `threshold` still to prune (>= 0).
  masks = []
  for x, ties, n_equal in zip(leaves, _ties_to_prune(equal, remaining), equal):
    masks.append(_keep_mask_from_index(x, threshold, ties, n_equal))
  return masks


def _keep_mask_from_index(x, threshold, ties, n_equal):
  """Prunes keys below ``threshold`` and the first ``ties`` keys equal to it."""
  if x.size == 0:
    return jnp.ones(x.shape, jnp.bool_)

  def cutoff_all():
    # Prune every tie (or none): the cutoff is past the end or at the start.
    return jnp.where(ties > 0, jnp.int32(x.size), jnp.int32(0))

  def cutoff_search():
    # Flat index just past the `ties`-th tie, by a radix search on the index.
    def count_below(candidates):
      is_tie = magnitude_keys(x) == threshold
      index = _flat_index(x.shape)[..., None]
      return jnp.sum(
          is_tie[..., None] & (index < candidates.astype(jnp.int32)),
          axis=tuple(range(x.ndim)),
          dtype=jnp.uint32,
      )

    bits = max(1, math.ceil(math.log2(x.size)))
    last = _radix_select(count_below, ties, bits, _RADIX_BITS)
    return last.astype(jnp.int32) + 1

  needs_search = (ties > 0) & (ties < n_equal)
  cutoff = lax.cond(needs_search, cutoff_search, cutoff_all)
  keys = magnitude_keys(x)
  pruned = (keys < threshold) | (
      (keys == threshold) & (_flat_index(x.shape) < cutoff)
  )
  return ~pruned


def masks_by_sort(
    leaves: Sequence[jax.Array], sparsity: jax.Array
) -> list[jax.Array]:
  """Keep-masks by the sort reference; identical to ``masks_by_bisection``."""
  n = sum(x.size for x in leaves)
  k = prune_count(sparsity, n)
  sorted_keys = [jnp.sort(magnitude_keys(x).reshape(-1)) for x in leaves]

  def count_below(candidates):
    total = jnp.zeros(candidates.shape, jnp.uint32)
    for keys in sorted_keys:
      total = total + jnp.searchsorted(keys, candidates, side="left").astype(
          jnp.uint32
      )
    return total

  # One candidate per round: each count is a cheap binary search.
  threshold = _radix_select(count_below, k, 31, 1)
  less = [
      jnp.searchsorted(s, threshold, side="left").astype(jnp.uint32)
      for s in sorted_keys
  ]
  equal = [
      jnp.searchsorted(s, threshold, side="right").astype(jnp.uint32) - lo
      for s, lo in zip(sorted_keys, less)
  ]
  remaining = k - sum(less)
  masks = []
  for x, ties in zip(leaves, _ties_to_prune(equal, remaining)):
    keys = magnitude_keys(x).reshape(-1)
    is_tie = keys == threshold
    tie_rank = jnp.cumsum(is_tie, dtype=jnp.uint32)  # 1-based among ties.
    pruned = (keys < threshold) | (is_tie & (tie_rank <= ties))
    masks.append((~pruned).reshape(x.shape))
  return masks


def keep_masks(
    leaves: Sequence[jax.Array], sparsity: jax.Array, method: str = "bisect"
) -> list[jax.Array]:
  """Keep-masks for ``leaves`` pruned together to ``sparsity`` by ``method``.

  Exactly ``round(sparsity * n)`` of the ``n`` entries are pruned: smallest
  magnitude first, zeros before everything, NaN and inf last, ties by position
  (see the module docstring). Usable under ``jax.jit`` with a traced sparsity.

  Args:
    leaves: floating arrays ranked together (one leaf: layer scope).
    sparsity: float32 scalar; clipped to [0, 1], NaN counts as 0.
    method: ``"bisect"`` (fast) or ``"sort"`` (reference); same masks.

  Returns:
    One bool array per leaf, True where the entry is kept.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> optax_prune.keep_masks([jnp.array([0.5, -3.0, 0.0, 2.0])], 0.5)
    [Array([False,  True, False,  True], dtype=bool)]
  """
  sparsity = jnp.asarray(sparsity, jnp.float32)
  sparsity = jnp.where(jnp.isnan(sparsity), 0.0, jnp.clip(sparsity, 0.0, 1.0))
  if method == "bisect":
    return masks_by_bisection(leaves, sparsity)
  if method == "sort":
    return masks_by_sort(leaves, sparsity)
  raise ValueError(f"unknown threshold method {method!r}; expected {METHODS}.")
