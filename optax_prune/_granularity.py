"""What one pruning decision removes: an entry, an N:M group, a block, a channel.

Every granularity reduces a leaf's scores to *unit scores*, ranks the units
with the same exact threshold kernels as single entries (``round(s * units)``
units pruned, smallest ``|score|`` first, ties by position), and expands the
unit decisions back to a keep-mask of the leaf's shape:

* :func:`unstructured`: a unit is an entry (the default).
* :func:`n_of_m`: a unit is a group of ``m`` consecutive entries along
  ``axis``; a pruned unit keeps only its ``n`` largest entries. The schedule's
  sparsity is the share of groups made N:M-sparse (cheapest first: a group's
  score is the sum of the ``|score|`` it would lose), so at sparsity 1 every
  group is N:M and the leaf's entry sparsity is ``(m - n) / m``.
* :func:`blocks`: a unit is a ``(bh, bw)`` block of the last two axes, scored
  by the mean or max ``|score|`` of its entries; edge blocks of a shape that
  is not a multiple are smaller and scored over their real entries only.
* :func:`channels`: a unit is a slice at one index of ``axis`` (a filter or an
  output channel), scored by the L1 or L2 norm of its entries.

Your own granularity is any hashable object (a frozen dataclass) with the
members of :class:`Granularity`: ``check``, ``unit_scores``, ``expand`` and
``needs_whole_leaf``. Leaves of one schedule with equal granularities are
ranked together under ``scope="global"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _checks
from optax_prune import _coupling
from optax_prune import _distributions
from optax_prune import _thresholds


MAX_M = 256  # Largest N:M group; positions fit uint8 (see `to_nm`).


def _score_dtype(x: jax.Array):
  """float32, or float64 for float64 scores (ranked at full precision)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _check_axis(name: str, axis, shape, path: str) -> int:
  if not -len(shape) <= axis < len(shape):
    raise ValueError(
        f"`{name}` axis {axis} is out of range for leaf {path} of shape"
        f" {tuple(shape)}; choose another granularity for it."
    )
  return axis % len(shape)


