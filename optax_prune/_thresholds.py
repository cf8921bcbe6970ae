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

The kernels take the number of entries to prune, a traced uint32 scalar (see
``_distributions.prune_count``: exactly ``round(s * n)``), so a moving
sparsity never recompiles.

Methods:

* ``"sort"`` (reference): a stable sort of the keys (of a group: their
  concatenation) ranks every entry; the ``k`` first are pruned. Memory: a
  permutation and a rank (int32) per entry.
* ``"bisect"`` (fast): finds the threshold key by a radix search over its 31
  (float64: 63) bits, each round counting entries below a candidate with one reduction over
  the parameters; all groups share one search loop. No sort and no copy of the
  parameters are asked for: on GPU XLA fuses it so (no parameter-sized
  temporaries at 1e8 entries); on CPU XLA materializes the keys and the counts
  (about 7 bytes per entry, see benchmarks/RESULTS.md). Ties at the threshold,
  when a leaf must keep some of them, are split by a second search over the
  flat index, only when needed.
* ``"auto"``: the policy :func:`choose_method`, per group.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optax_prune import _checks
from optax_prune import _distributions
from optax_prune import _placement

METHODS = ("sort", "bisect")
THRESHOLDS = ("auto",) + METHODS
# Bits decided per round of the radix search: 2**bits - 1 candidates per pass.
# 1 was fastest on CPU and within 20% of 4 on an H200 (benchmarks/RESULTS.md).
RADIX_BITS = 1
# Up to this many entries in a group, "auto" uses the sort reference: sorting a
# few thousand keys costs about one of the radix search's 31 counting passes.
AUTO_SORT_MAX_SIZE = 2048


def choose_method(threshold: str, size: int, whole: bool = True) -> str:
  """The method that ``threshold`` means for a group of ``size`` entries.

  ``"auto"`` sorts groups of at most ``AUTO_SORT_MAX_SIZE`` entries whose
  leaves are all known to be whole on each device (``whole``, see
  ``_placement.known_whole``): a sort gathers split leaves. Otherwise, and
  for large groups, the radix search: bounded memory and no gathers.
  """
  if threshold == "auto":
    return "sort" if whole and size <= AUTO_SORT_MAX_SIZE else "bisect"
  return threshold


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
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    radix_bits: int = RADIX_BITS,
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

  thresholds = _radix_select(count_below, k, _key_bits(wide), radix_bits)
  out = []
  for group, threshold, k_group in zip(groups, thresholds, k):
    less = [_count(magnitude_keys(x, wide) < threshold) for x in group]
    equal = [_count(magnitude_keys(x, wide) == threshold) for x in group]
    remaining = k_group - sum(less)  # Ties at `threshold` still to prune.
    out.append([
        _keep_mask_from_index(x, threshold, ties, n_equal, radix_bits)
        for x, ties, n_equal in zip(group, _ties_to_prune(equal, remaining), equal)
    ])
  return out


def _keep_mask_from_index(x, threshold, ties, n_equal, radix_bits):
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
    last = _radix_select(count_below, ties[None], bits, radix_bits)[0]
    return last.astype(jnp.int32) + 1

  needs_search = (ties > 0) & (ties < n_equal)
  cutoff = lax.cond(needs_search, cutoff_search, cutoff_all)
  keys = magnitude_keys(x, wide)
  pruned = (keys < threshold) | (
      (keys == threshold) & (_flat_index(x.shape) < cutoff)
  )
  return ~pruned


def masks_by_sort(
    leaves: Sequence[jax.Array], k: jax.Array
) -> list[jax.Array]:
  """Keep-masks by the sort reference; identical to ``masks_by_bisection``.

  A stable sort of the keys ranks every entry (ties by position: the earlier
  leaf, then the lower flat index) and the ``k`` (uint32) first are pruned.
  For a group of several leaves (global scope) this sorts their concatenated
  keys: simple and obviously right, but it copies the group, and a leaf split
  over devices is gathered whole onto each of them (an all-gather; under
  Explicit mesh axes an explicit reshard, and the mask is resharded back).
  ``threshold="auto"`` therefore never picks it for large groups nor for
  split leaves.
  """
  n = sum(x.size for x in leaves)
  wide = needs_wide_keys(leaves)
  whole, shardings = zip(*map(_placement.gathered, leaves)) if leaves else ((), ())
  if n == 0:
    return [jnp.ones(x.shape, jnp.bool_) for x in leaves]
  keys = [magnitude_keys(x, wide).reshape(-1) for x in whole]
  order = jnp.argsort(jnp.concatenate(keys) if len(keys) > 1 else keys[0], stable=True)
  # Each entry's rank, by inverting the permutation. (A threshold read from the
  # sorted keys with a cumulative sum over its ties lost a unit at random
  # inside a whole jitted train step on an H200, jax 0.11.2: a rank needs no scan.)
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  pruned = rank < k.astype(jnp.int32)
  masks, offset = [], 0
  for x, sharding in zip(leaves, shardings):
    leaf_pruned = pruned[offset:offset + x.size].reshape(x.shape)
    masks.append(_placement.put_back(~leaf_pruned, sharding))
    offset += x.size
  return masks


def keep_masks_for_counts(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    method: str,
    *,
    radix_bits: int = RADIX_BITS,
) -> list[list[jax.Array]]:
  """Keep-masks for independent groups, group ``g`` losing ``counts[g]`` entries.

  Args:
    groups: groups of floating arrays; each group is ranked together.
    counts: per group, a uint32 scalar in [0, group size].
    method: one of ``METHODS`` (resolve ``"auto"`` with :func:`choose_method`).
    radix_bits: bits decided per round of the radix search (``"bisect"``).

  Returns:
    Per group, one bool array per leaf, True where the entry is kept.
  """
  counts = [jnp.asarray(k, jnp.uint32) for k in counts]
  if method == "bisect":
    return masks_by_bisection(groups, counts, radix_bits) if groups else []
  if method == "sort":
    return [masks_by_sort(group, k) for group, k in zip(groups, counts)]
  raise ValueError(f"unknown threshold method {method!r}; expected {METHODS}.")


def keep_masks(
    leaves: Sequence[jax.Array], sparsity: jax.Array, *, threshold: str = "auto"
) -> list[jax.Array]:
  """Keep-masks for ``leaves`` pruned together to ``sparsity``.

  Exactly ``round(sparsity * n)`` of the ``n`` entries are pruned: smallest
  magnitude first, zeros before everything, NaN and inf last, ties by position
  (see the module docstring). Usable under ``jax.jit`` with a traced sparsity.

  Args:
    leaves: floating arrays ranked together (one leaf: layer scope).
    sparsity: float32 scalar; clipped to [0, 1], NaN counts as 0.
    threshold: ``"sort"`` (reference), ``"bisect"`` (radix search) or
      ``"auto"``, as in ``magnitude_pruning``; all give the same masks.

  Returns:
    One bool array per leaf, True where the entry is kept.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> optax_prune.keep_masks([jnp.array([0.5, -3.0, 0.0, 2.0])], 0.5)
    [Array([False,  True, False,  True], dtype=bool)]
  """
  _checks.one_of("threshold", threshold, THRESHOLDS)
  size = sum(x.size for x in leaves)
  method = choose_method(threshold, size, all(map(_placement.known_whole, leaves)))
  count = _distributions.prune_count(_distributions.clip_sparsity(sparsity), size)
  return keep_masks_for_counts([leaves], [count], method)[0]
