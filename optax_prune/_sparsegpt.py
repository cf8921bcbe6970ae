"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that updates the kept weights.

Magnitude and Wanda pruning only choose a mask; SparseGPT also corrects the
weights it keeps, so that the layer's outputs on calibration data move as
little as possible. Per weight leaf it needs the Hessian of the layer-wise
squared error, :math:`H = \\sum x x^\\top` over the inputs :math:`x` that meet
the weight, which :func:`hessians` reads off the model's jaxpr the way
:func:`input_norms` reads norms (the same walk, ``_activations._collect``).

The sweep runs over input features in blocks (``lax.fori_loop`` over blocks
and, inside a block, over its features), with the lazy update of the
features after each block as one matrix product.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_prune import _activations
from optax_prune import _checks
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _oneshot
from optax_prune import _paths
from optax_prune import _plan
from optax_prune import _thresholds
from optax_prune import _transform

COMPARE = ("block", "output", "leaf")
_HIGHEST = lax.Precision.HIGHEST


class Hessian(NamedTuple):
  """The input Hessian of one weight leaf, :math:`H = \\sum x x^\\top`.

  ``matrix``: ``(k, k)``, with ``k`` the product of the leaf's input axes
  (every axis but ``output_axes``; a ``Dense`` kernel's first, a
  ``DenseGeneral``'s contracting axes), the features flattened row-major in
  the leaf's axis order. float32 (float64 if the inputs were). ``output_axes``:
  the leaf's axes that index output features.
  """

  matrix: Any
  output_axes: tuple[int, ...]


