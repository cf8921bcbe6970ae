"""Per-leaf sparsity tables for any pytree."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from optax_prune import _paths
from optax_prune import _tables


class LeafSparsity(NamedTuple):
  """One row of a :class:`SparsitySummary`."""

  path: str  # `jax.tree_util.keystr` of the leaf's path.
  shape: tuple[int, ...]
  size: int
  zeros: int  # Entries exactly equal to zero (kept ones may be zero by chance).
  pruned: Optional[int]  # Entries masked out, when masks were given; else None.
  sparsity: float  # pruned / size with masks, else zeros / size (0 if empty).


class SparsitySummary(NamedTuple):
  """Rows per leaf and totals; ``str()`` gives a readable table."""

  rows: tuple[LeafSparsity, ...]
  size: int
  zeros: int
  pruned: Optional[int]
  sparsity: float  # Over all leaves: pruned (or zeros, without masks) / size.
  masked_sparsity: Optional[float]  # Over the leaves that have masks only.

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
    return _tables.format_table(header, body, footer, left=2)


def sparsity_summary(tree: Any, masks: Any = None) -> SparsitySummary:
  """Counts zeros (and, given masks, pruned entries) in every array leaf.

  Leaves are named with ``jax.tree_util.keystr`` of their path, so dicts,
  tuples, flax ``FrozenDict`` and ``nnx.State`` all work. Non-array leaves are
  skipped.

  Args:
    tree: a pytree of arrays, e.g. params.
    masks: optional keep-masks, e.g. ``find_pruning_state(opt_state).masks``.
      Pruned counts are then read from the masks, not from zeros: a kept
      weight can be zero by chance.

  Returns:
    A :class:`SparsitySummary`; ``print`` it for a table.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> summary = optax_prune.sparsity_summary({"w": jnp.array([0.0, 1.0])})
    >>> summary.rows[0].zeros, summary.sparsity
    (1, 0.5)
  """
  path_leaves, mask_leaves = _paths.pair_masks(tree, masks, "tree")
  rows = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    if not hasattr(leaf, "shape"):
      continue
    values = np.asarray(leaf)
    size = int(values.size)
    zeros = int(np.count_nonzero(values == 0))
    pruned = None if mask is None else int(np.count_nonzero(np.asarray(mask) == 0))
    counted = zeros if pruned is None else pruned
    rows.append(LeafSparsity(
        path=jax.tree_util.keystr(path),
        shape=tuple(values.shape),
        size=size,
        zeros=zeros,
        pruned=pruned,
        sparsity=counted / size if size else 0.0,
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
  )
