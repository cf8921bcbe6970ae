"""Exporting pruned params to sparse formats (BCOO, N:M) and sizing them."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from optax_prune import _granularity
from optax_prune import _paths
from optax_prune import _tables


def _leaves_with_masks(params: Any, masks: Any):
  """Flattens `params` and pairs each leaf with its keep-mask.

  Returns ``(path_leaves, treedef, masks)``, where each mask is a bool NumPy
  array of the leaf's shape, or None for a leaf that is not pruned (an
  `optax.MaskedNode` in `masks`). With ``masks=None``, the leaves that
  ``magnitude_pruning`` prunes by default (kernels) keep their nonzero entries.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if masks is None:
    mask_leaves = []
    pruned = _paths.default_where(path_leaves, params)
    for (path, leaf), default in zip(path_leaves, pruned):
      if hasattr(leaf, "dtype") and default:
        _check_not_traced(leaf, "params")
        mask_leaves.append(np.asarray(leaf) != 0)
      else:
        mask_leaves.append(None)
    return path_leaves, treedef, mask_leaves
  path_leaves, mask_leaves = _paths.pair_masks(params, masks, "params")
  checked = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    if mask is None:
      checked.append(None)
      continue
    _check_not_traced(mask, "masks")
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != np.shape(leaf):
      raise ValueError(
          f"`masks` must hold a bool array of the leaf's shape {np.shape(leaf)}"
          f" (or `optax.MaskedNode()`) at {jax.tree_util.keystr(path)}, got"
          f" {mask.dtype}{list(mask.shape)}. Pass the pruning state's `masks`,"
          " e.g. `find_pruning_state(opt_state).masks`."
      )
    checked.append(mask)
  return path_leaves, treedef, checked


def _check_not_traced(x: Any, name: str) -> None:
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"`{name}` is traced: exporting reads concrete values on the host, so"
        " call it outside `jax.jit` (on the params after training)."
    )


def to_bcoo(params: Any, masks: Any = None) -> Any:
  """Converts the pruned leaves of `params` to ``jax.experimental.sparse.BCOO``.

  Each leaf whose mask is a bool array becomes a ``BCOO`` storing exactly its
  kept entries: ``nse`` is the number of True entries, so a kept weight that
  happens to be exactly zero is still stored (the mask, not the value,
  decides). Indices are int32, sorted and unique; the dtype is kept. Leaves
  whose mask is ``optax.MaskedNode()`` are returned unchanged, dense.

  This is a host-side export (it reads the masks' values to size the result):
  call it on concrete params, not under ``jax.jit``.

  Args:
    params: a pytree of arrays, e.g. the trained params.
    masks: keep-masks with the structure of `params`, e.g.
      ``find_pruning_state(opt_state).masks``: bool arrays (True = kept) for
      pruned leaves and ``optax.MaskedNode()`` for the others. If None, the
      leaves pruned by default (kernels) are converted keeping their nonzero
      entries, and other leaves are left dense.

  Returns:
    A pytree like `params` with ``BCOO`` leaves in place of the pruned ones.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[0.0, 1.0], [2.0, 3.0]]), "b": jnp.ones(2)}
    >>> masks = {"w": jnp.array([[True, False], [True, False]]),
    ...          "b": optax.MaskedNode()}
    >>> sparse_params = optax_prune.to_bcoo(params, masks)
    >>> sparse_params["w"].nse
    2
    >>> sparse_params["w"].todense()
    Array([[0., 0.],
           [2., 0.]], dtype=float32)
  """
  path_leaves, treedef, mask_leaves = _leaves_with_masks(params, masks)
  leaves = []
  for (_, leaf), mask in zip(path_leaves, mask_leaves):
    if mask is None:
      leaves.append(leaf)
      continue
    _check_not_traced(leaf, "params")
    values = np.asarray(leaf)
    # Row-major order on both sides, so `data[i]` sits at `indices[i]`.
    data = values[mask]
    indices = np.argwhere(mask).astype(np.int32)
    leaves.append(sparse.BCOO(
        (jnp.asarray(data), jnp.asarray(indices)),
        shape=values.shape, indices_sorted=True, unique_indices=True,
    ))
  return jax.tree_util.tree_unflatten(treedef, leaves)


