"""Input-feature norms read off the jaxpr (linen, nnx, plain JAX), and
activation-aware (Wanda) one-shot pruning, against NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_prune
from tests import reference


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _np_norm(x, keep_axis):
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum(x * x, axis=tuple(a for a in range(x.ndim) if a != keep_axis)))


def test_linen_norms_are_those_of_each_layers_input_over_all_batches():
  model = _Linen()
  batches = [jax.random.normal(jax.random.key(i), (2, 5, 5, 2)) for i in range(2)]
  params = model.init(jax.random.key(9), batches[0])["params"]
  norms = optax_prune.input_norms(lambda p, x: model.apply({"params": p}, x), params, batches)
  assert set(norms) == {"['Conv_0']['kernel']", "['Dense_0']['kernel']", "['Dense_1']['kernel']"}
  # By hand: the inputs each layer sees, both batches together.
  inputs = {"conv": [], "d0": [], "d1": []}
  for x in batches:
    inputs["conv"].append(x)
    h = nn.Conv(4, (3, 3)).apply({"params": params["Conv_0"]}, x)
    h = jax.nn.relu(h).reshape(2, -1)
    inputs["d0"].append(h)
    inputs["d1"].append(jax.nn.gelu(h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]))
  cat = {k: np.concatenate(v) for k, v in inputs.items()}
  np.testing.assert_allclose(norms["['Conv_0']['kernel']"].norm.reshape(-1),
                             _np_norm(cat["conv"], 3), rtol=1e-5)
  np.testing.assert_allclose(norms["['Dense_0']['kernel']"].norm[:, 0],
                             _np_norm(cat["d0"], 1), rtol=1e-5)
  np.testing.assert_allclose(norms["['Dense_1']['kernel']"].norm[:, 0],
                             _np_norm(cat["d1"], 1), rtol=1e-4)
  assert norms["['Conv_0']['kernel']"].norm.shape == (1, 1, 2, 1)
  assert norms["['Conv_0']['kernel']"].output_axes == (3,)
  assert norms["['Dense_1']['kernel']"].output_axes == (1,)


def test_nnx_norms_and_attention_projections():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attention = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
      self.linear = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear(jax.nn.relu(self.attention(x)))

  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  norms = optax_prune.input_norms(fn, state, [x])
  linear = [k for k in norms if "linear" in k and "kernel" in k]
  out = [k for k in norms if "'out'" in k and "kernel" in k]
  assert len(linear) == 1 and len(out) == 1
  h = jax.nn.relu(model.attention(x))
  np.testing.assert_allclose(norms[linear[0]].norm[:, 0], _np_norm(h, 2), rtol=1e-5)
  # The output projection (heads, head_dim, out) contracts two axes.
  assert norms[out[0]].norm.shape == (2, 4, 1) and norms[out[0]].output_axes == (2,)
  query = [k for k in norms if "'query'" in k]
  assert norms[query[0]].output_axes == (1, 2)
  np.testing.assert_allclose(norms[query[0]].norm[:, 0, 0], _np_norm(x, 2), rtol=1e-5)


def _wanda_case():
  rng = np.random.default_rng(0)
  w = np.round(rng.standard_normal((16, 6)) * 2) / 2  # Ties on a grid.
  w[0, :] = 0.0
  norm = np.abs(rng.standard_normal((16, 1))).astype(np.float32)
  norm[3] = 0.0  # A dead input: its weights score 0.
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(6)}
  norms = {"['w']": optax_prune.InputNorm(norm, (1,))}
  return params, norms, np.abs(w).astype(np.float32) * norm


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_wanda_per_output_prunes_the_smallest_scores_of_each_column(sparsity):
  params, norms, scores = _wanda_case()
  pruned, masks = optax_prune.prune(params, sparsity, input_norms=norms, compare="output")
  for j in range(scores.shape[1]):
    want = reference.keep_masks([scores[:, j]], sparsity)[0]
    np.testing.assert_array_equal(masks["w"][:, j], want)
  assert (~np.asarray(masks["w"])).sum(0).tolist() == [reference.prune_count(sparsity, 16)] * 6
  np.testing.assert_array_equal(pruned["w"], np.where(masks["w"], params["w"], 0))


def test_wanda_per_leaf_and_two_of_four():
  params, norms, scores = _wanda_case()
  _, masks = optax_prune.prune(params, 0.5, input_norms=norms)
  np.testing.assert_array_equal(masks["w"], reference.keep_masks([scores], 0.5)[0])
  _, nm = optax_prune.prune(params, 1.0, input_norms=norms,
                            granularity=optax_prune.n_of_m(2, 4, axis=0))
  groups = np.asarray(nm["w"]).reshape(4, 4, 6)
  assert (groups.sum(1) == 2).all()
  ranked = scores.reshape(4, 4, 6)
  # In each group the two kept have the largest scores (ties: later kept).
  for g in range(4):
    for j in range(6):
      keep = reference.keep_masks([ranked[g, :, j]], 0.5)[0]
      np.testing.assert_array_equal(groups[g, :, j], keep)


def test_wanda_errors_name_the_fix():
  params, norms, _ = _wanda_case()
  with pytest.raises(ValueError, match="no norms for the pruned leaves"):
    optax_prune.prune({**params, "v": jnp.ones((4, 4))}, 0.5, input_norms=norms)
  with pytest.raises(ValueError, match="takes no `granularity`"):
    optax_prune.prune(params, 0.5, compare="output", granularity=optax_prune.blocks((2, 2)))
  with pytest.raises(ValueError, match="leave `score='magnitude'`"):
    optax_prune.prune(params, 0.5, input_norms=norms, score="random")
  with pytest.raises(ValueError, match="does not broadcast"):
    optax_prune.prune(params, 0.5, input_norms={"['w']": optax_prune.InputNorm(np.ones((5, 1)), (1,))})


def test_a_weight_cast_before_its_matmul_is_found_and_grouped_convs_are_left_out():
  # The kernel is cast to bf16 (and promoted back) before the matmul: still
  # the same weight. A grouped convolution's kernel sees only its group's
  # channels: it gets no norms.
  x = jnp.array([[3.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
  norms = optax_prune.input_norms(lambda p, x: x @ p["w"].astype(jnp.bfloat16),
                                  {"w": jnp.ones((3, 2))}, [x])
  np.testing.assert_allclose(norms["['w']"].norm[:, 0], [5.0, 0.0, np.sqrt(2.0)], rtol=1e-6)
  conv = lambda p, x: jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                                   feature_group_count=2)
  images = jnp.ones((2, 4, 3, 3))
  assert optax_prune.input_norms(conv, {"k": jnp.ones((4, 2, 1, 1))}, [images]) == {}


def test_calls_with_one_forward_function_and_shapes_compile_once():
  # A sequential walk calls it per block: blocks sharing `fn` and shapes share
  # the compiled sums, and each call still reads its own params and batches.
  from optax_prune import _activations  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  fn = lambda p, x: jnp.tanh(x @ p["w"])
  _activations._SUMS.clear()
  for _ in range(3):
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    x = rng.standard_normal((5, 4)).astype(np.float32)
    norms = optax_prune.input_norms(fn, params, [x, 2 * x])
    np.testing.assert_allclose(norms["['w']"].norm[:, 0], np.sqrt(5 * (x ** 2).sum(0)), rtol=1e-6)
    h = optax_prune.hessians(fn, params, [x])
    np.testing.assert_allclose(h["['w']"].matrix, x.T.astype(np.float64) @ x, rtol=1e-5)
  assert len(_activations._SUMS) == 2  # One per statistic.
  assert all(run._cache_size() == 1 for run, _ in _activations._SUMS.values())
