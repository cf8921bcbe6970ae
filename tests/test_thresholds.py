"""Masks against the NumPy reference: exact counts, ties, zeros, NaN, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from optax_prune import _thresholds
from tests import reference

pytestmark = pytest.mark.usefixtures("strict_promotion")

METHODS = _thresholds.METHODS


# One jitted function per method, so equal shapes reuse one compilation.
_JITTED = {
    method: jax.jit(functools.partial(_thresholds.keep_masks, threshold=method))
    for method in METHODS
}


def _masks(leaves, sparsity, method):
  xs = [jnp.asarray(x) for x in leaves]
  return [np.asarray(m) for m in _JITTED[method](xs, np.float32(sparsity))]


def _assert_matches_reference(leaves, sparsity):
  expected = reference.keep_masks(leaves, sparsity)
  for method in METHODS:
    got = _masks(leaves, sparsity, method)
    for g, e in zip(got, expected):
      np.testing.assert_array_equal(g, e, err_msg=f"method={method}")


# Small integers make ties frequent; specials cover zeros of both signs, inf, NaN.
_tie_heavy = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -0.5])
_special = st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3e38])
_values = st.one_of(
    _tie_heavy, _special, st.floats(-1e3, 1e3, width=32, allow_subnormal=True)
)
_shapes = hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6)
_dtypes = st.sampled_from([np.float32, jnp.bfloat16, np.float16])


@given(
    x=hnp.arrays(np.float32, _shapes, elements=_values),
    sparsity=st.floats(0.0, 1.0, width=32),
    dtype=_dtypes,
)
def test_layer_masks_match_reference(x, sparsity, dtype):
  x = np.asarray(jnp.asarray(x).astype(dtype))
  _assert_matches_reference([x], sparsity)


@settings(max_examples=30)
@given(
    leaves=st.lists(hnp.arrays(np.float32, _shapes, elements=_values), max_size=3),
    sparsity=st.floats(0.0, 1.0, width=32),
)
def test_global_masks_match_reference(leaves, sparsity):
  _assert_matches_reference(leaves, sparsity)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("fill", [0.0, 1.0, -2.5])
def test_all_equal_weights_prune_exact_count_lowest_index_first(method, sparsity, fill):
  x = np.full((13, 7), fill, np.float32)
  mask = _masks([x], sparsity, method)[0]
  k = reference.prune_count(sparsity, x.size)
  assert (~mask).sum() == k
  # Ties go by flat index: the first k entries are the pruned ones.
  np.testing.assert_array_equal(mask.reshape(-1), np.arange(x.size) >= k)


@pytest.mark.parametrize("method", METHODS)
def test_zeros_are_pruned_first_and_non_finite_last(method):
  x = np.array([[3.0, 0.0, -np.inf, np.nan], [-0.0, 1.0, 2.0, -4.0]], np.float32)
  # Order by magnitude: 0, -0, 1, 2, 3, -4, -inf, nan.
  for k, kept in [(2, 6), (6, 2), (7, 1)]:
    mask = _masks([x], k / x.size, method)[0]
    assert mask.sum() == kept
  mask = _masks([x], 7 / x.size, method)[0]
  assert mask[0, 3] and mask.sum() == 1  # NaN survives longest.


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_sparsity_is_clipped_and_nan_prunes_nothing(method):
  x = np.arange(10, dtype=np.float32)
  assert _masks([x], 1.5, method)[0].sum() == 0
  assert _masks([x], -0.5, method)[0].sum() == 10
  assert _masks([x], float("nan"), method)[0].sum() == 10


def test_methods_agree_on_large_gaussian_leaves():
  rng = np.random.default_rng(0)
  leaves = [rng.standard_normal(s).astype(np.float32) for s in [(300, 200), (5000,), (64, 3, 3, 3)]]
  leaves[0][::7] = 0.0  # A block of ties at zero.
  for s in (0.1, 0.5, 0.9):
    expected = reference.keep_masks(leaves, s)
    for method in METHODS:
      for g, e in zip(_masks(leaves, s, method), expected):
        np.testing.assert_array_equal(g, e)
    for x in leaves:
      for method in METHODS:
        np.testing.assert_array_equal(_masks([x], s, method)[0], reference.keep_masks([x], s)[0])


def test_unknown_threshold_is_rejected():
  with pytest.raises(ValueError, match="`threshold` must be one of"):
    _thresholds.keep_masks([jnp.ones(3)], 0.5, threshold="quickselect")
  with pytest.raises(ValueError, match="unknown threshold method"):
    _thresholds.keep_masks_for_counts([[jnp.ones(3)]], [1], "auto")


# float64 (jax_enable_x64): values a float32 key could not tell apart.
_close_to_one = st.integers(-2**20, 2**20).map(lambda i: 1.0 + i * 2.0**-45)
_f64_values = st.one_of(_close_to_one, _special, st.floats(-1e300, 1e300))
# Few shapes, so the examples share compilations (63-bit searches compile slower).
_few_shapes = st.sampled_from([(0,), (2, 3), (17,)])


@settings(max_examples=15)
@given(
    x=hnp.arrays(np.float64, _few_shapes, elements=_f64_values),
    y=hnp.arrays(np.float32, _few_shapes, elements=_values),
    sparsity=st.floats(0.0, 1.0, width=32),
)
# A float32 subnormal in a float64 group must not tie with zero.
@example(x=np.zeros(0), y=np.array([[1e-45, 0, 0], [0, 0, 0]], np.float32), sparsity=0.5)
def test_float64_is_ranked_at_float64_precision(x, y, sparsity):
  with jax.enable_x64(True):
    _assert_matches_reference([x], sparsity)
    _assert_matches_reference([y, x], sparsity)  # A mixed group: float64 keys.


def test_float64_neighbours_are_not_tied():
  # Distinct float64 weights that all round to float32 1.0: only their float64
  # order (reversed here) may decide, not their position.
  x = 1.0 + np.arange(8, 0, -1) * 2.0**-40
  assert len(set(x.astype(np.float32))) == 1
  with jax.enable_x64(True):
    for method in METHODS:
      got = _masks([x], 0.5, method)[0]
      np.testing.assert_array_equal(got, [True] * 4 + [False] * 4, err_msg=method)


@pytest.mark.parametrize("method", ["bisect", "histogram"])
def test_exact_count_and_order_for_a_1e8_entry_leaf(method):
  # 10**8 weights, 1000 distinct magnitudes with 10**5 ties each. At float32
  # sparsity 0.7 (0.699999988...) exactly round(s * n) = 69,999,999 are pruned,
  # not the 7 * 10**7 a float32 product gives; 99,999 of the 10**5 ties at the
  # threshold, so the tie search over the flat index runs at full size (27
  # bits: both levels of the histogram method's index selection).
  n = 10**8
  index = np.arange(n, dtype=np.int32)
  x = ((index % 1000) * 7919 % 1000).astype(np.float32).reshape(10**4, 10**4)
  del index
  k = reference.prune_count(np.float32(0.7), n)
  assert k == 69_999_999 and int(np.float32(0.7) * np.float32(n)) == 70_000_000
  # Compiled at XLA's default backend optimisation (the suite compiles at 0):
  # unoptimised loops over 10**8 entries took 5x as long; the masks are the same.
  keep_masks = jax.jit(functools.partial(_thresholds.keep_masks, threshold=method),
                       compiler_options={"xla_backend_optimization_level": 3})
  pruned = ~np.asarray(keep_masks([jnp.asarray(x)], np.float32(0.7))[0]).reshape(-1)
  x = x.reshape(-1)
  # These three facts determine the mask: the count, smaller before larger,
  # and ties at the threshold pruned in flat-index order.
  assert int(pruned.sum()) == k
  threshold = x[pruned].max()
  assert threshold <= x[~pruned].min()
  ties = np.flatnonzero(x == threshold)
  tie_pruned = pruned[ties]
  assert tie_pruned.sum() == 99_999 and tie_pruned[:99_999].all() and not tie_pruned[-1]


def test_widened_float32_keys_are_the_float64_bits_subnormals_included():
  # Every 997th subnormal, random normals, and the edges, against NumPy's
  # exact float32 -> float64 conversion (XLA on CPU would flush subnormals).
  rng = np.random.default_rng(0)
  bits = np.concatenate([
      np.arange(0, 2**23, 997, dtype=np.uint32),
      rng.integers(0, 0x7F800000, 20000, dtype=np.uint32),
      np.array([0, 1, 0x7FFFFF, 0x800000, 0x7F7FFFFF, 0x7F800000], np.uint32)])
  x = bits.view(np.float32)
  with jax.enable_x64(True):
    got = np.asarray(_thresholds.magnitude_keys(jnp.asarray(x), wide=True))
  np.testing.assert_array_equal(got, reference.magnitude_keys(x, wide=True))
  nan = np.array([0x7FC00000, 0x7F800001], np.uint32).view(np.float32)
  with jax.enable_x64(True):
    assert (np.asarray(_thresholds.magnitude_keys(jnp.asarray(nan), wide=True))
            > reference.magnitude_keys(np.float64(np.inf), wide=True)).all()


def _cut_reference(x, k):
  """Prunes the k smallest keys of one leaf, ties by flat index."""
  keep = np.ones(np.size(x), bool)
  keep[np.argsort(reference.magnitude_keys(x), kind="stable")[:k]] = False
  return keep.reshape(np.shape(x))


# One jitted kernel stage per method: equal shapes and leaf counts share a compile.
_JITTED_COUNTS = {
    method: jax.jit(functools.partial(_thresholds.keep_masks_for_counts, method=method))
    for method in METHODS
}


@settings(max_examples=20)
@given(data=st.data(), shape=st.sampled_from([(7,), (3, 4)]), n_leaves=st.integers(2, 3),
       dtype=st.sampled_from([np.float32, jnp.bfloat16]))
def test_alike_leaves_ranked_by_one_kernel_match_the_reference(data, shape, n_leaves, dtype):
  # Lone leaves of one shape and dtype go through one kernel instance (a loop
  # over them); each keeps its own count, ties, zeros and NaN as the reference.
  leaves = [np.asarray(jnp.asarray(data.draw(hnp.arrays(
      np.float32, shape, elements=_values))).astype(dtype)) for _ in range(n_leaves)]
  counts = [data.draw(st.integers(0, int(np.prod(shape)))) for _ in leaves]
  for method in METHODS:
    got = _JITTED_COUNTS[method]([[jnp.asarray(x)] for x in leaves],
                                 [np.uint32(k) for k in counts])
    for (g,), x, k in zip(got, leaves, counts):
      np.testing.assert_array_equal(g, _cut_reference(x, k), err_msg=method)


@pytest.mark.parametrize("method", METHODS)
def test_alike_leaves_compile_one_kernel_instance(method):
  # Twelve lone leaves of one shape compile to as many kernels as two do.
  def kernels(n):
    leaves = [[jax.ShapeDtypeStruct((16, 16), jnp.float32)] for _ in range(n)]
    counts = [jax.ShapeDtypeStruct((), jnp.uint32)] * n
    text = _JITTED_COUNTS[method].lower(leaves, counts).compile().as_text()
    return text.count(" sort("), text.count(" while("), text.count(" scatter(")
  assert kernels(12) == kernels(2)


@settings(max_examples=20)
@given(data=st.data(), shape=st.sampled_from([(7,), (3, 4)]), layers=st.integers(1, 4),
       dtype=st.sampled_from([np.float32, jnp.bfloat16]))
def test_layers_of_a_stack_each_match_the_reference(data, shape, layers, dtype):
  # A stack's layers (its leading axis) each lose their own count, ranked on
  # their own: ties by flat index within the layer, zeros first, NaN last.
  stacked = np.asarray(jnp.asarray(data.draw(hnp.arrays(
      np.float32, (layers,) + shape, elements=_values))).astype(dtype))
  counts = [data.draw(st.integers(0, int(np.prod(shape)))) for _ in range(layers)]
  for method in METHODS:
    (got,), = _JITTED_COUNTS[method]([[jnp.asarray(stacked)]],
                                     [np.asarray(counts, np.uint32)])
    for layer, (g, x, k) in enumerate(zip(np.asarray(got), stacked, counts)):
      np.testing.assert_array_equal(g, _cut_reference(x, k), err_msg=f"{method} {layer}")


@pytest.mark.parametrize("method", METHODS)
def test_a_stack_compiles_one_kernel_instance_whatever_its_layers(method):
  def kernels(layers):
    leaves = [[jax.ShapeDtypeStruct((layers, 16, 16), jnp.float32)]]
    counts = [jax.ShapeDtypeStruct((layers,), jnp.uint32)]
    text = _JITTED_COUNTS[method].lower(leaves, counts).compile().as_text()
    return text.count(" sort("), text.count(" while("), text.count(" scatter("), len(text)
  few, many = kernels(2), kernels(24)
  assert few[:3] == many[:3]
  assert many[3] <= 1.2 * few[3]  # No per-layer code.
