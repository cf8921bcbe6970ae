"""Coupled channel groups, coupled pruning and shrinking.

The groups of each model are checked against hand-written member lists; a
model pruned with `coupled_channels` and shrunk computes the masked model's
outputs (linen CNN with BatchNorm and a residual add, an MLP, a transformer's
heads and MLP, an nnx model); unsafe axes are refused with their reason; the
counts are exact against a NumPy reference (hypothesis, ties included).
"""

import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_prune
from tests import helpers
from tests import reference


def _groups_by_name(groups):
  return {g.name: g for g in groups.groups}


def _prune(params, groups, sparsity, **kwargs):
  """Params after one pruning step at ``sparsity`` (zero updates) and the state."""
  tx = optax_prune.magnitude_pruning(
      sparsity, granularity=optax_prune.coupled_channels(groups), **kwargs)

  @jax.jit
  def step(params):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates), state

  return step(params)


@jax.jit
def _perturbed(variables, seed=3):
  """Variables moved off their init (biases, BatchNorm scales and statistics
  nonzero), so every member matters."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------ models --


class ResCNN(nn.Module):
  """Conv-BN-ReLU, a residual block of two Conv-BN, pooling, a Dense MLP."""

  widths: tuple = (8, 6, 5)

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)
    x = nn.relu(bn()(nn.Conv(self.widths[0], (3, 3), name="stem")(x)))
    y = nn.relu(bn()(nn.Conv(self.widths[1], (3, 3), name="inner")(x)))
    y = bn()(nn.Conv(self.widths[0], (3, 3), name="outer")(y))
    x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.widths[2], name="hidden")(x))
    return nn.Dense(3, name="head")(x)


class TinyTransformer(nn.Module):
  """Embedding, one pre-norm block (self-attention, GELU MLP), read-out."""

  heads: int = 4
  head_dim: int = 4
  mlp: int = 24

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 16)(tokens)
    causal = nn.make_causal_mask(tokens)
    x = x + nn.SelfAttention(self.heads, qkv_features=self.heads * self.head_dim,
                             name="attn")(nn.LayerNorm()(x), mask=causal)
    h = nn.gelu(nn.Dense(self.mlp, name="up")(nn.LayerNorm()(x)))
    x = x + nn.Dense(16, name="down")(h)
    return nn.Dense(11, name="head")(nn.LayerNorm()(x))


@functools.cache
def _res_cnn():
  model, x = ResCNN(), jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  variables = _perturbed(jax.jit(model.init)(jax.random.key(0), x))
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  fn = lambda p, s, x: model.apply({"params": p, **s}, x)
  state = {"batch_stats": variables["batch_stats"]}
  return fn, variables["params"], state, x


# ------------------------------------------------------------------ groups --


def test_cnn_groups_couple_batchnorm_and_both_sides_of_the_residual_add():
  fn, params, state, x = _res_cnn()
  groups = _groups_by_name(optax_prune.channel_groups(fn, params, x, state=state))
  stem = groups["['outer']['kernel'][axis 3]"]
  assert stem.prunable and stem.size == 8
  assert set(stem.members) == {
      ("['BatchNorm_0']['bias']", 0), ("['BatchNorm_0']['scale']", 0),
      ("['BatchNorm_2']['bias']", 0), ("['BatchNorm_2']['scale']", 0),
      ("['stem']['bias']", 0), ("['stem']['kernel']", 3),
      ("['outer']['bias']", 0), ("['outer']['kernel']", 3),
      ("['inner']['kernel']", 2), ("['hidden']['kernel']", 0)}
  assert set(stem.state_members) == {
      (f"['batch_stats']['BatchNorm_{i}']['{s}']", 0) for i in (0, 2) for s in ("mean", "var")}
  inner = groups["['inner']['kernel'][axis 3]"]
  assert inner.prunable and set(inner.members) == {
      ("['BatchNorm_1']['bias']", 0), ("['BatchNorm_1']['scale']", 0),
      ("['inner']['bias']", 0), ("['inner']['kernel']", 3), ("['outer']['kernel']", 2)}
  hidden = groups["['hidden']['kernel'][axis 1]"]
  assert hidden.prunable and set(hidden.members) == {
      ("['head']['kernel']", 0), ("['hidden']['bias']", 0), ("['hidden']['kernel']", 1)}
  assert groups["['stem']['kernel'][axis 2]"].reason == "an input of the model"
  assert groups["['head']['kernel'][axis 1]"].reason == "an output of the model"
  assert groups["['stem']['kernel'][axis 0]"].reason == "a convolution window"
  assert len(optax_prune.channel_groups(fn, params, x, state=state).prunable) == 3


def test_transformer_groups_heads_and_refuses_the_residual_stream():
  model, tokens = TinyTransformer(), jnp.zeros((2, 5), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  groups = optax_prune.channel_groups(
      lambda p, t: model.apply({"params": p}, t), params, tokens)
  by_name = _groups_by_name(groups)
  heads = by_name["['attn']['key']['kernel'][axis 1]"]
  assert heads.prunable and heads.size == 4
  assert set(heads.members) == {
      (f"['attn']['{k}']['{w}']", 1 if w == "kernel" else 0)
      for k in ("query", "key", "value") for w in ("kernel", "bias")} | {
          ("['attn']['out']['kernel']", 0)}
  mlp = by_name["['up']['kernel'][axis 1]"]
  assert mlp.prunable and mlp.size == 24
  depth_qk = by_name["['attn']['key']['kernel'][axis 2]"]
  assert depth_qk.reason.startswith("contracted between two activations")
  (stream,) = [g for g in groups.groups if ("['Embed_0']['embedding']", 1) in g.members]
  assert stream.reason.startswith("reduced over")  # LayerNorm's statistics.
  assert by_name["['attn']['value']['kernel'][axis 2]"].prunable  # Value/output depth.
  assert "prunable" in str(groups) and "reduced over" in str(groups)


def test_params_the_model_does_not_read_are_refused():
  params = {"w": jnp.ones((3, 5)), "v": jnp.ones((5, 2)),
            "aux": {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros(4)}}
  fn = lambda p, x: jax.nn.relu(x @ p["w"]) @ p["v"]
  groups = optax_prune.channel_groups(fn, params, jnp.ones((2, 3)))
  assert [g.members for g in groups.prunable] == [(("['v']", 0), ("['w']", 1))]
  assert {g.reason for g in groups.groups if "aux" in g.name} == {"not read by the model"}
  with pytest.raises(ValueError, match="holds an axis twice"):
    optax_prune.shrink(groups.prunable * 2, params)


def test_layers_that_share_a_jitted_activation_stay_apart():
  # jax.nn.gelu is one jitted jaxpr for both calls: its variables are per call.
  params = {"a": jnp.ones((3, 8)), "b": jnp.ones((8, 8)), "c": jnp.ones((8, 2))}
  fn = lambda p, x: jax.nn.gelu(jax.nn.gelu(x @ p["a"]) @ p["b"]) @ p["c"]
  groups = optax_prune.channel_groups(fn, params, jnp.ones((4, 3)))
  assert [g.members for g in groups.prunable] == [
      (("['a']", 1), ("['b']", 0)), (("['b']", 1), ("['c']", 0))]


def _refusal(fn, *shapes):
  params = {"w": jnp.ones(shapes[0]), "v": jnp.ones(shapes[1])}
  groups = optax_prune.channel_groups(fn, params, jnp.ones((3, shapes[0][0])))
  return {g.name: g.reason for g in groups.groups}


@pytest.mark.parametrize("body,reason", [
    # A flatten before the next layer interleaves channels with positions.
    (lambda p, x: jnp.einsum("bij,ij->b", (x @ p["w"]).reshape(3, 2, 2), p["v"]),
     "merged with or split from another axis by a reshape"),
    (lambda p, x: jnp.concatenate([x @ p["w"], x @ p["w"]], -1) @ p["v"], "concatenated"),
    (lambda p, x: jax.nn.standardize(x @ p["w"], axis=-1) @ p["v"][:4],
     "reduced over (a mean or norm changes with its size)"),
    (lambda p, x: jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h), x @ p["w"]) @ p["v"][:4],
     "`scan` is not analysed"),
    (lambda p, x: (x @ p["w"]) @ (p["v"][:4] + 1.0),
     "contracted with a weight that is not zero at pruned channels"),
    (lambda p, x: (x @ p["w"])[:, :2] @ p["v"][:2], "sliced"),
    # Positions (a MADE degree, a one-hot) renumber when a channel goes.
    (lambda p, x: (jax.nn.relu(x @ p["w"]) * jnp.arange(4.0)) @ p["v"],
     "indexed by position (iota)"),
    (lambda p, x: (jax.nn.relu(x @ p["w"]) * np.arange(4.0)) @ p["v"],
     "a constant captured by the model"),
    (lambda p, x: jax.lax.reduce_window(jax.nn.relu(x @ p["w"]), 1.0, jax.lax.mul,
                                        (1, 1), (1, 1), "SAME") @ p["v"],
     "`reduce_window` is not analysed"),
    # Weights that are not 0 where the masked params are: cumlogsumexp of zeros
    # is log(k); a normalised weight is 0 / 0 at a pruned channel.
    (lambda p, x: (jnp.tanh(x @ p["w"]) + 1) @ jax.lax.cumlogsumexp(p["v"], axis=1),
     "contracted with a weight that is not zero at pruned channels"),
    (lambda p, x: jnp.tanh(x @ p["w"]) @ (p["v"] / jnp.abs(p["v"]).sum(1, keepdims=True)),
     "contracted with a weight that is not zero at pruned channels"),
])
def test_unsafe_axes_are_refused_with_their_reason(body, reason):
  shapes = ((5, 4), (8, 2)) if "concatenated" in reason else (
      ((5, 4), (2, 2)) if "reshape" in reason else ((5, 4), (4, 2)))
  reasons = _refusal(body, *shapes)
  assert reasons["['w'][axis 1]"] == reason


def test_a_weight_scaled_by_state_is_zero_where_its_param_is():
  # w2 * scale is a weight (params and state alone) that is 0 wherever w2 is:
  # the channels of w1 contracted with it can go.
  fn = lambda p, s, x: jax.nn.relu(x @ p["w1"]) @ (p["w2"] * s["scale"])
  params = {"w1": jnp.ones((5, 4)), "w2": jnp.ones((4, 2))}
  groups = optax_prune.channel_groups(fn, params, jnp.ones((3, 5)),
                                      state={"scale": jnp.ones((4, 2))})
  (group,) = [g for g in groups.groups if g.name == "['w1'][axis 1]"]
  assert group.prunable and group.state_members == (("['scale']", 0),)


def test_a_group_of_a_single_channel_is_refused():
  reasons = _refusal(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"], (5, 1), (1, 2))
  assert reasons["['w'][axis 1]"] == "a single channel"


# ------------------------------------------------------ prune, then shrink --


def test_cnn_shrunk_computes_the_masked_outputs():
  fn, params, state, x = _res_cnn()
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  pruned, _ = _prune(params, groups, 0.5)
  small = optax_prune.shrink(groups, pruned, state)
  widths = (small.params["stem"]["kernel"].shape[-1],
            small.params["inner"]["kernel"].shape[-1],
            small.params["hidden"]["kernel"].shape[-1])
  assert widths == (4, 3, 3)  # round-half-even: 5 channels at 0.5 lose 2.
  assert sorted(small.sizes.values()) == [3, 3, 4]
  assert small.state["batch_stats"]["BatchNorm_2"]["var"].shape == (4,)
  out = ResCNN(widths).apply({"params": small.params, **small.state}, x)
  np.testing.assert_allclose(out, fn(pruned, state, x), rtol=1e-5, atol=1e-6)
  dense = sum(a.size for a in jax.tree.leaves(params))
  assert sum(a.size for a in jax.tree.leaves(small.params)) < 0.5 * dense


def test_transformer_heads_and_mlp_shrink_to_equal_outputs():
  model, tokens = TinyTransformer(), jax.random.randint(jax.random.key(2), (2, 5), 0, 11)
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  fn = lambda p, t: model.apply({"params": p}, t)
  groups = optax_prune.channel_groups(fn, params, tokens)
  # flax's attention takes one qkv_features: prune heads, not the value depth.
  chosen = [g for g in groups.prunable if g.name != "['attn']['value']['kernel'][axis 2]"]
  pruned, _ = _prune(params, chosen, 0.5)
  small = optax_prune.shrink(chosen, pruned)
  heads, mlp = small.params["attn"]["query"]["kernel"].shape[1], small.params["up"]["kernel"].shape[1]
  assert (heads, mlp) == (2, 12)
  out = TinyTransformer(heads=heads, mlp=mlp).apply({"params": small.params}, tokens)
  np.testing.assert_allclose(out, fn(pruned, tokens), rtol=1e-5, atol=1e-5)


class FlatCNN(nn.Module):
  """A convolution, 2x2 average pooling and a flatten before the Dense layers."""

  widths: tuple = (6, 5)

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(self.widths[0], (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(self.widths[1])(x.reshape((x.shape[0], -1))))
    return nn.Dense(3)(x)


def test_a_flatten_before_a_dense_layer_shrinks_with_the_channels():
  model, x = FlatCNN(), jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), x)["params"])
  fn = lambda p, x: model.apply({"params": p}, x)
  groups = optax_prune.channel_groups(fn, params, x)
  conv = _groups_by_name(groups)["['Conv_0']['kernel'][axis 3]"]
  # Dense_0's 54 input rows are 3 x 3 positions times 6 channels, channels inner.
  assert conv.prunable and conv.flat_members == (("['Dense_0']['kernel']", 0, 9, 1),)
  flattened = _groups_by_name(groups)["['Dense_0']['kernel'][axis 0]"]
  assert flattened.reason.startswith("a flatten of channels and positions")
  pruned, _ = _prune(params, groups, 0.5)
  assert int((np.asarray(pruned["Dense_0"]["kernel"]) == 0).all(1).sum()) == 9 * 3
  small = optax_prune.shrink(groups, pruned)
  assert small.params["Dense_0"]["kernel"].shape == (27, 3)
  out = FlatCNN((3, 3)).apply({"params": small.params}, x)
  np.testing.assert_allclose(out, fn(pruned, x), rtol=1e-5, atol=1e-6)


class Decoder(nn.Module):
  """A Dense layer reshaped into a (4, 4, 6) map before a convolution (a generator's stem)."""

  @nn.compact
  def __call__(self, z):
    x = nn.relu(nn.Dense(4 * 4 * 6)(z)).reshape(z.shape[0], 4, 4, 6)
    return nn.Conv(2, (3, 3))(x)


def test_a_dense_layer_split_into_a_map_shrinks_with_the_next_convolution():
  model, z = Decoder(), jax.random.normal(jax.random.key(1), (2, 5))
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), z)["params"])
  fn = lambda p, z: model.apply({"params": p}, z)
  groups = optax_prune.channel_groups(fn, params, z)
  conv = _groups_by_name(groups)["['Conv_0']['kernel'][axis 2]"]
  # Dense_0's 96 outputs are 4 x 4 positions times 6 channels, channels inner.
  assert conv.prunable and conv.flat_members == (
      ("['Dense_0']['bias']", 0, 16, 1), ("['Dense_0']['kernel']", 1, 16, 1))
  pruned, _ = _prune(params, groups, 0.5)
  small = optax_prune.shrink(groups, pruned)
  assert small.params["Dense_0"]["kernel"].shape == (5, 48)
  np.testing.assert_allclose(small.apply(small.params, z), fn(pruned, z), rtol=1e-5, atol=1e-6)