class NMSparse(NamedTuple):
  """An array with N:M sparsity along `axis`, in a compact layout.

  Along `axis`, the dense array is split into consecutive groups of `m`
  entries, each keeping at most `n` of them. Both arrays have the dense shape
  with the length ``L`` of `axis` replaced by ``L // m * n``: slot ``k`` of a
  group holds one kept value and its position in the group.

  A pytree whose leaves are `values` and `indices`; `n`, `m`, `axis` and
  `shape` are static, so it can be passed to a jitted function.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> x = jnp.array([0.0, 5.0, 0.0, 7.0])
    >>> w = optax_prune.to_nm(x, None, optax_prune.n_of_m(2, 4, axis=0))
    >>> w.values, w.indices
    (Array([5., 7.], dtype=float32), Array([1, 3], dtype=uint8))
    >>> w.todense()
    Array([0., 5., 0., 7.], dtype=float32)
  """

  # The kept values of each group in position order, zero-padded when a group
  # keeps fewer than `n`; the dtype of the dense array.
  values: jax.Array
  # uint8, same shape as `values`: each value's position in its group, in
  # [0, m). Padding slots point at distinct positions the group does not keep.
  indices: jax.Array
  n: int
  m: int
  axis: int  # Non-negative.
  shape: tuple[int, ...]  # The dense shape.

  def todense(self) -> jax.Array:
    """The dense array, bitwise equal to ``jnp.where(mask, x, 0)``."""
    return _nm_todense(self.values, self.indices, n=self.n, m=self.m,
                       axis=self.axis, shape=self.shape)


jax.tree_util.register_pytree_with_keys(
    NMSparse,
    lambda w: (((jax.tree_util.GetAttrKey("values"), w.values),
                (jax.tree_util.GetAttrKey("indices"), w.indices)),
               (w.n, w.m, w.axis, w.shape)),
    lambda aux, children: NMSparse(*children, *aux),
    flatten_func=lambda w: ((w.values, w.indices), (w.n, w.m, w.axis, w.shape)),
)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "shape"))
def _nm_todense(values, indices, *, n, m, axis, shape):
  del shape
  pattern = _granularity.NOfM(n, m, axis)
  values, indices = pattern.groups(values, n), pattern.groups(indices, n)
  # For each dense position in a group, the slot that holds it (if any).
  hits = indices[..., :, None] == jnp.arange(m, dtype=indices.dtype)
  slot = jnp.argmax(hits, axis=-2)
  dense = jnp.where(hits.any(axis=-2),
                    jnp.take_along_axis(values, slot, axis=-1),
                    jnp.zeros((), values.dtype))
  return pattern.ungroup(dense)


def _nm_problem(shape, mask: np.ndarray, nm: _granularity.NOfM):
  """Returns (the pattern with a non-negative axis, None), or (None, why
  `mask` is not N:M)."""
  ndim, n, m = len(shape), nm.n, nm.m
  if not -ndim <= nm.axis < ndim:
    return None, (
        f"`axis`={nm.axis} is out of range for an array of shape {tuple(shape)}."
    )
  axis = nm.axis % ndim
  if shape[axis] % m:
    return None, (
        f"`axis` {axis} has length {shape[axis]}, not a multiple of `m`={m}:"
        " N:M groups need whole groups of m entries. Pick another `axis`, or"
        " an `m` that divides its length."
    )
  pattern = _granularity.NOfM(n, m, axis)
  counts = pattern.groups(mask).reshape(-1, m).sum(axis=-1)
  over = int(np.count_nonzero(counts > n))
  if over:
    return None, (
        f"`mask` keeps more than n={n} of every m={m} entries along axis"
        f" {axis} in {over} of {counts.size} groups (the worst keeps"
        f" {int(counts.max())}). Prune with an {n}:{m} pattern along this axis"
        " first, or pass a larger `n`."
    )
  return pattern, None


