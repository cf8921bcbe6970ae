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
  permutation (int32) per entry beside the keys.
* ``"bisect"``: finds the threshold key by a radix search over its 31
  (float64: 63) bits, each round counting entries below a candidate with one
  reduction over the parameters; all groups share one search loop. On GPU XLA
  fuses it without parameter-sized temporaries; on CPU it materializes the
  keys and the counts (about 7 bytes per entry). Ties at the threshold, when
  a leaf must keep some of them, are split by a second search over the flat
  index, only when needed.
* ``"histogram"`` (fast): the same selection by one histogram of 2**16 counts
  per 16-bit digit of the key (a scatter-add; two passes for float32 keys),
  each level counting only keys on the prefix decided so far, then one pass
  that writes the masks; split ties are resolved by the same histograms over
  the flat index (two levels of about sqrt(leaf size) counts). On split
  leaves each device counts its shard and only the counts are all-reduced
  (2**16 and 2**15 integers per group, never a leaf). 3.1-4.3x faster than bisect on
  CPU at 1e7-3e7 entries (benchmarks/RESULTS.md, section 2).
* ``"auto"``: per group and backend, :func:`choose_method`.

Each method finds a :class:`Cut` per leaf (a threshold key and a tie cutoff);
the mask is written from it in one elementwise pass. Lone leaves of one shape,
dtype and placement (layer scope over a deep model) are ranked by one kernel
instance, a loop over them (:func:`masks_of_alike_leaves`): the compiled
program does not grow with the number of such leaves.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from optax_prune import _checks
from optax_prune import _distributions
from optax_prune import _placement

METHODS = ("sort", "bisect", "histogram")
THRESHOLDS = ("auto",) + METHODS
# Bits decided per round of the radix search: 2**bits - 1 candidates per pass.
# 1 was fastest on CPU and within 20% of 4 on an H200 (benchmarks/RESULTS.md).
RADIX_BITS = 1
# Bits of the key decided per histogram of the "histogram" method: two passes
# over float32 keys (16 + 15 bits), 2**16 counts per histogram.
HISTOGRAM_DIGIT_BITS = 16

class AutoPolicy(NamedTuple):
  """What ``threshold="auto"`` picks on one backend, by group size.

  Groups of at most ``sort_max`` entries whose leaves are known whole on each
  device are sorted (a sort gathers split leaves); otherwise groups of at
  least ``histogram_min`` entries use ``"histogram"`` and smaller ones
  ``"bisect"``. Both are gather-free.
  """

  sort_max: int
  histogram_min: int


# Crossovers measured by `python -m benchmarks.mask_update` (benchmarks/RESULTS.md,
# sections 2 and 4). CPU: a sort never beats bisect by much (below 1024 entries
# both take < 0.2 ms), and the histograms' fixed cost (two cumulative sums of
# 2**16 counts, ~0.6 ms) beats bisect's 31 passes from about 2**15 entries.
# GPU (H200): CUB's radix sort beat the 31 passes at every size from 1e5 to
# 1e8; sorting is capped by its memory (about 12 B per entry for a group of
# leaves: 2**26 entries stay under 1 GiB). TPU: untested, as the GPU.
AUTO_POLICIES = {
    "cpu": AutoPolicy(sort_max=1024, histogram_min=2**15),
    "gpu": AutoPolicy(sort_max=2**26, histogram_min=0),
}


def choose_method(threshold: str, size: int, whole: bool = True,
                  backend: Optional[str] = None) -> str:
  """The method that ``threshold`` means for a group of ``size`` entries.

  ``"auto"`` follows ``AUTO_POLICIES`` for ``backend`` (default: JAX's
  default backend; TPU as GPU); ``whole`` says the group's leaves are all
  known whole on each device (see ``_placement.known_whole``).
  """
  if threshold != "auto":
    return threshold
  backend = backend or jax.default_backend()
  policy = AUTO_POLICIES["cpu" if backend == "cpu" else "gpu"]
  if whole and size <= policy.sort_max:
    return "sort"
  return "histogram" if size >= policy.histogram_min else "bisect"


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
  """Splits ``remaining`` ties over leaves in order: earlier leaves first.

  One vector operation over the leaves (``fill_in_order``; counts fit int32),
  not a chain through them that XLA would copy into every leaf's fusions.
  """
  if len(equal_counts) < 2:
    return [jnp.minimum(equal, remaining) for equal in equal_counts]
  take = _distributions.fill_in_order(
      remaining.astype(jnp.int32), jnp.stack(equal_counts).astype(jnp.int32))
  return list(take.astype(jnp.uint32))


