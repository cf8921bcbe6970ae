"""sparsity_summary against direct NumPy counts, on several pytree kinds."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import optax_prune


class Pair(NamedTuple):
  a: jnp.ndarray
  b: jnp.ndarray


@pytest.mark.parametrize("tree", [
    {"w": jnp.array([[0.0, 1.0], [0.0, -0.0]]), "b": jnp.array([0.0, 2.0, 3.0])},
    (jnp.zeros((2, 3)), [jnp.ones(4), jnp.array([0.0, 5.0])]),
    FrozenDict({"layer": {"kernel": jnp.array([[1.0, 0.0]])}}),
    Pair(jnp.array([0.0]), jnp.zeros((0, 3))),
])
def test_counts_match_numpy(tree):
  import jax
  leaves = jax.tree.leaves(tree)
  summary = optax_prune.sparsity_summary(tree)
  assert [r.zeros for r in summary.rows] == [int(np.sum(np.asarray(x) == 0)) for x in leaves]
  assert [r.size for r in summary.rows] == [x.size for x in leaves]
  assert summary.size == sum(x.size for x in leaves)
  total = sum(int(np.sum(np.asarray(x) == 0)) for x in leaves)
  assert summary.sparsity == (total / summary.size if summary.size else 0.0)
  assert summary.pruned is None and summary.masked_sparsity is None
  text = str(summary)
  assert "total" in text and all(r.path in text for r in summary.rows)


def test_masks_count_pruned_not_zeros():
  # A kept weight that is zero by chance is not pruned.
  params = {"w": jnp.array([[0.0, 1.0], [2.0, 3.0]]), "b": jnp.zeros(2)}
  masks = {"w": jnp.array([[True, False], [True, True]]), "b": optax.MaskedNode()}
  summary = optax_prune.sparsity_summary(params, masks)
  rows = {r.path: r for r in summary.rows}
  assert rows["['w']"].pruned == 1 and rows["['w']"].zeros == 1
  assert rows["['b']"].pruned is None
  assert summary.pruned == 1 and summary.masked_sparsity == 0.25
  assert summary.sparsity == 1 / 6


def test_masks_of_another_structure_are_rejected():
  with pytest.raises(ValueError, match="masks"):
    optax_prune.sparsity_summary({"w": jnp.ones(2)}, {"v": jnp.ones(2, bool)})