class NnxMLP(nnx.Module):

  def __init__(self, widths, rngs):
    self.up = nnx.Linear(6, widths[0], rngs=rngs)
    self.norm = nnx.BatchNorm(widths[0], rngs=rngs)
    self.mid = nnx.Linear(widths[0], widths[1], rngs=rngs)
    self.out = nnx.Linear(widths[1], 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.up(x)))
    return self.out(nnx.gelu(self.mid(x)))


def test_nnx_model_trains_with_coupled_pruning_and_shrinks():
  model = NnxMLP((8, 10), nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (4, 6))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = _perturbed(rest)
  rest = jax.tree.map(jnp.abs, rest)
  nnx.update(model, rest)
  fn = lambda p, s, x: nnx.merge(graphdef, p, s)(x)
  groups = optax_prune.channel_groups(fn, params, x, state=rest)
  assert sorted(g.size for g in groups.prunable) == [8, 10]
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(
      0.25, granularity=optax_prune.coupled_channels(groups)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer, x)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  small = optax_prune.shrink(groups, params, rest)
  assert small.sizes == {"['up']['kernel'][axis 1]": 6, "['mid']['kernel'][axis 1]": 8}
  smaller = NnxMLP((6, 8), nnx.Rngs(0))
  smaller.eval()
  nnx.update(smaller, small.params, small.state)
  np.testing.assert_allclose(smaller(x), model(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------- heads behind a reshape --
# Written as HF's Flax BERT, GPT-2 and ViT write them: one hidden-size (or
# fused 3 * hidden) projection, reshaped to (..., heads, head_dim) and merged
# back before the output projection; widths are literals or attributes.


def _attention(q, k, v, mask=None):
  """q, k, v: (batch, tokens, heads, head_dim) -> (batch, tokens, heads * head_dim)."""
  weights = nn.dot_product_attention_weights(q, k, mask=mask)
  out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
  return out.reshape(out.shape[:2] + (-1,))


class BertLayer(nn.Module):
  """Post-norm: separate query/key/value, a GELU MLP (FlaxBertLayer)."""

  hidden: int = 16
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    head_dim = self.hidden // self.heads
    split = lambda h: h.reshape(h.shape[:2] + (self.heads, head_dim))
    q, k, v = (split(nn.Dense(self.hidden, name=n)(x)) for n in ("query", "key", "value"))
    out = nn.Dense(self.hidden, name="attention_output")(_attention(q, k, v))
    x = nn.LayerNorm(name="attention_norm")(out + x)
    h = nn.gelu(nn.Dense(32, name="intermediate")(x))
    return nn.LayerNorm(name="output_norm")(nn.Dense(self.hidden, name="output")(h) + x)


class GPT2Block(nn.Module):
  """Pre-norm, causal; one fused c_attn kernel (d, 3 d) cut by `jnp.split` or slices."""

  cut: str = "split"

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    heads = 4
    qkv = nn.Dense(3 * d, name="c_attn")(nn.LayerNorm(name="ln_1")(x))
    if self.cut == "split":
      q, k, v = jnp.split(qkv, 3, axis=2)
    else:
      q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    q, k, v = (y.reshape(b, t, heads, d // heads) for y in (q, k, v))
    causal = nn.make_causal_mask(jnp.ones((b, t)), dtype=bool)
    x = x + nn.Dense(d, name="c_proj")(_attention(q, k, v, causal))
    h = nn.gelu(nn.Dense(4 * d, name="c_fc")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(d, name="mlp_proj")(h)


class ViTEncoder(nn.Module):
  """Patches, position embeddings, one pre-norm block, a classifier (FlaxViTModel)."""

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(16, (2, 2), strides=(2, 2), padding="VALID", name="patch")(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    y = nn.LayerNorm(name="layernorm_before")(x)
    split = lambda h: h.reshape(h.shape[:2] + (4, 4))
    q, k, v = (split(nn.Dense(16, name=n)(y)) for n in ("query", "key", "value"))
    x = x + nn.Dense(16, name="attention_output")(_attention(q, k, v))
    h = nn.gelu(nn.Dense(32, name="intermediate")(nn.LayerNorm(name="layernorm_after")(x)))
    x = x + nn.Dense(16, name="output")(h)
    return nn.Dense(3, name="classifier")(nn.LayerNorm(name="layernorm")(x)[:, 0])


def _qkv_heads(q, k, v, out):
  """(path, axis, outer) of the members of separate projections' heads (blocks of 4)."""
  return {(f"['{n}']['kernel']", 1, 1) for n in (q, k, v)} | {
      (f"['{n}']['bias']", 0, 1) for n in (q, k, v)} | {(f"['{out}']['kernel']", 0, 1)}


HEADS = {  # model, input, the heads group's members.
    "bert": (BertLayer, (2, 5, 16), _qkv_heads("query", "key", "value", "attention_output")),
    "gpt2-split": (functools.partial(GPT2Block, "split"), (2, 5, 16), {
        ("['c_attn']['kernel']", 1, 3), ("['c_attn']['bias']", 0, 3),
        ("['c_proj']['kernel']", 0, 1)}),
    "gpt2-slices": (functools.partial(GPT2Block, "slices"), (2, 5, 16), {
        ("['c_attn']['kernel']", 1, 3), ("['c_attn']['bias']", 0, 3),
        ("['c_proj']['kernel']", 0, 1)}),
    "vit": (ViTEncoder, (2, 4, 4, 3), _qkv_heads("query", "key", "value", "attention_output")),
}


def _head_scores(params, members, heads=4, head_dim=4):
  """NumPy: a head's importance is the sum over members of the L2 norm of
  its entries (head h of third o of a fused axis: o * 16 + h * 4 + i)."""
  score = np.zeros(heads)
  for path, axis, outer in members:
    w = np.moveaxis(np.asarray(_by_keystr(params, path), np.float64), axis, 0)
    for h in range(heads):
      rows = [o * heads * head_dim + h * head_dim + i for o in range(outer) for i in range(head_dim)]
      score[h] += np.sqrt(np.sum(w[rows] ** 2))
  return score


def _by_keystr(tree, path):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}[path]


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_behind_a_reshape_prune_whole_and_shrink_to_the_masked_outputs(name):
  make, shape, members = HEADS[name]
  model, x = make(), jax.random.normal(jax.random.key(1), shape)
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), x))["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  groups = optax_prune.channel_groups(fn, params, x)
  (heads,) = [g for g in groups.groups if "blocks of 4]" in g.name]
  assert heads.prunable and heads.size == 4 and heads.members == ()
  assert {(path, axis, outer) for path, axis, outer, inner in heads.flat_members} == members
  assert {view[3] for view in heads.flat_members} == {4}  # A unit: head_dim entries.
  # The projections' own axes shrink with the heads, their head_dim is kept.
  fused = [g for g in groups.groups if g.name == "['c_attn']['kernel'][axis 1]"]
  assert all(g.reason.startswith("cut into equal pieces") for g in fused)
  pruned, masks = optax_prune.prune(params, 0.5, granularity=optax_prune.coupled_channels([heads]))
  # NumPy reference: the round(0.5 * 4) = 2 heads of least importance go.
  gone = np.argsort(_head_scores(params, members), kind="stable")[:2]
  for path, axis, outer in members:
    mask = np.moveaxis(np.asarray(_by_keystr(masks, path)), axis, 0)
    keep = mask.reshape((outer, 4, 4, -1)).all(axis=(0, 2, 3))
    np.testing.assert_array_equal(keep, ~np.isin(np.arange(4), gone), err_msg=path)
    assert not mask.reshape((outer, 4, 4, -1))[:, gone].any()
  small = optax_prune.shrink([heads], pruned)
  assert small.sizes == {heads.name: 2}
  for path, axis, outer in members:
    assert _by_keystr(small.params, path).shape[axis] == outer * 2 * 4
  masked = fn(pruned, x)
  np.testing.assert_allclose(jax.jit(small.apply)(small.params, x), masked, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(masked))))
  assert small.max_abs_diff <= 1e-5 * float(jnp.max(jnp.abs(masked)))


def test_heads_are_refused_where_a_reshape_is_not_heads_by_head_dim():
  x = jnp.ones((2, 5, 16))
  w = {"q": jnp.ones((16, 16)), "v": jnp.ones((16, 16)), "o": jnp.ones((16, 16)),
       "a": jnp.ones((4, 3)), "b": jnp.ones((2, 3))}
  split = lambda h: h.reshape(2, 5, 4, 4)

  def merged_in_another_order(p, x):  # Merged as (head_dim, heads): no contiguous heads.
    out = jnp.einsum("bqhd,bkhd->bqhd", split(x @ p["q"]), split(x @ p["v"]))
    return out.transpose(0, 1, 3, 2).reshape(2, 5, 16) @ p["o"]

  def summed_over_both(p, x):  # Neither part keeps its entries apart.
    return split(x @ p["q"]).sum((2, 3)) + (x @ p["v"] @ p["o"]).sum(-1)

  def cut_unequally(p, x):
    a, b = jnp.split(x @ p["q"], [4], axis=-1)
    return (jnp.tanh(a) @ p["v"][:4] + b @ p["v"][4:]) @ p["o"]

  def pieces_of_other_units(p, x):  # The halves hold blocks of other groups.
    a, b = jnp.split(x @ p["q"], 2, axis=-1)
    return (a.reshape(2, 5, 2, 4) @ p["a"]).sum(2) + (b.reshape(2, 5, 4, 2) @ p["b"]).sum(2)

  for body, reason in ((merged_in_another_order, _RESHAPED), (summed_over_both, _RESHAPED),
                       (cut_unequally, "`split` runs along it"),
                       (pieces_of_other_units, "`split` runs along it")):
    groups = optax_prune.channel_groups(body, w, x)
    assert _groups_by_name(groups)["['q'][axis 1]"].reason == reason, body.__name__
    assert not [g for g in groups.prunable if ("['q']", 1) in [v[:2] for v in g.views()]]


_RESHAPED = "merged with or split from another axis by a reshape"


# ------------------------------------------------------------ exact counts --


def _reference_keep(kernels, sparsity):
  """NumPy: channel score = sum of the members' L2 norms (float32), the
  round(s * C) smallest pruned (half to even, of the float32 s), ties by position."""
  (w1, a1), (w2, a2) = kernels
  norm = lambda w, axis: np.sqrt(np.sum(w * w, axis=1 - axis, dtype=np.float32))
  score = norm(w1, a1) + norm(w2, a2)
  count = reference.prune_count(sparsity, score.size)  # Of the float32 sparsity, exactly.
  keep = np.ones(score.size, bool)
  keep[np.argsort(score, kind="stable")[:count]] = False
  return keep, count, score


@hypothesis.settings(max_examples=15)
@hypothesis.given(
    width=st.integers(2, 9), sparsity=st.floats(0.0, 1.0),
    values=st.sampled_from(["zeros", "grid", "normal"]), seed=st.integers(0, 2**16))
def test_each_group_loses_exactly_round_s_c_smallest_channels(width, sparsity, values, seed):
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(3, width)).astype(np.float32)
  w2 = rng.normal(size=(width, 2)).astype(np.float32)
  if values != "normal":  # Ties: all channels equal, or on a grid of 0.5.
    w1, w2 = (np.round(w * 2) / 2 * (values == "grid") for w in (w1, w2))
  params = {"a": {"kernel": jnp.asarray(w1)}, "b": {"kernel": jnp.asarray(w2)}}
  fn = lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
  groups = optax_prune.channel_groups(fn, params, jnp.ones((2, 3)))
  _, state = _prune(params, groups, sparsity)
  keep = np.asarray(state.masks["a"]["kernel"]).any(axis=0)
  np.testing.assert_array_equal(np.asarray(state.masks["b"]["kernel"]).any(axis=1), keep)
  expected, count, score = _reference_keep(((w1, 1), (w2, 0)), sparsity)
  assert int((~keep).sum()) == count
  # Grid values sum exactly in float32; random ones may differ by an ulp in
  # another summation order, so near-ties are compared by count only.
  gaps = np.diff(np.sort(score))
  if values != "normal" or not gaps.size or gaps.min() > 1e-5:
    np.testing.assert_array_equal(keep, expected)


