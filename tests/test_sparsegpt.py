"""SparseGPT and the input Hessians, against NumPy (tests/reference.py): under
x64 masks exact and weights within 1e-10 of a float64 loop implementation;
exact counts per block, N:M packed by `to_nm`, the errors named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_prune
from optax_prune import _sparsegpt
from tests import reference

NM = optax_prune.n_of_m(2, 4, axis=0)


def _layer(seed, k=20, o=6, rows=48, dead=(3,), grid=True):
  """A weight (k, o) and its Hessian X^T X (float64), with unseen inputs."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((k, o))
  if grid:
    w = np.round(w * 2) / 2  # Ties within a row (same U_jj).
  x = rng.standard_normal((rows, k)) + 0.3 * rng.standard_normal((rows, 1))
  x[:, list(dead)] = 0.0  # Inputs never seen.
  return w, x.T @ x


def _run(w, h, sparsity, **options):
  params = {"kernel": jnp.asarray(w)}
  hessians = {"['kernel']": optax_prune.Hessian(jnp.asarray(h), (1,))}
  new, masks = optax_prune.sparsegpt(params, hessians, sparsity, **options)
  return np.asarray(new["kernel"]), np.asarray(masks["kernel"])


# (k, blocksize, compare, nm): several blocks, a partial last one, N:M groups.
CASES = [(20, 8, "block", None), (37, 16, "block", None), (24, 8, "output", None),
         (24, 8, "leaf", None), (24, 8, "block", (2, 4)), (40, 16, "block", (1, 4))]


@pytest.mark.parametrize("k,blocksize,compare,nm", CASES)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.77, 1.0]))
def test_x64_matches_the_float64_reference(k, blocksize, compare, nm, seed, sparsity):
  w, h = _layer(seed, k=k, dead=(3, k - 2))
  if nm is not None:
    sparsity = 1.0
  with jax.enable_x64(True):
    granularity = None if nm is None else optax_prune.n_of_m(*nm, axis=0)
    got_w, got_keep = _run(w, h, sparsity, compare=compare, granularity=granularity,
                           blocksize=blocksize)
    assert got_w.dtype == np.float64
  want_w, want_keep = reference.sparsegpt(w, h, sparsity, blocksize, compare, nm)
  np.testing.assert_array_equal(got_keep, want_keep)
  np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-10)
  assert (got_w[~got_keep] == 0).all() and (got_w[[3, k - 2]] == 0).all()


def test_exact_count_per_block_and_ties_by_position():
  w, h = _layer(0, k=37, o=5)
  for sparsity in (0.1, 0.5, 0.9):
    new, keep = _run(w.astype(np.float32), h.astype(np.float32), sparsity, blocksize=16)
    for start in range(0, 37, 16):
      block = keep[start:start + 16]
      assert (~block).sum() == reference.prune_count(sparsity, block.size)
    assert (new[~keep] == 0).all()
  # All scores equal (a Hessian with equal diagonals, equal |w|): the lower
  # positions of each block go first.
  keep = _run(np.ones((8, 2), np.float32), np.eye(8, dtype=np.float32), 0.5, blocksize=4)[1]
  np.testing.assert_array_equal(keep, np.repeat([[False], [False], [True], [True]] * 2, 2, 1))


def test_two_of_four_is_packed_by_to_nm_and_matches_the_reference_in_float32():
  w, h = _layer(1, k=32, o=8, grid=False)
  new, keep = _run(w.astype(np.float32), h.astype(np.float32), 1.0, granularity=NM,
                   blocksize=16)
  assert (keep.reshape(8, 4, 8).sum(1) == 2).all()
  packed = optax_prune.to_nm(jnp.asarray(new), jnp.asarray(keep), NM)
  np.testing.assert_array_equal(packed.todense(), new)
  want_w, want_keep = reference.sparsegpt(w, h, 1.0, 16, nm=(2, 4))
  np.testing.assert_array_equal(keep, want_keep)
  np.testing.assert_allclose(new, want_w, rtol=1e-3, atol=1e-4)


