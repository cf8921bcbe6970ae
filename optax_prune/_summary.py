"""Per-leaf sparsity tables for any pytree."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import math

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _bits
from optax_prune import _paths
from optax_prune import _tables
from optax_prune import _transform


class LeafSparsity(NamedTuple):
  """One row of a :class:`SparsitySummary`."""

  path: str  # `jax.tree_util.keystr` of the leaf's path.
  shape: tuple[int, ...]
  size: int
  zeros: int  # Entries exactly equal to zero (kept ones may be zero by chance).
  pruned: Optional[int]  # Entries masked out, when masks were given; else None.
  sparsity: float  # pruned / size with masks, else zeros / size (0 if empty).
  # Masked-out entries that are not 0 (None without masks): a link after the
  # pruning transformation moved them. 0 when pruning is last in the chain.
  pruned_nonzero: Optional[int] = None


class SparsitySummary(NamedTuple):
  """Rows per leaf and totals; ``str()`` gives a readable table."""

  rows: tuple[LeafSparsity, ...]
  size: int
  zeros: int
  pruned: Optional[int]
  sparsity: float  # Over all leaves: pruned (or zeros, without masks) / size.
  masked_sparsity: Optional[float]  # Over the leaves that have masks only.
  pruned_nonzero: Optional[int] = None  # Over all leaves (None without masks).
  # From a pruning state passed as `masks` (else None): its step count, and
  # the steps whose updates were 0 on every pruned leaf.
  steps: Optional[int] = None
  zero_update_steps: Optional[int] = None
  # Steps at which a schedule was due but the step ran `update_masks=False`.
  skipped_mask_updates: Optional[int] = None

  def __str__(self) -> str:
    cells = lambda path, shape, size, zeros, pruned, sparsity: (
        path, shape, str(size), str(zeros), "-" if pruned is None else str(pruned),
        f"{sparsity:.2%}")
    body = [cells(r.path, str(r.shape), r.size, r.zeros, r.pruned, r.sparsity)
            for r in self.rows]
    footer = [cells("total", "", self.size, self.zeros, self.pruned, self.sparsity)]
    if self.masked_sparsity is not None:
      masked = [r for r in self.rows if r.pruned is not None]
      footer.append(cells(
          "masked leaves", "", sum(r.size for r in masked),
          sum(r.zeros for r in masked), self.pruned, self.masked_sparsity))
    header = ("path", "shape", "size", "zeros", "pruned", "sparsity")
    table = _tables.format_table(header, body, footer, left=2)
    if self.pruned_nonzero:
      table += "\n" + _PRUNED_NONZERO_WARNING.format(n=self.pruned_nonzero)
    if counts_micro_batches(self.steps, self.zero_update_steps):
      table += "\n" + _ZERO_UPDATES_WARNING.format(
          n=self.zero_update_steps, steps=self.steps)
    if self.skipped_mask_updates:
      table += "\n" + _SKIPPED_UPDATES_WARNING.format(n=self.skipped_mask_updates)
    return table


_PRUNED_NONZERO_WARNING = (
    "WARNING: {n} pruned entries are not zero. Is the pruning link"
    " (`magnitude_pruning`, `static_sparse` or `straight_through`) the last link"
    " of the chain, and `rigl` / `set_training` the outermost optimizer?"
    " `optax.chain(optax.adamw(...), magnitude_pruning(...))` keeps them at"
    " exactly 0; a link after it moves them again."
)


_ZERO_UPDATES_WARNING = (
    "WARNING: {n} of {steps} steps brought all-zero updates to the pruned"
    " leaves, and the pruning schedule counted each as a step. Does an"
    " `optax.MultiSteps` come before `magnitude_pruning` in the chain? It"
    " passes zeros on every micro-batch but the last; wrap the whole chain"
    " instead: `optax.MultiSteps(optax.chain(adamw, magnitude_pruning(...)), k)`."
)


_SKIPPED_UPDATES_WARNING = (
    "WARNING: {n} steps at which the pruning schedule was due ran with"
    " `update_masks=False`, so their mask updates were skipped. Pass"
    " `update_masks=True` at the steps `optax_prune.mask_update_steps(schedule,"
    " num_steps)` lists, counting steps as the state does (from 0, one per"
    " `update` call)."
)


def counts_micro_batches(steps: Optional[int], zero_update_steps: Optional[int]) -> bool:
  """Whether at least half of the steps (and two or more) had zero updates.

  A learning rate warmed up from 0 gives one such step; ``MultiSteps(k)``
  before the pruning link gives ``(k - 1) / k`` of them.
  """
  if not steps or zero_update_steps is None:
    return False
  return zero_update_steps >= 2 and 2 * zero_update_steps >= steps


def sparsity_summary(tree: Any, masks: Any = None) -> SparsitySummary:
  """Counts zeros (and, given masks, pruned entries) in every array leaf.

  Leaves are named with ``jax.tree_util.keystr`` of their path, so dicts,
  tuples, flax ``FrozenDict`` and ``nnx.State`` all work. Non-array leaves are
  skipped.

  Args:
    tree: a pytree of arrays, e.g. params.
    masks: optional keep-masks, e.g. ``find_pruning_state(opt_state).masks``,
      or the optimizer state itself (its pruning state's masks are used, and
      its step counters reported). Pruned counts are then read from the
      masks, not from zeros: a kept weight can be zero by chance.

  Returns:
    A :class:`SparsitySummary`; ``print`` it for a table.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> summary = optax_prune.sparsity_summary({"w": jnp.array([0.0, 1.0])})
    >>> summary.rows[0].zeros, summary.sparsity
    (1, 0.5)
  """
  steps = zero_update_steps = skipped = None
  if masks is not None and _transform.pruning_states(masks):
    state = _transform.find_pruning_state(masks)
    masks, steps, zero_update_steps, skipped = (
        state.masks, int(state.count), int(state.zero_update_steps),
        int(state.skipped_mask_updates))
  path_leaves, mask_leaves = _paths.pair_masks(tree, masks, "tree")
  rows = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    if not hasattr(leaf, "shape"):
      continue
    values = np.asarray(leaf)
    size = int(values.size)
    zeros = int(np.count_nonzero(values == 0))
    pruned = nonzero = None
    if mask is not None:
      removed = np.asarray(mask) == 0
      pruned = int(np.count_nonzero(removed))
      nonzero = int(np.count_nonzero(removed & (values != 0)))
    counted = zeros if pruned is None else pruned
    rows.append(LeafSparsity(
        path=jax.tree_util.keystr(path),
        shape=tuple(values.shape),
        size=size,
        zeros=zeros,
        pruned=pruned,
        sparsity=counted / size if size else 0.0,
        pruned_nonzero=nonzero,
    ))
  size = sum(r.size for r in rows)
  zeros = sum(r.zeros for r in rows)
  # With masks, only masked-out entries count as pruned, in every leaf.
  pruned = None if masks is None else sum(r.pruned or 0 for r in rows)
  counted = zeros if pruned is None else pruned
  masked_size = sum(r.size for r in rows if r.pruned is not None)
  masked_sparsity = None
  if masks is not None:
    masked_sparsity = pruned / masked_size if masked_size else 0.0
  return SparsitySummary(
      rows=tuple(rows), size=size, zeros=zeros, pruned=pruned,
      sparsity=counted / size if size else 0.0,
      masked_sparsity=masked_sparsity,
      pruned_nonzero=None if masks is None else sum(r.pruned_nonzero or 0 for r in rows),
      steps=steps, zero_update_steps=zero_update_steps,
      skipped_mask_updates=skipped,
  )


def pruning_metrics(opt_state: Any, params: Any = None) -> dict[str, jax.Array]:
  """Scalars for a logger (TensorBoard, wandb, ...), read from the pruning state.

  A flat dict keyed by readable, slash-separated paths (``Dense_0/kernel``),
  usable inside ``jit`` (no host transfer) or on a concrete state:

  * ``"pruning/step"``: the state's step count;
  * ``"pruning/sparsity"``: pruned entries over the entries of pruned leaves;
  * ``"pruning/pruned_nonzero"``: entries pruned but not 0 at the last step,
    in the smallest pruned leaf (the per-step checks read that one); 0 when
    ``magnitude_pruning`` is last in the chain (anything else means a link
    after it moves pruned weights);
  * ``"pruning/zero_update_steps"``: steps whose updates were 0 on that
    leaf; near the step count, the schedule counts micro-batches (an
    ``optax.MultiSteps`` before the pruning link);
  * ``"pruning/skipped_mask_updates"``: steps at which a schedule was due
    but the step ran ``update_masks=False`` (0 unless that option is used);
  * ``"pruning/sparsity/<path>"`` and ``"pruning/target/<path>"`` per pruned
    leaf: its pruned fraction and the sparsity asked of it;
  * with ``params``, ``"pruning/model_sparsity"``: pruned entries over all
    entries of the params (leaves that are not pruned count as dense).

  Args:
    opt_state: an optimizer state holding one pruning state (see
      ``find_pruning_state``).
    params: the params (arrays or ``jax.ShapeDtypeStruct``); needed for
      packed masks (``packed_masks=True``), whose shapes do not give the
      leaves' sizes, and for ``"pruning/model_sparsity"``.

  Returns:
    A dict of scalar arrays.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_prune
    >>> tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5))
    >>> params = {"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.ones(4)}
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> {k: float(v) for k, v in optax_prune.pruning_metrics(state, params).items()}
    {'pruning/step': 1.0, 'pruning/sparsity': 0.5, 'pruning/pruned_nonzero': 0.0, \
'pruning/zero_update_steps': 0.0, 'pruning/skipped_mask_updates': 0.0, \
'pruning/sparsity/w': 0.5, 'pruning/target/w': 0.5, \
'pruning/model_sparsity': 0.25}
  """
  state = _transform.find_pruning_state(opt_state)
  masks = [(path, m) for path, m in
           jax.tree_util.tree_flatten_with_path(state.masks, is_leaf=_paths.is_masked)[0]
           if not _paths.is_masked(m)]
  if params is None:
    packed = [p for p, m in masks if m.dtype == jnp.uint8]
    if packed:
      raise ValueError(
          "`params` are needed to read packed masks (`packed_masks=True`):"
          " call `pruning_metrics(opt_state, params)`.")
    sizes = [m.size for _, m in masks]
  else:
    path_leaves, paired = _paths.pair_masks(params, state.masks, "params", unpack=False)
    sizes = [math.prod(jnp.shape(x)) for (_, x), m in zip(path_leaves, paired)
             if m is not None]
  pruned = [size - _bits.kept_count(m) for size, (_, m) in zip(sizes, masks)]
  total = sum(pruned, jnp.zeros((), jnp.int32))
  metrics = {
      "pruning/step": state.count,
      "pruning/sparsity": total / max(sum(sizes), 1),
      "pruning/pruned_nonzero": state.pruned_nonzero,
      "pruning/zero_update_steps": state.zero_update_steps,
      "pruning/skipped_mask_updates": state.skipped_mask_updates,
  }
  for (path, _), size, n in zip(masks, sizes, pruned):
    metrics[f"pruning/sparsity/{_paths.readable(path)}"] = n / max(size, 1)
  for (path, _), target in zip(masks, state.target_sparsity):
    metrics[f"pruning/target/{_paths.readable(path)}"] = target
  if params is not None:
    entries = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params)
                  if hasattr(x, "shape"))
    metrics["pruning/model_sparsity"] = total / max(entries, 1)
  return metrics
