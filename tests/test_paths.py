"""Per-leaf settings by path rules and prefixes; pairing masks with leaves."""

import jax
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


def _linen_scanned(layers=3):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "mlp"))
      return nn.tanh(nn.Dense(8, kernel_init=init)(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=layers, metadata_params={nn.PARTITION_NAME: "layers"})
      return nn.Dense(2)(stack(name="stack")(x, None)[0])

  return Model().init(jax.random.key(0), jnp.ones((2, 8)))["params"]


def test_layer_axes_read_linen_scan_metadata_and_prune_each_layer():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  boxed = _linen_scanned()
  rules = optax_prune.layer_axes(boxed, "layers")
  assert rules.rules == ((r"^\['stack'\]\['Dense_0'\]\['kernel'\]$", 0),)
  params = nn.unbox(boxed)
  tx = optax_prune.magnitude_pruning(0.5, distribution="uniform", layer_axis=rules)
  _, state = tx.update(params, tx.init(params), params)
  per_layer = (~np.asarray(state.masks["stack"]["Dense_0"]["kernel"])).sum(axis=(1, 2))
  np.testing.assert_array_equal(per_layer, [32, 32, 32])
  with pytest.raises(ValueError, match=r"no leaf .* named 'blocks' \(names seen: \['layers', 'mlp'\]"):
    optax_prune.layer_axes(boxed, "blocks")


def test_layer_axes_read_nnx_transform_metadata():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 4, rngs=rngs, kernel_metadata={"out_sharding": (None, "m")})

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(rngs)

  with jax.set_mesh(jax.make_mesh((1, 1), ("layers", "m"))):  # For `out_sharding`.
    # nnx.vmap names the layer axis but leaves the arrays where they are;
    # `nnx.Optimizer` places its state (the masks) by the names: the masks
    # are read placed like their params.
    model = make(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    rules = optax_prune.layer_axes(state, "layers")
    assert rules.rules == ((r"^\['linear'\]\['kernel'\]$", 0),)
    pure = nnx.to_pure_dict(state)
    tx = optax_prune.magnitude_pruning(0.75, distribution="uniform", layer_axis=rules)
    _, pstate = tx.update(pure, tx.init(pure), pure)
    # Inside `nnx.Optimizer`: `init` sees Variables, `update` pure arrays.
    optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), tx), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(pstate.pruned_units, [12, 12, 12])
  kernel = np.asarray(model.linear.kernel[...])
  np.testing.assert_array_equal((kernel == 0).sum(axis=(1, 2)), [12, 12, 12])


def test_logger_names_are_slash_separated_paths():
  tree = {"Dense_0": {"kernel": 1}, "layers": [{"w": 2}]}
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert [_paths.readable(p) for p in paths] == ["Dense_0/kernel", "layers/0/w"]
  nnx_path = (jax.tree_util.GetAttrKey("linear"), jax.tree_util.GetAttrKey("kernel"),
              jax.tree_util.GetAttrKey("value"))
  assert _paths.readable(nnx_path) == "linear/kernel"


def test_a_rule_that_matches_no_leaf_is_refused():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  tx = optax_prune.magnitude_pruning(optax_prune.by_path({"Dnse_0": 0.5}, default=0.9))
  with pytest.raises(ValueError, match=r"`schedule`'s `by_path` rule 'Dnse_0' matches no leaf;"
                     r" the leaves' paths are like \"\['Dense_0'\]\['kernel'\]\""):
    tx.init(params)
