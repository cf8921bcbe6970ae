"""A pruned model that is really smaller: kept values and mask bits, in memory and on disk.

:func:`compact` turns every pruned leaf into a small NamedTuple of arrays (the
keep-mask packed 8 entries a byte, the kept values, an int32 header), or the
N:M layout of :func:`to_nm`; :func:`uncompact` inverts it bit for bit.
:func:`save_compact` and :func:`load_compact` store that tree with
orbax-checkpoint (imported when they are called: the package does not need it)
and check everything read back against the params it is loaded for, and
against a CRC32 per stored array and shard written beside it.

A leaf split over devices is compacted shard by shard on the host, one shard at
a time, and restored onto each shard's own devices: no device, and no host
buffer, ever holds the whole leaf.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import warnings
import zlib
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

from optax_prune import _bits
from optax_prune import _export
from optax_prune import _granularity
from optax_prune import _paths

_INT32_MAX = 2**31 - 1
_LOAD_FIX = (
    "Load it for the params it was saved from (same structure, shapes and"
    " dtypes), or save it again from these params."
)


class CompactLeaf(NamedTuple):
  """A pruned leaf stored as its keep-mask's bits and its kept values.

  For a leaf of ``shape`` (``ndim`` axes) with keep-mask ``mask``, whole or
  split into ``S`` distinct shards on a grid of ``grid[i]`` shards along axis
  ``i`` (``S = prod(grid)``; ``grid`` is all ones for a leaf that is whole):

  * ``bits``: uint8. Each shard's mask packed along its last axis
    (``np.packbits``, big-endian, the last byte of a row zero-padded), the
    shards' bytes side by side in the shards' places, so that the bits take
    the leaf's own sharding (``PartitionSpec``) unchanged. Its shape is
    ``shape[:-1] + (grid[-1] * ceil(shard_shape[-1] / 8),)``: exactly
    ``_bits.packed_shape(shape)`` (the packed whole mask) for a whole leaf or
    when a shard's last-axis length is a multiple of 8; otherwise every shard
    pads its own last byte, so the array is slightly longer than the packed
    whole mask. A 0-d leaf has ``(1,)``.
  * ``values``: the leaf's dtype, bit for bit. A whole leaf: shape
    ``(max(kept, 1),)``, the kept entries in row-major order. A split leaf:
    ``(S, max(1, max kept per shard))``, row ``r`` the kept entries of shard
    ``r`` in the shard's row-major order; shards are numbered in row-major
    order of their first index and each row lives on the devices of its
    shard. Zero padding fills rows that keep fewer (orbax cannot store
    zero-size arrays, hence at least one entry).
  * ``header``: int32 vector ``[ndim, *shape, *grid, *kept]`` with ``kept``
    the number of kept entries of each shard (``S`` of them).

  A pytree whose leaves are these three arrays (NumPy for a NumPy leaf,
  ``jax.Array`` for a ``jax.Array``), so orbax saves it as it is.
  """

  bits: Any
  values: Any
  header: Any


class CompactNMLeaf(NamedTuple):
  """A pruned N:M leaf in :func:`to_nm`'s layout, with the kept slots marked.

  For ``n_of_m(n, m, axis)``, ``values`` and ``indices`` are exactly
  ``to_nm(leaf, mask, nm)``'s (the dense shape with the length ``L`` of
  ``axis`` replaced by ``L // m * n``; uint8 positions in each group).
  ``slots`` (uint8) is the bool array "slot holds a kept entry" of that shape,
  packed along its last axis: it tells a kept weight equal to 0 from a padding
  slot, so the mask comes back exactly. ``header``: int32 ``[n, m, axis,
  *shape]``. For float32 and 2:4 that is ``(2 * 4 + 2 + 2 / 8) / 16`` =
  0.64 of the dense bytes.
  """

  values: Any
  indices: Any
  slots: Any
  header: Any


def _is_entry(x: Any) -> bool:
  return isinstance(x, (CompactLeaf, CompactNMLeaf))


def _where(path) -> str:
  return f"the leaf at {jax.tree_util.keystr(path)}"


# Masks in either layout, on the host.


def _host_mask(path, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
  """``mask`` as a bool NumPy array of ``shape``: bool, or packed uint8 bits."""
  _export._check_not_traced(mask, "masks")  # pylint: disable=protected-access
  mask = np.asarray(mask)
  if mask.dtype == np.bool_ and mask.shape == shape:
    return mask
  if mask.dtype == np.uint8 and mask.shape == _bits.packed_shape(shape):
    return _bits.unpack_np(mask, shape)
  raise ValueError(_bad_mask(path, mask, shape))


def _bad_mask(path, mask, shape) -> str:
  return (
      f"`masks` must hold, at {jax.tree_util.keystr(path)}, a bool array of"
      f" the leaf's shape {tuple(shape)}, its packed uint8 bits of shape"
      f" {_bits.packed_shape(shape)}, or `optax.MaskedNode()`; got"
      f" {np.dtype(mask.dtype)}{list(np.shape(mask))}. Pass the pruning"
      " state's `masks`, e.g. `find_pruning_state(opt_state).masks`."
  )


def _device_mask(path, mask: Any, x: jax.Array) -> jax.Array:
  """``mask`` as a bool ``jax.Array`` placed like ``x`` (moving mask bytes only)."""
  _export._check_not_traced(mask, "masks")  # pylint: disable=protected-access
  shape = x.shape
  if isinstance(mask, jax.Array):
    if mask.dtype == np.bool_ and mask.shape == shape:
      if mask.sharding.is_equivalent_to(x.sharding, x.ndim):
        return mask
      return jax.device_put(mask, x.sharding)
    if mask.dtype == np.uint8 and mask.shape == _bits.packed_shape(shape):
      unpack = functools.partial(_bits.unpack, shape=shape)
      return jax.jit(unpack, out_shardings=x.sharding)(mask)
    raise ValueError(_bad_mask(path, mask, shape))
  return jax.device_put(_host_mask(path, mask, shape), x.sharding)


# Where the shards of a split leaf are.


class _Split(NamedTuple):
  """The distinct shards of a leaf split over devices."""

  grid: tuple[int, ...]  # Shards along each axis.
  shard_shape: tuple[int, ...]
  rows: list  # Per shard, in row-major order of starts: its index (slices).
  row_of: dict  # Device -> its shard's row.
  values_sharding: Any  # For (S, width) values: row r on shard r's devices.


def _index(index, shape) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _split(path, sharding, shape: tuple[int, ...]) -> Optional[_Split]:
  """The leaf's shards, or None when every device holds the whole leaf."""
  by_index: dict = {}
  for device, index in sharding.devices_indices_map(shape).items():
    by_index.setdefault(_index(index, shape), []).append(device)
  if len(by_index) == 1:
    return None
  keys = sorted(by_index)
  grid = tuple(len({k[i][0] for k in keys}) for i in range(len(shape)))
  shard_shapes = {tuple(b - a for a, b in k) for k in keys}
  replicas = {len(devices) for devices in by_index.values()}
  if math.prod(grid) != len(keys) or len(shard_shapes) != 1 or len(replicas) != 1:
    raise ValueError(
        f"{_where(path)} is split into uneven shards ({len(keys)} shards of"
        f" shapes {sorted(shard_shapes)} for shape {shape}): compacting needs"
        " equal shards on a grid. Give every split axis a length divisible by"
        " its number of shards."
    )
  rows = [tuple(slice(a, b) for a, b in k) for k in keys]
  row_of = {d: r for r, k in enumerate(keys) for d in by_index[k]}
  return _Split(grid, shard_shapes.pop(), rows, row_of,
                _values_sharding(sharding, keys, by_index, row_of))