def test_masks_only_grow_and_pruned_channels_stay_zero():
  fn, params, state, x = _res_cnn()
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  schedule = optax_prune.polynomial_schedule(0.75, begin_step=0, end_step=4, frequency=1)
  tx = optax.chain(optax.adam(0.1), optax_prune.magnitude_pruning(
      schedule, granularity=optax_prune.coupled_channels(groups)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.sum(fn(p, state, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  previous = None
  for _ in range(5):
    params, opt_state = step(params, opt_state)
    masks = optax_prune.find_pruning_state(opt_state).masks
    keep = np.asarray(masks["stem"]["bias"])
    if previous is not None:
      assert not np.any(keep & ~previous)
    previous = keep
    for path in ("stem", "outer"):
      pruned = ~np.asarray(masks[path]["bias"])
      assert np.all(np.asarray(params[path]["bias"])[pruned] == 0)
  assert int((~previous).sum()) == 6  # round(0.75 * 8).


# ------------------------------------------------------------- bad inputs --


def test_bad_arguments_name_themselves():
  fn, params, state, x = _res_cnn()
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  unsafe = [g for g in groups.groups if not g.prunable]
  with pytest.raises(ValueError, match="cannot be removed safely: it is an input"):
    optax_prune.coupled_channels(
        [g for g in unsafe if g.reason == "an input of the model"])
  with pytest.raises(ValueError, match="`groups` must be a ChannelGroups"):
    optax_prune.coupled_channels([])
  with pytest.raises(ValueError, match="`norm`"):
    optax_prune.coupled_channels(groups, norm="l3")
  coupled = optax_prune.coupled_channels(groups)
  for kwargs, name in (({"where": lambda p, x: True}, "where"),
                       ({"scope": "global"}, "scope"),
                       ({"distribution": "erk"}, "distribution")):
    with pytest.raises(ValueError, match=f"`{name}="):
      optax_prune.magnitude_pruning(0.5, granularity=coupled, **kwargs)
  with pytest.raises(ValueError, match="one schedule"):
    optax_prune.magnitude_pruning({"stem": 0.5}, granularity=coupled)
  tx = optax_prune.magnitude_pruning(0.5, granularity=coupled)
  with pytest.raises(ValueError, match=r"member \['stem'\]\['bias'\].*missing"):
    tx.init({k: v for k, v in params.items() if k != "stem"})
  with pytest.raises(ValueError, match="pass the `state`"):
    optax_prune.shrink(groups, params)
  with pytest.raises(ValueError, match="do not match group"):
    optax_prune.shrink(groups, jax.tree.map(lambda a: a[..., :1], params), state)


# -------------------------------------------------------------- contract --

_SCHEDULE = optax_prune.polynomial_schedule(0.75, begin_step=0, end_step=8, frequency=4)


def _contract_params(dtype):
  rng = np.random.default_rng(0)
  shapes = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)},
            "dense": {"kernel": (8, 16), "bias": (16,)},
            "out": {"kernel": (16, 8), "bias": (8,)}}
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), dtype), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def _contract_fn(p, x):
  x = jax.lax.conv_general_dilated(
      x, p["conv"]["kernel"].astype(x.dtype), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
  x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
  x = jax.nn.relu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
  return x @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("dtype,packed,optimizer,static,options", [
    ("bfloat16", True, optax.adamw(0.05, weight_decay=0.1), True, {}),
    ("float32", False, optax.sgd(0.05, momentum=0.9), False, {}),
    ("float32", False, optax.adam(0.05), False, {"importance": "taylor", "round_to": 4})])
def test_coupled_pruning_keeps_the_contract(dtype, packed, optimizer, static, options):
  """Exact channel counts per group at every update (rounded with `round_to`),
  pruned members exactly 0 after every step (no revival by momentum, Adam or
  weight decay), masks nested and unchanged between updates, one compile per
  kind of step; with every importance."""
  params = _contract_params(dtype)
  groups = optax_prune.channel_groups(_contract_fn, params, jnp.ones((2, 5, 5, 4), dtype))
  assert [(g.size, len(g.members)) for g in groups.prunable] == [(8, 3), (16, 3)]
  tx = optax.chain(optimizer, optax_prune.magnitude_pruning(
      _SCHEDULE, granularity=optax_prune.coupled_channels(groups, **options),
      packed_masks=packed))
  due = set(optax_prune.mask_update_steps(_SCHEDULE, 10).tolist()) if static else None
  previous = None
  for t, _, state, after in helpers.train(tx, params, 10, due_steps=due):
    stored = optax_prune.find_pruning_state(state).masks
    assert stored["conv"]["kernel"].dtype == (np.uint8 if packed else bool)
    masks = {(k, n): np.asarray(m)
             for k, d in optax_prune.unpack_masks(stored, after).items()
             for n, m in d.items() if not isinstance(m, optax.MaskedNode)}
    assert len(masks) == 5  # All but the output bias.
    masks_of = lambda k, n: masks[k, n]
    kept = {  # Channels kept by any member, per group.
        8: masks_of("conv", "bias") | masks_of("dense", "kernel").any(1),
        16: masks_of("dense", "bias") | masks_of("out", "kernel").any(1)}
    np.testing.assert_array_equal(kept[8], masks_of("conv", "kernel").any((0, 1, 2)))
    target = _SCHEDULE(t)
    if bool(target.update):
      for size, keep in kept.items():
        kept_count = _kept_reference(size, float(target.sparsity), options.get("round_to", 1))
        assert int((~keep).sum()) == size - kept_count
    for key, m in masks.items():
      if previous is not None:
        assert not (m & ~previous[key]).any(), f"step {t}: {key} revived"
        if not bool(target.update):
          np.testing.assert_array_equal(m, previous[key])
      np.testing.assert_array_equal(np.asarray(after[key[0]][key[1]], np.float32)[~m], 0)
    previous = masks


# ------------------------------------ one-shot, round_to, other importances --


class BnMLP(nn.Module):
  """Dense-BN-ReLU of 12 channels, Dense-ReLU of 3, a Dense read-out."""

  widths: tuple = (12, 3)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(self.widths[0])(x)))
    x = nn.relu(nn.Dense(self.widths[1])(x))
    return nn.Dense(2)(x)


