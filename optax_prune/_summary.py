"""Per-leaf sparsity tables for any pytree."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import optax


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
    header = ("path", "shape", "size", "zeros", "pruned", "sparsity")
    lines = [
        (r.path, str(r.shape), str(r.size), str(r.zeros),
         "-" if r.pruned is None else str(r.pruned), f"{r.sparsity:.2%}")
        for r in self.rows
    ]
    lines.append(
        ("total", "", str(self.size), str(self.zeros),
         "-" if self.pruned is None else str(self.pruned),
         f"{self.sparsity:.2%}")
    )
    if self.masked_sparsity is not None:
      masked = [r for r in self.rows if r.pruned is not None]
      lines.append(
          ("masked leaves", "", str(sum(r.size for r in masked)),
           str(sum(r.zeros for r in masked)), str(self.pruned),
           f"{self.masked_sparsity:.2%}")
      )
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))
    )
    rule = "  ".join("-" * w for w in widths)
    body = [fmt(l) for l in lines[:len(self.rows)]]
    totals = [fmt(l) for l in lines[len(self.rows):]]
    return "\n".join([fmt(header), rule] + body + [rule] + totals)


def pair_masks(tree: Any, masks: Any, name: str) -> tuple[list, list]:
  """``tree``'s (path, leaf) pairs and each leaf's mask (None: not pruned).

  ``masks`` is like the pruning state's: bool arrays and ``optax.MaskedNode``
  (read as None), or None for no masks at all.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if masks is None:
    return path_leaves, [None] * len(path_leaves)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  try:
    mask_leaves = treedef.flatten_up_to(masks)
  except (ValueError, TypeError):
    # Same leaves under wrapper nodes (an `nnx.State` of `Param`s beside the
    # pure dicts of the optimizer state): pair them by path prefix.
    mask_paths = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked)[0]
    mask_leaves = [m for _, m in mask_paths]
    if len(mask_paths) != len(path_leaves) or not all(
        jax.tree_util.keystr(path).startswith(jax.tree_util.keystr(mask_path))
        for (mask_path, _), (path, _) in zip(mask_paths, path_leaves)
    ):
      raise ValueError(
          f"`masks` must have the structure of `{name}`, as the pruning"
          " state's `masks` have for the params."
      ) from None
  return path_leaves, [None if is_masked(m) else m for m in mask_leaves]


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
  path_leaves, mask_leaves = pair_masks(tree, masks, "tree")
  rows = []
  for (path, leaf), mask in zip(path_leaves, mask_leaves):
    if not hasattr(leaf, "shape"):
      continue
    values = np.asarray(leaf)
    size = int(values.size)
    zeros = int(np.count_nonzero(values == 0))
    pruned = None if mask is None else int(np.count_nonzero(~np.asarray(mask)))
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