def _values_sharding(sharding, keys, by_index, row_of):
  """A sharding of (S, width) arrays putting row r on the devices of shard r.

  On the leaf's own mesh when it has one (the mesh axes that split the leaf,
  in the order of its ``PartitionSpec``, split the rows; the others
  replicate them); else on a (shards, replicas) mesh of the same devices.
  """
  if isinstance(sharding, NamedSharding):
    axes = []
    for entry in sharding.spec:
      if isinstance(entry, str):
        axes.append(entry)
      elif isinstance(entry, tuple):
        axes.extend(entry)
    candidate = NamedSharding(sharding.mesh, P(tuple(axes), None))
    placed = candidate.devices_indices_map((len(keys), 1))
    if set(placed) == set(row_of) and all(
        _index(index, (len(keys), 1))[0] == (row_of[d], row_of[d] + 1)
        for d, index in placed.items()):
      return candidate
  devices = np.array([sorted(by_index[k], key=lambda d: d.id) for k in keys])
  mesh = jax.sharding.Mesh(devices, ("shards", "replicas"))
  return NamedSharding(mesh, P("shards", None))


def _replicated(sharding):
  """A sharding of any shape holding the whole array on ``sharding``'s devices."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P())
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  if len(devices) == 1:
    return SingleDeviceSharding(devices[0])
  return NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)), P())


def _assemble(shape, sharding, per_device: dict) -> jax.Array:
  """A ``jax.Array`` from NumPy blocks, ``per_device[device]``, each put on its device."""
  devices = list(sharding.addressable_devices_indices_map(shape))
  return jax.make_array_from_single_device_arrays(
      shape, sharding, [jax.device_put(per_device[d], d) for d in devices])


def _shards_by_device(x: jax.Array) -> dict:
  return {s.device: s.data for s in x.addressable_shards}


# The header.


def _header(path, shape, grid, counts) -> np.ndarray:
  numbers = [len(shape), *shape, *grid, *counts]
  if max(numbers) > _INT32_MAX:
    raise ValueError(
        f"{_where(path)} has an axis or a shard of more than 2**31 - 1"
        f" entries (shape {tuple(shape)}): the compact header is int32. Split"
        " the leaf over more devices, or keep it dense."
    )
  return np.asarray(numbers, np.int32)


def _read_header(path, header) -> tuple[tuple, tuple, np.ndarray]:
  """(shape, grid, kept per shard) from a :class:`CompactLeaf` header, checked."""
  h = np.asarray(header)
  ndim = int(h[0]) if h.ndim == 1 and h.size and h.dtype == np.int32 else -1
  if ndim < 0 or h.size < 2 + 2 * ndim or np.any(h < 0):
    raise ValueError(
        f"{_where(path)}: the compact header is not int32 [ndim, *shape,"
        f" *grid, *kept] with non-negative entries (got {h.dtype}"
        f"{list(h.shape)}): the data is corrupted. {_LOAD_FIX}"
    )
  shape = tuple(int(v) for v in h[1:1 + ndim])
  grid = tuple(int(v) for v in h[1 + ndim:1 + 2 * ndim])
  counts = h[1 + 2 * ndim:].astype(np.int64)
  if counts.size != math.prod(grid) or any(g < 1 for g in grid):
    raise ValueError(
        f"{_where(path)}: the compact header's grid {grid} does not match its"
        f" {counts.size} kept counts: the data is corrupted. {_LOAD_FIX}"
    )
  return shape, grid, counts


def _bits_shape(shape, grid) -> tuple[int, ...]:
  if not shape:
    return (1,)
  shard_last = shape[-1] // grid[-1]
  return (*shape[:-1], grid[-1] * -(-shard_last // 8))


# The bit layout, on the host.


def _compact_np(path, x: np.ndarray, mask: np.ndarray) -> CompactLeaf:
  values = x[mask]  # Row-major, the dtype kept.
  padded = np.zeros(max(values.size, 1), x.dtype)
  padded[:values.size] = values
  header = _header(path, x.shape, (1,) * x.ndim, [values.size])
  return CompactLeaf(_bits.pack_np(mask), padded, header)


def _grid_rows(shape, grid):
  """The shard indices of an even ``grid`` over ``shape``, row-major."""
  sizes = [n // g for n, g in zip(shape, grid)]
  for starts in np.ndindex(*grid):
    yield tuple(slice(i * s, (i + 1) * s) for i, s in zip(starts, sizes))


def _expand_shard(path, row, bits, values, count, shard_shape):
  """(dense, mask) of one shard from its packed bits and its values row."""
  mask = _bits.unpack_np(bits, shard_shape)
  kept = int(np.count_nonzero(mask))
  if kept != count or count > values.shape[-1]:
    raise ValueError(
        f"{_where(path)}: shard {row} has {kept} mask bits set, its header"
        f" says {count} kept values and it stores {values.shape[-1]}: the data"
        f" is corrupted. {_LOAD_FIX}"
    )
  dense = np.zeros(shard_shape, values.dtype)
  dense[mask] = values[:count]
  return dense, mask


def _check_bits_layout(path, leaf: CompactLeaf, shape, grid, counts, dtype=None):
  want_bits = _bits_shape(shape, grid)
  problems = []
  if np.dtype(leaf.bits.dtype) != np.uint8 or tuple(leaf.bits.shape) != want_bits:
    problems.append(f"bits are {np.dtype(leaf.bits.dtype)}{list(leaf.bits.shape)},"
                    f" not uint8{list(want_bits)}")
  rows = counts.size
  width = leaf.values.shape[-1] if leaf.values.ndim else 0
  want_values = (width,) if rows == 1 else (rows, width)
  if tuple(leaf.values.shape) != want_values or width < max(1, counts.max()):
    problems.append(f"values have shape {list(leaf.values.shape)} for"
                    f" {rows} shard(s) keeping at most {int(counts.max())}")
  if dtype is not None and np.dtype(leaf.values.dtype) != np.dtype(dtype):
    problems.append(f"values are {np.dtype(leaf.values.dtype)}, not {np.dtype(dtype)}")
  if problems:
    raise ValueError(f"{_where(path)}: {'; '.join(problems)}: the data is"
                     f" corrupted or not a compact leaf. {_LOAD_FIX}")


def _expand_np(path, leaf: CompactLeaf) -> tuple[np.ndarray, np.ndarray]:
  """(dense, mask) on the host, for any grid."""
  shape, grid, counts = _read_header(path, leaf.header)
  _check_bits_layout(path, leaf, shape, grid, counts)
  bits, values = np.asarray(leaf.bits), np.asarray(leaf.values)
  values = values.reshape(counts.size, -1)
  dense = np.zeros(shape, values.dtype)
  mask = np.zeros(shape, bool)
  if not shape:  # 0-d.
    d, m = _expand_shard(path, 0, bits, values[0], int(counts[0]), (1,))
    return d.reshape(()), m.reshape(())
  shard_shape = tuple(n // g for n, g in zip(shape, grid))
  per_shard = bits.shape[-1] // grid[-1]
  for r, index in enumerate(_grid_rows(shape, grid)):
    j = index[-1].start // max(shard_shape[-1], 1)
    block = bits[index[:-1] + (slice(j * per_shard, (j + 1) * per_shard),)]
    dense[index], mask[index] = _expand_shard(
        path, r, block, values[r], int(counts[r]), shard_shape)
  return dense, mask


# The bit layout of jax.Arrays: whole leaves on the host, split leaves shard by shard.


def _compact_array(path, x: jax.Array, mask: Any) -> CompactLeaf:
  if not x.is_fully_addressable:
    raise ValueError(
        f"{_where(path)} spans several processes: `compact` reads shards on"
        " the host and needs every shard in this process. Gather it first"
        " (`jax.experimental.multihost_utils.process_allgather`)."
    )
  split = _split(path, x.sharding, x.shape)
  if split is None:
    leaf = _compact_np(path, np.asarray(x), _host_mask(path, mask, x.shape))
    whole = _replicated(x.sharding)
    return CompactLeaf(jax.device_put(leaf.bits, x.sharding),
                       jax.device_put(leaf.values, whole),
                       jax.device_put(leaf.header, whole))
  x_shards = _shards_by_device(x)
  m_shards = _shards_by_device(_device_mask(path, mask, x))
  first = {}
  for device, r in split.row_of.items():
    first.setdefault(r, device)
  bits, values = [], []
  for r in range(len(split.rows)):  # One shard at a time, on the host.
    shard_mask = np.asarray(m_shards[first[r]])
    values.append(np.asarray(x_shards[first[r]])[shard_mask])
    bits.append(_bits.pack_np(shard_mask))
  counts = [v.size for v in values]
  width = max(1, max(counts))
  rows = [np.zeros((1, width), x.dtype) for _ in values]
  for row, v in zip(rows, values):
    row[0, :v.size] = v
  bits_shape = _bits_shape(x.shape, split.grid)
  return CompactLeaf(
      bits=_assemble(bits_shape, x.sharding,
                     {d: bits[r] for d, r in split.row_of.items()}),
      values=_assemble((len(rows), width), split.values_sharding,
                       {d: rows[r] for d, r in split.row_of.items()}),
      header=jax.device_put(_header(path, x.shape, split.grid, counts),
                            _replicated(x.sharding)),
  )


def _expand_array(path, leaf: CompactLeaf, sharding=None):
  """(dense, mask) as ``jax.Array``s placed with ``sharding`` (default: the bits')."""
  sharding = leaf.bits.sharding if sharding is None else sharding
  shape, grid, counts = _read_header(path, leaf.header)
  split = _split(path, sharding, shape)
  if split is None or split.grid != grid:
    # A whole leaf, or one loaded into another split: assembled on the host.
    dense, mask = _expand_np(path, leaf)
    return jax.device_put(dense, sharding), jax.device_put(mask, sharding)
  _check_bits_layout(path, leaf, shape, grid, counts)
  bits_shards = _shards_by_device(leaf.bits)
  value_rows = {}
  for shard in leaf.values.addressable_shards:
    start, stop = _index(shard.index, leaf.values.shape)[0]
    for r in range(start, stop):
      value_rows.setdefault(r, (shard, r - start))
  dense, mask = {}, {}
  done = {}
  for device, r in split.row_of.items():
    if r not in done:
      shard, offset = value_rows[r]
      done[r] = _expand_shard(path, r, np.asarray(bits_shards[device]),
                              np.asarray(shard.data)[offset], int(counts[r]),
                              split.shard_shape)
    dense[device], mask[device] = done[r]
  return (_assemble(shape, sharding, dense), _assemble(shape, sharding, mask))


# N:M.


def _compact_nm(path, x: np.ndarray, mask: np.ndarray,
                pattern: _granularity.NOfM) -> CompactNMLeaf:
  values, order, slot_kept = _export._nm_pack_np(x, mask, pattern)  # pylint: disable=protected-access
  _header(path, x.shape, (), [])  # Checks the shape fits int32.
  header = np.asarray([pattern.n, pattern.m, pattern.axis, *x.shape], np.int32)
  return CompactNMLeaf(values, order, _bits.pack_np(slot_kept), header)


def _expand_nm(path, leaf: CompactNMLeaf) -> tuple[np.ndarray, np.ndarray]:
  h = np.asarray(leaf.header)
  values, indices = np.asarray(leaf.values), np.asarray(leaf.indices)
  bad = f"{_where(path)}: the N:M data is corrupted ({{}}). {_LOAD_FIX}"
  if h.ndim != 1 or h.size < 4 or h.dtype != np.int32:
    raise ValueError(bad.format(f"header {h.dtype}{list(h.shape)}"))
  n, m, axis, shape = int(h[0]), int(h[1]), int(h[2]), tuple(int(v) for v in h[3:])
  if not (1 <= n < m <= 256 and 0 <= axis < len(shape) and shape[axis] % m == 0):
    raise ValueError(bad.format(f"header n={n}, m={m}, axis={axis}, shape={shape}"))
  want = shape[:axis] + (shape[axis] // m * n,) + shape[axis + 1:]
  if (values.shape != want or indices.shape != want or indices.dtype != np.uint8
      or tuple(leaf.slots.shape) != _bits.packed_shape(want)
      or np.dtype(leaf.slots.dtype) != np.uint8):
    raise ValueError(bad.format(
        f"values {list(values.shape)}, indices {indices.dtype}"
        f"{list(indices.shape)}, slots {list(leaf.slots.shape)} for the dense"
        f" shape {shape}"))
  pattern = _granularity.NOfM(n, m, axis)
  kept = pattern.groups(_bits.unpack_np(np.asarray(leaf.slots), want), n)
  values, indices = pattern.groups(values, n), pattern.groups(indices, n)
  positions = indices.astype(np.int64)
  # Kept slots come first in each group, at increasing positions below m.
  prefix = np.all(kept[..., 1:] <= kept[..., :-1])
  increasing = np.all((np.diff(positions, axis=-1) > 0) | ~kept[..., 1:])
  if not (prefix and increasing and np.all(positions < m)
          and not np.any(np.where(kept, 0, values != 0))):
    raise ValueError(bad.format("slots, positions or padding out of the layout"))
  dense = np.zeros(values.shape[:-1] + (m,), values.dtype)
  full = np.zeros(dense.shape, bool)
  np.put_along_axis(dense, positions, np.where(kept, values, np.zeros((), values.dtype)), -1)
  np.put_along_axis(full, positions, kept, -1)
  # Padding slots point at distinct unused positions, written False / 0 above;
  # a kept position is written once (positions increase among kept slots).
  return pattern.ungroup(dense), pattern.ungroup(full)


# Public functions.


def compact(params: Any, masks: Any, *,
            nm: Optional[_granularity.NOfM] = None) -> Any:
  r"""Pruned params as only their kept values and their masks' bits.

  Each leaf with a keep-mask becomes a :class:`CompactLeaf`: the mask packed
  8 entries a byte along the last axis, the kept values in row-major order
  (the dtype kept bit for bit: f32, bf16, f16, f64) and an int32 header. For
  a leaf of ``N`` entries of ``b`` bytes keeping a share ``1 - s`` of them,
  that is about

  .. math::

     \frac{\text{compact bytes}}{\text{dense bytes}} \approx (1 - s)
       + \frac{1}{8 b}

  (``1 - s + 1/32`` for float32). With ``nm=n_of_m(n, m, axis=...)``, leaves
  whose mask fits the pattern are stored in :func:`to_nm`'s layout instead,
  as a :class:`CompactNMLeaf` (values, uint8 positions, and one bit per slot
  telling kept from padding), ready for :func:`nm_matmul`-style kernels;
  others, and leaves split over devices, use the bit layout. Leaves without a
  mask stay as they are (dense).

  A leaf split over several devices (a ``jax.Array`` with distinct shards) is
  compacted shard by shard and stays on its devices: the bits take the leaf's
  sharding and the values are one padded row per shard, placed on that
  shard's devices (see :class:`CompactLeaf`). Host-side: call it outside
  ``jax.jit``.

  Args:
    params: a pytree of arrays (``jax.Array`` or NumPy), e.g. the trained
      params.
    masks: keep-masks with the structure of `params`, e.g.
      ``find_pruning_state(opt_state).masks``: a bool array (True = kept) per
      pruned leaf, ``optax.MaskedNode()`` for the others. A mask leaf may also
      be the packed uint8 bits of the bool mask (``_bits.pack``, shape
      ``_bits.packed_shape(leaf.shape)``), the optimizer state's packed
      layout; it is unpacked.
    nm: optional N:M pattern, ``n_of_m(n, m, axis=...)``.

  Returns:
    A pytree like `params` with a :class:`CompactLeaf` or
    :class:`CompactNMLeaf` in place of each pruned leaf; NumPy arrays for
    NumPy leaves, ``jax.Array``\ s for ``jax.Array`` leaves.

  Raises:
    ValueError: if `masks` does not match `params`, `nm` is not an N:M
      granularity, an input is traced, or a split leaf's shards are uneven
      or in another process.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
    ...           "b": jnp.ones(3)}
    >>> masks = {"w": jnp.array([[True, False, True], [False, False, True]]),
    ...          "b": optax.MaskedNode()}
    >>> small = optax_prune.compact(params, masks)
    >>> small["w"].values  # The kept 0.0 is kept: the mask decides.
    Array([0., 2., 5.], dtype=float32)
    >>> small["w"].bits  # 0b10100000, 0b00100000
    Array([[160],
           [ 32]], dtype=uint8)
    >>> restored, restored_masks = optax_prune.uncompact(small)
    >>> restored["w"]
    Array([[0., 0., 2.],
           [0., 0., 5.]], dtype=float32)
  """
  if nm is not None:
    _export._check_pattern("nm", nm)  # pylint: disable=protected-access
  # Packed masks are unpacked here, per shard for split leaves.
  path_leaves, mask_leaves = _paths.pair_masks(params, masks, "params", unpack=False)
  treedef = jax.tree_util.tree_structure(params)
  out = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    _export._check_not_traced(leaf, "params")  # pylint: disable=protected-access
    if mask is None:
      out.append(leaf)
      continue
    if not hasattr(leaf, "dtype"):
      raise ValueError(f"`params` has a mask but no array at {jax.tree_util.keystr(path)}:"
                       f" got {type(leaf).__name__}.")
    if isinstance(leaf, jax.Array) and _split(path, leaf.sharding, leaf.shape):
      out.append(_compact_array(path, leaf, mask))
      continue
    host = np.asarray(leaf)
    host_mask = _host_mask(path, mask, host.shape)
    pattern = None
    if nm is not None and host.size:
      pattern, _ = _export._nm_problem(host.shape, host_mask, nm)  # pylint: disable=protected-access
    if pattern is not None:
      entry = _compact_nm(path, host, host_mask, pattern)
      if isinstance(leaf, jax.Array):
        entry = jax.tree.map(
            lambda a, s=_replicated(leaf.sharding): jax.device_put(a, s), entry)
      out.append(entry)
    elif isinstance(leaf, jax.Array):
      out.append(_compact_array(path, leaf, host_mask))
    else:
      out.append(_compact_np(path, host, host_mask))
  return jax.tree_util.tree_unflatten(treedef, out)


def uncompact(tree: Any) -> tuple[Any, Any]:
  """The params and masks that :func:`compact` turned into `tree`.

  Each :class:`CompactLeaf` and :class:`CompactNMLeaf` becomes a dense leaf
  bitwise equal to ``jnp.where(mask, param, 0)`` (pruned entries ``+0.0``,
  kept ones, zeros included, as they were) and its bool mask; other leaves
  are returned as they are, with ``optax.MaskedNode()`` masks. NumPy in,
  NumPy out; a ``jax.Array`` comes back with its sharding (a split leaf is
  expanded shard by shard on its own devices). Host-side, like
  :func:`compact`.

  Args:
    tree: a pytree from :func:`compact`.

  Returns:
    ``(params, masks)``: masks as the pruning state holds them, bool arrays
    placed like their params and ``optax.MaskedNode()`` for dense leaves.

  Raises:
    ValueError: if a compact leaf is inconsistent (its mask bits do not count
      its kept values, its arrays have other shapes than its header says).

  Examples:
    >>> import numpy as np, optax, optax_prune
    >>> w = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    >>> small = optax_prune.compact({"w": w}, {"w": w != 1.0},
    ...                             nm=optax_prune.n_of_m(3, 4, axis=0))
    >>> type(small["w"]).__name__, small["w"].values
    ('CompactNMLeaf', array([-2.,  0.,  4.], dtype=float32))
    >>> params, masks = optax_prune.uncompact(small)
    >>> params["w"], masks["w"]
    (array([ 0., -2.,  0.,  4.], dtype=float32), array([False,  True,  True,  True]))
  """
  path_entries, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_entry)
  params, masks = [], []
  for path, entry in path_entries:
    if not _is_entry(entry):
      params.append(entry)
      masks.append(optax.MaskedNode())
      continue
    for part in entry:
      _export._check_not_traced(part, "tree")  # pylint: disable=protected-access
    dense, mask = _expand(path, entry)
    params.append(dense)
    masks.append(mask)
  return (jax.tree_util.tree_unflatten(treedef, params),
          jax.tree_util.tree_unflatten(treedef, masks))


def _expand(path, entry, sharding=None):
  on_device = isinstance(entry.values, jax.Array)
  if isinstance(entry, CompactNMLeaf):
    dense, mask = _expand_nm(path, entry)
    if on_device or sharding is not None:
      sharding = entry.values.sharding if sharding is None else sharding
      return jax.device_put(dense, sharding), jax.device_put(mask, sharding)
    return dense, mask
  if on_device or sharding is not None:
    if isinstance(entry.bits, jax.Array):
      return _expand_array(path, entry, sharding)
    dense, mask = _expand_np(path, entry)
    return jax.device_put(dense, sharding), jax.device_put(mask, sharding)
  return _expand_np(path, entry)


# Checksums: a CRC32 per stored array and distinct shard ("block").

_CHECKSUMS = "optax_prune"  # The key of orbax's custom metadata.


def _crc32(block: np.ndarray) -> int:
  # Bytes of any dtype (bf16 included) in row-major order; 0-d as one entry.
  return zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8))