@functools.cache
def _bn_mlp():
  model, x = BnMLP(), jax.random.normal(jax.random.key(1), (16, 5))
  variables = _perturbed(jax.jit(model.init)(jax.random.key(0), x), seed=5)
  state = {"batch_stats": jax.tree.map(jnp.abs, variables["batch_stats"])}
  fn = lambda p, s, x: model.apply({"params": p, **s}, x)
  groups = optax_prune.channel_groups(fn, variables["params"], x, state=state)
  wide, narrow = sorted(groups.prunable, key=lambda g: -g.size)
  return fn, variables["params"], state, x, wide, narrow


def _kept_reference(size, sparsity, m):
  """The kept count: C - round(s C), moved to the nearest of {m, 2m, ... <= C} or C,
  ties to the larger; 0 stays 0."""
  kept = size - reference.prune_count(sparsity, size)
  if kept == 0:  # Pruned whole (s = 1): no rounding up.
    return 0
  candidates = [c for c in range(m, size + 1, m)] + [size]
  return min(candidates, key=lambda c: (abs(c - kept), -c))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(size=st.integers(1, 80), m=st.integers(1, 20), sparsity=st.floats(0.0, 1.0))
def test_round_to_keeps_the_nearest_multiple_never_below_it(size, m, sparsity):
  from optax_prune import _granularity  # pylint: disable=import-outside-toplevel
  coupled = _granularity.CoupledChannels((), round_to=m)
  pruned = int(coupled.pruned_count(jnp.float32(sparsity), size))
  assert size - pruned == _kept_reference(size, sparsity, m)


