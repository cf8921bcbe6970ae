"""Sensitivity analysis against a NumPy reference, and budget allocation properties."""

import warnings

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_prune
from optax_prune import _sensitivity
from tests import helpers
from tests import reference

SPARSITIES = (0.25, 0.5, 0.75)


def test_sensitivity_measures_each_leaf_alone_against_numpy():
  params = helpers.params()
  dense = jax.tree.map(np.asarray, params)
  # The loss increase is the energy of what was pruned: sum of squares of the
  # removed entries, computable from the reference masks.
  evaluate = lambda p: float(sum(jnp.sum((a - b) ** 2) for a, b in
                                 zip(jax.tree.leaves(p), jax.tree.leaves(dense))))
  report = optax_prune.sensitivity(params, evaluate, SPARSITIES)
  assert report.baseline == 0.0 and report.sparsities == SPARSITIES
  assert list(report.losses) == ["['conv']['kernel']", "['dense']['kernel']", "['out']['kernel']"]
  for name in ("conv", "dense", "out"):
    x = dense[name]["kernel"]
    path = f"['{name}']['kernel']"
    assert report.sizes[path] == x.size
    want = [float(np.sum(np.where(reference.keep_masks([x], s)[0], 0, x) ** 2))
            for s in SPARSITIES]
    np.testing.assert_allclose(report.losses[path], want, rtol=1e-5)
  assert "baseline 0" in str(report) and "75%" in str(report)


def test_sensitivity_rejects_bad_sparsities():
  params = helpers.params()
  with pytest.raises(ValueError, match="increasing"):
    optax_prune.sensitivity(params, lambda p: 0.0, [0.5, 0.2])
  with pytest.raises(ValueError, match="`sparsities` must be in \\[0, 1\\]"):
    optax_prune.sensitivity(params, lambda p: 0.0, [0.5, 1.5])


def _report(losses, sizes):
  return optax_prune.SensitivityReport(
      baseline=0.0, sparsities=SPARSITIES,
      losses={f"l{i}": tuple(l) for i, l in enumerate(losses)},
      sizes={f"l{i}": n for i, n in enumerate(sizes)})


def test_least_loss_takes_the_cheapest_entries_first():
  report = _report([(0.0, 0.01, 0.02), (1.0, 2.0, 4.0)], [300, 100])
  # By hand: l0 costs 0 per entry up to 0.25, then 0.02 / (0.5 * 300) per
  # entry up to 0.75; l1 costs 2 / (0.5 * 100) at the least. 200 entries:
  # 75 + 125 from l0, none from l1.
  chosen = optax_prune.sparsities_for_budget(report, 0.5)
  assert chosen == {"l0": pytest.approx(0.25 + 125 / 300, abs=1e-6), "l1": 0.0}


def test_curves_are_made_non_decreasing_and_results_rounded_down():
  # l0's measured loss dips back to 0: read as (0, 1, 1, 1), it is dearer
  # than l1, which therefore takes the whole budget.
  report = _report([(1.0, 0.0, 0.0), (0.1, 0.2, 0.3)], [100, 100])
  assert optax_prune.sparsities_for_budget(report, 0.375) == {"l0": 0.0, "l1": 0.75}
  # Rounded down to 1e-6, never past the budget.
  report = _report([(1.0, 2.0, 3.0)], [1000])
  assert optax_prune.sparsities_for_budget(report, 0.1234567) == {"l0": 0.123456}


def test_budget_prunes_insensitive_leaves_more_and_fits_params():
  report = _report([(0.0, 0.01, 0.02), (1.0, 2.0, 4.0)], [300, 100])
  chosen = optax_prune.sparsities_for_budget(report, 0.5, rule="equal_loss")
  # The least tolerance tau reaching 0.5, by hand: l0 = 0.5 + 25 (tau - 0.01)
  # on its second segment, l1 = 0.25 tau; 300 l0 + 100 l1 = 200.
  tau = 125 / 7525
  assert chosen["l0"] == pytest.approx(0.5 + 25 * (tau - 0.01), abs=1e-6)
  assert chosen["l1"] == pytest.approx(0.25 * tau, abs=1e-6)
  assert (300 * chosen["l0"] + 100 * chosen["l1"]) / 400 == pytest.approx(0.5, abs=1e-5)
  params = {"l0": jnp.ones((3, 100)), "l1": jnp.ones((1, 100)), "b": jnp.ones(3)}
  real = optax_prune.SensitivityReport(
      0.0, SPARSITIES, {"['l0']": report.losses["l0"], "['l1']": report.losses["l1"]},
      {"['l0']": 300, "['l1']": 100})
  tree = optax_prune.sparsities_for_budget(real, 0.5, params=params, rule="equal_loss")
  assert tree["b"] is None and tree["l0"] == chosen["l0"]
  # Usable as the sparsity of a one-shot prune.
  _, masks = optax_prune.prune(params, tree, where=lambda path, x: x.ndim == 2)
  assert int((~masks["l0"]).sum()) == reference.prune_count(tree["l0"], 300)
  with pytest.raises(ValueError, match="`target` must be a number in \\[0, 0.75\\]"):
    optax_prune.sparsities_for_budget(report, 0.9)


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(
    st.lists(st.tuples(st.lists(st.floats(-1, 10), min_size=3, max_size=3),
                       st.integers(1, 1000)), min_size=1, max_size=5),
    st.floats(0, 0.75))