def _distinct_shards(x) -> dict:
  """{index ((start, stop) per axis): data} of an array's distinct shards."""
  if not isinstance(x, jax.Array):
    return {tuple((0, n) for n in np.shape(x)): x}
  shards = {}
  for shard in x.addressable_shards:
    shards.setdefault(_index(shard.index, x.shape), shard.data)
  return shards


def _checksums(x) -> list:
  """``[[index, crc], ...]`` of the blocks ``x`` is written in: its distinct shards."""
  return [[[list(i) for i in index], _crc32(np.asarray(data))]
          for index, data in sorted(_distinct_shards(x).items())]


def _verify(where: str, x, blocks: list) -> None:
  """Checks each saved block of ``x``, assembled on the host one block at a time.

  A block is read from the shards of ``x`` (as loaded) that overlap it, so a
  leaf loaded into another split than it was saved with is checked without
  gathering it.
  """
  shards = _distinct_shards(x)
  cached = (None, None)  # One shard on the host at a time.
  for number, (index, expected) in enumerate(blocks):
    index = tuple(tuple(i) for i in index)
    block = np.empty([b - a for a, b in index], x.dtype)
    for shard_index, data in shards.items():
      overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(index, shard_index)]
      if block.size and any(a >= b for a, b in overlap):
        continue
      if cached[0] != shard_index:
        cached = (shard_index, np.asarray(data))
      within = lambda starts: tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, starts))
      block[within(index)] = cached[1][within(shard_index)]
    got = _crc32(block)
    if got != expected:
      shard = "" if len(blocks) == 1 else (
          f" shard {number} of {len(blocks)} (index"
          f" [{', '.join(f'{a}:{b}' for a, b in index)}]),")
      raise ValueError(
          f"{where}:{shard} its bytes do not match the checksum written with them"
          f" (CRC32 {got:#010x}, saved {expected:#010x}): the file is damaged."
          " Save it again from the params it came from.")