@pytest.mark.parametrize("size, m, table", [
    (12, 8, {0.1: 12, 0.25: 8, 0.5: 8, 0.9: 8, 1.0: 0}),  # 12 heads: whole, cut to 8, or all.
    (12, 4, {0.1: 12, 0.25: 8, 0.5: 8, 0.75: 4, 0.95: 4}),  # kept 6: 4 or 8, ties up.
    (3, 8, {0.0: 3, 0.5: 3, 0.8: 3, 1.0: 0}),  # Smaller than m: kept whole below s = 1.
    (64, 8, {0.3: 48, 0.35: 40}),  # 45 kept -> 48; 41.6 -> 42 kept -> 40.
])
def test_round_to_table(size, m, table):
  from optax_prune import _granularity  # pylint: disable=import-outside-toplevel
  coupled = _granularity.CoupledChannels((), round_to=m)
  got = {s: size - int(coupled.pruned_count(jnp.float32(s), size)) for s in table}
  assert got == table


def _channel_keep(masks, group):
  """The group's keep vector, the same in every member (checked)."""
  from optax_prune import _coupling  # pylint: disable=import-outside-toplevel
  by_path = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
  keeps = []
  for path, axis, outer, inner in group.views():
    mask = by_path[path]
    view, channel_axis = _coupling.channel_view(np.asarray(mask), axis, outer, inner)
    keeps.append(view.any(axis=tuple(a for a in range(view.ndim) if a != channel_axis)))
  for keep in keeps[1:]:
    np.testing.assert_array_equal(keep, keeps[0])
  return keeps[0]


