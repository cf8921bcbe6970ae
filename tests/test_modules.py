"""Shrinking flax modules: nnx in place (arrays, widths, optimizer), linen widths.

Reference: a module built afresh with the new widths has the same attributes
and the same array shapes; the optimizer's leaves are NumPy takes of the old.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_prune


class Block(nnx.Module):
  """Dense, BatchNorm, depthwise Conv, attention, Dense; widths as arguments."""

  def __init__(self, width, heads, rngs):
    self.up = nnx.Linear(6, width, rngs=rngs)
    self.norm = nnx.BatchNorm(width, rngs=rngs)
    self.conv = nnx.Conv(width, width, (3,), feature_group_count=width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, qkv_features=4 * heads,
                                       decode=False, rngs=rngs)
    self.out = nnx.Linear(width, 3, rngs=rngs)
    self.width = width  # A model's own copy of a width: named in a warning.

  def __call__(self, x):
    h = nnx.relu(self.norm(self.up(x)))
    h = self.conv(h)
    return self.out(h + self.attn(h))


def _loss(model, x):
  return jnp.mean(model(x) ** 2)


@nnx.jit
def _train_step(model, optimizer, x):
  optimizer.update(model, nnx.grad(_loss)(model, x))


def _trained_block():
  model = Block(8, 4, nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (2, 5, 6))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = optax_prune.channel_groups(lambda p, s, x: nnx.merge(graphdef, p, s)(x), params, x,
                                      state=rest)
  # Heads and the residual stream; not the value depth (one depth for q, k, v).
  chosen = [g for g in groups.prunable if "['value']" not in g.name]
  assert len(chosen) == 2
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(
      0.5, granularity=optax_prune.coupled_channels(chosen)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(2):
    _train_step(model, optimizer, x)
  return model, optimizer, groups, chosen, x


def _attributes(model):
  return {path: {k: v for k, v in vars(m).items()
                 if isinstance(v, (int, tuple)) and not isinstance(v, bool)
                 and not k.startswith("_")}
          for path, m in nnx.iter_modules(model)}


def test_nnx_module_shrinks_in_place_with_its_widths_and_optimizer_and_trains_on():
  model, optimizer, _, chosen, x = _trained_block()
  masked = model(x)
  old_state = jax.tree.map(np.asarray, nnx.state(optimizer, nnx.OptState))
  old_params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  kept_stream = np.flatnonzero(np.abs(old_params["up"]["kernel"][...]).sum(0))
  assert kept_stream.size == 4

  with pytest.warns(UserWarning, match=r"model\.width = 8"):
    small = optax_prune.shrink_module(model, chosen, optimizer=optimizer)
  assert sorted(small.sizes.values()) == [2, 4]

  # Reference: the block built with the new widths (4 channels, 2 heads).
  fresh = Block(4, 2, nnx.Rngs(0))
  expected = _attributes(fresh)
  expected[()]["width"] = 8  # Left as it was, and warned about.
  assert _attributes(model) == expected
  assert (jax.tree.map(np.shape, nnx.state(model, nnx.Param))
          == jax.tree.map(np.shape, nnx.state(fresh, nnx.Param)))
  np.testing.assert_allclose(model(x), masked, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(masked))))

  # Adam's moments and the masks: the old ones at the kept channels.
  state = nnx.state(optimizer, nnx.OptState)
  for moment in ("mu", "nu"):
    old = old_state["opt_state"][0][0][moment]
    new = state["opt_state"][0][0][moment]
    np.testing.assert_array_equal(new["up"]["kernel"][...],
                                  old["up"]["kernel"][...][:, kept_stream])
    np.testing.assert_array_equal(new["norm"]["scale"][...], old["norm"]["scale"][...][kept_stream])
    np.testing.assert_array_equal(new["out"]["kernel"][...],
                                  old["out"]["kernel"][...][kept_stream])
  masks = state["opt_state"][1]["masks"]
  assert all(bool(np.all(m)) for m in jax.tree.leaves(masks))
  assert np.shape(masks["up"]["kernel"][...]) == (6, 4)

  # The same optimizer goes on: a step changes the weights, none pruned again.
  before = np.asarray(model.up.kernel[...])
  _train_step(model, optimizer, x)
  after = np.asarray(model.up.kernel[...])
  assert after.shape == (6, 4) and not np.array_equal(after, before)
  assert np.all(np.abs(after).sum(0) > 0)


def test_a_shape_nnx_attention_cannot_take_is_refused_and_nothing_changes():
  model, optimizer, groups, _, _ = _trained_block()
  attributes = _attributes(model)
  value_depth = [g for g in groups.prunable if "['value']" in g.name]
  params = nnx.state(model, nnx.Param)
  params["attn"]["value"]["kernel"] = params["attn"]["value"]["kernel"][...].at[:, :, :2].set(0)
  params["attn"]["value"]["bias"] = params["attn"]["value"]["bias"][...].at[:, :2].set(0)
  params["attn"]["out"]["kernel"] = params["attn"]["out"]["kernel"][...].at[:, :2].set(0)
  nnx.update(model, params)
  before = jax.tree.map(np.asarray, nnx.state(model))
  with pytest.raises(ValueError, match=r"one head depth for query, key and value.*value"
                     r" depth group out of `groups`"):
    optax_prune.shrink_module(model, value_depth, optimizer=optimizer)
  after = jax.tree.map(np.asarray, nnx.state(model))
  assert jax.tree.all(jax.tree.map(np.array_equal, after, before))
  assert _attributes(model) == attributes
  with pytest.raises(ValueError, match=r"`model` must be an nnx.Module.*linen_widths"):
    optax_prune.shrink_module({"w": jnp.ones(3)}, value_depth)
  with pytest.raises(ValueError, match=r"`optimizer` must be the nnx.Optimizer"):
    optax_prune.shrink_module(model, value_depth, optimizer=optax.adam(1e-3))


class LinenNet(nn.Module):
  features: int = 8
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.features, (3,))(x))
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=4 * self.heads,
                                            out_features=self.features)(h)
    return nn.Dense(3)(nn.relu(nn.Dense(self.features)(h)))


def test_linen_widths_name_the_arguments_that_build_the_smaller_model():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  model = LinenNet()
  params = model.init(jax.random.key(1), x)["params"]
  groups = optax_prune.channel_groups(lambda p, x: model.apply({"params": p}, x), params, x)
  chosen = [g for g in groups.prunable if "['value']" not in g.name]
  pruned, _ = optax_prune.prune(params, 0.5, granularity=optax_prune.coupled_channels(chosen))
  small = optax_prune.shrink(chosen, pruned)
  widths = optax_prune.linen_widths(params, small.params)
  assert widths == {"['Conv_0']": {"features": 4}, "['Dense_1']": {"features": 4},
                    "['MultiHeadDotProductAttention_0']": {"num_heads": 2, "qkv_features": 8,
                                                           "out_features": 4}}
  # Reference: the model built with those widths has the shrunk shapes.
  fresh = LinenNet(features=4, heads=2).init(jax.random.key(1), x)["params"]
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, small.params)
  np.testing.assert_allclose(LinenNet(features=4, heads=2).apply({"params": small.params}, x),
                             model.apply({"params": pruned}, x), rtol=1e-5, atol=1e-5)
  assert optax_prune.linen_widths(params, params) == {}
