"""Exact magnitude masks: which entries of a group of arrays to prune.

Every method computes the same mask. Entries are ranked by an unsigned integer
key, the bit pattern of ``|x|``: float32 bits with the sign cleared (bf16 and
f16 widen to float32 exactly), or float64 bits in a group that holds a float64
leaf (only with ``jax_enable_x64``; the other leaves widen exactly, and the
search runs over 63 bits instead of 31). For non-negative floats that bit
pattern is ordered like the value, so:

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

* ``"sort"`` (reference): sorts the keys (of a group: their concatenation)
  and reads the k-th smallest; ties are ranked with a cumulative sum. Memory:
  a sorted copy of the keys and an int32 rank per entry.
* ``"bisect"`` (fast): finds the threshold key by a radix search over its 31
  (float64: 63) bits, each round counting entries below a candidate with one reduction over
  the parameters; all groups share one search loop. No sort and no copy of the
  parameters are asked for: on GPU XLA fuses it so (no parameter-sized
  temporaries at 1e8 entries); on CPU XLA materializes the keys and the counts
  (about 7 bytes per entry, see benchmarks/RESULTS.md). Ties at the threshold,
  when a leaf must keep some of them, are split by a second search over the
  flat index, only when needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

METHODS = ("sort", "bisect")
# Bits decided per round of the radix search: 2**bits - 1 candidates per pass.
# 1 was fastest on CPU and within 20% of 4 on an H200 (benchmarks/RESULTS.md).
_RADIX_BITS = 1
# Largest group size (entries) for which the count fits our int32 arithmetic.
MAX_GROUP_SIZE = 2**31 - 1


def needs_wide_keys(leaves: Sequence[jax.Array]) -> bool:
  """Whether a group must be ranked by float64 keys (it holds a float64 leaf)."""
  return any(jnp.result_type(x) == jnp.float64 for x in leaves)


def magnitude_keys(x: jax.Array, wide: bool = False) -> jax.Array:
  """Unsigned keys ordered like ``|x|``, with NaN above ``inf``.

  uint32 keys from the float32 value (exact for bf16, f16, f32; float64 would
  round to nearest), or with ``wide`` uint64 keys: the float64 bits of the
  value (a float64 leaf's own bits; others widened exactly, see
  ``_widen_key``).
  """
  if wide and x.dtype == jnp.float64:
    bits = lax.bitcast_convert_type(x, jnp.uint64)
    return bits & jnp.uint64(0x7FFFFFFFFFFFFFFF)
  if x.dtype != jnp.float32:
    x = x.astype(jnp.float32)  # Exact for bf16, f16; f64 rounds to nearest.
  key = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  return _widen_key(key) if wide else key


def _widen_key(key: jax.Array) -> jax.Array:
  """The float64 key of the float32 value with float32 key ``key``.

  In integers, not by a float conversion: XLA on CPU flushes float32
  subnormals to zero when it converts them, which would tie them with 0.
  """
  exponent = (key >> 23).astype(jnp.uint64)
  fraction = (key & 0x7FFFFF).astype(jnp.uint64)
  # A subnormal m * 2**-149 is normal in float64: shift its leading 1 to bit
  # 23 (`shift` places), drop it, and lower the exponent to match.
  shift = (lax.clz(key & 0x7FFFFF) - 8).astype(jnp.uint64)
  subnormal = (jnp.uint64(897) - shift) << 52 | (
      (fraction << shift) & 0x7FFFFF) << 29
  normal = (exponent + 896) << 52 | fraction << 29
  special = jnp.uint64(2047) << 52 | fraction << 29  # inf and NaN.
  return jnp.where(
      exponent == 0,
      jnp.where(fraction == 0, jnp.uint64(0), subnormal),
      jnp.where(exponent == 255, special, normal),
  )


def _key_bits(wide: bool) -> int:
  return 63 if wide else 31  # Sign bit cleared: the top bit is always 0.


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
  """Per row g: largest ``t`` in [0, 2**bits) with ``count_below(t)[g] < k[g]``.

  ``t`` is uint32 for ``bits <= 32``, else uint64.

  ``k`` has shape (G,), one target per independent search. ``count_below``
  takes candidates of shape (G, D) and returns their (G, D) counts, which must
  be non-decreasing in ``t``. For ``k[g] >= 1`` the result is the k-th
  smallest key (1-based) of row g's counted set; 0 when ``k[g] == 0``. Each
  round decides ``radix_bits`` bits of every row at once, most significant
  first, in one ``fori_loop``: G searches cost the loop trips of one, and the
  program compiles fast whatever the number of rounds.
  """
  key_type = jnp.uint32 if bits <= 32 else jnp.uint64
  rounds = -(-bits // radix_bits)
  digits = jnp.arange(1, 2**radix_bits, dtype=key_type)

  def one_round(r, found):
    low = jnp.maximum(bits - (r + 1) * radix_bits, 0)
    width = (bits - r * radix_bits) - low  # The last round may decide fewer.
    low, width = low.astype(key_type), width.astype(key_type)
    allowed = digits < (key_type(1) << width)
    candidates = found[:, None] | (digits << low)[None, :]
    below = (count_below(candidates) < k[:, None]) & allowed[None, :]
    return found | (jnp.sum(below, axis=1, dtype=key_type) << low)

  return lax.fori_loop(0, rounds, one_round, jnp.zeros(k.shape, key_type))


def _count_below_each(x: jax.Array, candidates: jax.Array) -> jax.Array:
  """(D,) counts of keys of ``x`` below each of the (D,) candidates."""
  keys = magnitude_keys(x, candidates.dtype == jnp.uint64)[..., None]
  return jnp.sum(keys < candidates, axis=tuple(range(x.ndim)), dtype=jnp.uint32)


def _ties_to_prune(equal_counts, remaining):
  """Splits ``remaining`` ties over leaves in order: earlier leaves first."""
  out = []
  for equal in equal_counts:
    take = jnp.minimum(equal, remaining)
    out.append(take)
    remaining = remaining - take
  return out


def masks_by_bisection(
    groups: Sequence[Sequence[jax.Array]], counts: Sequence[jax.Array]
) -> list[list[jax.Array]]:
  """Keep-masks (True = kept) for independent groups; see the module docstring.

  Each group is ranked on its own (one leaf per group: layer scope) and has
  ``counts[g]`` (uint32) entries pruned; all groups share one search loop.
  """
  k = jnp.stack(counts)
  # One loop for all groups, so one key width: float64 if any group needs it
  # (float32 keys widen exactly, so every group's masks are unchanged).
  wide = any(needs_wide_keys(g) for g in groups)

  def count_below(candidates):
    return jnp.stack([
        sum((_count_below_each(x, candidates[i]) for x in group),
            jnp.zeros(candidates.shape[1:], jnp.uint32))
        for i, group in enumerate(groups)
    ])

  thresholds = _radix_select(count_below, k, _key_bits(wide), _RADIX_BITS)
  out = []
  for group, threshold, k_group in zip(groups, thresholds, k):
    less = [_count(magnitude_keys(x, wide) < threshold) for x in group]
    equal = [_count(magnitude_keys(x, wide) == threshold) for x in group]
    remaining = k_group - sum(less)  # Ties at `threshold` still to prune.
    out.append([
        _keep_mask_from_index(x, threshold, ties, n_equal)
        for x, ties, n_equal in zip(group, _ties_to_prune(equal, remaining), equal)
    ])
  return out


def _keep_mask_from_index(x, threshold, ties, n_equal):
  """Prunes keys below ``threshold`` and the first ``ties`` keys equal to it."""
  if x.size == 0:
    return jnp.ones(x.shape, jnp.bool_)
  wide = threshold.dtype == jnp.uint64

  def cutoff_all():
    # Prune every tie (or none): the cutoff is past the end or at the start.
    return jnp.where(ties > 0, jnp.int32(x.size), jnp.int32(0))

  def cutoff_search():
    # Flat index just past the `ties`-th tie, by a radix search on the index.
    def count_below(candidates):  # (1, D) flat-index candidates.
      is_tie = (magnitude_keys(x, wide) == threshold)[..., None]
      index = _flat_index(x.shape)[..., None]
      return jnp.sum(
          is_tie & (index < candidates[0].astype(jnp.int32)),
          axis=tuple(range(x.ndim)),
          dtype=jnp.uint32,
      )[None]

    bits = max(1, math.ceil(math.log2(x.size)))
    last = _radix_select(count_below, ties[None], bits, _RADIX_BITS)[0]
    return last.astype(jnp.int32) + 1

  needs_search = (ties > 0) & (ties < n_equal)
  cutoff = lax.cond(needs_search, cutoff_search, cutoff_all)
  keys = magnitude_keys(x, wide)
  pruned = (keys < threshold) | (
      (keys == threshold) & (_flat_index(x.shape) < cutoff)
  )
  return ~pruned


def explicit_sharding(x: jax.Array):
  """The sharding of ``x`` if Explicit mesh axes split it, else None."""
  sharding = jax.typeof(x).sharding
  return sharding if any(s is not None for s in sharding.spec) else None


def masks_by_sort(
    leaves: Sequence[jax.Array], k: jax.Array
) -> list[jax.Array]:
  """Keep-masks by the sort reference; identical to ``masks_by_bisection``.

  The threshold is the k-th smallest key of the sorted keys. For a group of
  several leaves (global scope) this sorts their concatenated keys: simple and
  obviously right, but it copies the group, and a leaf split over devices is
  gathered whole onto each of them (an all-gather; under Explicit mesh axes an
  explicit reshard, and the mask is resharded back). ``threshold="auto"``
  therefore never picks it for large groups nor for split leaves.
  ``k`` (uint32) entries are pruned.
  """
  n = sum(x.size for x in leaves)
  wide = needs_wide_keys(leaves)
  shardings = [explicit_sharding(x) for x in leaves]
  keys = [
      magnitude_keys(jax.sharding.reshard(x, P()) if s else x, wide).reshape(-1)
      for x, s in zip(leaves, shardings)
  ]
  if n == 0:
    return [jnp.ones(x.shape, jnp.bool_) for x in leaves]
  ordered = jnp.sort(jnp.concatenate(keys) if len(keys) > 1 else keys[0])
  # With k = 0 this reads the smallest key, and no entry is pruned below.
  threshold = ordered[jnp.maximum(k.astype(jnp.int32) - 1, 0)]
  less = [_count(key < threshold) for key in keys]
  equal = [_count(key == threshold) for key in keys]
  remaining = k - sum(less)
  masks = []
  for x, s, key, ties in zip(
      leaves, shardings, keys, _ties_to_prune(equal, remaining)
  ):
    is_tie = key == threshold
    tie_rank = jnp.cumsum(is_tie, dtype=jnp.uint32)  # 1-based among ties.
    pruned = (key < threshold) | (is_tie & (tie_rank <= ties))
    mask = (~pruned).reshape(x.shape)
    masks.append(jax.sharding.reshard(mask, s) if s else mask)
  return masks


def clip_sparsity(sparsity: jax.Array) -> jax.Array:
  """float32 sparsity clipped to [0, 1]; NaN counts as 0."""
  sparsity = jnp.asarray(sparsity, jnp.float32)
  return jnp.where(jnp.isnan(sparsity), 0.0, jnp.clip(sparsity, 0.0, 1.0))


def keep_masks_for_counts(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    method: str,
) -> list[list[jax.Array]]:
  """Keep-masks for independent groups, group ``g`` losing ``counts[g]`` entries.

  Args:
    groups: groups of floating arrays; each group is ranked together.
    counts: per group, a uint32 scalar in [0, group size].
    method: one of ``METHODS``.

  Returns:
    Per group, one bool array per leaf, True where the entry is kept.
  """
  counts = [jnp.asarray(k, jnp.uint32) for k in counts]
  if method == "bisect":
    return masks_by_bisection(groups, counts) if groups else []
  if method == "sort":
    return [masks_by_sort(group, k) for group, k in zip(groups, counts)]
  raise ValueError(f"unknown threshold method {method!r}; expected {METHODS}.")


def keep_masks_of_groups(
    groups: Sequence[Sequence[jax.Array]], sparsity: jax.Array, method: str
) -> list[list[jax.Array]]:
  """Keep-masks for independent groups of leaves, each pruned to ``sparsity``.

  Args:
    groups: groups of floating arrays; each group is ranked together.
    sparsity: float32 scalar; clipped to [0, 1], NaN counts as 0.
    method: one of ``METHODS``.

  Returns:
    Per group, one bool array per leaf, True where the entry is kept.
  """
  sparsity = clip_sparsity(sparsity)
  counts = [prune_count(sparsity, sum(x.size for x in g)) for g in groups]
  return keep_masks_for_counts(groups, counts, method)


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
  return keep_masks_of_groups([leaves], sparsity, method)[0]