# On disk, with orbax.


def _for_orbax(tree: Any) -> Any:
  """The compact tree as orbax should write it.

  Orbax cannot store zero-size arrays: an empty dense leaf becomes None, an
  empty pruned leaf's bits too (both come back from `like`). Arrays that are
  whole on one device or replicated are written as NumPy arrays: orbax then
  stores no sharding metadata for them, about 0.5 kB per array (on the
  digits CNN, 8% of the checkpoint at 95% sparsity). Split arrays stay
  jax Arrays, written shard by shard.
  """
  def host(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated and x.is_fully_addressable:
      return np.asarray(x)
    return x

  def fix(x):
    if isinstance(x, CompactLeaf) and math.prod(x.bits.shape) == 0:
      x = x._replace(bits=None)
    elif hasattr(x, "shape") and not _is_entry(x) and math.prod(x.shape) == 0:
      return None
    return jax.tree.map(host, x)
  return jax.tree.map(fix, tree, is_leaf=_is_entry)


def save_compact(directory: Any, params: Any, masks: Any, *,
                 nm: Optional[_granularity.NOfM] = None,
                 force: bool = False) -> None:
  """Saves ``compact(params, masks, nm=nm)`` with orbax-checkpoint.

  On disk each pruned leaf holds the arrays of its :class:`CompactLeaf` or
  :class:`CompactNMLeaf` (orbax stores each as a compressed array), and
  dense leaves are stored as they are, with a CRC32 of each stored array's
  shards in orbax's custom metadata, so the directory takes about the
  compact bytes (``benchmarks/compact_sizes.py``: smaller than orbax's
  checkpoint of the dense pruned params at every sparsity from 0.5 to 0.95).
  A split leaf is written shard by shard by the devices holding it. Load it
  with :func:`load_compact`. Needs ``pip install orbax-checkpoint`` (the
  ``checkpoint`` extra).

  Args:
    directory: a path (str or ``pathlib.Path``); it must not exist unless
      `force`.
    params: a pytree of arrays, e.g. the trained params.
    masks: keep-masks as for :func:`compact` (bool, or packed uint8 bits).
    nm: optional N:M pattern, as for :func:`compact`.
    force: overwrite an existing `directory`.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.zeros(2)}
    >>> masks = {"w": jnp.abs(params["w"]) > 1, "b": optax.MaskedNode()}
    >>> path = tempfile.mkdtemp() + "/model"
    >>> optax_prune.save_compact(path, params, masks)
    >>> loaded, loaded_masks = optax_prune.load_compact(path, params)
    >>> loaded["w"], loaded_masks["w"]
    (Array([[ 0., -2.],
           [ 0.,  3.]], dtype=float32), Array([[False,  True],
           [False,  True]], dtype=bool))
  """
  ocp = _orbax("save_compact")
  tree = _for_orbax(compact(params, masks, nm=nm))
  checksums = {jax.tree_util.keystr(path): _checksums(x)
               for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(os.fspath(directory)), tree, force=force,
                      custom_metadata={_CHECKSUMS: {"format": 1, "crc32": checksums}})
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def _orbax(name: str):
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"`{name}` needs orbax-checkpoint: `pip install orbax-checkpoint`"
        " (or the `checkpoint` extra, `pip install optax-prune[checkpoint]`)."
    ) from e
  return ocp


