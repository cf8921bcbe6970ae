"""Per-leaf settings by path rules and prefixes; pairing masks with leaves."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from optax_prune import _paths


def test_the_first_matching_rule_wins():
  rules = optax_prune.by_path({"Dense": 0.1, "Dense_1": 0.2, "kernel": 0.3}, default=0.4)
  assert rules.resolve("['Dense_1']['kernel']") == 0.1  # Not the last match.
  assert rules.resolve("['Conv_0']['kernel']") == 0.3
  assert rules.resolve("['Conv_0']['bias']") == 0.4


def test_rules_decide_per_leaf_in_the_transformation():
  params = {"Dense_0": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)},
            "Dense_1": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}}
  tx = optax_prune.magnitude_pruning(
      optax_prune.by_path({"Dense_1": 0.75, "Dense": 0.25}, default=None))
  masks = tx.update(params, tx.init(params), params)[1].masks
  assert (~np.asarray(masks["Dense_0"]["kernel"])).sum() == 2
  assert (~np.asarray(masks["Dense_1"]["kernel"])).sum() == 6


def test_a_prefix_value_covers_its_subtree():
  tree = {"a": {"x": 1, "y": 2}, "b": 3}
  assert _paths.per_leaf({"a": "A", "b": "B"}, tree, None, "s") == ["A", "A", "B"]
  with pytest.raises(ValueError, match="`s` must be a single value or a pytree"):
    _paths.per_leaf({"a": "A"}, tree, None, "s")


def test_pair_masks_reads_masked_nodes_as_unpruned():
  tree = {"b": jnp.ones(2), "w": jnp.ones((2, 2))}
  masks = {"b": optax.MaskedNode(), "w": jnp.array([[True, False], [True, True]])}
  path_leaves, paired = _paths.pair_masks(tree, masks, "tree")
  assert [m is None for m in paired] == [True, False]
  with pytest.raises(ValueError, match="`masks` must have the structure of `tree`"):
    _paths.pair_masks(tree, {"w": masks["w"]}, "tree")