@runtime_checkable
class Granularity(Protocol):
  """What one pruning decision removes: the protocol of a granularity.

  The mask update calls, per pruned leaf: ``unit_scores`` on the leaf's
  scores (an array of its shape), ranks the units' ``|score|`` with the exact
  kernels (the count the distribution gives: ``round(s * units)`` per leaf
  when uniform; ties by position in the unit scores' row-major order), then
  ``expand`` to turn the unit decisions back into a keep-mask of the leaf's
  shape. Both are traced once at ``init`` to check them.
  """

  # Whether `unit_scores`/`expand` need the leaf whole on each device: under
  # Explicit mesh axes its scores are then gathered at a mask update and the
  # mask put back (`_placement`); elementwise ones work on shards.
  needs_whole_leaf: bool

  def check(self, path: str, shape: Sequence[int]) -> None:
    """Raises a ``ValueError`` naming ``path`` if the leaf does not fit."""

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    """One floating score per unit (any shape); smallest ``|score|`` pruned first."""

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    """The leaf's bool keep-mask from the units' (``unit_scores``-shaped) one."""


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Each entry is ranked on its own."""

  needs_whole_leaf = False

  def check(self, path: str, shape: Sequence[int]) -> None:
    del path, shape

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    return scores

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    del scores
    return unit_keep


@dataclasses.dataclass(frozen=True)
class PerLayer:
  """``inner`` applied to each layer of a leaf that stacks layers along
  ``axis`` (``nn.scan``, ``nnx.scan``): the plan wraps a stacked leaf's
  granularity in it (see ``magnitude_pruning``'s ``layer_axis``).

  Unit scores carry the layer axis first, ``(layers, *inner unit scores)``;
  under layer scope each layer is then ranked on its own (its row of the
  counts), under global scope with the other leaves, in that order.
  """

  inner: Any  # A `Granularity`, seeing one layer.
  axis: int  # The layer axis of the leaf, nonnegative.

  @property
  def needs_whole_leaf(self) -> bool:
    return self.inner.needs_whole_leaf

  def check(self, path: str, shape: Sequence[int]) -> None:
    self.inner.check(f"{path} (a layer of it)", layer_shape(shape, self.axis))

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    return jax.vmap(self.inner.unit_scores, in_axes=self.axis)(scores)

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    return jax.vmap(self.inner.expand, in_axes=(0, self.axis), out_axes=self.axis)(
        unit_keep, scores)


def layer_shape(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  """The shape of one layer of a leaf of ``shape`` stacked along ``axis``."""
  return tuple(d for a, d in enumerate(shape) if a != axis)


@dataclasses.dataclass(frozen=True)
class NOfM:
  """At most ``n`` of every ``m`` consecutive entries along ``axis`` kept."""

  needs_whole_leaf = True

  n: int = 2
  m: int = 4
  axis: int = -1

  def check(self, path: str, shape: Sequence[int]) -> None:
    axis = _check_axis("n_of_m", self.axis, shape, path)
    if shape[axis] % self.m:
      raise ValueError(
          f"`n_of_m` needs the length of axis {self.axis} of leaf {path}"
          f" (shape {tuple(shape)}) to be a multiple of m={self.m}; pick"
          " another axis or granularity for this leaf."
      )

  def groups(self, x: jax.Array, per_group: int = 0) -> jax.Array:
    """``x`` with ``axis`` last, split into groups: (..., groups, per_group).

    ``per_group`` defaults to ``m`` (a packed N:M array has ``n``). The one
    place where N:M groups are formed, for masks and exports; NumPy or JAX.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    per_group = per_group or self.m
    x = xp.moveaxis(x, self.axis, -1)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // per_group, per_group))

  def ungroup(self, x: jax.Array) -> jax.Array:
    """The inverse of :meth:`groups` for (..., groups, k): ``axis`` of length groups * k."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    return xp.moveaxis(x, -1, self.axis)

  def _kept_in_group(self, scores: jax.Array) -> jax.Array:
    """(..., groups, m) bools: the ``n`` largest ``|score|`` of each group.

    An entry's rank is the number of entries of its group below it (ties:
    the lower position is below), from ``m * m`` key comparisons.
    """
    keys = _thresholds.magnitude_keys(
        scores, _thresholds.needs_wide_keys([scores])
    )
    keys = self.groups(keys)
    mine, other = keys[..., :, None], keys[..., None, :]
    position = jnp.arange(self.m)
    earlier = position[None, :] < position[:, None]
    below = (other < mine) | ((other == mine) & earlier)
    rank = jnp.sum(below, axis=-1)
    return rank >= self.m - self.n

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    lost = jnp.where(self._kept_in_group(scores), 0, jnp.abs(self.groups(scores)))
    return jnp.sum(lost, axis=-1, dtype=_score_dtype(scores))

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    return self.ungroup(self._kept_in_group(scores) | unit_keep[..., None])


@dataclasses.dataclass(frozen=True)
class Blocks:
  """``(bh, bw)`` blocks of the last two axes, scored by mean or max."""

  needs_whole_leaf = True

  shape: tuple[int, int] = (4, 4)
  reduce: str = "mean"

  def check(self, path: str, shape: Sequence[int]) -> None:
    if len(shape) < 2:
      raise ValueError(
          f"`blocks` needs a leaf with at least 2 axes; leaf {path} has shape"
          f" {tuple(shape)}. Exclude it with `where` or give it another"
          " granularity."
      )

  def _padded(self, x: jax.Array) -> jax.Array:
    (bh, bw), (h, w) = self.shape, x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(0, -h % bh), (0, -w % bw)]
    x = jnp.pad(x, pad)  # Zeros: no effect on a sum of |s| or on a max.
    hb, wb = x.shape[-2] // bh, x.shape[-1] // bw
    return x.reshape(x.shape[:-2] + (hb, bh, wb, bw))

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    magnitude = self._padded(jnp.abs(scores).astype(_score_dtype(scores)))
    if self.reduce == "max":
      return jnp.max(magnitude, axis=(-3, -1))
    (bh, bw), (h, w) = self.shape, scores.shape[-2:]
    # Real entries per block: edge blocks of a ragged shape hold fewer.
    rows = np.minimum(bh, h - bh * np.arange(-(-h // bh)))
    cols = np.minimum(bw, w - bw * np.arange(-(-w // bw)))
    counts = jnp.asarray(np.outer(rows, cols), magnitude.dtype)
    return jnp.sum(magnitude, axis=(-3, -1)) / counts

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    (bh, bw), (h, w) = self.shape, scores.shape[-2:]
    keep = jnp.repeat(jnp.repeat(unit_keep, bh, axis=-2), bw, axis=-1)
    return keep[..., :h, :w]


@dataclasses.dataclass(frozen=True)
class Channels:
  """Whole slices along ``axis``, scored by their L1 or L2 norm."""

  needs_whole_leaf = True

  axis: int = -1
  norm: str = "l2"

  def check(self, path: str, shape: Sequence[int]) -> None:
    _check_axis("channels", self.axis, shape, path)

  def unit_scores(self, scores: jax.Array) -> jax.Array:
    others = tuple(a for a in range(scores.ndim) if a != self.axis % scores.ndim)
    magnitude = jnp.abs(scores).astype(_score_dtype(scores))
    if self.norm == "l1":
      return jnp.sum(magnitude, axis=others)
    plain = jnp.sqrt(jnp.sum(magnitude * magnitude, axis=others))
    # Squares overflow past ~1e19 and vanish below ~1e-19 in float32; there,
    # and only there, scale each channel by its largest entry first.
    largest = jnp.max(magnitude, axis=others, initial=0.0)
    scale = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1.0)
    scale_full = jnp.expand_dims(scale, others)
    scaled = scale * jnp.sqrt(jnp.sum((magnitude / scale_full) ** 2, axis=others))
    tiny = jnp.finfo(plain.dtype).tiny
    needs_scaling = (jnp.isinf(plain) & jnp.isfinite(largest)) | (
        (plain < tiny) & (largest > 0))
    return jnp.where(needs_scaling, scaled, plain)

  def expand(self, unit_keep: jax.Array, scores: jax.Array) -> jax.Array:
    axis = self.axis % scores.ndim
    shape = [1] * scores.ndim
    shape[axis] = scores.shape[axis]
    return jnp.broadcast_to(unit_keep.reshape(shape), scores.shape)


def check_n_m(n: Any, m: Any, name_n: str = "`n`", name_m: str = "`m`"):
  """``(n, m)`` as ints; raises unless ``1 <= n < m <= MAX_M``.

  One rule for `n_of_m` and the exporters (`to_nm`, `export_size_report`):
  ranking within a group compares all m * m pairs, and the packed layout
  stores positions as uint8.
  """
  if not (_checks.is_integer(n) and _checks.is_integer(m)):
    raise ValueError(
        f"{name_n} and {name_m} must be ints with 1 <= n < m <= {MAX_M}, got"
        f" n={n!r}, m={m!r}."
    )
  n, m = int(n), int(m)
  if not 1 <= n < m <= MAX_M:
    raise ValueError(
        f"{name_n} and {name_m} must satisfy 1 <= n < m <= {MAX_M} (each group"
        f" of m keeps at most n; all m * m pairs are compared, positions fit"
        f" uint8), got n={n}, m={m}."
    )
  return n, m


def unstructured() -> Unstructured:
  """Entries ranked one by one: the default granularity.

  Examples:
    >>> import optax_prune
    >>> tx = optax_prune.magnitude_pruning(
    ...     0.5, granularity=optax_prune.unstructured())
  """
  return Unstructured()


def n_of_m(n: int = 2, m: int = 4, *, axis: int) -> NOfM:
  r"""N:M sparsity: at most ``n`` of every ``m`` consecutive entries kept.

  The leaf's ``axis`` is cut into groups of ``m`` (its length must be a
  multiple of ``m``, checked at ``init``). At scheduled sparsity :math:`s`
  exactly :math:`\mathrm{round}(s \cdot G)` of the :math:`G` groups are made
  N:M-sparse, those that lose the least ``sum |score|``; in each, the
  ``m - n`` smallest entries are pruned (ties: lower position first). At
  :math:`s = 1` the whole leaf is N:M with entry sparsity :math:`(m-n)/m`.
  For NVIDIA's 2:4 sparse tensor cores, and for :func:`nm_matmul`, the groups
  run along the contraction axis of a kernel: ``axis=0`` for a flax ``Dense``
  kernel of shape ``(in, out)``, ``axis=-2`` (input channels) for a ``Conv``
  kernel of shape ``(..., in, out)``. ``axis`` has no default: the axis the
  mask is trained along is the axis it is packed along (``to_nm``).

  Args:
    n: entries kept per group, ``1 <= n < m``.
    m: group length, ``2 <= m <= 256``. Ranking within groups compares all
      pairs: temporaries of ``m`` bools per entry.
    axis: the axis cut into groups (required; see above).

  Returns:
    A granularity for ``magnitude_pruning(granularity=...)``.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> tx = optax_prune.magnitude_pruning(
    ...     1.0, granularity=optax_prune.n_of_m(2, 4, axis=0))
    >>> w = {"w": jnp.arange(1.0, 9.0).reshape(4, 2)}
    >>> tx.update(w, tx.init(w), w)[1].masks["w"].T
    Array([[False, False,  True,  True],
           [False, False,  True,  True]], dtype=bool)
  """
  n, m = check_n_m(n, m)
  return NOfM(n, m, _checks.integer("axis", axis))


def blocks(shape: tuple[int, int] = (4, 4), *, reduce: str = "mean") -> Blocks:
  """Block sparsity: ``(bh, bw)`` blocks of the last two axes pruned whole.

  Leading axes (a conv kernel's spatial ones) are independent rows of blocks.
  A block's score is the mean or the max ``|score|`` of its entries; when the
  last two axes are not multiples of the block, the edge blocks are smaller
  and their mean is taken over their real entries. The scheduled sparsity
  counts blocks: exactly ``round(s * blocks)`` are pruned.

  Args:
    shape: ``(bh, bw)``, positive integers.
    reduce: ``"mean"`` or ``"max"``.

  Returns:
    A granularity for ``magnitude_pruning(granularity=...)``.

  Examples:
    >>> import optax_prune
    >>> granularity = optax_prune.blocks((4, 4), reduce="max")
  """
  if not isinstance(shape, (tuple, list)) or len(shape) != 2:
    raise ValueError(f"`shape` must be a pair (bh, bw); got {shape!r}.")
  shape = (_checks.integer("shape[0]", shape[0], 1),
           _checks.integer("shape[1]", shape[1], 1))
  return Blocks(shape, _checks.one_of("reduce", reduce, ("mean", "max")))


def channels(*, axis: int = -1, norm: str = "l2") -> Channels:
  """Channel (filter) sparsity: whole slices along ``axis`` pruned together.

  A slice's score is the L1 or L2 norm of its entries' scores; the scheduled
  sparsity counts slices: exactly ``round(s * shape[axis])`` are pruned. For
  a flax ``Conv`` or ``Dense`` kernel ``axis=-1`` prunes output channels
  (filters), ``axis=-2`` input channels.

  Args:
    axis: the axis whose slices are units.
    norm: ``"l1"`` or ``"l2"``.

  Returns:
    A granularity for ``magnitude_pruning(granularity=...)``.

  Examples:
    >>> import optax_prune
    >>> granularity = optax_prune.channels(axis=-1, norm="l1")
  """
  norm = _checks.one_of("norm", norm, ("l1", "l2"))
  return Channels(_checks.integer("axis", axis), norm)


def checked_unit_count(granularity: Granularity, path: str, shape: Sequence[int]) -> int:
  """Units of a leaf of ``shape``, after tracing ``granularity`` on it abstractly.

  A granularity of your own gets a ``ValueError`` naming the leaf when
  ``unit_scores`` fails or ``expand`` does not return a bool mask of the
  leaf's shape, instead of an error from inside ``jit``. Leaves of one shape
  are traced once (a deep model has many).
  """
  units, failure = _checks.cached(_traced_units, granularity, tuple(shape))
  if isinstance(failure, Exception):
    raise ValueError(
        f"granularity {granularity!r} failed on leaf {path}: {failure}. Fix its"
        " `unit_scores`/`expand`, or give this leaf another granularity"
        " (a pytree prefix or `by_path` rules)."
    ) from failure
  if failure is not None:
    raise ValueError(
        f"granularity {granularity!r}: `expand` must return a bool mask of the"
        f" leaf's shape; for leaf {path} of shape {tuple(shape)} it returned {failure}."
        " Return `unit_keep` broadcast back to the leaf, as `channels` does."
    )
  return units


@functools.lru_cache(maxsize=4096)
def _traced_units(granularity: Granularity, shape: tuple[int, ...]):
  """``(units, None)``, or ``(None, what went wrong)``: the exception, or
  what ``expand`` returned instead of a bool mask of ``shape``."""
  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    units = jax.eval_shape(granularity.unit_scores, spec)
    mask = jax.eval_shape(
        granularity.expand, jax.ShapeDtypeStruct(units.shape, jnp.bool_), spec)
  except Exception as e:  # Any failure here is the granularity's.
    return None, e
  if getattr(mask, "shape", None) != shape or mask.dtype != jnp.bool_:
    return None, mask
  return math.prod(units.shape), None


IMPORTANCES = ("weight", "bn_scale", "taylor", "activation")


def _is_bn_scale(path: str) -> bool:
  """A BatchNorm scale (LayerNorm's and RMSNorm's scales are never in a prunable group)."""
  return path.endswith("['scale']")


@dataclasses.dataclass(frozen=True, eq=False)  # Compared by identity: it holds arrays.
class CoupledChannels:
  """Channels of coupled groups, each pruned in all its members at once.

  Not a per-leaf granularity: a unit spans leaves. ``magnitude_pruning`` and
  ``prune`` prune the groups' parameter members (their ``where``) with the
  rule ``_rules.prune_coupled``, which asks this object for each group's
  channel importance (:meth:`importance_of`) and kept count
  (:meth:`pruned_count`).
  """

  groups: tuple  # Of `_coupling.ChannelGroup`, all prunable.
  norm: str = "l2"
  round_to: int = 1
  importance: str = "weight"
  # Per group, its channels' activation norms (importance="activation").
  activation_norms: tuple = ()

  def __repr__(self) -> str:  # Error messages name it without printing every group.
    return (f"coupled_channels(<{len(self.groups)} groups>, norm={self.norm!r},"
            f" round_to={self.round_to}, importance={self.importance!r})")

  @functools.cached_property
  def paths(self) -> frozenset:
    return frozenset(view[0] for g in self.groups for view in g.views())

  def selects(self, path, leaf) -> bool:
    """The ``where`` it implies: the groups' parameter members."""
    del leaf
    return jax.tree_util.keystr(path) in self.paths

  def importance_of(self, group_index: int, members, scores, params, signals) -> jax.Array:
    """The ``(C,)`` importance of one group's channels.

    ``members`` holds ``(leaf index, view)`` of the group's parameter
    members; ``scores``, ``params`` and ``signals`` map a leaf index to the
    transformation's scores, the param and its gradient (or update).
    """
    if self.importance == "activation":
      return jnp.asarray(self.activation_norms[group_index])
    if self.importance == "taylor":  # |sum over members and slice of w * g|
      total = 0.0
      for i, view in members:
        product, axis = _coupling.channel_view(
            params[i].astype(jnp.float32) * signals[i].astype(jnp.float32), *view[1:])
        total = total + jnp.sum(product, axis=tuple(a for a in range(product.ndim) if a != axis))
      return jnp.abs(total)
    if self.importance == "bn_scale":  # |gamma| of the group's BatchNorm scales
      return sum(jnp.abs(_coupling.channel_view(params[i], *view[1:])[0].reshape(-1))
                 for i, view in members if _is_bn_scale(view[0]))
    return sum(self.channel_scores(scores[i], view) for i, view in members)

  def channel_scores(self, scores: jax.Array, view: tuple) -> jax.Array:
    """A member's channel norms; ``view`` is its ``(path, axis, outer, inner)``."""
    scores, axis = _coupling.channel_view(scores, *view[1:])
    return Channels(axis, self.norm).unit_scores(scores)

  def pruned_count(self, sparsity: jax.Array, size: int) -> jax.Array:
    """Channels to prune of a group of ``size``: ``round(s * size)``, or, with
    ``round_to=m``, the kept count moved to the nearest of ``m, 2m, ...`` (up to
    ``size``) or ``size`` itself, ties to the kept side; a kept count of 0 stays
    0 (uint32)."""
    pruned = _distributions.prune_count(sparsity, size)
    if self.round_to == 1:
      return pruned
    m = self.round_to
    kept = jnp.int32(size) - pruned.astype(jnp.int32)
    lower = kept // m * m  # A candidate only from m up.
    upper = jnp.minimum(lower + m, size)  # The next multiple, or the whole group.
    take_upper = (lower < m) | (upper - kept <= kept - lower)
    rounded = jnp.where(kept == 0, 0, jnp.where(take_upper, upper, lower))  # s = 1 stays whole.
    return (size - rounded).astype(jnp.uint32)

  def check_params(self, params: Any) -> None:
    """Raises a ``ValueError`` naming a member missing from ``params`` or of
    another size (groups found for other params)."""
    leaves = _coupling._by_path(params)  # pylint: disable=protected-access
    for group in self.groups:
      for view in group.views():
        _coupling._member(leaves, view, group, "params")  # pylint: disable=protected-access

  def checked_setup(self, schedule: Any, where: Any, scope: str, distribution: Any):
    """Refuses ``magnitude_pruning`` arguments that it decides itself."""
    for name, value, allowed in (("where", where, (None,)), ("scope", scope, ("layer",)),
                                 ("distribution", distribution, (None, "uniform"))):
      if value not in allowed:
        raise ValueError(
            f"`{name}={value!r}` cannot be combined with `coupled_channels`: it prunes"
            " exactly the groups' members, each group losing round(s * channels)"
            f" channels; leave `{name}` at its default.")
    if not (callable(schedule) or _checks.is_number(schedule)):
      raise ValueError(
          "`coupled_channels` needs one schedule (a number or a schedule) for all"
          f" its groups; got {schedule!r}. To prune some groups only, pass a"
          " subset of `channel_groups(...).prunable`.")


def activation_norms(groups, input_norms) -> tuple:
  """Per group, ``(C,)`` norms of its channels as inputs of its consumers.

  A consumer is a member whose group axis is contracted (an input axis of its
  ``InputNorm``); the channel's norm is the L2 norm of its slice of the
  consumer's input norms, summed over the group's consumers.
  """
  if not isinstance(input_norms, dict):
    raise ValueError(
        "`input_norms` must be the dict `optax_prune.input_norms(fn, params, batches)`"
        f" returns; got {type(input_norms).__name__}.")
  out, missing = [], []
  for group in groups:
    total = np.zeros(group.size, np.float64)
    found = False
    for path, axis, outer, inner in group.views():
      norm = input_norms.get(path)
      if norm is None or axis in norm.output_axes:
        continue
      view, channel_axis = _coupling.channel_view(np.asarray(norm.norm, np.float64), axis, outer, inner)
      total += np.sqrt(np.sum(np.square(view), axis=tuple(
          a for a in range(view.ndim) if a != channel_axis)))
      found = True
    if not found:
      missing.append(group.name)
    out.append(total.astype(np.float32))
  if missing:
    raise ValueError(
        f"`importance='activation'`: the groups {missing} have no member that takes"
        " their channels as inputs in `input_norms` (a layer after them). Pass a"
        " subset of the groups without them, or another `importance`.")
  return tuple(out)


def coupled_channels(groups: Any, *, norm: str = "l2", round_to: int = 1,
                     importance: str = "weight", input_norms: Any = None) -> CoupledChannels:
  r"""Structured pruning over coupled channel groups (Torch-Pruning's DepGraph).

  For ``magnitude_pruning(schedule, granularity=coupled_channels(groups))``
  and ``prune(params, s, granularity=coupled_channels(groups))``.
  Each group of :math:`C` channels found by :func:`channel_groups` (a
  layer's output units with its bias, the BatchNorm after it, the next
  layer's input rows and everything joined by residual adds; or an
  attention layer's heads) loses exactly :math:`\mathrm{round}(s \cdot C)`
  channels at scheduled sparsity :math:`s`, those of smallest importance,
  ties by position. A pruned channel is masked in every member, so
  :func:`shrink` can cut it out. The members are the pruned leaves
  (``where`` is implied), and every group follows the one ``schedule``.

  Importance of channel :math:`c`, over the group's parameter members
  :math:`(w, a)` (:math:`w_{[a=c]}` the member's slice at the channel):

  * ``"weight"`` (default): :math:`\sum_{(w,a)} \lVert w_{[a=c]} \rVert`,
    the L2 or L1 norm of the transformation's ``score`` (``|w|`` by
    default, ``|w g|`` with ``score="saliency"``);
  * ``"bn_scale"`` (network slimming, Liu et al. 2017): :math:`\sum
    |\gamma_c|` over the group's BatchNorm scales (1-D members named
    ``scale``); a group without one is an error;
  * ``"taylor"`` (first order, Molchanov et al. 2019):
    :math:`\big|\sum_{(w,a)} \sum_{w_{[a=c]}} w \cdot g\big|`, with
    :math:`g` the raw gradient (``grads=`` of ``update`` or ``prune``;
    without it, the update the link receives);
  * ``"activation"``: :math:`\sum \lVert x_c \rVert_2` of the channel as
    the input of each member that contracts it, from calibration batches
    (``input_norms=``, from :func:`input_norms`); fixed while training.

  With ``round_to=m`` the *kept* count of each group,
  :math:`C - \mathrm{round}(s C)`, moves to the nearest of :math:`m, 2m,
  \dots \le C` or :math:`C` itself (ties to more kept channels): a group
  keeps at least :math:`m` (or none, when :math:`\mathrm{round}(s C) = C`,
  as at :math:`s = 1`), a group smaller than :math:`m` is not pruned below
  that, and a width that is not a multiple of :math:`m` is either kept whole
  or cut to a multiple (12 heads with ``round_to=8`` keep 12 or 8).

  Args:
    groups: a :class:`ChannelGroups` (its prunable groups) or a sequence of
      its :class:`ChannelGroup` items (a subset: heads only, say). A group
      that cannot be removed safely is an error.
    norm: ``"l2"`` or ``"l1"`` (``importance="weight"``).
    round_to: an int >= 1: kept channel counts in multiples of it (8 or 16
      for tensor cores).
    importance: ``"weight"``, ``"bn_scale"``, ``"taylor"`` or
      ``"activation"``.
    input_norms: for ``importance="activation"``: ``input_norms(fn, params,
      batches)``.

  Returns:
    A granularity for ``magnitude_pruning(granularity=...)`` and ``prune``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, optax_prune
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((3, 5))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> groups = optax_prune.channel_groups(
    ...     lambda p, x: model.apply({"params": p}, x), params, x)
    >>> tx = optax_prune.magnitude_pruning(
    ...     0.5, granularity=optax_prune.coupled_channels(groups))
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> state.masks["layers_0"]["bias"].sum(), state.masks["layers_2"]["kernel"].sum()
    (Array(8, dtype=int32), Array(16, dtype=int32))
    >>> pruned, masks = optax_prune.prune(  # One-shot; 16 * 0.7 rounds to 11 kept, then to 8.
    ...     params, 0.3, granularity=optax_prune.coupled_channels(groups, round_to=8))
    >>> masks["layers_0"]["bias"].sum()
    Array(8, dtype=int32)
    >>> grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
    >>> taylor = optax_prune.coupled_channels(groups, importance="taylor")
    >>> _, masks = optax_prune.prune(params, 0.25, granularity=taylor, grads=grads)
    >>> masks["layers_0"]["bias"].sum()  # The 4 channels of least |sum of w * g| pruned.
    Array(12, dtype=int32)
  """
  groups = _coupling.checked_groups(groups, "groups")
  norm = _checks.one_of("norm", norm, ("l1", "l2"))
  if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
    raise ValueError(f"`round_to` must be an int >= 1 (1: no rounding); got {round_to!r}.")
  importance = _checks.one_of("importance", importance, IMPORTANCES)
  if (input_norms is not None) != (importance == "activation"):
    raise ValueError(
        "`input_norms` go with `importance='activation'` (and it needs them): pass"
        " both, or neither.")
  norms = activation_norms(groups, input_norms) if importance == "activation" else ()
  if importance == "bn_scale":
    without = [g.name for g in groups
               if not any(_is_bn_scale(view[0]) for view in g.views())]
    if without:
      raise ValueError(
          f"`importance='bn_scale'` ranks channels by their BatchNorm scales; the groups"
          f" {without} have none. Pass a subset of the groups without them, or"
          " another `importance`.")
  return CoupledChannels(groups, norm, int(round_to), importance, norms)
