"""Planning, grouping rules, the rule and granularity protocols, state layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_prune
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _plan
from optax_prune import _rules
from optax_prune import _scores
from optax_prune import _thresholds
from optax_prune import _transform
from tests import helpers
from tests import reference


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_plan_is_made_without_tracing_from_shapes_alone():
  schedule = optax_prune.log_schedule(0.9, 1, 3, steps_per_epoch=10)
  config = _config.make_config(
      {"conv": 0.5, "dense": schedule, "out": None}, scope="global")
  plan = _plan.make_plan(config, _abstract(helpers.params()))
  # Leaves in `jax.tree.leaves` order: conv bias, conv kernel, dense ..., out ...
  assert plan.pruned == (False, True, False, True, False, False)
  assert plan.pruned_indices == (1, 3)
  assert [s.schedule for s in plan.schedules] == [
      optax_prune.constant_schedule(0.5), schedule]
  (conv,), (dense,) = (s.groups for s in plan.schedules)
  assert [leaf.path for leaf in conv.leaves] == ["['conv']['kernel']"]
  assert conv.units == 3 * 3 * 4 * 8 and conv.method == "sort"  # auto, small.
  assert dense.units == 32 * 16 and dense.method == "sort"


def test_auto_sorts_small_whole_groups_and_searches_large_ones():
  config = _config.make_config(0.5, threshold="auto")
  method = lambda shape: _plan.make_plan(
      config, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}).schedules[0].groups[0].method
  assert jax.default_backend() == "cpu"  # The policy below is the CPU's.
  assert method((32, 32)) == "sort"  # 1024 entries.
  assert method((32, 33)) == "bisect"
  assert method((256, 128)) == "histogram"  # 2**15 entries.


@pytest.mark.parametrize("backend, size, whole, expected", [
    ("cpu", 1024, True, "sort"), ("cpu", 1025, True, "bisect"),
    ("cpu", 10, False, "bisect"),  # A sort would gather a split leaf.
    ("cpu", 2**15 - 1, True, "bisect"), ("cpu", 2**15, False, "histogram"),
    ("gpu", 2**26, True, "sort"), ("gpu", 2**26 + 1, True, "histogram"),
    ("gpu", 10, False, "histogram"), ("tpu", 10**6, True, "sort"),
])
def test_auto_policy_by_backend(backend, size, whole, expected):
  assert _thresholds.choose_method("auto", size, whole, backend) == expected
  assert _thresholds.choose_method("bisect", size, whole, backend) == "bisect"


def test_the_checks_read_the_smallest_nonempty_pruned_leaf():
  # `pruned_nonzero` and `zero_update_steps` read one leaf: the smallest that
  # has entries (an empty one would hide every mistake), ties by position.
  tree = {"a": (0, 5), "b": (8, 8), "c": (4, 4), "d": (2, 8), "e": (3,)}
  params = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in tree.items()}
  plan = _plan.make_plan(_config.make_config(0.5), params)
  assert plan.pruned == (True, True, True, True, False)
  assert plan.sentinel == 2  # "c": 16 entries, before "d".


def test_a_leaf_that_is_not_floating_cannot_be_chosen():
  params = {"w": jax.ShapeDtypeStruct((4, 4), jnp.int32)}
  with pytest.raises(ValueError, match=r"leaf \['w'\] of dtype int32, but only floating"):
    _plan.make_plan(_config.make_config(0.5, where=lambda path, leaf: True), params)


def test_layer_axis_is_checked_and_global_scope_ranks_a_stack_with_the_others():
  params = {"stack": jax.ShapeDtypeStruct((3, 4, 4), jnp.float32),
            "w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  axis = lambda a: optax_prune.by_path({"stack": a}, default=None)
  with pytest.raises(ValueError, match=r"`layer_axis=3` does not fit leaf \['stack'\]"):
    _plan.make_plan(_config.make_config(0.5, layer_axis=axis(3)), params)
  plan = _plan.make_plan(_config.make_config(0.5, layer_axis=axis(0)), params)
  assert [(g.by_layer, g.rows) for g in plan.schedules[0].groups] == [(True, 3), (False, 1)]
  plan = _plan.make_plan(_config.make_config(0.5, scope="global", layer_axis=axis(0)), params)
  (group,) = plan.schedules[0].groups
  assert (group.by_layer, group.rows, group.units) == (False, 1, 3 * 16 + 16)


def test_empty_leaves_hold_no_units_and_groups_up_to_int32_are_planned():
  # An empty leaf has no units whatever its granularity (a (0, 5) leaf has 5
  # empty channels): it takes no share of a budget.
  params = {"a": jax.ShapeDtypeStruct((0, 5), jnp.float32),
            "b": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  config = _config.make_config(0.5, granularity=optax_prune.channels(axis=-1),
                               scope="global")
  groups = _plan.make_plan(config, params).schedules[0].groups
  assert [[leaf.units for leaf in g.leaves] for g in groups] == [[0], [4]]
  # Exactly 2**31 - 1 units fit a group; one more is refused.
  config = _config.make_config(0.5, distribution="uniform")
  big = lambda n: {"w": jax.ShapeDtypeStruct((1, n), jnp.float32)}
  (group,) = _plan.make_plan(config, big(2**31 - 1)).schedules[0].groups
  assert group.units == 2**31 - 1
  with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1"):
    _plan.make_plan(config, big(2**31))


def test_equal_numbers_share_one_global_ranking():
  # Two equal values, as read from a JSON config, are one schedule: the two
  # leaves are ranked together, so the small leaf loses everything.
  params = {"a": jnp.full((4, 4), 0.1), "b": jnp.full((4, 4), 5.0)}
  tx = optax_prune.magnitude_pruning({"a": 0.5, "b": 0.5}, scope="global")
  masks = tx.update(params, tx.init(params), params)[1].masks
  assert not np.asarray(masks["a"]).any() and np.asarray(masks["b"]).all()
  # Different values stay separate schedules: each leaf loses half.
  tx = optax_prune.magnitude_pruning({"a": 0.5, "b": 0.50001}, scope="global")
  masks = tx.update(params, tx.init(params), params)[1].masks
  assert np.asarray(masks["a"]).sum() == 8 and np.asarray(masks["b"]).sum() == 8


def test_equal_schedules_built_twice_share_one_erk_budget():
  params = helpers.params()
  build = lambda: optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=0, frequency=1)
  assert build() == build() and hash(build()) == hash(build())
  spec = {"conv": build(), "dense": build(), "out": build()}
  tx = optax_prune.magnitude_pruning(spec, distribution="erk")
  masks = tx.update(params, tx.init(params), params)[1].masks
  pruned = [int((~np.asarray(masks[k]["kernel"])).sum()) for k in ("conv", "dense", "out")]
  sizes = [params[k]["kernel"].size for k in ("conv", "dense", "out")]
  assert sum(pruned) == reference.prune_count(0.8, sum(sizes))
  # ERK over the three, not uniform per leaf: each leaf near its ERK share
  # (the out kernel keeps 39%, not 20%).
  shapes = [params[k]["kernel"].shape for k in ("conv", "dense", "out")]
  densities = reference.erk_densities(shapes, 0.8)
  assert all(abs(p - n * (1 - d)) < 2 for p, n, d in zip(pruned, sizes, densities))
  # A function of your own is equal only to itself: three budgets, uniform.
  own = lambda step: build()(step)
  other = lambda step: build()(step)
  tx = optax_prune.magnitude_pruning({"conv": own, "dense": other, "out": None},
                                     distribution="erk")
  masks = tx.update(params, tx.init(params), params)[1].masks
  for k in ("conv", "dense"):
    n = params[k]["kernel"].size
    assert (~np.asarray(masks[k]["kernel"])).sum() == reference.prune_count(0.8, n)


def _random_rule(plan, sparsity, inputs):
  """Static sparse training: a fresh random mask of the exact size at every
  update, ignoring the old one (so it revives weights, on purpose)."""
  masks = []
  counts, shares = _distributions.Uniform().counts(
      [leaf.units for leaf in plan.leaves], [], sparsity)
  for leaf, count in zip(plan.leaves, counts):
    scores = jax.random.uniform(_scores.leaf_key(inputs.key, leaf.index), leaf.shape)
    masks.append(_thresholds.keep_masks_for_counts([[scores]], [count], "sort")[0][0])
  return _rules.MaskUpdate(masks, shares, [c.astype(jnp.int32) for c in counts])


def test_a_new_rule_plugs_in_without_touching_the_transformation():
  every_step = lambda step: optax_prune.PruningTarget(jnp.float32(0.5), jnp.bool_(True))
  config = _config.make_config(every_step, seed=3)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), _transform.masking(config, _random_rule))
  revived = False
  for t, before, state, after in helpers.train(tx, helpers.params(), 4):
    masks = optax_prune.find_pruning_state(state).masks
    for k in ("conv", "dense", "out"):
      mask = np.asarray(masks[k]["kernel"])
      # The rule's own draw, recomputed outside the library.
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), t), 2 * ["conv", "dense", "out"].index(k) + 1)
      scores = np.asarray(jax.random.uniform(key, mask.shape)).reshape(-1)
      expected = np.ones(mask.size, bool)
      expected[np.argsort(scores, kind="stable")[:reference.prune_count(0.5, mask.size)]] = False
      np.testing.assert_array_equal(mask.reshape(-1), expected)
      assert (np.asarray(after[k]["kernel"])[~mask] == 0).all()
      revived |= bool((np.asarray(before[k]["kernel"]) == 0)[mask].any())
  assert revived  # Regrowth is possible through a rule; gradual pruning never does it.


@dataclasses.dataclass(frozen=True)
class _Rows:
  """A granularity of the test's own: whole rows (axis 0) by their max |score|."""

  needs_whole_leaf = True

  def check(self, path, shape):
    if len(shape) != 2:
      raise ValueError(f"_Rows needs a 2-D leaf; {path} has shape {shape}")

  def unit_scores(self, scores):
    return jnp.max(jnp.abs(scores), axis=1)

  def expand(self, unit_keep, scores):
    return jnp.broadcast_to(unit_keep[:, None], scores.shape)