def test_budget_meets_the_target_within_the_measured_range(leaves, target):
  report = _report([l for l, _ in leaves], [n for _, n in leaves])
  sizes = np.array([n for _, n in leaves], float)
  xs = np.array((0.0,) + SPARSITIES)
  curves = [np.maximum.accumulate(np.array((0.0,) + tuple(l))) for l, _ in leaves]

  def hull_loss(s):
    """Total loss on each curve's lower convex hull (NumPy interpolation)."""
    total = 0.0
    for x, ys in zip(s, curves):
      hull = _sensitivity.lower_hull(xs, ys)
      total += np.interp(x, xs[hull], ys[hull])
    return total

  losses = {}
  for rule in ("least_loss", "equal_loss"):
    chosen = optax_prune.sparsities_for_budget(report, target, rule=rule)
    s = np.array(list(chosen.values()))
    assert ((0 <= s) & (s <= 0.75)).all()
    assert s @ sizes / sizes.sum() == pytest.approx(target, abs=1e-5)
    losses[rule] = hull_loss(s)
  # The greedy is optimal on the hulls: no worse than the other rule or
  # uniform (up to the results' rounding down to 1e-6: slopes <= 44 per leaf).
  assert losses["least_loss"] <= losses["equal_loss"] + 1e-3
  assert losses["least_loss"] <= hull_loss(np.full(len(leaves), target)) + 1e-3


def test_a_tiny_target_takes_part_of_the_first_segment_only():
  # Found by hypothesis: a denormal target left a rounding remainder that
  # took a later segment of the same leaf whole.
  report = _report([(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)], [3, 1])
  for target in (5e-324, 1e-12, 0.0):
    chosen = optax_prune.sparsities_for_budget(report, target)
    assert chosen == {"l0": 0.0, "l1": 0.0}


def test_leaves_of_one_shape_share_one_compile():
  # A deep model's sweep compiles once per leaf shape, not once per leaf.
  rng = np.random.default_rng(5)
  params = {f"l{i}": jnp.asarray(rng.standard_normal((7, 9)), jnp.float32) for i in range(4)}
  before = _sensitivity._pruned_leaf._cache_size()
  report = optax_prune.sensitivity(params, lambda p: float(sum(jnp.sum(x**2) for x in p.values())),
                                   [0.5], where=lambda path, x: True, higher_is_better=False)
  assert _sensitivity._pruned_leaf._cache_size() == before + 1
  for path, (loss,) in report.losses.items():  # The 32 smallest squares of each leaf are gone.
    x = np.asarray(params[path[2:-2]], np.float64).reshape(-1)
    assert np.isclose(loss, -np.sort(x**2)[:reference.prune_count(0.5, 63)].sum(), rtol=1e-5)


def test_an_accuracy_is_read_with_higher_is_better_and_warned_about_without_it():
  params = helpers.params()
  # Higher is better: the energy kept, which pruning lowers.
  kept = lambda p: float(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)))
  with pytest.warns(UserWarning, match="higher_is_better=True"):
    as_loss = optax_prune.sensitivity(params, kept, [0.25, 0.5])
  report = optax_prune.sensitivity(params, kept, [0.25, 0.5], higher_is_better=True)
  for path, curve in report.losses.items():
    np.testing.assert_allclose(curve, [-x for x in as_loss.losses[path]])
    assert curve[1] > curve[0] > 0  # Larger is worse, as for a loss.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax_prune.sensitivity(params, kept, [0.25, 0.5], higher_is_better=False)
  with pytest.raises(ValueError, match="`higher_is_better` must be None, True or False"):
    optax_prune.sensitivity(params, kept, [0.5], higher_is_better="yes")