def _node(tree, path):
  """The node of orbax's metadata tree (nested dicts and lists) at ``path``."""
  node = tree
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      k = key.key
    elif isinstance(key, jax.tree_util.SequenceKey):
      k = key.idx
    elif isinstance(key, jax.tree_util.GetAttrKey):
      k = key.name
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      k = key.key
    else:
      raise KeyError(key)
    if isinstance(node, (list, tuple)):
      if not isinstance(k, int) or not 0 <= k < len(node):
        raise KeyError(key)
      node = node[k]
    elif isinstance(node, dict):
      node = node[k] if k in node else node[str(k)]
    else:
      raise KeyError(key)
  return node


def _unseen(tree, seen: set, prefix: str) -> list[str]:
  """Paths of the arrays of orbax's metadata tree outside the ``seen`` nodes."""
  if id(tree) in seen or tree is None:
    return []
  if isinstance(tree, dict) and set(tree) in (set(CompactLeaf._fields),
                                              set(CompactNMLeaf._fields)):
    return [prefix]  # A compact leaf: named as one.
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _unseen(v, seen, f"{prefix}[{k!r}]")]
  if isinstance(tree, (list, tuple)):
    return [p for i, v in enumerate(tree) for p in _unseen(v, seen, f"{prefix}[{i}]")]
  return [prefix]


