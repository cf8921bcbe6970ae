"""Sequential one-shot pruning: block by block, each calibrated on the outputs
of the blocks already pruned (as SparseGPT and Wanda prune LLMs layer by layer).

Only one block's statistics (norms or Hessians) are alive at a time; the
calibration activations, one array per batch, are replaced by the pruned
block's outputs as the walk goes on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import optax

from optax_prune import _activations
from optax_prune import _checks
from optax_prune import _config
from optax_prune import _granularity
from optax_prune import _oneshot
from optax_prune import _paths
from optax_prune import _plan
from optax_prune import _sparsegpt
from optax_prune import _transform

METHODS = ("magnitude", "wanda", "sparsegpt")
# Each method's own way of ranking (`compare=None`): Wanda's is per output.
_COMPARE = {"magnitude": "leaf", "wanda": "output", "sparsegpt": "block"}

_BLOCKS_HELP = (
    "`blocks` must be a non-empty sequence of `(key, block_fn)` pairs: `key` a key"
    " of `params` (or a tuple of keys down nested dicts) holding the block's"
    " params, `block_fn(block_params, x) -> x` its forward pass, e.g."
    " `[('layers_0', fn), ('layers_1', fn)]`.")


def prune_sequential(
    params: Any,
    blocks: Sequence[tuple[Any, Callable[[Any, Any], Any]]],
    batches: Iterable[Any],
    sparsity: Any,
    *,
    method: str = "sparsegpt",
    compare: Optional[str] = None,
    where: Any = None,
    granularity: Any = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[Any, Any]:
  r"""Prunes the blocks of a model in order, each on the outputs of the pruned ones before.

  With :math:`f_b` the forward pass of block :math:`b` and :math:`x^{(0)}`
  the calibration ``batches``:

  .. math::

    \theta_b' = \mathrm{method}(\theta_b;\ x^{(b)}), \qquad
    x^{(b+1)} = f_b(\theta_b', x^{(b)}),

  so every block is calibrated on what it will see once the blocks before it
  are pruned, not on the dense model's activations (which all-at-once
  pruning, :func:`input_norms` or :func:`hessians` over the whole model,
  uses). Methods: ``"magnitude"`` (:func:`prune`; no data needed, the same as
  all at once), ``"wanda"`` (:func:`input_norms` of the block, then
  :func:`prune` with them) and ``"sparsegpt"`` (:func:`hessians` of the
  block, then :func:`sparsegpt`). One block's statistics are held at a time.

  Blocks are named by their params: ``blocks`` is a list of ``(key,
  block_fn)``, ``params[key]`` (or ``params[k1][k2]...`` for a tuple of keys)
  the block's params and ``block_fn(block_params, x)`` its output, the next
  block's input. A flax linen model's layers ``layers_0, layers_1, ...`` are
  ``[(f"layers_{i}", lambda p, x: Block().apply({"params": p}, x)) ...]``;
  the embedding goes before, in ``batches``. A scanned stack (one leaf for
  all layers) must be given as unstacked layers. Leaves outside the blocks
  are left as they are.

  Args:
    params: the trained params, nested dicts (flax linen's; for nnx,
      ``nnx.State.to_pure_dict()``).
    blocks: ``[(key, block_fn), ...]`` in the order the model runs them.
    batches: the calibration inputs of the first block, one array (or pytree)
      per batch.
    sparsity: a number in [0, 1], a pytree of those (``None``: not pruned)
      whose structure is a prefix of ``params``, or :func:`by_path` rules
      (paths of the whole params). Every pruned leaf is pruned to its own
      sparsity (uniform: no ERK).
    method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
    compare: how entries are ranked, passed on: for ``"magnitude"`` and
      ``"wanda"`` the ``compare`` of :func:`prune`, for ``"sparsegpt"`` that
      of :func:`sparsegpt`; None for each method's own (``"leaf"``,
      ``"output"`` as Wanda does, ``"block"``).
    where: which leaves are pruned (over the whole params), as for
      :func:`magnitude_pruning`.
    granularity: passed on (e.g. :func:`n_of_m` for 2:4); a pytree or
      :func:`by_path` rules are resolved over the whole params, like
      ``sparsity``.
    blocksize, dampening: for ``"sparsegpt"``, as for :func:`sparsegpt`.

  Returns:
    ``(pruned_params, masks)`` as :func:`prune` returns them, over the whole
    params (``optax.MaskedNode()`` for leaves not pruned).

  Examples:
    >>> import jax, jax.numpy as jnp, optax_prune
    >>> keys = jax.random.split(jax.random.key(0), 2)
    >>> params = {f"l{i}": {"kernel": jax.random.normal(k, (8, 8))} for i, k in enumerate(keys)}
    >>> layer = lambda p, x: jax.nn.relu(x @ p["kernel"])
    >>> x = jax.random.normal(jax.random.key(1), (16, 8))
    >>> pruned, masks = optax_prune.prune_sequential(
    ...     params, [("l0", layer), ("l1", layer)], [x], 0.5, blocksize=4)
    >>> [int((~m).sum()) for m in (masks["l0"]["kernel"], masks["l1"]["kernel"])]
    [32, 32]
  """
  _checks.one_of("method", method, METHODS)
  _oneshot.check_sparsity(sparsity)
  blocks = _checked_blocks(params, blocks)
  compare = _COMPARE[method] if compare is None else compare
  # Checked now, not after the first block's statistics are collected.
  _checks.one_of("compare", compare,
                 _sparsegpt.COMPARE if method == "sparsegpt" else _oneshot.COMPARE)
  if method == "sparsegpt":
    _checks.integer("blocksize", blocksize, 1)
    _checks.positive_number("dampening", dampening)
  # Which leaves are pruned, at what sparsity: decided over the whole params.
  config, _, _ = _transform.pruning_setup(
      sparsity, where=where, scope="layer", threshold="auto", granularity=None,
      distribution="uniform", score="magnitude", seed=0, layer_axis=None)
  plan = _plan.make_plan(config, params)
  fractions = [None] * len(plan.pruned)
  for s in plan.schedules:
    for leaf in s.leaves:
      fractions[leaf.index] = float(s.schedule(0).sparsity)
  fractions = plan.treedef.unflatten(fractions)
  granularities = None  # Resolved over the whole params too: one per leaf.
  if granularity is not None:
    per_leaf = _paths.per_leaf(granularity, params, _config.is_granularity_leaf, "granularity")
    granularities = plan.treedef.unflatten(
        [_granularity.unstructured() if g is None else g for g in per_leaf])
  masks = jax.tree.map(lambda _: optax.MaskedNode(), params)
  xs = list(batches)
  for keys, fn in blocks:
    block = _get(params, keys)
    block_sparsity = _get(fractions, keys)
    chosen = jax.tree.map(lambda s: s is not None, block_sparsity, is_leaf=lambda s: s is None)
    if any(jax.tree.leaves(chosen)):
      options = dict(where=chosen, compare=compare,
                     granularity=None if granularities is None else _get(granularities, keys))
      if method == "magnitude":
        block, block_masks = _oneshot.prune(block, block_sparsity, **options)
      elif method == "wanda":
        norms = _activations.input_norms(fn, block, xs)
        block, block_masks = _oneshot.prune(block, block_sparsity, input_norms=norms, **options)
      else:
        hessians = _sparsegpt.hessians(fn, block, xs)
        block, block_masks = _sparsegpt.sparsegpt(
            block, hessians, block_sparsity, blocksize=blocksize, dampening=dampening,
            **options)
      params = _set(params, keys, block)
      masks = _set(masks, keys, block_masks)
    run = jax.jit(fn)
    xs = [run(block, x) for x in xs]  # The next block's inputs, from this pruned one.
  return params, masks


def _checked_blocks(params: Any, blocks: Any) -> list:
  """``[(tuple of keys, fn)]``, each key present in ``params``."""
  if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
    raise ValueError(f"{_BLOCKS_HELP} Got {blocks!r}.")
  out = []
  for entry in blocks:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
      raise ValueError(f"{_BLOCKS_HELP} Got the entry {entry!r}.")
    keys = tuple(entry[0]) if isinstance(entry[0], (tuple, list)) else (entry[0],)
    try:
      _get(params, keys)
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(
          f"`blocks`: the key {entry[0]!r} names no subtree of `params` ({e!r}); keys"
          " are those of `params`, e.g. 'layers_0' or ('encoder', 'layers_0').") from e
    out.append((keys, entry[1]))
  return out


def _get(tree: Any, keys: tuple) -> Any:
  for key in keys:
    tree = tree[key]
  return tree


def _set(tree: Any, keys: tuple, value: Any) -> Any:
  """``tree`` with ``tree[k1][k2]... = value``, the dicts on the way copied."""
  if not keys:
    return value
  head, rest = keys[0], keys[1:]
  return {**tree, head: _set(tree[head], rest, value)}