def _check_pattern(name: str, nm: Any) -> _granularity.NOfM:
  if not isinstance(nm, _granularity.NOfM):
    raise ValueError(
        f"`{name}` must be an N:M granularity such as"
        f" `optax_prune.n_of_m(2, 4, axis=0)`; got {nm!r}."
    )
  _granularity.check_n_m(nm.n, nm.m, f"`{name}.n`", f"`{name}.m`")
  return nm


def to_nm(x: Any, mask: Any, nm: _granularity.NOfM) -> NMSparse:
  """Packs an array with N:M sparsity along an axis into an :class:`NMSparse`.

  ``nm`` is the granularity the array was pruned with, ``n_of_m(n, m,
  axis=...)``: along its axis, whose length must be a multiple of `m`, each
  group of `m` consecutive entries may keep at most `n` of them (2:4 is what
  NVIDIA's sparse tensor cores take). The result is exact: ``to_nm(x, mask,
  nm).todense()`` equals ``jnp.where(mask, x, 0)`` bit for bit.

  This is a host-side export (it checks the mask's values): call it on
  concrete arrays, not under ``jax.jit``.

  Args:
    x: the dense array.
    mask: bool keep-mask of `x`'s shape (True = kept), e.g. a leaf of
      ``find_pruning_state(opt_state).masks``. If None, ``x != 0``.
    nm: the pattern, :func:`n_of_m` (for a flax ``Dense`` kernel to be used
      by :func:`nm_matmul`, ``axis=0``, the contraction axis).

  Returns:
    An :class:`NMSparse` with the kept values and their positions.

  Raises:
    ValueError: if `nm` is not an N:M granularity, its axis is out of range
      or not a multiple of `m` long, or some group keeps more than `n`
      entries.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> x = jnp.array([[1.0, 0.0, 3.0, 4.0], [0.0, 6.0, 0.0, 0.0]])
    >>> mask = jnp.array([[True, False, False, True], [False, True, False, False]])
    >>> w = optax_prune.to_nm(x, mask, optax_prune.n_of_m(2, 4, axis=-1))
    >>> w.values
    Array([[1., 4.],
           [6., 0.]], dtype=float32)
    >>> w.indices
    Array([[0, 3],
           [1, 0]], dtype=uint8)
  """
  _check_pattern("nm", nm)
  _check_not_traced(x, "x")
  values = np.asarray(x)
  if mask is None:
    mask = values != 0
  else:
    _check_not_traced(mask, "mask")
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != values.shape:
      raise ValueError(
          f"`mask` must be a bool array of `x`'s shape {values.shape}, got"
          f" {mask.dtype}{list(mask.shape)}."
      )
  pattern, problem = _nm_problem(values.shape, mask, nm)
  if problem:
    raise ValueError(problem)
  packed, order, _ = _nm_pack_np(values, mask, pattern)
  return NMSparse(
      values=jnp.asarray(packed), indices=jnp.asarray(order),
      n=pattern.n, m=pattern.m, axis=pattern.axis, shape=tuple(values.shape),
  )


def _nm_pack_np(values: np.ndarray, mask: np.ndarray, pattern: _granularity.NOfM):
  """``to_nm``'s layout on the host: (values, uint8 positions, slot kept).

  `pattern` has a non-negative axis and `mask` fits it (`_nm_problem`). The
  third array (bool, the shape of the others) tells which slots hold a kept
  entry; the others are padding.
  """
  grouped, kept = pattern.groups(values), pattern.groups(mask)
  # A stable sort of "not kept" puts each group's kept positions first, in
  # position order, then its unused ones: the first n are the kept entries,
  # padded with distinct unused positions (there are m - n > 0 of them).
  order = np.argsort(~kept, axis=-1, kind="stable")[..., :pattern.n]
  slot_kept = np.take_along_axis(kept, order, axis=-1)
  packed = np.where(slot_kept, np.take_along_axis(grouped, order, axis=-1),
                    np.zeros((), values.dtype))
  return (pattern.ungroup(packed), pattern.ungroup(order.astype(np.uint8)),
          pattern.ungroup(slot_kept))