def _target_sharding(leaf):
  sharding = getattr(leaf, "sharding", None)
  if sharding is None or isinstance(leaf, np.ndarray):
    return SingleDeviceSharding(jax.devices()[0])
  return sharding


def _sds(meta, sharding):
  return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that finishes its tasks before it closes.

  Orbax runs a restore with `loop.run_until_complete` and closes the loop
  when it raises. One failed read (a truncated file) then strands the other
  reads: their TensorStore callbacks later print "Event loop is closed" from
  TensorStore's threads, and their collected tasks print TensorStore's spec
  dumps, long after the error (issue #26). This loop cancels what is left and
  waits for it, and drops the errors of reads that failed beside the one
  orbax raised, so a failed restore is one exception and nothing printed.
  """

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = [task for task in asyncio.all_tasks(self) if not task.done()]
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None  # A cancelled read's TensorStore callback: nobody awaits it.
    return super().call_soon_threadsafe(callback, *args, context=context)

  def call_exception_handler(self, context):
    # A task that failed beside the read orbax raised: its error is that one.
    if self.is_closed() and "never retrieved" in context.get("message", ""):
      return
    super().call_exception_handler(context)


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self):
    return _DrainingLoop()


def _restore(checkpointer: Any, path: Any, target: Any) -> Any:
  """Orbax's restore; a damaged file is one `ValueError`, nothing printed later."""
  previous_policy = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    return checkpointer.restore(path, target)
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and TensorStore raise bare Exceptions with pages of spec dumps.
    reason = str(e).split(" See full")[0].splitlines()[0][:160]
  finally:
    asyncio.set_event_loop_policy(previous_policy)
  raise ValueError(
      f"could not read the arrays of {path}: a data file is damaged or truncated"
      f" ({reason}). Save it again with `save_compact`.")


def load_compact(directory: Any, like: Any) -> tuple[Any, Any]:
  """Loads what :func:`save_compact` wrote: ``(params, masks)``, checked.

  Everything read is checked against `like` before it is used: the tree's
  structure, each leaf's shape and dtype, and for a compact leaf its header
  and the popcount of its mask bits against its kept count and its stored
  values. Every array read is checked against the CRC32 that
  :func:`save_compact` wrote for each of its shards (one shard at a time on
  the host, also when loaded into another split). A mismatch, a corrupted or
  a truncated file is a ``ValueError`` naming the leaf (and the shard), never
  wrong weights; a file written without checksums (by an older version)
  loads with a warning. Each leaf is placed with its `like` leaf's sharding
  (the default device when it has none). A leaf saved split over devices and
  loaded with the same split is restored shard by shard on its devices;
  loaded into another split (another mesh, or one device), it is assembled
  on the host first, then placed.

  Args:
    directory: the path given to :func:`save_compact`.
    like: a params pytree of ``jax.Array``\\ s or ``jax.ShapeDtypeStruct``\\ s
      (with shardings where wanted) giving the expected structure, shapes,
      dtypes and placements; e.g. freshly initialized params, or
      ``jax.eval_shape`` of the initializer.

  Returns:
    ``(params, masks)`` as :func:`uncompact` gives them: pruned entries
    exactly 0, bool masks placed like their params, ``optax.MaskedNode()``
    for leaves saved dense.

  Raises:
    FileNotFoundError: if ``directory`` does not exist.
    ValueError: if the file does not match `like` or is corrupted (its
      metadata unreadable, a data file truncated, a checksum differing).

  Examples:
    >>> import tempfile, jax, jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.arange(8.0).reshape(2, 4)}
    >>> masks = {"w": params["w"] > 4}
    >>> path = tempfile.mkdtemp() + "/model"
    >>> optax_prune.save_compact(path, params, masks)
    >>> like = jax.eval_shape(lambda: params)  # Shapes and dtypes only.
    >>> optax_prune.load_compact(path, like)[0]["w"]
    Array([[0., 0., 0., 0.],
           [0., 5., 6., 7.]], dtype=float32)
    >>> optax_prune.load_compact(path, {"w": jnp.zeros((4, 2))})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the leaf at ['w']: the file holds shape (2, 4), `like` has (4, 2). ...
  """
  ocp = _orbax("load_compact")
  path = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no compact checkpoint at {path}: there is no such directory.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(path)
    checksums = (getattr(meta, "custom_metadata", None) or {}).get(_CHECKSUMS)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    if meta is None:  # Orbax reads a missing or damaged `_METADATA` as nothing.
      raise ValueError(
          f"{path} holds no readable compact checkpoint: its metadata (`_METADATA`)"
          " is missing or damaged. Save it again with `save_compact`.")
    like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    targets, kinds, seen = [], [], set()
    for leaf_path, leaf in like_leaves:
      try:
        node = _node(meta, leaf_path)
      except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"{_where(leaf_path)}: the file has no leaf there (it was saved"
            f" from another structure). {_LOAD_FIX}") from None
      seen.add(id(node))
      kind, target = _plan_leaf(leaf_path, node, leaf)
      kinds.append(kind)
      targets.append(target)
    extra = _unseen(meta, seen, "")
    if extra:
      raise ValueError(
          f"the file holds leaves that `like` does not: {', '.join(extra[:3])} (it was"
          f" saved from a larger structure). {_LOAD_FIX}")
    restored = _restore(checkpointer, path, jax.tree_util.tree_unflatten(treedef, targets))
  finally:
    checkpointer.close()
  _check_checksums(path, restored, checksums)
  entries = jax.tree_util.tree_flatten(restored, is_leaf=lambda x: _is_entry(x) or x is None)[0]
  params, masks = [], []
  for (leaf_path, leaf), kind, entry in zip(like_leaves, kinds, entries):
    sharding = _target_sharding(leaf)
    if kind == "dense":
      params.append(entry)
      masks.append(optax.MaskedNode())
      continue
    if kind == "empty":
      params.append(jax.device_put(np.zeros(leaf.shape, leaf.dtype), sharding))
      masks.append(optax.MaskedNode())
      continue
    if isinstance(entry, CompactLeaf):
      if entry.bits is None:  # Saved empty.
        entry = entry._replace(bits=jax.device_put(
            np.zeros(_bits.packed_shape(tuple(leaf.shape)), np.uint8), sharding))
      _check_header(leaf_path, entry, leaf)
    else:
      _check_nm_header(leaf_path, entry, leaf)
    dense, mask = _expand(leaf_path, entry, sharding)
    params.append(dense)
    masks.append(mask)
  return (jax.tree_util.tree_unflatten(treedef, params),
          jax.tree_util.tree_unflatten(treedef, masks))