def _outer(x: jax.Array, k: int) -> jax.Array:
  """``X^T X`` of the operand with its ``k`` contracting axes last, flattened."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  x = x.reshape(-1, math.prod(x.shape[x.ndim - k:]))
  return jnp.matmul(x.T, x, precision=_HIGHEST)


# Convolutions are not recorded: SparseGPT here prunes matrix multiplications.
_HESSIANS = _activations._Statistic(_outer, None)  # pylint: disable=protected-access


def hessians(fn: Callable[..., Any], params: Any, batches: Iterable[Any]) -> dict[str, Hessian]:
  r"""The input Hessian :math:`X^\top X` of each weight of ``fn``, over ``batches``.

  .. math::

    H = \sum_{\text{batches}} \sum_{b, t} x_{b t} \, x_{b t}^\top

  for the operand :math:`x` that meets a leaf of ``params`` in a matrix
  multiplication (``dot_general``; its contracting axes are the features,
  every other axis a row), found as :func:`input_norms` finds it: no hook in
  the model. Each batch's product is formed on the device in float32 (float64
  for float64 inputs) and the batches are summed in float64 on the host.
  Convolutions are not recorded.

  Args:
    fn: ``fn(params, batch)``, the model's forward pass.
    params: the trained params.
    batches: calibration inputs, each passed as ``batch``.

  Returns:
    ``{keystr(path): Hessian}`` for every leaf used as the weight of a matrix
    multiplication (for :func:`sparsegpt`); other leaves are absent.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
    >>> h = optax_prune.hessians(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}, [x])
    >>> h["['w']"].matrix
    array([[10.,  2.],
           [ 2.,  4.]], dtype=float32)
  """
  path_leaves, _, found, totals, dtypes = _activations._collect(  # pylint: disable=protected-access
      fn, params, batches, _HESSIANS)
  return {jax.tree_util.keystr(path_leaves[i][0]): Hessian(
      total.astype(dtypes[i]), found[i][1]) for i, total in totals.items()}


def sparsegpt(
    params: Any,
    hessians: dict[str, Hessian],  # pylint: disable=redefined-outer-name
    sparsity: Any,
    *,
    compare: str = "block",
    where: Any = None,
    granularity: Any = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[Any, Any]:
  r"""Prunes trained params once with SparseGPT, updating the weights it keeps.

  Per pruned leaf, viewed as :math:`W` of shape ``(in, out)`` (input axes
  flattened first), with :math:`H` its input Hessian from :func:`hessians`:
  input features never seen (:math:`H_{jj} = 0`) get :math:`H_{jj} = 1` and
  their weights set to 0; then

  .. math::

    H \leftarrow H + \lambda \, \overline{\mathrm{diag}(H)} \, I, \qquad
    H^{-1} = U^\top U \ (U \text{ upper triangular}),

  and the input features :math:`j = 0, 1, \dots` are swept in order: row
  :math:`j` is masked, :math:`q_j = m_j \odot w_j`, and its error
  :math:`e_j = (w_j - q_j) / U_{jj}` is spread over the rows not yet swept,
  :math:`w_l \leftarrow w_l - U_{jl} \, e_j` (:math:`l > j`; within a block
  of ``blocksize`` features at once, the rest lazily, once per block). The
  mask ranks :math:`w_{ij}^2 / U_{jj}^2` (ties: the lower position in the
  ``(in, out)`` layout pruned first):

  * ``compare="block"`` (the paper's): at the start of each block of
    ``blocksize`` input features, from its current weights, exactly
    :math:`\mathrm{round}(s \cdot n)` of the block's :math:`n` entries;
  * ``"output"``: :math:`\mathrm{round}(s \cdot K)` of each output feature's
    :math:`K` inputs, chosen before the sweep (from the initial weights);
  * ``"leaf"``: :math:`\mathrm{round}(s \cdot n)` of the whole leaf, chosen
    before the sweep;
  * ``granularity=n_of_m(n, m, axis=...)``: every group of ``m`` input
    features is made N:M when the sweep reaches it, from the current weights
    (the ``m - n`` smallest of each output's group, ties: lower position),
    so that :func:`to_nm` packs the result; ``sparsity`` must be 1 (every
    group, as ``n_of_m`` at :math:`s = 1`).

  Unlike :func:`prune`, kept weights change: the bit-for-bit guarantee on
  kept weights does not apply. Pruned entries are exactly 0; a kept entry of
  an unseen input feature is 0 too.

  A leaf placed on a mesh split along its (first) output axis only, as
  tensor-parallel ``Dense`` kernels are, is swept shard by shard with
  ``shard_map``: each device updates its own columns with the replicated
  Hessian, and the block and leaf masks are chosen across devices from
  counts only (same masks and weights as on one device). Other placements
  are left to XLA.

  Args:
    params: the trained params.
    hessians: ``{path: Hessian}`` from :func:`hessians`; every pruned leaf
      needs one.
    sparsity: a number in [0, 1], a pytree of those (``None``: not pruned)
      whose structure is a prefix of the params, or :func:`by_path` rules.
      Every pruned leaf is pruned to its own sparsity (uniform: no ERK).
    compare: ``"block"``, ``"output"`` or ``"leaf"``: the entries ranked
      together (see above).
    where: which leaves are pruned, as for :func:`magnitude_pruning` (by
      default the ``kernel`` leaves).
    granularity: None (unstructured) or :func:`n_of_m`, whose ``axis`` must be
      the leaf's last input axis (``0`` for a ``Dense`` kernel, ``1`` for an
      attention output kernel ``(heads, head_dim, out)``), or a pytree (a
      prefix of the params) or :func:`by_path` rules of those.
    blocksize: input features per block, an integer >= 1 (a multiple of
      ``m`` with N:M).
    dampening: :math:`\lambda`, a finite number > 0: the fraction of the mean
      diagonal added to the diagonal of :math:`H`.

  Returns:
    ``(new_params, masks)``: the params with pruned entries 0 and kept ones
    updated (float32 arithmetic, float64 for float64 leaves), and the
    keep-masks (bool, ``optax.MaskedNode()`` for leaves not pruned).

  Examples:
    >>> import jax, jax.numpy as jnp, optax_prune
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> x = jax.random.normal(jax.random.key(1), (32, 8))
    >>> fn = lambda p, x: x @ p["kernel"]
    >>> h = optax_prune.hessians(fn, params, [x])
    >>> pruned, masks = optax_prune.sparsegpt(params, h, 0.5, blocksize=4)
    >>> int((~masks["kernel"]).sum()), bool((pruned["kernel"] == 0).sum() >= 16)
    (16, True)
    >>> nm = optax_prune.n_of_m(2, 4, axis=0)
    >>> pruned, masks = optax_prune.sparsegpt(params, h, 1.0, granularity=nm)
    >>> optax_prune.to_nm(pruned["kernel"], masks["kernel"], nm).values.shape
    (4, 4)

  References:
    Frantar & Alistarh, `SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot <https://arxiv.org/abs/2301.00774>`_, 2023.
  """
  if not isinstance(hessians, Mapping):
    raise ValueError(
        "`hessians` must be a dict `{path: Hessian}`, as `hessians(fn, params, batches)`"
        f" returns; got {type(hessians).__name__}.")
  _oneshot.check_sparsity(sparsity)
  _checks.one_of("compare", compare, COMPARE)
  blocksize = _checks.integer("blocksize", blocksize, 1)
  dampening = _checks.positive_number("dampening", dampening)
  _check_granularity(granularity, compare, blocksize)
  config, _, _ = _transform.pruning_setup(
      sparsity, where=where, scope="layer", threshold="auto", granularity=granularity,
      distribution="uniform", score="magnitude", seed=0, layer_axis=None)
  plan = _plan.make_plan(config, params)
  leaves = plan.treedef.flatten_up_to(params)
  jobs = _jobs(plan, hessians)
  out, masks = list(leaves), [optax.MaskedNode()] * len(leaves)
  for index, fraction, hessian, nm in jobs:
    out[index], masks[index] = _prune_leaf(
        leaves[index], hessian, fraction, compare, nm, blocksize, dampening)
  return plan.treedef.unflatten(out), plan.treedef.unflatten(masks)


def _check_granularity(granularity: Any, compare: str, blocksize: int) -> None:
  """None, ``n_of_m``, or a pytree or ``by_path`` rules of those (None: unstructured)."""
  for value in _paths.spec_values(granularity, _config.is_granularity_leaf):
    if value is None or isinstance(value, _granularity.Unstructured):
      continue
    if not isinstance(value, _granularity.NOfM):
      raise ValueError(
          "`granularity` must be None (unstructured), `n_of_m(n, m, axis=...)` or"
          f" `by_path` rules of those; got {value!r}.")
    if compare != "block":
      raise ValueError(
          "`granularity=n_of_m(...)` chooses each group of m inputs in the sweep:"
          " leave `compare='block'`.")
    if blocksize % value.m:
      raise ValueError(
          f"`blocksize` must be a multiple of m={value.m} with `n_of_m`, so"
          f" that no group straddles two blocks; got {blocksize}.")


def _jobs(plan: _plan.Plan, hessians: dict) -> list:
  """``(leaf index, sparsity, Hessian, N:M or None)`` per pruned leaf, checked."""
  jobs, missing = [], []
  for s in plan.schedules:
    fraction = float(s.schedule(0).sparsity)
    for leaf in s.leaves:
      hessian = hessians.get(leaf.path)
      if hessian is None:
        missing.append(leaf.path)
        continue
      inputs = _inputs(leaf.shape, hessian.output_axes)
      k = math.prod(leaf.shape[a] for a in inputs)
      if np.shape(hessian.matrix) != (k, k):
        raise ValueError(
            f"`hessians[{leaf.path!r}]` has shape {np.shape(hessian.matrix)}, but the"
            f" leaf {leaf.shape} with output axes {hessian.output_axes} has {k} input"
            " features: collect the Hessians from these params.")
      nm = leaf.granularity if isinstance(leaf.granularity, _granularity.NOfM) else None
      if nm is not None:
        if fraction != 1.0:
          raise ValueError(
              "`sparsity` must be 1 for the leaves pruned N:M (every group of m is"
              f" made N:M); got {fraction} for {leaf.path}.")
        if not inputs or nm.axis % len(leaf.shape) != inputs[-1]:
          raise ValueError(
              f"`n_of_m(axis={nm.axis})` must cut the last input axis of {leaf.path}"
              f" (shape {leaf.shape}, inputs {inputs}): pass axis={inputs[-1] if inputs else 0}.")
      jobs.append((leaf.index, fraction, hessian, nm))
  if missing:
    raise ValueError(
        f"`hessians` has no Hessian for the pruned leaves {missing}: they were not"
        " met as the weight of a matrix multiplication. Leave them out with"
        " `where`, or collect the Hessians with the model that uses them.")
  return jobs


def _inputs(shape: tuple, outputs: tuple) -> tuple:
  return tuple(a for a in range(len(shape)) if a not in outputs)


def _prune_leaf(x, hessian, fraction, compare, nm, blocksize, dampening):
  """One leaf: to ``(in, out)``, swept, and back to its layout."""
  shape = np.shape(x)
  outputs = tuple(hessian.output_axes)
  order = _inputs(shape, outputs) + outputs
  k = int(np.shape(hessian.matrix)[0])
  o = math.prod(shape) // k if k else 0
  if k == 0 or o == 0:
    return x, jnp.ones(shape, bool)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  w = jnp.transpose(x, order).reshape(k, o).astype(dtype)
  blocksize = min(blocksize, k)
  if compare == "block":
    sizes = [min(blocksize, k - b) * o for b in range(0, k, blocksize)]
  else:
    sizes = [k if compare == "output" else k * o]
  counts = _distributions.prune_count(jnp.float32(fraction), sizes).astype(jnp.int32)
  options = dict(compare=compare, nm=None if nm is None else (nm.n, nm.m), blocksize=blocksize)
  split = _output_split(x, order, len(order) - len(outputs))
  sweep = (functools.partial(_sweep, **options) if split is None
           else sharded_sweep(*split, **options))
  new, keep = sweep(w, jnp.asarray(hessian.matrix, dtype), counts, jnp.asarray(dampening, dtype))
  back = np.argsort(order)
  unflat = tuple(shape[a] for a in order)
  return (jnp.transpose(new.reshape(unflat), back).astype(x.dtype),
          jnp.transpose(keep.reshape(unflat), back))


def _output_split(x: Any, order: tuple, inputs: int) -> Optional[tuple]:
  """``(mesh, mesh axes)`` when ``x`` is split along its first output axis
  only (so each device holds whole columns of the ``(in, out)`` view, in
  order); None otherwise (one device, or a split the sweep leaves to XLA)."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding) or len(order) == inputs:
    return None
  spec = tuple(sharding.spec) + (None,) * (len(order) - len(sharding.spec))
  split = [spec[a] for a in order]
  names = split[inputs]
  if names is None or any(n is not None for i, n in enumerate(split) if i != inputs):
    return None
  return sharding.mesh, names


@functools.lru_cache(maxsize=32)
def sharded_sweep(mesh: Any, names: Any, **options) -> Callable:
  """The sweep of ``(in, out)`` weights split along ``out`` over ``names``:
  every device sweeps its own columns (the Hessian replicated). Columns are
  independent but for the block and leaf masks, which are chosen across the
  devices from counts (``_smallest_split``): no weights cross devices."""
  names = tuple(names) if isinstance(names, (tuple, list)) else names
  columns = jax.sharding.PartitionSpec(None, names)
  rest = jax.sharding.PartitionSpec()
  fn = functools.partial(_sweep, axis=names, **options)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(columns, rest, rest, rest),
                               out_specs=(columns, columns), check_vma=False))