def nm_matmul(inputs: Any, w: NMSparse, *, precision=None) -> jax.Array:
  """Computes ``inputs @ w.todense()`` without building the dense weight.

  `w` is a 2-D ``(K, N)`` weight that is N:M along axis 0, the contraction
  axis, as NVIDIA's 2:4 sparse tensor cores use it. The inputs' columns are
  gathered by `w.indices` and contracted with `w.values`, so only
  ``K * n / m`` terms are summed per output. Works under ``jax.jit``.

  It is a reference, not a fast kernel: the gathered inputs take
  ``inputs.size / K * (K * n / m) * N`` entries, more than the dense weight
  when the batch is large.

  Args:
    inputs: an array of shape ``(..., K)``.
    w: an :class:`NMSparse` of dense shape ``(K, N)`` with ``axis=0``, e.g.
      ``to_nm(kernel, mask, n_of_m(2, 4, axis=0))``.
    precision: passed to ``jnp.einsum``, as for ``jnp.matmul``.

  Returns:
    An array of shape ``(..., N)``.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> kernel = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    >>> w = optax_prune.to_nm(kernel, None, optax_prune.n_of_m(2, 4, axis=0))
    >>> optax_prune.nm_matmul(jnp.array([[1.0, 1.0, 1.0, 1.0]]), w)
    Array([[4., 6.]], dtype=float32)
  """
  if len(w.shape) != 2 or w.axis != 0:
    raise ValueError(
        f"`w` must be a 2-D NMSparse with `axis`=0 (N:M along the contraction"
        f" axis), got shape {w.shape} and axis {w.axis}. Build it with"
        " `to_nm(kernel, mask, n_of_m(n, m, axis=0))`."
    )
  k, _ = w.shape
  if np.ndim(inputs) < 1 or np.shape(inputs)[-1] != k:
    raise ValueError(
        f"`inputs` must have shape (..., {k}) to multiply a weight of shape"
        f" {w.shape}, got {np.shape(inputs)}."
    )
  slots = k // w.m * w.n
  # Row of the dense weight behind each slot: its group's start + position.
  group_start = (jnp.arange(slots, dtype=jnp.int32) // w.n * w.m)[:, None]
  rows = group_start + w.indices.astype(jnp.int32)  # (slots, N)
  gathered = jnp.take(inputs, rows, axis=-1)  # (..., slots, N)
  return jnp.einsum("...kn,kn->...n", gathered, w.values, precision=precision)


class LeafExportSize(NamedTuple):
  """One row of an :class:`ExportSizeReport`."""

  path: str  # `jax.tree_util.keystr` of the leaf's path.
  shape: tuple[int, ...]
  dtype: str
  dense_bytes: int  # size * itemsize.
  kept: int  # True mask entries; size for a leaf that is not pruned.
  # kept * (itemsize + 4 * ndim) for a pruned leaf (BCOO data + int32
  # indices); dense_bytes for a leaf that is not pruned (it stays dense).
  bcoo_bytes: int
  # values.nbytes + indices.nbytes of `to_nm`; None without `nm`, for a leaf
  # that is not pruned, or when its mask does not fit the pattern.
  nm_bytes: Optional[int]


class ExportSizeReport(NamedTuple):
  """Bytes per leaf and in total, dense and exported; ``str()`` gives a table.

  Totals cover the whole tree, leaves that are not pruned counting as dense:
  `bcoo_bytes` is the size of ``to_bcoo(params, masks)``; `nm_bytes` the size
  with the leaves that fit the N:M pattern packed and all others dense (None
  without `nm`). The table's ratio is dense bytes over the smaller export.
  """

  rows: tuple[LeafExportSize, ...]
  dense_bytes: int
  bcoo_bytes: int
  nm_bytes: Optional[int]

  def __str__(self) -> str:
    header = ("path", "shape", "kept", "dense B", "BCOO B", "N:M B", "ratio")

    def cells(path, shape, size, kept, dense, bcoo, nm):
      best = min(bcoo, dense if nm is None else nm)
      ratio = "-" if not dense else (f"{dense / best:.2f}x" if best else "inf")
      return (path, shape, f"{kept / size:.2%}" if size else "-", str(dense),
              str(bcoo), "-" if nm is None else str(nm), ratio)

    body = [
        cells(r.path, str(r.shape), math.prod(r.shape), r.kept, r.dense_bytes,
              r.bcoo_bytes, r.nm_bytes)
        for r in self.rows
    ]
    total = cells(
        "total", "", sum(math.prod(r.shape) for r in self.rows),
        sum(r.kept for r in self.rows), self.dense_bytes, self.bcoo_bytes,
        self.nm_bytes,
    )
    return _tables.format_table(header, body, [total], left=2)


def export_size_report(params: Any, masks: Any = None, *,
                       nm: Optional[_granularity.NOfM] = None
                       ) -> ExportSizeReport:
  """Bytes of every array leaf stored dense, as BCOO and, optionally, as N:M.

  Counts what :func:`to_bcoo` and :func:`to_nm` produce, without building it:
  dense is ``size * itemsize``; BCOO is ``kept * itemsize`` of data plus
  ``kept * ndim * 4`` of int32 indices; N:M is ``values.nbytes +
  indices.nbytes``. Leaves that are not pruned count as dense everywhere.
  Non-array leaves are skipped. Host-side, like the exports.

  Args:
    params: a pytree of arrays, e.g. the trained params.
    masks: keep-masks as for :func:`to_bcoo`; if None, the leaves pruned by
      default (kernels) count as pruned, keeping their nonzero entries.
    nm: optional N:M granularity, ``n_of_m(n, m, axis=...)``; N:M bytes are
      then given for each pruned leaf whose mask fits it (None for the others).

  Returns:
    An :class:`ExportSizeReport`; ``print`` it for a table.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> params = {"w": jnp.array([[1.0, 0.0, 0.0, 2.0]]), "b": jnp.ones(3)}
    >>> masks = {"w": params["w"] != 0, "b": optax.MaskedNode()}
    >>> report = optax_prune.export_size_report(
    ...     params, masks, nm=optax_prune.n_of_m(2, 4, axis=-1))
    >>> [(r.path, r.dense_bytes, r.bcoo_bytes, r.nm_bytes) for r in report.rows]
    [("['b']", 12, 12, None), ("['w']", 16, 24, 10)]
    >>> report.dense_bytes, report.bcoo_bytes, report.nm_bytes
    (28, 36, 22)
  """
  if nm is not None:
    _check_pattern("nm", nm)
  path_leaves, _, mask_leaves = _leaves_with_masks(params, masks)
  rows = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    if not hasattr(leaf, "shape"):
      continue
    shape = tuple(np.shape(leaf))
    itemsize = np.dtype(leaf.dtype).itemsize
    size = math.prod(shape)
    dense = size * itemsize
    if mask is None:
      kept, bcoo, nm_bytes = size, dense, None
    else:
      kept = int(np.count_nonzero(mask))
      bcoo = kept * (itemsize + 4 * len(shape))
      nm_bytes = None
      if nm is not None and _nm_problem(shape, mask, nm)[1] is None:
        nm_bytes = size // nm.m * nm.n * (itemsize + 1)  # Values + uint8 indices.
    rows.append(LeafExportSize(
        path=jax.tree_util.keystr(path), shape=shape,
        dtype=str(np.dtype(leaf.dtype)), dense_bytes=dense, kept=kept,
        bcoo_bytes=bcoo, nm_bytes=nm_bytes,
    ))
  return ExportSizeReport(
      rows=tuple(rows),
      dense_bytes=sum(r.dense_bytes for r in rows),
      bcoo_bytes=sum(r.bcoo_bytes for r in rows),
      nm_bytes=None if nm is None else sum(
          r.dense_bytes if r.nm_bytes is None else r.nm_bytes for r in rows),
  )