def _check_checksums(directory: str, restored: Any, checksums: Any) -> None:
  if checksums is None:
    warnings.warn(
        f"{directory} holds no checksums (written before optax_prune stored them,"
        " or not by `save_compact`): its values are loaded unverified. Save it"
        " again with `save_compact` to store them.", UserWarning, stacklevel=3)
    return
  crc32 = checksums.get("crc32", {}) if isinstance(checksums, dict) else {}
  for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]:
    name = jax.tree_util.keystr(path)
    if name not in crc32:
      raise ValueError(f"the leaf at {name}: the file records no checksum for it:"
                       f" its metadata is damaged. Save it again with `save_compact`.")
    _verify(f"the leaf at {name}", x, crc32[name])


def _differs(path, what, saved, wanted) -> ValueError:
  return ValueError(
      f"{_where(path)}: the file holds {what} {saved}, `like` has {wanted}."
      f" {_LOAD_FIX}")


def _plan_leaf(path, node, leaf):
  """(kind, orbax restore target) of one leaf of `like`, from the file's metadata."""
  shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
  sharding = _target_sharding(leaf)
  if node is None:
    if math.prod(shape):
      raise _differs(path, "an empty leaf, not", "shape", shape)
    return "empty", None
  if not isinstance(node, dict):  # A dense leaf.
    if tuple(node.shape) != shape:
      raise _differs(path, "shape", tuple(node.shape), shape)
    if np.dtype(node.dtype) != dtype:
      raise _differs(path, "dtype", np.dtype(node.dtype), dtype)
    return "dense", jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  fields = set(node)
  if fields == set(CompactLeaf._fields):
    values = node["values"]
    if values is None or node["header"] is None:
      raise ValueError(f"{_where(path)}: the compact leaf has no values or header:"
                       f" the data is corrupted. {_LOAD_FIX}")
    if np.dtype(values.dtype) != dtype:
      raise _differs(path, "dtype", np.dtype(values.dtype), dtype)
    whole = _replicated(sharding)
    split = _split(path, sharding, shape)
    bits_meta = node["bits"]
    # Restored in place, shard by shard, when saved with the same split.
    same = (bits_meta is not None and split is not None and
            tuple(bits_meta.shape) == _bits_shape(shape, split.grid) and
            tuple(values.shape[:1]) == (len(split.rows),) and len(values.shape) == 2)
    if same:
      target = CompactLeaf(_sds(bits_meta, sharding), _sds(values, split.values_sharding),
                           _sds(node["header"], whole))
    else:
      one = SingleDeviceSharding(jax.devices()[0])
      target = CompactLeaf(None if bits_meta is None else _sds(bits_meta, one),
                           _sds(values, one), _sds(node["header"], one))
    return "bits", target
  if fields == set(CompactNMLeaf._fields) and all(node[f] is not None for f in fields):
    if np.dtype(node["values"].dtype) != dtype:
      raise _differs(path, "dtype", np.dtype(node["values"].dtype), dtype)
    one = SingleDeviceSharding(jax.devices()[0])
    return "nm", CompactNMLeaf(*(_sds(node[f], one) for f in CompactNMLeaf._fields))
  raise ValueError(f"{_where(path)}: the file holds {sorted(fields)} there, neither"
                   f" an array nor a compact leaf. {_LOAD_FIX}")


def _check_header(path, entry: CompactLeaf, leaf):
  shape, _, _ = _read_header(path, entry.header)
  if shape != tuple(leaf.shape):
    raise _differs(path, "shape", shape, tuple(leaf.shape))


def _check_nm_header(path, entry: CompactNMLeaf, leaf):
  h = np.asarray(entry.header)
  shape = tuple(int(v) for v in h[3:]) if h.ndim == 1 else None
  if shape != tuple(leaf.shape):
    raise _differs(path, "shape", shape, tuple(leaf.shape))