def cuts_by_bisection(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    radix_bits: int = RADIX_BITS,
    mapped: bool = False,
) -> list[list[Cut]]:
  """Cuts for independent groups by the radix search; see the module docstring.

  Each group is ranked on its own (one leaf per group: layer scope) and has
  ``counts[g]`` (uint32) entries pruned; all groups share one search loop.
  ``mapped``: traced under ``vmap`` (see :func:`_branch`).
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
    # Ties at `threshold` still to prune.
    remaining = k_group - (jnp.sum(jnp.stack(less), dtype=jnp.uint32) if less
                           else jnp.uint32(0))
    cutoff = lambda x, ties, n_equal, t=threshold: _tie_cutoff(
        x, ties, n_equal, lambda: _last_tie_by_radix(x, t, ties, radix_bits), mapped)
    out.append([Cut(threshold, c) for c in _per_alike_leaf(
        cutoff, group, _ties_to_prune(equal, remaining), equal)])
  return out


def _branch(pred, if_true, if_false, mapped: bool):
  """``lax.cond``; under ``vmap`` (``mapped``), both branches and a select.

  ``vmap`` of a ``cond`` whose predicate is mapped runs both branches anyway,
  and its select of the operands fails for operands split by Explicit mesh
  axes (jax 0.10), so mapped kernels select the results instead.
  """
  if not mapped:
    return lax.cond(pred, if_true, if_false)
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), if_true(), if_false())


def _tie_cutoff(x, ties, n_equal, find_last_tie, mapped=False):
  """Flat index just past the ``ties``-th of the ``n_equal`` ties of ``x``.

  Ties (keys equal to the threshold) before it are pruned (see
  :func:`keep_mask`). ``find_last_tie()`` returns the flat index of the
  ``ties``-th tie; it runs only when some ties are kept and some pruned,
  behind a ``lax.cond`` that returns a scalar.
  """
  if x.size == 0:
    return jnp.int32(0)
  search = lambda: find_last_tie().astype(jnp.int32) + 1
  return _branch((ties > 0) & (ties < n_equal), search, lambda: _cutoff_all(x, ties), mapped)


def _cutoff_all(x, ties):
  """The cutoff that prunes every tie of ``x`` (``ties > 0``) or none."""
  return jnp.where(ties > 0, jnp.int32(x.size), jnp.int32(0))


def _last_tie_by_radix(x, threshold, ties, radix_bits):
  """Flat index of the ``ties``-th tie, by a radix search over the index."""
  wide = threshold.dtype == jnp.uint64

  def count_below(candidates):  # (1, D) flat-index candidates.
    is_tie = (magnitude_keys(x, wide) == threshold)[..., None]
    index = _flat_index(x.shape)[..., None]
    return jnp.sum(
        is_tie & (index < candidates[0].astype(jnp.int32)),
        axis=tuple(range(x.ndim)),
        dtype=jnp.uint32,
    )[None]

  bits = max(1, math.ceil(math.log2(x.size)))
  return _radix_select(count_below, ties[None], bits, radix_bits)[0]


class Cut(NamedTuple):
  """Where a leaf is cut: keys below ``threshold`` are pruned, and keys equal
  to it at a row-major flat index below ``cutoff`` (ties by position).

  Every method finds the same cut; a mask is written from it in one
  elementwise pass (:func:`keep_mask`), so a kernel's output is two scalars.
  """

  threshold: jax.Array  # uint32 (uint64 for float64 keys) scalar.
  cutoff: jax.Array  # int32 scalar, in [0, leaf size].


def keep_mask(x: jax.Array, cut: Cut) -> jax.Array:
  """The keep-mask of ``x`` at ``cut`` (True = kept)."""
  if x.size == 0:
    return jnp.ones(x.shape, jnp.bool_)
  threshold, cutoff = cut
  keys = magnitude_keys(x, threshold.dtype == jnp.uint64)
  pruned = (keys < threshold) | (
      (keys == threshold) & (_flat_index(x.shape) < cutoff)
  )
  return ~pruned


def _histogram(digits: jax.Array, bins: int) -> jax.Array:
  """(bins,) uint32 counts of each value of ``digits``; values >= bins dropped.

  One scatter-add. On a split leaf each device counts its shard and the
  counts are all-reduced: ``bins`` integers cross devices, never the leaf.
  """
  # Under Explicit mesh axes the counts' placement must be named: replicated.
  out_sharding = P() if _placement.explicit_sharding(digits) else None
  return jnp.zeros(bins, jnp.uint32).at[digits.astype(jnp.int32)].add(
      jnp.uint32(1), mode="drop", out_sharding=out_sharding)


def _select_by_histogram(keys: Sequence[jax.Array], k: jax.Array, bits: int,
                         digit_bits: int, include: Optional[Sequence[jax.Array]] = None):
  """The k-th smallest of a group's ``bits``-bit unsigned keys, by histograms.

  Returns ``(kth, below, equal)``: the k-th smallest key (1-based; 0 when
  ``k == 0``), how many keys are below it and how many equal it. Only keys
  where ``include`` (one bool array per key array; None: all) is True count.
  Digits of ``digit_bits`` bits are decided most significant first; each
  level counts only the keys whose higher digits match those decided so far,
  so ``ceil(bits / digit_bits)`` passes over the keys decide all of them.
  """
  key_type = jnp.uint32 if bits <= 32 else jnp.uint64
  include = include if include is not None else [None] * len(keys)
  found = jnp.zeros((), key_type)
  below = jnp.zeros((), jnp.uint32)  # Keys below `found`'s decided prefix.
  equal = jnp.zeros((), jnp.uint32)
  for level in range(-(-bits // digit_bits)):
    low = max(bits - (level + 1) * digit_bits, 0)
    width = bits - level * digit_bits - low
    bins = 2**width
    counts = jnp.zeros(bins, jnp.uint32)
    for key, counted in zip(keys, include):
      key = key.astype(key_type)
      if level:  # Keys off the decided prefix count nowhere.
        on_prefix = key >> (low + width) == found >> (low + width)
        counted = on_prefix if counted is None else counted & on_prefix
      digit = (key >> low) & key_type(bins - 1)
      if counted is not None:
        digit = jnp.where(counted, digit, key_type(bins))  # Dropped.
      counts = counts + _histogram(digit, bins)
    cumulative = below + jnp.cumsum(counts, dtype=jnp.uint32)
    chosen = jnp.sum(cumulative < k, dtype=jnp.uint32)  # The k-th key's bin.
    chosen = jnp.minimum(chosen, bins - 1)  # Past the end only if k > count.
    below = jnp.where(chosen > 0, cumulative[jnp.maximum(chosen, 1) - 1], below)
    equal = counts[chosen]
    found = found | (chosen.astype(key_type) << low)
  return found, below, equal


def _last_tie_by_histogram(x, key, threshold, ties):
  """Flat index of the ``ties``-th tie, by histograms of the ties' index.

  Two levels of ``ceil(bits / 2)`` bits (at most 2**16 counts each): on a
  split leaf the counts that cross devices stay far smaller than the leaf.
  """
  bits = max(1, math.ceil(math.log2(x.size)))
  last, _, _ = _select_by_histogram([_flat_index(x.shape)], ties, bits, -(-bits // 2),
                                    include=[key == threshold])
  return last


def cuts_by_histogram(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    digit_bits: int = HISTOGRAM_DIGIT_BITS,
    mapped: bool = False,
) -> list[list[Cut]]:
  """Cuts by histograms of key digits; identical to ``cuts_by_sort``.

  Per group, one histogram of 2**``digit_bits`` counts per digit of the keys
  (two passes over float32 keys at 16 bits) finds the threshold key and how
  many keys lie below and at it; one more pass writes the masks. When ties
  at the threshold are split (some kept, some pruned: earlier leaves, then
  lower flat indices first), each leaf's ties are counted and the cutoff's
  flat index is selected the same way, by histograms of its digits.
  """
  out = []
  for group, k in zip(groups, counts):
    wide = needs_wide_keys(group)  # Groups are independent: each its own width.
    keys = [magnitude_keys(x, wide) for x in group]
    threshold, below, equal = _select_by_histogram(
        keys, k, _key_bits(wide), digit_bits)
    ties = k - below  # Keys equal to the threshold still to prune.

    def split_ties(group=group, keys=keys, threshold=threshold, ties=ties,
                   equal=equal):
      per_leaf = ([equal] if len(group) == 1 else
                  [_count(key == threshold) for key in keys])

      def cutoff(x, t, n):
        key = magnitude_keys(x, wide)
        return _tie_cutoff(x, t, n, lambda: _last_tie_by_histogram(x, key, threshold, t),
                           mapped)

      return _per_alike_leaf(cutoff, group, _ties_to_prune(per_leaf, ties), per_leaf)

    def whole_ties(group=group, ties=ties):
      return [_cutoff_all(x, ties) for x in group]

    # The branches return one scalar per leaf; the masks are written after.
    cutoffs = _branch((ties > 0) & (ties < equal), split_ties, whole_ties, mapped)
    out.append([Cut(threshold, c) for c in cutoffs])
  return out


def _alike(leaves: Sequence[jax.Array]) -> list[list[int]]:
  """Indices of ``leaves`` by shape, dtype and placement (``jax.typeof``), in
  order; an empty leaf is alone."""
  by_type: dict = {}
  for i, x in enumerate(leaves):
    by_type.setdefault(jax.typeof(x) if x.size else i, []).append(i)
  return list(by_type.values())


def _loop_over(leaves: Sequence[jax.Array], body, init):
  """``fori_loop`` over alike ``leaves``: ``body(j, leaves[j], carry)``, the
  leaf picked by a ``lax.switch`` (one leaf-sized copy, no stacked operand),
  so the compiled program holds one instance of ``body`` whatever their
  number. XLA compiles each distinct fusion on its own, and per-leaf code
  that differs only in which leaf or which entry of a vector it reads is
  distinct."""
  branches = [lambda x=x: x for x in leaves]
  return lax.fori_loop(0, len(leaves), lambda j, carry: body(
      j, lax.switch(j, branches), carry), init)


def _per_alike_leaf(fn, leaves: Sequence[jax.Array], *scalars: Sequence[jax.Array]) -> list:
  """``[fn(x, *its scalars) for each leaf]`` (int32 scalars), alike leaves run
  by one instance of ``fn`` (:func:`_loop_over`; a group of many alike
  leaves: global scope over a deep model)."""
  out: list = [None] * len(leaves)
  for members in _alike(leaves):
    columns = [jnp.stack([s[i] for i in members]) for s in scalars]
    if len(members) == 1:
      found = fn(leaves[members[0]], *(c[0] for c in columns))[None]
    else:
      found = _loop_over([leaves[i] for i in members], lambda j, x, found: found.at[j].set(
          fn(x, *(c[j] for c in columns))), jnp.zeros(len(members), jnp.int32))
    for j, i in enumerate(members):
      out[i] = found[j]
  return out


def cuts_by_sort(leaves: Sequence[jax.Array], k: jax.Array) -> list[Cut]:
  """Cuts by the sort reference; identical to ``cuts_by_bisection``.

  A stable sort of the keys ranks every entry (ties by position: the earlier
  leaf, then the lower flat index) and the ``k`` (uint32) first are pruned:
  the cut is the key of the ``k``-th entry in sorted order and its position
  (the ``k`` first are exactly those at or before it, in key then position
  order). For a group of several leaves (global scope) this sorts their
  concatenated keys: simple and obviously right, but it copies the group,
  and a leaf split over devices is gathered whole onto each of them (an
  all-gather; under Explicit mesh axes an explicit reshard; the mask is
  written from the cut on the leaf as it lies). ``threshold="auto"``
  therefore picks it only for groups known whole on each device, up to a
  size that depends on the backend (``AUTO_POLICIES``).
  """
  wide = needs_wide_keys(leaves)
  key_type = jnp.uint64 if wide else jnp.uint32
  if sum(x.size for x in leaves) == 0:
    return [Cut(jnp.zeros((), key_type), jnp.int32(0)) for _ in leaves]
  keys = [magnitude_keys(_placement.gathered(x)[0], wide).reshape(-1) for x in leaves]
  keys = jnp.concatenate(keys) if len(keys) > 1 else keys[0]
  order = jnp.argsort(keys, stable=True)
  # Where the k-th entry in sorted order lies in the concatenation (a gather
  # of one entry: no scan over the sorted keys).
  last = order[jnp.maximum(k.astype(jnp.int32), 1) - 1]
  pruning = k > 0
  threshold = jnp.where(pruning, keys[last], jnp.zeros((), key_type))
  cuts, offset = [], 0
  for x in leaves:
    cutoff = jnp.clip(last + 1 - offset, 0, x.size).astype(jnp.int32)
    cuts.append(Cut(threshold, jnp.where(pruning, cutoff, 0)))
    offset += x.size
  return cuts


def masks_of_alike_leaves(
    leaves: Sequence[jax.Array], counts: jax.Array, method: str,
    *, radix_bits: int = RADIX_BITS,
) -> list[jax.Array]:
  """Keep-masks of leaves of one shape, dtype and placement, each ranked on
  its own, by one instance of the ``method`` kernel.

  A loop over the leaves (:func:`_loop_over`: the kernel's temporaries are
  one leaf's whatever their number) runs the kernel on leaf ``j`` and writes
  its mask into row ``j`` of one stacked bool buffer (1 byte per entry): the
  compiled program holds one kernel and one mask writer, not one per leaf (a
  writer per leaf would read its own cut, so each would be distinct).
  """
  counts = jnp.asarray(counts, jnp.uint32)

  def one(j, x, masks):
    (cut,), = _cuts_for_counts([[x]], [counts[j]], method, radix_bits)
    return lax.dynamic_update_index_in_dim(masks, keep_mask(x, cut), j, 0)

  sharding = _placement.explicit_sharding(leaves[0])
  masks = jnp.zeros((len(leaves),) + tuple(leaves[0].shape), jnp.bool_, out_sharding=(
      None if sharding is None else P(None, *sharding.spec)))
  masks = _loop_over(leaves, one, masks)
  return [masks[j] for j in range(len(leaves))]


def masks_of_layers(stacked: jax.Array, counts: jax.Array, method: str,
                    *, radix_bits: int = RADIX_BITS) -> jax.Array:
  """The keep-mask of a leaf whose leading axis stacks layers, each layer
  ``l`` ranked on its own and losing ``counts[l]`` entries.

  One kernel instance mapped over the layers (``vmap``): the compiled
  program does not grow with their number, no layer is copied out, and a
  layer axis split over devices stays split (each device ranks its layers).
  Its temporaries are those of ranking the whole leaf.
  """
  if stacked.size == 0:
    return jnp.ones(stacked.shape, jnp.bool_)

  def one(x, k):
    (cut,), = _cuts_for_counts([[x]], [k], method, radix_bits, mapped=True)
    return keep_mask(x, cut)

  return jax.vmap(one)(stacked, _placement.like_axis(counts, stacked))


def _cuts_for_counts(groups, counts, method, radix_bits, mapped=False):
  if method == "bisect":
    return cuts_by_bisection(groups, counts, radix_bits, mapped=mapped) if groups else []
  if method == "histogram":
    return cuts_by_histogram(groups, counts, mapped=mapped)
  if method == "sort":
    return [cuts_by_sort(group, k) for group, k in zip(groups, counts)]
  raise ValueError(f"unknown threshold method {method!r}; expected {METHODS}.")


def keep_masks_for_counts(
    groups: Sequence[Sequence[jax.Array]],
    counts: Sequence[jax.Array],
    method: str,
    *,
    radix_bits: int = RADIX_BITS,
) -> list[list[jax.Array]]:
  """Keep-masks for independent groups, group ``g`` losing ``counts[g]`` entries.

  Groups of one leaf that share a shape, dtype and placement (layer scope
  over a deep model: its kernels of one width) are ranked by one kernel
  instance (:func:`masks_of_alike_leaves`); other groups each by their own,
  or, for ``"bisect"``, by one search loop over all of them.

  Args:
    groups: groups of floating arrays; each group is ranked together.
    counts: per group, a uint32 scalar in [0, group size]; or, for a group of
      one leaf whose leading axis stacks layers (a scanned layer stack), a
      vector over that axis: each layer loses its own count
      (:func:`masks_of_layers`).
    method: one of ``METHODS`` (resolve ``"auto"`` with :func:`choose_method`).
    radix_bits: bits decided per round of the radix search (``"bisect"``).

  Returns:
    Per group, one bool array per leaf, True where the entry is kept.
  """
  if method not in METHODS:
    raise ValueError(f"unknown threshold method {method!r}; expected {METHODS}.")
  counts = [jnp.asarray(k, jnp.uint32) for k in counts]
  out: list = [None] * len(groups)
  for g, (group, k) in enumerate(zip(groups, counts)):
    if k.ndim:  # One stacked leaf, its layers ranked each on its own.
      out[g] = [masks_of_layers(group[0], k, method, radix_bits=radix_bits)]
  lone = [g for g, group in enumerate(groups) if len(group) == 1 and out[g] is None]
  for members in _alike([groups[g][0] for g in lone]):
    if len(members) > 1:
      chosen = [lone[m] for m in members]
      masks = masks_of_alike_leaves([groups[g][0] for g in chosen],
                                    jnp.stack([counts[g] for g in chosen]), method,
                                    radix_bits=radix_bits)
      for g, mask in zip(chosen, masks):
        out[g] = [mask]
  rest = [g for g in range(len(groups)) if out[g] is None]
  cuts = _cuts_for_counts([groups[g] for g in rest], [counts[g] for g in rest],
                          method, radix_bits)
  for g, group_cuts in zip(rest, cuts):
    out[g] = [keep_mask(x, cut) for x, cut in zip(groups[g], group_cuts)]
  return out


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
    threshold: ``"sort"`` (reference), ``"bisect"`` (radix search),
      ``"histogram"`` (histograms of key digits) or ``"auto"``, as in
      ``magnitude_pruning``; all give the same masks.

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