def test_a_granularity_of_your_own():
  assert isinstance(_Rows(), optax_prune.Granularity)
  x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
  tx = optax_prune.magnitude_pruning(0.3, granularity=_Rows())
  mask = np.asarray(tx.update({"w": x}, tx.init({"w": x}), {"w": x})[1].masks["w"])
  order = np.argsort(np.abs(x).max(1), kind="stable")
  np.testing.assert_array_equal(mask.all(1), ~np.isin(np.arange(10), order[:3]))
  assert (mask.all(1) | ~mask.any(1)).all()  # Whole rows.
  with pytest.raises(ValueError, match="_Rows needs a 2-D leaf"):
    tx.init({"w": jnp.ones((2, 2, 2))})


def test_tree_map_params_gives_masks_their_params_specs():
  tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5))
  p = helpers.params()
  state = tx.init(p)
  specs = jax.tree.map(lambda x: P(*([None] * (x.ndim - 1) + ["model"])), p)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  pruning = optax_prune.find_pruning_state(mapped)
  assert pruning.masks["dense"]["kernel"] == specs["dense"]["kernel"]
  assert pruning.target_sparsity == P() and pruning.count == P()  # Not params.


def test_a_float_cast_of_the_state_changes_no_mask():
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(0.5))
  step = helpers.make_step(tx)
  p, state = step(helpers.params(), tx.init(helpers.params()))
  cast = optax.tree_utils.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert optax_prune.find_pruning_state(cast).masks["dense"]["kernel"].dtype == jnp.bfloat16
  _, from_cast = step(p, cast)
  _, from_bool = step(p, state)
  jax.tree.map(np.testing.assert_array_equal,
               optax_prune.find_pruning_state(from_cast).masks,
               optax_prune.find_pruning_state(from_bool).masks)


