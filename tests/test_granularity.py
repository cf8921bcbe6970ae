"""N:M, block and channel masks against NumPy references; exact unit counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
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


# Small integers: unit scores are exact in float32, and ties are everywhere.
_ints = st.integers(-6, 6).map(float)
_sparsity = st.floats(0, 1, width=32)
_threshold = st.sampled_from(["sort", "bisect"])


@settings(max_examples=25)
@given(x=hnp.arrays(np.float32, st.sampled_from([(4, 8), (8, 3), (2, 3, 8)]), elements=_ints),
       sparsity=_sparsity, nm=st.sampled_from([(2, 4), (1, 4), (3, 8), (1, 2)]),
       threshold=_threshold)
def test_n_of_m_matches_reference(x, sparsity, nm, threshold):
  n, m = nm
  axis = next(a for a in (-1, 0) if x.shape[a] % m == 0) if any(
      x.shape[a] % m == 0 for a in (-1, 0)) else None
  if axis is None:
    return
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


@settings(max_examples=25)
@given(x=hnp.arrays(np.float32, st.sampled_from([(5, 7), (8, 8), (2, 6, 9), (1, 3)]),
                    elements=_ints),
       sparsity=_sparsity, block=st.sampled_from([(4, 4), (2, 3), (1, 1), (8, 2)]),
       reduce=st.sampled_from(["mean", "max"]), threshold=_threshold)
def test_blocks_match_reference_with_ragged_edges(x, sparsity, block, reduce, threshold):
  got = _mask(x, sparsity, optax_prune.blocks(block, reduce=reduce), threshold)
  np.testing.assert_array_equal(got, reference.block_masks(x, sparsity, *block, reduce))


@settings(max_examples=25)
@given(x=hnp.arrays(np.float32, st.sampled_from([(5, 7), (3, 3, 2, 4), (1, 6)]),
                    elements=_ints),
       sparsity=_sparsity, axis=st.sampled_from([-1, 0, 1]),
       norm=st.sampled_from(["l1", "l2"]), threshold=_threshold)
def test_channels_match_reference(x, sparsity, axis, norm, threshold):
  got = _mask(x, sparsity, optax_prune.channels(axis=axis, norm=norm), threshold)
  np.testing.assert_array_equal(got, reference.channel_masks(x, sparsity, axis, norm))
  channels = np.moveaxis(got, axis, 0).reshape(x.shape[axis], -1)
  assert (channels.all(1) | ~channels.any(1)).all()  # Whole channels only.
  assert (~channels.any(1)).sum() == reference.prune_count(sparsity, x.shape[axis])


def test_a_ragged_block_is_scored_by_its_real_entries():
  # 3x3 with 2x2 blocks: the corner block holds one entry. Its mean (3) beats
  # the full blocks' (1); with zero padding counted it would be 3/4 and lose.
  x = np.ones((3, 3), np.float32)
  x[2, 2] = 3.0
  keep = _mask(x, 0.75, optax_prune.blocks((2, 2)))  # 3 of 4 blocks pruned.
  np.testing.assert_array_equal(keep, np.pad(np.zeros((2, 2), bool), ((0, 1), (0, 1)),
                                              constant_values=False) | (x == 3.0))


def test_granularity_per_leaf_by_prefix_and_by_path():
  params = {"conv": jnp.ones((3, 3, 4, 8)), "dense": jnp.ones((8, 16)), "out": jnp.ones((16, 4))}
  by_prefix = {"conv": optax_prune.channels(), "dense": optax_prune.n_of_m(2, 4, axis=0),
               "out": None}
  by_path = optax_prune.by_path(
      {"conv": optax_prune.channels(), "dense": optax_prune.n_of_m(2, 4, axis=0)}, default=None)
  for granularity in (by_prefix, by_path):
    tx = optax_prune.magnitude_pruning(1.0, granularity=granularity)
    masks = tx.update(params, tx.init(params), params)[1].masks
    assert not masks["conv"].any() and not masks["out"].any()
    assert (np.asarray(masks["dense"]).reshape(2, 4, 16).sum(1) == 2).all()


def test_global_scope_ranks_units_of_one_granularity_together():
  # Two leaves' channels ranked together: the 2 weakest of 6 channels go, both in "a".
  params = {"a": jnp.asarray(np.tile([1.0, 2.0, 9.0], (4, 1))),
            "b": jnp.asarray(np.tile([5.0, 6.0, 7.0], (4, 1)))}
  tx = optax_prune.magnitude_pruning(
      2 / 6, scope="global", granularity=optax_prune.channels(norm="l1"))
  masks = tx.update(params, tx.init(params), params)[1].masks
  np.testing.assert_array_equal(masks["a"][0], [False, False, True])
  assert masks["b"].all()


def test_structured_masks_keep_exact_zeros_under_adam():
  params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 8)), jnp.float32)}
  tx = optax.chain(optax.adam(0.1), optax_prune.magnitude_pruning(
      0.5, granularity=optax_prune.blocks((4, 4))))
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  mask = optax_prune.find_pruning_state(state).masks["w"]
  assert int((~mask).sum()) == 32 and bool((params["w"][~mask] == 0).all())


@pytest.mark.parametrize("make,match", [
    (lambda: optax_prune.n_of_m(4, 4), "`n`"),
    (lambda: optax_prune.n_of_m(0, 4), "`n`"),
    (lambda: optax_prune.n_of_m(2, 4.0), "`m`"),
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