def _keys(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """Ranking keys of nonnegative scores; rows not ``valid`` (padding) last."""
  keys = _thresholds.magnitude_keys(scores, wide=scores.dtype == jnp.float64)
  return jnp.where(valid[:, None], keys, jnp.array(jnp.iinfo(keys.dtype).max, keys.dtype))


def _smallest(keys: jax.Array, count: jax.Array, axis: Any = None) -> jax.Array:
  """True at the ``count`` smallest keys (stable: lower position first).

  With ``axis`` (inside ``shard_map``), ``keys`` is this device's block of
  columns of a matrix split along its columns over ``axis``, and the choice
  is made over the whole matrix, positions in its row-major order.
  """
  if axis is not None:
    return _smallest_split(keys, count, axis)
  order = jnp.argsort(keys.reshape(-1), stable=True)
  flat = jnp.zeros(keys.size, bool).at[order].set(jnp.arange(keys.size) < count)
  return flat.reshape(keys.shape)


def _smallest_split(keys: jax.Array, count: jax.Array, axis: Any) -> jax.Array:
  """``_smallest`` over the devices of ``axis``, each holding columns ``keys``.

  The ``count``-th smallest key ``v`` is found bit by bit (the smallest ``v``
  with ``#{keys <= v} >= count``: one summed count per bit); every key below
  ``v`` is chosen, and of the keys equal to ``v`` the first ones in row-major
  order of the whole matrix (rows, then devices in order, then local
  columns), from per-row tie counts gathered across devices. Only counts
  cross devices.
  """
  bits = keys.dtype.itemsize * 8
  one = jnp.ones((), keys.dtype)
  psum = lambda x: lax.psum(jnp.sum(x, dtype=jnp.int32), axis)

  def step(b, prefix):
    bit = jnp.left_shift(one, (bits - 1 - b).astype(keys.dtype))
    enough = psum(keys <= (prefix | (bit - one))) >= count  # This bit 0 suffices.
    return jnp.where(enough, prefix, prefix | bit)

  v = lax.fori_loop(0, bits, step, jnp.zeros((), keys.dtype))
  below = keys < v
  ties = keys == v
  left = count - psum(below)  # Ties still to prune.
  every = lax.all_gather(jnp.sum(ties, axis=1, dtype=jnp.int32), axis)  # (devices, rows)
  per_row = jnp.sum(every, axis=0)
  mine = jnp.arange(every.shape[0]) < lax.axis_index(axis)
  before = (jnp.cumsum(per_row) - per_row) + jnp.sum(jnp.where(mine[:, None], every, 0), axis=0)
  rank = before[:, None] + jnp.cumsum(ties, axis=1, dtype=jnp.int32) - ties
  return below | (ties & (rank < left))


def _smallest_per_column(keys: jax.Array, count: jax.Array) -> jax.Array:
  """True at the ``count`` smallest keys of each column (stable)."""
  ranks = jnp.argsort(jnp.argsort(keys, axis=0, stable=True), axis=0, stable=True)
  return ranks < count


@functools.partial(jax.jit, static_argnames=("compare", "nm", "blocksize", "axis"))
def _sweep(w, h, counts, dampening, *, compare, nm, blocksize, axis=None):
  """SparseGPT on ``w`` of shape ``(k, o)``: ``(new w, keep-mask)``.

  ``counts``: entries pruned per block (``"block"``), per output
  (``"output"``) or in all (``"leaf"``), int32. The features are padded to a
  whole number of blocks: padded rows are 0, their Hessian the identity, and
  their keys the largest, so they are never chosen while a real entry is left.
  """
  k, o = w.shape
  dtype = w.dtype
  b = blocksize
  blocks = -(-k // b)
  padded = blocks * b
  # 1. Unseen inputs: H_jj = 1 and their weights 0; dampening; U with H^-1 = U^T U.
  dead = jnp.diagonal(h) == 0
  h = jnp.where(jnp.diag(dead), jnp.ones((), dtype), h)
  w = jnp.where(dead[:, None], jnp.zeros((), dtype), w)
  eye = jnp.eye(k, dtype=dtype)
  h = h + dampening * jnp.mean(jnp.diagonal(h)) * eye
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)
  u = jnp.linalg.cholesky(hinv).T
  # 2. Padding to whole blocks (identity: decoupled, never pruned first).
  valid = jnp.arange(padded) < k
  w = jnp.pad(w, ((0, padded - k), (0, 0)))
  u = jnp.pad(u, ((0, padded - k), (0, padded - k))) + jnp.diag(~valid).astype(dtype)
  d = jnp.diagonal(u)
  score = lambda w, d: (w * w) / (d * d)[:, None]
  # 3. Masks chosen before the sweep ("output", "leaf").
  pruned = jnp.zeros((padded, o), bool)
  if nm is None and compare == "leaf":
    pruned = _smallest(_keys(score(w, d), valid), counts[0], axis)
  elif nm is None and compare == "output":
    pruned = _smallest_per_column(_keys(score(w, d), valid), counts[0])

  def column(i, carry):
    w1, p1, err1, u1, d1 = carry
    if nm is not None:  # A new group of m: its m - n smallest of each output go.
      n, m = nm
      group = lax.dynamic_slice_in_dim(w1, i, m, 0)
      keys = _keys(score(group, lax.dynamic_slice_in_dim(d1, i, m)), jnp.ones(m, bool))
      chosen = lax.dynamic_update_slice_in_dim(p1, _smallest_per_column(keys, m - n), i, 0)
      p1 = jnp.where(i % m == 0, chosen, p1)
    wi = w1[i]
    q = jnp.where(p1[i], jnp.zeros((), dtype), wi)
    err = (wi - q) / u1[i, i]
    # Rows before i are untouched: U is upper triangular (u1[i, :i] == 0).
    w1 = (w1 - u1[i][:, None] * err[None, :]).at[i].set(q)
    return w1, p1, err1.at[i].set(err), u1, d1

  def block(j, carry):
    w, pruned = carry
    start = j * b
    rows = lax.dynamic_slice_in_dim(u, start, b, 0)  # (b, padded)
    u1 = lax.dynamic_slice_in_dim(rows, start, b, 1)
    d1 = jnp.diagonal(u1)
    w1 = lax.dynamic_slice_in_dim(w, start, b, 0)
    p1 = lax.dynamic_slice_in_dim(pruned, start, b, 0)
    if nm is None and compare == "block":
      p1 = _smallest(_keys(score(w1, d1), lax.dynamic_slice_in_dim(valid, start, b)), counts[j],
                     axis)
    w1, p1, err1, _, _ = lax.fori_loop(
        0, b, column, (w1, p1, jnp.zeros((b, o), dtype), u1, d1))
    # The lazy update of the rows after the block (rows before it meet zeros of U).
    w = w - jnp.matmul(rows.T, err1, precision=_HIGHEST)
    w = lax.dynamic_update_slice_in_dim(w, w1, start, 0)
    return w, lax.dynamic_update_slice_in_dim(pruned, p1, start, 0)

  w, pruned = lax.fori_loop(0, blocks, block, (w, pruned))
  keep = ~pruned[:k]
  return jnp.where(keep, w[:k], jnp.zeros((), dtype)), keep