def test_the_layer_output_error_is_below_magnitude_and_wanda_at_equal_counts():
  # Correlated features of uneven scales: what the weight update exploits.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 32))
  x = (x + 0.3 * rng.standard_normal((256, 32))) * rng.uniform(0.1, 3.0, 32)
  w = rng.standard_normal((32, 16))
  params = {"kernel": jnp.asarray(w, jnp.float32)}
  fn = lambda p, x: x @ p["kernel"]
  batches = [jnp.asarray(x[:128], jnp.float32), jnp.asarray(x[128:], jnp.float32)]
  error = lambda p: np.linalg.norm(x @ (np.asarray(p["kernel"], np.float64) - w))
  hess = optax_prune.hessians(fn, params, batches)
  norms = optax_prune.input_norms(fn, params, batches)
  ours, masks = optax_prune.sparsegpt(params, hess, 0.5, compare="output")
  wanda, wanda_masks = optax_prune.prune(params, 0.5, input_norms=norms, compare="output")
  magnitude, _ = optax_prune.prune(params, 0.5)
  assert (~masks["kernel"]).sum() == (~wanda_masks["kernel"]).sum() == 256
  assert error(ours) < 0.7 * error(wanda) < 0.7 * error(magnitude)  # 100, 273, 573.


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.DenseGeneral((2, 4), name="query")(x)  # (in, heads, head_dim): outputs (1, 2).
    x = jax.nn.gelu(x)
    x = nn.DenseGeneral(5, axis=(-2, -1), name="out")(x)  # (heads, head_dim, out).
    return nn.Dense(3, name="head")(jnp.tanh(x))


def test_hessians_of_dense_general_layers_and_their_pruning_in_the_in_out_layout():
  model = _Model()
  batches = [jax.random.normal(jax.random.key(i), (2, 3, 8)) for i in range(2)]
  params = model.init(jax.random.key(7), batches[0])["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  hess = optax_prune.hessians(fn, params, batches)
  assert set(hess) == {"['query']['kernel']", "['out']['kernel']", "['head']['kernel']"}
  inputs = {"query": [], "out": []}
  for x in batches:
    inputs["query"].append(np.asarray(x).reshape(-1, 8))
    h = jax.nn.gelu(nn.DenseGeneral((2, 4)).apply({"params": params["query"]}, x))
    inputs["out"].append(np.asarray(h).reshape(-1, 8))  # (heads, head_dim) flattened.
  for name, axes in (("query", (1, 2)), ("out", (2,))):
    x = np.concatenate(inputs[name]).astype(np.float64)
    got = hess[f"['{name}']['kernel']"]
    assert got.output_axes == axes and got.matrix.dtype == np.float32
    np.testing.assert_allclose(got.matrix, x.T @ x, rtol=1e-5, atol=1e-5)
  new, masks = optax_prune.sparsegpt(params, hess, 0.5, blocksize=4)
  for name, shape in (("query", (8, 8)), ("out", (8, 5))):
    kernel = np.asarray(params[name]["kernel"], np.float64).reshape(shape)
    matrix = hess[f"['{name}']['kernel']"].matrix
    want_w, want_keep = reference.sparsegpt(kernel, matrix, 0.5, 4)
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]).reshape(shape), want_keep)
    np.testing.assert_allclose(np.asarray(new[name]["kernel"]).reshape(shape), want_w,
                               rtol=1e-3, atol=1e-4)
  assert new["head"]["bias"] is params["head"]["bias"]


def test_a_new_sparsity_does_not_recompile():
  w, h = _layer(5, k=16, o=4)
  w, h = w.astype(np.float32), h.astype(np.float32)
  _run(w, h, 0.25, blocksize=8)
  before = _sparsegpt._sweep._cache_size()
  _run(w, h, 0.6, blocksize=8)
  assert _sparsegpt._sweep._cache_size() == before