@dataclasses.dataclass(frozen=True)
class _FloatMask(_Rows):
  """A faulty granularity: `expand` returns floats."""

  def expand(self, unit_keep, scores):
    return super().expand(unit_keep, scores).astype(jnp.float32)


class _Unhashable(_Rows):
  """A granularity that is not hashable (a mutable one)."""

  __hash__ = None


def test_a_faulty_granularity_of_your_own_is_refused_at_init():
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="`expand` must return a bool mask of the leaf's shape"):
    optax_prune.magnitude_pruning(0.5, granularity=_FloatMask()).init(params)
  with pytest.raises(ValueError, match="must be hashable"):
    optax_prune.magnitude_pruning(0.5, granularity=_Unhashable())


def test_tree_map_params_works_with_prefix_settings_and_a_whole_cast_state():
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
  tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(
      {"a": 0.5, "b": None}, where={"a": True, "b": False}))
  state = tx.init(params)
  cast = optax.tree_utils.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert optax_prune.find_pruning_state(cast).masks["a"].dtype == jnp.bfloat16
  # Every floating leaf cast, counters and targets included: the update still runs.
  everything = jax.tree.map(
      lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  _, new = jax.jit(tx.update)(params, everything, params)
  assert int((~optax_prune.find_pruning_state(new).masks["a"]).sum()) == 8