def _importance_reference(importance, params, state, x, grads, group):
  """NumPy channel importance of one group of BnMLP, written out per layer."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
  stats = jax.tree.map(lambda a: np.asarray(a, np.float64), state["batch_stats"]["BatchNorm_0"])
  bn = p["BatchNorm_0"]
  h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h1 = np.maximum((h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"], 0)
  h2 = np.maximum(h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  norm = lambda a, axis: np.sqrt(np.sum(a * a, axis=axis))
  if group.size == 12:
    members = [(p["Dense_0"]["kernel"], g["Dense_0"]["kernel"], 0), (p["Dense_0"]["bias"], g["Dense_0"]["bias"], None),
               (bn["scale"], g["BatchNorm_0"]["scale"], None), (bn["bias"], g["BatchNorm_0"]["bias"], None),
               (p["Dense_1"]["kernel"].T, g["Dense_1"]["kernel"].T, 0)]
    activation, scales = norm(h1, 0), np.abs(bn["scale"])
  else:
    members = [(p["Dense_1"]["kernel"], g["Dense_1"]["kernel"], 0), (p["Dense_1"]["bias"], g["Dense_1"]["bias"], None),
               (p["Dense_2"]["kernel"].T, g["Dense_2"]["kernel"].T, 0)]
    activation, scales = norm(h2, 0), None
  if importance == "weight":
    return sum(norm(w, axis) if axis is not None else np.abs(w) for w, _, axis in members)
  if importance == "taylor":
    return np.abs(sum(np.sum(w * d, axis=axis) if axis is not None else w * d for w, d, axis in members))
  return activation if importance == "activation" else scales


@pytest.mark.parametrize("importance", ["weight", "taylor", "activation", "bn_scale"])
def test_one_shot_coupled_pruning_ranks_channels_by_each_importance(importance):
  fn, params, state, x, wide, narrow = _bn_mlp()
  groups = [wide] if importance == "bn_scale" else [wide, narrow]
  loss = lambda p: jnp.sum(fn(p, state, x) ** 2)
  grads = jax.grad(loss)(params)
  kwargs = {}
  if importance == "activation":
    kwargs["input_norms"] = optax_prune.input_norms(lambda p, x: fn(p, state, x), params, [x])
  coupled = optax_prune.coupled_channels(
      groups, **({} if importance == "activation" else {"importance": importance}))
  for sparsity in (0.25, 0.5):
    pruned, masks = optax_prune.prune(params, sparsity, granularity=coupled, grads=grads, **kwargs)
    for group in groups:
      keep = _channel_keep(masks, group)
      score = _importance_reference(importance, params, state, x, grads, group)
      expected = np.ones(group.size, bool)
      expected[np.argsort(score, kind="stable")[:reference.prune_count(sparsity, group.size)]] = False
      np.testing.assert_array_equal(keep, expected, err_msg=f"{importance} {sparsity} {group.name}")
    is_masked = lambda m: isinstance(m, optax.MaskedNode)
    for leaf, mask, out in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=is_masked),
                               jax.tree.leaves(pruned)):
      np.testing.assert_array_equal(np.asarray(out), leaf if is_masked(mask) else np.where(mask, leaf, 0))
    if importance == "activation":  # The same, given to the granularity (for training).
      given = optax_prune.coupled_channels(groups, importance="activation", **kwargs)
      _, again = optax_prune.prune(params, sparsity, granularity=given)
      for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(got, want)


def test_one_shot_with_round_to_shrinks_to_the_masked_model():
  fn, params, state, x, wide, narrow = _bn_mlp()
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  coupled = optax_prune.coupled_channels(groups, round_to=8)
  pruned, masks = optax_prune.prune(params, 0.3, granularity=coupled)
  # 12 channels at 0.3: 8 kept (not 8.4); 3 channels, fewer than 8: never pruned.
  assert _channel_keep(masks, wide).sum() == 8 and _channel_keep(masks, narrow).all()
  small = optax_prune.shrink(groups, pruned, state)
  model = BnMLP(widths=(8, 3))
  out = model.apply({"params": small.params, **small.state}, x)
  np.testing.assert_allclose(out, fn(pruned, state, x), rtol=1e-5, atol=1e-5)
  # The transformation ranks the same way at its first mask update.
  tx = optax_prune.magnitude_pruning(0.3, granularity=coupled)
  _, opt_state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for got, want in zip(jax.tree.leaves(opt_state.masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(got, want)


def test_taylor_importance_reads_the_raw_gradient_in_the_transformation():
  fn, params, state, x, wide, narrow = _bn_mlp()
  grads = jax.grad(lambda p: jnp.sum(fn(p, state, x) ** 2))(params)
  coupled = optax_prune.coupled_channels([wide, narrow], importance="taylor", round_to=2)
  _, masks = optax_prune.prune(params, 0.5, granularity=coupled, grads=grads)
  tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5, granularity=coupled))
  _, opt_state = jax.jit(functools.partial(tx.update, grads=grads))(grads, tx.init(params), params)
  state = optax_prune.find_pruning_state(opt_state)
  for got, want in zip(jax.tree.leaves(state.masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(got, want)


def test_one_shot_and_importance_refusals_name_the_fix():
  fn, params, state, x, wide, narrow = _bn_mlp()
  groups = [wide, narrow]
  with pytest.raises(ValueError, match=r"bn_scale.*the groups \[.*Dense_1.*have none.*subset"):
    optax_prune.coupled_channels(groups, importance="bn_scale")
  with pytest.raises(ValueError, match="`input_norms` go with `importance='activation'`"):
    optax_prune.coupled_channels(groups, importance="activation")
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="`round_to` must be an int >= 1"):
      optax_prune.coupled_channels(groups, round_to=bad)
  with pytest.raises(ValueError, match="`importance`"):
    optax_prune.coupled_channels(groups, importance="hessian")
  taylor = optax_prune.coupled_channels(groups, importance="taylor")
  with pytest.raises(ValueError, match=r"grads=grads"):
    optax_prune.prune(params, 0.5, granularity=taylor)
  coupled = optax_prune.coupled_channels(groups)
  for kwargs in ({"compare": "output"}, {"scope": "global"}):
    with pytest.raises(ValueError) as error:
      optax_prune.prune(params, 0.5, granularity=coupled, **kwargs)
    assert len(str(error.value)) < 300 and "ChannelGroup(" not in str(error.value)
  norms = optax_prune.input_norms(lambda p, x: fn(p, state, x), params, [x])
  with pytest.raises(ValueError, match="not by importance='taylor'"):
    optax_prune.prune(params, 0.5, granularity=taylor, grads=params, input_norms=norms)
  assert "ChannelGroup(" not in repr(coupled)


def test_taylor_importance_is_the_magnitude_of_the_summed_products():
  """|sum over a channel's slice of w * g|: a negative sum counts by its size."""
  from optax_prune import _coupling, _granularity  # pylint: disable=import-outside-toplevel
  group = _coupling.ChannelGroup(3, (("['w']", 1),), name="['w'][axis 1]")
  coupled = _granularity.CoupledChannels((group,), importance="taylor")
  w = np.array([[1.0, 1.0, 2.0], [2.0, -1.0, 1.0]], np.float32)
  g = np.array([[-1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]], np.float32)  # Column sums: -5, 1, 2.
  got = coupled.importance_of(0, [(0, ("['w']", 1, 1, 1))], {}, {0: jnp.asarray(w)},
                              {0: jnp.asarray(g)})
  np.testing.assert_array_equal(np.asarray(got), np.abs(np.sum(w * g, axis=0)))