def test_bad_arguments_name_the_argument_and_the_range():
  w, h = _layer(0, k=8, o=4)
  w, h = w.astype(np.float32), h.astype(np.float32)
  cases = [
      (dict(sparsity=1.5), "`sparsity` must be in \\[0, 1\\]"),
      (dict(compare="row"), "`compare` must be one of"),
      (dict(blocksize=0), "`blocksize` must be an integer >= 1"),
      (dict(dampening=0.0), "`dampening` must be a finite number > 0"),
      (dict(dampening=float("nan")), "`dampening` must be a finite number > 0"),
      (dict(granularity=optax_prune.blocks((2, 2))), "`granularity` must be None"),
      (dict(sparsity=1.0, granularity=NM, compare="leaf"), "leave `compare='block'`"),
      (dict(sparsity=1.0, granularity=NM, blocksize=6), "`blocksize` must be a multiple of m=4"),
      (dict(granularity=NM), "`sparsity` must be 1"),
      (dict(sparsity=1.0, granularity=optax_prune.n_of_m(2, 4, axis=1)), "must cut the last input"),
  ]
  for options, message in cases:
    options = {"sparsity": 0.5, **options}
    with pytest.raises(ValueError, match=message):
      _run(w, h, options.pop("sparsity"), **options)
  params = {"kernel": jnp.asarray(w)}
  with pytest.raises(ValueError, match="`hessians` must be a dict"):
    optax_prune.sparsegpt(params, [h], 0.5)
  with pytest.raises(ValueError, match="has no Hessian for the pruned leaves"):
    optax_prune.sparsegpt(params, {}, 0.5)
  with pytest.raises(ValueError, match="has shape \\(4, 4\\)"):
    optax_prune.sparsegpt(params, {"['kernel']": optax_prune.Hessian(np.eye(4), (1,))}, 0.5)


def test_path_rules_choose_each_leafs_n_of_m_axis():
  # An attention output kernel (heads, head_dim, out) is N:M along head_dim
  # (its last input axis), the query kernel (in, heads, head_dim) along in.
  model = _Model()
  batches = [jax.random.normal(jax.random.key(3), (4, 3, 8))]
  params = model.init(jax.random.key(4), batches[0])["params"]
  hess = optax_prune.hessians(lambda p, x: model.apply({"params": p}, x), params, batches)
  rules = optax_prune.by_path({r"\['out'\]": optax_prune.n_of_m(2, 4, axis=1)}, default=NM)
  sparsity = optax_prune.by_path({r"\['head'\]": None}, default=1.0)
  new, masks = optax_prune.sparsegpt(params, hess, sparsity, granularity=rules, blocksize=4)
  assert (np.asarray(masks["out"]["kernel"]).reshape(2, 1, 4, 5).sum(2) == 2).all()
  optax_prune.to_nm(new["out"]["kernel"], masks["out"]["kernel"], optax_prune.n_of_m(2, 4, axis=1))
  assert (np.asarray(masks["query"]["kernel"]).reshape(2, 4, 8).sum(1) == 2).all()
  optax_prune.to_nm(new["query"]["kernel"], masks["query"]["kernel"], NM)
  assert isinstance(masks["head"]["kernel"], optax.MaskedNode)


def test_a_weight_used_twice_sums_both_inputs_convs_are_absent_and_bf16_kernels_stay_bf16():
  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  y = np.cos(np.arange(8, dtype=np.float32)).reshape(2, 4)
  fn = lambda p, b: jnp.sum(b[0] @ p["w"]) + jnp.sum(jnp.tanh(b[1]) @ p["w"]) + jnp.sum(
      jax.lax.conv_general_dilated(b[2], p["k"], (1, 1), "SAME"))
  images = jnp.ones((1, 2, 3, 3))
  params = {"w": jnp.ones((4, 4), jnp.bfloat16), "k": jnp.ones((3, 2, 1, 1))}
  hess = optax_prune.hessians(fn, params, [(x, y, images), (x, y, images)])
  assert set(hess) == {"['w']"}
  t = np.tanh(y.astype(np.float64))
  want = 2 * (x.T.astype(np.float64) @ x + t.T @ t)
  np.testing.assert_allclose(hess["['w']"].matrix, want, rtol=1e-5)
  new, masks = optax_prune.sparsegpt(params, hess, 0.5, where=lambda path, leaf: leaf.ndim == 2)
  assert new["w"].dtype == jnp.bfloat16 and (~masks["w"]).sum() == 8
  assert (np.asarray(new["w"], np.float32)[~np.asarray(masks["w"])] == 0).all()
