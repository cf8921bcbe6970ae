"""ERK and uniform distributions: exact totals, bounds, the ERK formula."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import optax_prune
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _plan
from tests import reference

_shapes = st.lists(
    st.sampled_from([(3, 3, 1, 8), (3, 3, 8, 16), (64, 10), (784, 300), (300, 100),
                     (100, 10), (5,), (1, 1), (0, 4), (4096, 4096)]),
    min_size=1, max_size=6)


@settings(max_examples=30)
@given(shapes=_shapes, sparsity=st.floats(0, 1, width=32))
def test_erk_counts_are_exact_bounded_and_follow_the_formula(shapes, sparsity):
  sizes = [int(np.prod(s)) for s in shapes]
  ratios = [_distributions.erk_ratio(s) for s in shapes]
  # Eager: every example has other static sizes, a jit would compile each.
  counts = np.array(_distributions.erk_prune_counts(sizes, ratios, np.float32(sparsity)),
                    np.int64)
  assert counts.sum() == reference.prune_count(sparsity, sum(sizes))  # Exact total.
  assert (counts >= 0).all() and (counts <= sizes).all()  # No leaf above 1.
  live = [i for i, n in enumerate(sizes) if n]
  density = reference.erk_densities([shapes[i] for i in live], float(np.float32(sparsity)))
  ideal = np.array(sizes, float)[live] * (1 - density)
  # Within float32 error of the ERK formula (plus the rounding of the counts,
  # and one unit per leaf that the formula would prune whole, kept instead).
  np.testing.assert_allclose(counts[live], ideal, atol=2 + len(live) + 2e-6 * sum(sizes))
  kept = sum(sizes) - counts.sum()
  if kept >= len(live):  # Enough kept units for one per leaf: no leaf pruned whole.
    assert (counts[live] < np.array(sizes)[live]).all(), (counts, sizes)


def test_erk_prunes_no_leaf_whole_below_sparsity_one():
  # A 1x1 leaf beside a large one: its ERK density rounds to no kept unit at
  # 0.999, yet it keeps its one weight; at 1.0 everything goes.
  shapes = [(1, 1), (3, 3), (512, 512)]
  sizes = [int(np.prod(s)) for s in shapes]
  ratios = [_distributions.erk_ratio(s) for s in shapes]
  density = reference.erk_densities(shapes, float(np.float32(0.9999)))
  assert round(density[0] * sizes[0]) == 0  # The formula alone would prune it whole.
  counts = [int(c) for c in _distributions.erk_prune_counts(sizes, ratios, np.float32(0.9999))]
  assert counts[0] == 0 and counts[1] < 9 and sum(counts) == reference.prune_count(0.9999, sum(sizes))
  counts = [int(c) for c in _distributions.erk_prune_counts(sizes, ratios, np.float32(1.0))]
  assert counts == sizes


def test_the_default_is_erk_for_one_target_and_uniform_for_per_leaf_ones():
  # ERK lost least in benchmarks.defaults (RESULTS section 13); per-leaf
  # targets, structured units and global scope keep their per-leaf meaning.
  def name(schedule, **kwargs):
    return _config.make_config(schedule, **kwargs).distribution.name
  assert name(0.9) == "erk"
  assert name(optax_prune.polynomial_schedule(0.9, begin_step=0, end_step=100, frequency=10)) == "erk"
  assert name(optax_prune.by_path({"Dense_0": None}, default=0.9)) == "erk"
  assert name(0.9, granularity=optax_prune.unstructured()) == "erk"
  assert name({"a": 0.9, "b": 0.5}) == "uniform"
  assert name(0.9, granularity=optax_prune.channels()) == "uniform"
  assert name(0.9, scope="global") == "uniform"
  assert name(0.9, distribution="uniform") == "uniform"
  # In the transformation: one schedule over the model prunes ERK counts.
  params = _model_params()
  tx = optax_prune.magnitude_pruning(0.9)
  masks = tx.update(params, tx.init(params), params)[1].masks
  kernels = list(params)
  shapes = [params[k]["kernel"].shape for k in kernels]
  sizes = [int(np.prod(s)) for s in shapes]
  want = _distributions.erk_prune_counts(
      sizes, [_distributions.erk_ratio(s) for s in shapes], np.float32(0.9))
  assert [int((~masks[k]["kernel"]).sum()) for k in kernels] == [int(c) for c in want]
  assert len({int((~masks[k]["kernel"]).sum()) / n for k, n in zip(kernels, sizes)}) > 1


def test_erk_keeps_small_layers_dense_and_prunes_large_ones_harder():
  shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1024, 128), (128, 10)]
  sizes = [int(np.prod(s)) for s in shapes]
  counts = [int(c) for c in _distributions.erk_prune_counts(
      sizes, [_distributions.erk_ratio(s) for s in shapes], np.float32(0.9))]
  expected = reference.erk_densities(shapes, float(np.float32(0.9)))
  assert expected[0] == expected[3] == 1.0 and counts[0] == counts[3] == 0
  assert counts[1] / sizes[1] > counts[2] / sizes[2] > 0.9  # Denser where fewer weights.


def test_erk_takes_its_rounding_remainder_from_leaves_that_are_not_dense():
  # At 0.64 the (3, 3) leaf is dense by the formula; the unit that rounding
  # leaves over goes to a sparse leaf, not to it (the first in order).
  shapes = [(3, 3), (8, 8), (20, 30)]
  sizes = [int(np.prod(s)) for s in shapes]
  counts = [int(c) for c in _distributions.erk_prune_counts(
      sizes, [_distributions.erk_ratio(s) for s in shapes], np.float32(0.64))]
  assert reference.erk_densities(shapes, float(np.float32(0.64)))[0] == 1.0
  assert counts[0] == 0 and sum(counts) == reference.prune_count(0.64, sum(sizes))


def test_uniform_counts_round_each_leaf():
  counts = _distributions.uniform_prune_counts([10, 7, 0], np.float32(0.25))
  assert [int(c) for c in counts] == [round(2.5), round(1.75), 0] == [2, 2, 0]


def _model_params():
  rng = np.random.default_rng(0)
  shapes = {"Dense_0": (64, 256), "Dense_1": (256, 256), "Dense_2": (256, 128),
            "Dense_3": (128, 10)}
  return {k: {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32),
              "bias": jnp.zeros(s[1])} for k, s in shapes.items()}


def test_erk_in_the_transformation_with_first_and_last_layers_kept_dense():
  params = _model_params()
  schedule = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=4, frequency=2)
  tx = optax.chain(optax.sgd(0.0), optax_prune.magnitude_pruning(
      optax_prune.by_path({r"\[.Dense_(0|3).\]": None}, default=schedule), distribution="erk"))
  state, traces = tx.init(params), []

  @jax.jit
  def step(params, state):
    traces.append(1)
    return tx.update(params, state, params)[1]

  for _ in range(5):
    state = step(params, state)
  assert len(traces) == 1  # The ramp runs in one compiled step.
  masks = optax_prune.find_pruning_state(state).masks
  assert isinstance(masks["Dense_0"]["kernel"], optax.MaskedNode)
  assert isinstance(masks["Dense_3"]["kernel"], optax.MaskedNode)
  middle = [masks[k]["kernel"] for k in ("Dense_1", "Dense_2")]
  total = sum(int(m.size) for m in middle)
  assert sum(int((~m).sum()) for m in middle) == reference.prune_count(0.8, total)
  shapes = [(256, 256), (256, 128)]
  density = reference.erk_densities(shapes, float(np.float32(0.8)))
  for m, d in zip(middle, density):
    assert abs(float(m.mean()) - d) < 1e-3
    # Within a leaf, the smallest magnitudes went: the magnitude ranking holds.
  for k in ("Dense_1", "Dense_2"):
    w, m = np.abs(np.asarray(params[k]["kernel"])), np.asarray(masks[k]["kernel"])
    assert w[~m].max() <= w[m].min()


def test_erk_needs_layer_scope():
  with pytest.raises(ValueError, match="`distribution='erk'`.*scope='layer'"):
    optax_prune.magnitude_pruning(0.5, distribution="erk", scope="global")
  with pytest.raises(ValueError, match="`distribution`"):
    optax_prune.magnitude_pruning(0.5, distribution="er")


def test_an_erk_total_past_int32_is_refused_at_init():
  # Each leaf fits int32, their shared ERK count does not; nothing is allocated.
  params = {"a": jax.ShapeDtypeStruct((50_000, 30_000), jnp.float32),
            "b": jax.ShapeDtypeStruct((50_000, 30_000), jnp.float32)}
  with pytest.raises(ValueError, match="`distribution='erk'`.*2\\*\\*31 - 1"):
    jax.eval_shape(optax_prune.magnitude_pruning(0.5, distribution="erk").init, params)
  jax.eval_shape(optax_prune.magnitude_pruning(0.5, distribution="uniform").init, params)
  # The default's ERK falls back to uniform for such a schedule instead.
  jax.eval_shape(optax_prune.magnitude_pruning(0.5).init, params)
  (schedule,) = _plan.make_plan(_config.make_config(0.5), params).schedules
  assert schedule.distribution == _distributions.Uniform()


@pytest.mark.parametrize(
    "n", [0, 1, 2, 3, 7, 1000, 2**24 - 1, 2**24 + 3, 123_456_789, 2**31 - 1]
)
@pytest.mark.parametrize(
    "sparsity", [0.0, 1e-9, 0.1234567, 0.3, 0.5, 0.75, 0.9, 0.99, 0.999999, 1.0]
)
def test_prune_count_is_exact_round_half_even(n, sparsity):
  expected = round(Fraction(float(np.float32(sparsity))) * n)
  assert int(_distributions.prune_count(np.float32(sparsity), n)) == expected


@given(
    n=st.integers(0, 2**31 - 1),
    sparsity=st.floats(0.0, 1.0, width=32, allow_subnormal=True),
)
def test_prune_count_property(n, sparsity):
  assert int(_distributions.prune_count(np.float32(sparsity), n)) == (
      reference.prune_count(sparsity, n)
  )


def test_prune_count_exact_halves():
  # s * n == j + 1/2 exactly: Python's round sends these to the even neighbour.
  for n in (1, 3, 5, 7, 9, 2**20 + 1):
    assert int(_distributions.prune_count(np.float32(0.5), n)) == round(n / 2)


@given(data=st.data())
def test_nested_counts_keep_the_total_and_never_fall_below_what_is_pruned(data):
  sizes = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=6))
  pruned = [data.draw(st.integers(0, n)) for n in sizes]
  total = data.draw(st.integers(sum(pruned), sum(sizes)))
  # Any split of `total` within the sizes, as ERK's rounding may give.
  counts, left = [], total
  for i, n in enumerate(sizes):
    rest = sum(sizes[i + 1:])
    c = data.draw(st.integers(max(0, left - rest), min(n, left)))
    counts.append(c)
    left -= c
  got = [int(c) for c in _distributions.nested_counts(counts, pruned)]
  assert sum(got) == total
  assert all(p <= g <= n for p, g, n in zip(pruned, got, sizes))
  assert got == counts or any(c < p for c, p in zip(counts, pruned))  # Moved only if needed.


def test_erk_counts_stay_nested_when_rounding_would_shrink_a_leaf():
  # Channels of three kernels: at 0.65625 ERK gives the first leaf 7 of 8
  # units and at 0.75 only 6; nesting keeps 7 and takes the unit elsewhere.
  sizes, shapes = [8, 16, 8], [(3, 3, 4, 8), (32, 16), (16, 8)]
  first, _ = _distributions.ERK().counts(sizes, shapes, np.float32(0.65625))
  raw, _ = _distributions.ERK().counts(sizes, shapes, np.float32(0.75))
  later, _ = _distributions.ERK().counts(sizes, shapes, np.float32(0.75), pruned=first)
  first, raw, later = ([int(c) for c in x] for x in (first, raw, later))
  assert raw[0] < first[0]  # The defect nesting repairs.
  assert all(b >= a for a, b in zip(first, later))
  assert sum(later) == sum(raw) == reference.prune_count(0.75, sum(sizes))


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_a_nan_sparsity_prunes_nothing_and_others_are_clipped(distribution):
  counts = lambda s: [int(c) for c in _distributions.resolve(distribution).counts(
      [10, 40], [(2, 5), (5, 8)], np.float32(s))[0]]
  assert counts(np.nan) == counts(-0.5) == [0, 0]
  assert counts(1.5) == [10, 40]


def test_nested_counts_also_hold_when_the_total_stays_the_same():
  # A re-update at the same total: the leaf that lost 4 keeps them.
  got = _distributions.nested_counts(jnp.asarray([3, 5]), jnp.asarray([4, 4]))
  assert [int(c) for c in got] == [4, 4]


@given(amount=st.integers(0, 300), room=st.lists(st.integers(0, 60), max_size=8))
def test_fill_in_order_takes_what_fits_leaf_by_leaf(amount, room):
  # The vector form of the sequential rule the counts are built with.
  expected, left = [], amount
  for r in room:
    expected.append(min(r, left))
    left -= expected[-1]
  got = _distributions.fill_in_order(jnp.int32(amount), jnp.asarray(room, jnp.int32))
  assert [int(g) for g in got] == expected
