"""N:M, block and channel masks against NumPy references; exact unit counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import optax_prune
from tests import reference


@functools.lru_cache(maxsize=None)
def _masker(granularity, threshold):
  """A jitted `(params, sparsity) -> mask`, one compilation per shape."""
  def masks(x, sparsity):
    schedule = lambda step: optax_prune.PruningTarget(sparsity, step == 0)
    tx = optax_prune.magnitude_pruning(
        schedule, granularity=granularity, threshold=threshold, where=lambda p, x: True)
    params = {"w": x}
    return tx.update(params, tx.init(params), params)[1].masks["w"]
  return jax.jit(masks)


def _mask(x, sparsity, granularity, threshold="auto"):
  return np.asarray(_masker(granularity, threshold)(jnp.asarray(x), np.float32(sparsity)))


# Small integers: unit scores are exact in float32 (and the values in bf16),
# ties are frequent; one entry in 16 is inf or NaN, which rank above every
# number (more would make nearly every block, channel or group tie, and mean
# and max, L1 and L2, would give the same masks).
_ints = st.integers(0, 15).flatmap(
    lambda i: st.sampled_from([np.inf, -np.inf, np.nan]) if i == 0
    else st.integers(-6, 6).map(float))
_dtype = st.sampled_from([np.float32, jnp.bfloat16])
_sparsity = st.floats(0, 1, width=32)
_threshold = st.sampled_from(["sort", "bisect", "histogram"])


@settings(max_examples=15)
@given(x=hnp.arrays(np.float32, st.sampled_from([(4, 8), (8, 3), (2, 8, 3)]), elements=_ints),
       sparsity=_sparsity, nm=st.sampled_from([(2, 4), (1, 4), (3, 8), (1, 2)]),
       threshold=_threshold, dtype=_dtype)
def test_n_of_m_matches_reference(x, sparsity, nm, threshold, dtype):
  n, m = nm
  axes = [a for a in (-1, 0, -2) if x.shape[a] % m == 0]
  assume(axes)
  axis = axes[0]
  x = np.asarray(jnp.asarray(x, dtype))
  got = _mask(x, sparsity, optax_prune.n_of_m(n, m, axis=axis), threshold)
  np.testing.assert_array_equal(got, reference.n_of_m_masks(x, sparsity, n, m, axis))
  groups = np.moveaxis(got, axis, -1).reshape(-1, m)
  sparse_groups = (groups.sum(-1) == n)
  assert (groups.sum(-1) >= n).all()  # Never more than m - n pruned per group.
  assert sparse_groups.sum() == reference.prune_count(sparsity, groups.shape[0])


def test_n_of_m_at_sparsity_one_is_the_hardware_pattern():
  x = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
  keep = _mask(x, 1.0, optax_prune.n_of_m(2, 4, axis=0))
  groups = keep.T.reshape(12, 4, 4)  # Groups of 4 along axis 0.
  assert (groups.sum(-1) == 2).all()
  # The two kept are the two largest |w| of each group.
  values = np.abs(x.T.reshape(12, 4, 4))
  assert (np.sort(values, -1)[..., 2:].sum(-1) == (values * groups).sum(-1)).all()


@settings(max_examples=15)
@given(x=hnp.arrays(np.float32, st.sampled_from([(5, 7), (8, 8), (2, 6, 9), (1, 3)]),
                    elements=_ints),
       sparsity=_sparsity, block=st.sampled_from([(4, 4), (2, 3), (1, 1), (8, 2)]),
       reduce=st.sampled_from(["mean", "max"]), threshold=_threshold, dtype=_dtype)
def test_blocks_match_reference_with_ragged_edges(x, sparsity, block, reduce, threshold, dtype):
  x = np.asarray(jnp.asarray(x, dtype))
  got = _mask(x, sparsity, optax_prune.blocks(block, reduce=reduce), threshold)
  np.testing.assert_array_equal(got, reference.block_masks(x, sparsity, *block, reduce))


@settings(max_examples=15)
@given(x=hnp.arrays(np.float32, st.sampled_from([(5, 7), (3, 3, 2, 4), (1, 6)]),
                    elements=_ints),
       sparsity=_sparsity, axis=st.sampled_from([-1, 0, 1]),
       norm=st.sampled_from(["l1", "l2"]), threshold=_threshold, dtype=_dtype)
def test_channels_match_reference(x, sparsity, axis, norm, threshold, dtype):
  x = np.asarray(jnp.asarray(x, dtype))
  got = _mask(x, sparsity, optax_prune.channels(axis=axis, norm=norm), threshold)
  np.testing.assert_array_equal(got, reference.channel_masks(x, sparsity, axis, norm))
  channels = np.moveaxis(got, axis, 0).reshape(x.shape[axis], -1)
  assert (channels.all(1) | ~channels.any(1)).all()  # Whole channels only.
  assert (~channels.any(1)).sum() == reference.prune_count(sparsity, x.shape[axis])


def test_mean_and_max_blocks_and_l1_and_l2_channels_differ():
  # Block A (left) holds one large entry, block B (right) many middling ones:
  # max keeps A, mean keeps B.
  x = np.array([[9.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]], np.float32)
  keep_max = _mask(x, 0.5, optax_prune.blocks((2, 2), reduce="max"))
  keep_mean = _mask(x, 0.5, optax_prune.blocks((2, 2), reduce="mean"))
  assert keep_max[:, :2].all() and not keep_max[:, 2:].any()
  assert keep_mean[:, 2:].all() and not keep_mean[:, :2].any()
  # Column 0: L1 = 4, L2 = 4; column 1: L1 = 6, L2 = sqrt(12) < 4.
  x = np.array([[4.0, 2.0], [0.0, 2.0], [0.0, 2.0]], np.float32)
  keep_l1 = _mask(x, 0.5, optax_prune.channels(axis=-1, norm="l1"))
  keep_l2 = _mask(x, 0.5, optax_prune.channels(axis=-1, norm="l2"))
  assert keep_l1[:, 1].all() and not keep_l1[:, 0].any()
  assert keep_l2[:, 0].all() and not keep_l2[:, 1].any()


def test_a_ragged_block_is_scored_by_its_real_entries():
  # 3x3 with 2x2 blocks: the corner block holds one entry. Its mean (1.5)
  # beats the other blocks' (1); with zero padding counted in either axis it
  # would be 0.75 or less and lose.
  x = np.ones((3, 3), np.float32)
  x[2, 2] = 1.5
  keep = _mask(x, 0.75, optax_prune.blocks((2, 2)))  # 3 of 4 blocks pruned.
  np.testing.assert_array_equal(keep, x == 1.5)


def test_granularity_per_leaf_by_prefix_and_by_path():
  rng = np.random.default_rng(3)
  params = {name: jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape) + 1.0, jnp.float32)
            for name, shape in [("conv", (3, 3, 4, 8)), ("dense", (8, 16)), ("out", (16, 4))]}
  choices = {"conv": optax_prune.channels(), "dense": optax_prune.n_of_m(2, 4, axis=0)}
  by_prefix = dict(choices, out=None)
  by_path = optax_prune.by_path({rf"\['{k}'\]": g for k, g in choices.items()}, default=None)
  expected = {
      "conv": reference.channel_masks(params["conv"], 0.5, -1, "l2"),
      "dense": reference.n_of_m_masks(params["dense"], 0.5, 2, 4, 0),
      "out": reference.keep_masks([np.asarray(params["out"])], 0.5)[0],
  }
  for granularity in (by_prefix, by_path):
    tx = optax_prune.magnitude_pruning(0.5, granularity=granularity)
    masks = jax.jit(tx.update)(params, tx.init(params), params)[1].masks
    for k in params:
      np.testing.assert_array_equal(masks[k], expected[k], err_msg=k)


def test_global_scope_ranks_units_of_one_granularity_together():
  # Two leaves' channels ranked together: the 2 weakest of 6 channels go, both in "a".
  params = {"a": jnp.asarray(np.tile([1.0, 2.0, 9.0], (4, 1))),
            "b": jnp.asarray(np.tile([5.0, 6.0, 7.0], (4, 1)))}
  tx = optax_prune.magnitude_pruning(
      2 / 6, scope="global", granularity=optax_prune.channels(norm="l1"))
  masks = jax.jit(tx.update)(params, tx.init(params), params)[1].masks
  np.testing.assert_array_equal(masks["a"][0], [False, False, True])
  assert masks["b"].all()


@pytest.mark.parametrize("make,match", [
    (lambda: optax_prune.n_of_m(4, 4, axis=0), "`n`"),
    (lambda: optax_prune.n_of_m(0, 4, axis=0), "`n`"),
    (lambda: optax_prune.n_of_m(2, 4.0, axis=0), "`m`"),
    (lambda: optax_prune.n_of_m(2, 512, axis=0), "`m` must satisfy 1 <= n < m <= 256"),
    (lambda: optax_prune.n_of_m(4, 4, axis=0), r"1 <= n < m <= 256 .* got n=4, m=4"),
    (lambda: optax_prune.n_of_m(2, 4, axis="x"), "`axis`"),
    (lambda: optax_prune.blocks((4,)), "`shape`"),
    (lambda: optax_prune.blocks((0, 4)), r"`shape\[0\]`"),
    (lambda: optax_prune.blocks(reduce="sum"), "`reduce`"),
    (lambda: optax_prune.channels(norm="linf"), "`norm`"),
    (lambda: optax_prune.magnitude_pruning(0.5, granularity="2:4"), "`granularity`"),
])
def test_bad_granularity_arguments_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("granularity,match", [
    (optax_prune.n_of_m(2, 4, axis=0), "multiple of m=4"),
    (optax_prune.n_of_m(2, 4, axis=5), "out of range"),
    (optax_prune.channels(axis=2), "out of range"),
    (optax_prune.blocks(), "at least 2 axes"),
])
def test_granularity_that_does_not_fit_a_leaf_is_refused_at_init(granularity, match):
  params = {"w": jnp.ones((6,) if match == "at least 2 axes" else (6, 8))}
  tx = optax_prune.magnitude_pruning(0.5, granularity=granularity, where=lambda p, x: True)
  with pytest.raises(ValueError, match=match):
    tx.init(params)


def test_empty_leaves_have_no_units():
  # A (0, 4) leaf has 4 empty channels; they must not take the global budget.
  params = {"a": jnp.arange(1.0, 17.0).reshape(4, 4), "e": jnp.zeros((0, 4))}
  for kwargs in (dict(scope="global"), dict(distribution="erk")):
    tx = optax_prune.magnitude_pruning(
        0.5, granularity=optax_prune.channels(norm="l1"), **kwargs)
    masks = jax.jit(tx.update)(params, tx.init(params), params)[1].masks
    np.testing.assert_array_equal(masks["a"][0], [False, False, True, True])
    assert masks["e"].shape == (0, 4)
  tx = optax_prune.magnitude_pruning(
      0.5, granularity=optax_prune.n_of_m(2, 4, axis=-1), where=lambda p, x: True)
  empty = {"w": jnp.zeros((0, 4)), "v": jnp.zeros((2, 0, 4))}
  masks = jax.jit(tx.update)(empty, tx.init(empty), empty)[1].masks
  assert masks["w"].shape == (0, 4) and masks["v"].shape == (2, 0, 4)


def test_l2_channels_rank_huge_and_tiny_norms_exactly():
  # Squares of 1e20 overflow float32 and those of 1e-25 vanish: the norm
  # scales such channels first, so they still rank by size, not by position.
  for scale in (1e20, 1e-25):
    x = np.array([[3.0, 2.0, 1.0]] * 2, np.float32) * np.float32(scale)
    keep = _mask(x, 1 / 3, optax_prune.channels(norm="l2"))
    np.testing.assert_array_equal(keep[0], [True, True, False], err_msg=str(scale))


def test_global_scope_ranks_each_granularity_apart():
  params = {"a": jnp.asarray(np.tile([1.0, 2.0, 9.0, 8.0], (4, 1))),
            "b": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = optax_prune.magnitude_pruning(
      0.5, scope="global", granularity={"a": optax_prune.channels(norm="l1"), "b": None})
  masks = jax.jit(tx.update)(params, tx.init(params), params)[1].masks
  np.testing.assert_array_equal(masks["a"][0], [False, False, True, True])
  np.testing.assert_array_equal(masks["b"], reference.keep_masks([np.asarray(params["b"])], 0.5)[0])


def test_erk_counts_units_of_structured_leaves():
  params = {"small": jnp.ones((4, 8)), "large": jnp.ones((64, 32))}
  tx = optax_prune.magnitude_pruning(
      0.75, distribution="erk", granularity=optax_prune.channels())
  masks = jax.jit(tx.update)(params, tx.init(params), params)[1].masks
  pruned = {k: int((~m.any(0)).sum()) for k, m in masks.items()}  # Pruned channels.
  assert sum(pruned.values()) == reference.prune_count(0.75, 8 + 32)
  assert pruned["small"] / 8 < pruned["large"] / 32  # The smaller leaf stays denser.
