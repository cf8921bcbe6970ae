"""The pruning transformation: exact zeros in every dtype, per-leaf schedules,
scopes, state checks and errors (the shared contract is tests/test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from tests import helpers
from tests import reference


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  params = {
      "conv1": {"kernel": rng.standard_normal((3, 3, 1, 8)), "bias": rng.standard_normal(8)},
      "conv2": {"kernel": rng.standard_normal((3, 3, 8, 16)), "bias": rng.standard_normal(16)},
      "dense": {"kernel": rng.standard_normal((64, 10)), "bias": rng.standard_normal(10)},
  }
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


_train = helpers.train


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
def test_dtypes_keep_exact_zeros(dtype):
  with jax.enable_x64(dtype == jnp.float64):  # float64 needs jax_enable_x64.
    _check_exact_zeros(dtype)


def _check_exact_zeros(dtype):
  tx = optax.chain(optax.adam(0.05), optax_prune.magnitude_pruning(0.75, distribution="uniform"))
  for t, before, state, after in _train(tx, _params(dtype=dtype), 30):
    masks = optax_prune.find_pruning_state(state).masks
    for k in after:
      assert after[k]["kernel"].dtype == dtype
      x = np.asarray(before[k]["kernel"])  # The reference ranks float64 as float64.
      if t == 0:
        np.testing.assert_array_equal(np.asarray(masks[k]["kernel"]), reference.keep_masks([x], 0.75)[0])
      assert np.all(np.asarray(after[k]["kernel"])[~np.asarray(masks[k]["kernel"])] == 0)


@pytest.mark.usefixtures("strict_promotion")
def test_masks_apply_on_the_step_they_are_computed():
  params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3)}
  tx = optax_prune.magnitude_pruning(0.5)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], [[0, 0, 0], [4, 5, 6]])
  assert int(state.count) == 1 and state.target_sparsity.tolist() == [0.5]


def test_per_leaf_schedules_as_in_the_original_example():
  # First conv block to 0.6, other conv blocks to 0.85, output layer unpruned.
  params = _params()
  tx = optax_prune.magnitude_pruning(
      {"conv1": 0.6, "conv2": optax_prune.constant_schedule(0.85), "dense": None})
  _, state = tx.update(params, tx.init(params), params)
  for name, sparsity in [("conv1", 0.6), ("conv2", 0.85)]:
    x = np.asarray(params[name]["kernel"])
    np.testing.assert_array_equal(state.masks[name]["kernel"], reference.keep_masks([x], sparsity)[0])
  assert isinstance(state.masks["dense"]["kernel"], optax.MaskedNode)


def test_global_scope_groups_leaves_by_schedule():
  params = _params()
  shared = optax_prune.constant_schedule(0.7)
  tx = optax_prune.magnitude_pruning(
      {"conv1": shared, "conv2": shared, "dense": 0.5}, scope="global")
  _, state = tx.update(params, tx.init(params), params)
  convs = [np.asarray(params[k]["kernel"]) for k in ("conv1", "conv2")]
  for k, e in zip(("conv1", "conv2"), reference.keep_masks(convs, 0.7)):
    np.testing.assert_array_equal(state.masks[k]["kernel"], e)
  np.testing.assert_array_equal(state.masks["dense"]["kernel"],
                                reference.keep_masks([np.asarray(params["dense"]["kernel"])], 0.5)[0])


def test_where_predicate_and_bool_tree():
  params = _params()
  by_path = optax_prune.magnitude_pruning(
      0.5, where=lambda path, leaf: "dense" in jax.tree_util.keystr(path))
  masks = by_path.init(params).masks
  assert not isinstance(masks["dense"]["kernel"], optax.MaskedNode)
  assert not isinstance(masks["dense"]["bias"], optax.MaskedNode)
  assert isinstance(masks["conv1"]["kernel"], optax.MaskedNode)
  by_tree = optax_prune.magnitude_pruning(
      0.5, where={"conv1": True, "conv2": {"kernel": True, "bias": False}, "dense": False})
  masks = by_tree.init(params).masks
  assert masks["conv1"]["bias"].shape == (8,)
  assert isinstance(masks["conv2"]["bias"], optax.MaskedNode)


def test_sparsity_one_and_099():
  params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((100, 10)), jnp.float32)}
  for s in (0.99, 1.0):
    tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(s))
    updates, state = tx.update(params, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert int((np.asarray(new["w"]) == 0).sum()) == round(s * 1000)


def test_find_pruning_state_finds_one_and_refuses_none_or_two():
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="exactly one.*found 0"):
    optax_prune.find_pruning_state(optax.adam(1e-3).init(params))
  one = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5, seed=1))
  assert optax_prune.find_pruning_state(one.init(params)).masks["w"].shape == (2, 2)
  two = optax.chain(optax_prune.magnitude_pruning(0.5), optax_prune.magnitude_pruning(0.25))
  with pytest.raises(ValueError, match=r"exactly one.*found 2\. Two pruning links .* one"
                     r" link with a pytree of schedules"):
    optax_prune.find_pruning_state(two.init(params))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scope="local"), "scope"),
    (dict(threshold="quick"), "threshold"),
    (dict(where=[1, 2]), "where"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_prune.magnitude_pruning(0.5, **kwargs)


@pytest.mark.parametrize("schedule,match", [
    ("cubic", "schedule"),
    (1.5, "schedule"),
    (lambda step: step * 0.1, "pair"),
    (lambda step: (0.5, 1), "could not|pair"),
    ({"a": 2.0}, r"schedule"),
])
def test_bad_schedules_raise_at_construction(schedule, match):
  with pytest.raises(ValueError, match=match):
    optax_prune.magnitude_pruning(schedule)


def test_update_without_params_is_a_clear_error():
  params = {"w": jnp.ones((2, 2))}
  tx = optax.chain(optax.sgd(0.1), optax_prune.magnitude_pruning(0.5))
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs them"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="needs them"):
    jax.jit(lambda u, s: tx.update(u, s))(params, state)


def test_params_of_another_structure_are_a_clear_error():
  tx = optax_prune.magnitude_pruning(0.5)
  state = tx.init({"w": jnp.ones((2, 2))})
  other = {"w": jnp.ones((2, 2)), "v": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update(other, state, other)
  bias_only = {"w": jnp.ones(4)}  # Same tree, but the leaf is no longer pruned.
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update(bias_only, state, bias_only)


def test_mismatched_where_and_non_float_leaves_are_clear_errors():
  params = {"w": jnp.ones((2, 2)), "i": jnp.ones((2, 2), jnp.int32)}
  with pytest.raises(ValueError, match="where"):
    optax_prune.magnitude_pruning(0.5, where={"x": True}).init(params)
  with pytest.raises(ValueError, match="only floating leaves"):
    optax_prune.magnitude_pruning(0.5, where=lambda p, x: True).init(params)
  # The default skips integer leaves.
  assert isinstance(optax_prune.magnitude_pruning(0.5).init(params).masks["i"], optax.MaskedNode)


def test_masks_stay_fixed_between_updates():
  # A constant schedule updates once: later steps never recompute masks,
  # so a weight driven to tiny magnitude after step 0 is not pruned.
  params = {"w": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
  tx = optax_prune.magnitude_pruning(0.25)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  params = {"w": jnp.asarray([[0.0, 2.0], [3.0, 1e-6]])}
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_array_equal(state.masks["w"], [[False, True], [True, True]])


def test_a_leaf_that_changes_shape_is_a_clear_error():
  tx = optax_prune.magnitude_pruning(0.5)
  state = tx.init({"w": jnp.ones((8, 8))})
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update({"w": jnp.ones((4, 4))}, state, {"w": jnp.ones((4, 4))})


# Mask updates at steps 0, 2 and 4.
_EVERY_OTHER = optax_prune.polynomial_schedule(0.75, begin_step=0, end_step=4, frequency=2)


def _run(tx, flags):
  step = helpers.make_step(tx)
  p, state = _params(), tx.init(_params())
  for flag in flags:
    p, state = step(p, state, update_masks=flag)
  return p, state


def test_update_masks_static_steps_equal_the_in_step_condition():
  tx = optax.chain(optax.adam(0.05), optax_prune.magnitude_pruning(_EVERY_OTHER))
  due = set(optax_prune.mask_update_steps(_EVERY_OTHER, 7).tolist())
  assert due == {0, 2, 4}
  in_step = _run(tx, [None] * 7)
  for flags in ([t in due for t in range(7)], [True] * 7):
    # `True` at a step that is not due computes masks and keeps the old ones.
    jax.tree.map(np.testing.assert_array_equal, _run(tx, flags), in_step)
  assert int(optax_prune.find_pruning_state(in_step[1]).skipped_mask_updates) == 0


def test_update_masks_false_at_due_steps_is_counted_and_shown():
  tx = optax.chain(optax.sgd(0.1), optax_prune.magnitude_pruning(_EVERY_OTHER))
  p, state = _run(tx, [False] * 5)
  pstate = optax_prune.find_pruning_state(state)
  assert int(pstate.skipped_mask_updates) == 3  # Steps 0, 2, 4.
  assert all(np.asarray(m).all() for m in jax.tree.leaves(pstate.masks))  # Never updated.
  assert int(optax_prune.pruning_metrics(state)["pruning/skipped_mask_updates"]) == 3
  summary = optax_prune.sparsity_summary(p, state)
  assert summary.skipped_mask_updates == 3
  assert "3 steps at which the pruning schedule was due" in str(summary)


def test_zero_update_steps_count_all_zero_updates_not_ones_that_cancel():
  params = {"w": jnp.ones((2, 2))}
  tx = optax_prune.magnitude_pruning(0.5)
  state = tx.init(params)
  for updates in ([[1.0, -1.0], [2.0, -2.0]], [[0.0, 0.0], [-0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]]):
    _, state = tx.update({"w": jnp.asarray(updates)}, state, params)
  assert int(state.zero_update_steps) == 1


def test_pruned_nonzero_counts_pruned_entries_left_nonzero_by_a_later_link():
  # The updates are not applied (as if a link after the pruning moved the
  # weights back): the one pruned entry is still 1.0 at the next step.
  params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  tx = optax_prune.magnitude_pruning(0.25)
  update = jax.jit(tx.update)
  _, state = update(params, tx.init(params), params)
  assert int(state.pruned_nonzero) == 0  # All kept before the first step.
  _, state = update(params, state, params)
  assert int(state.pruned_nonzero) == 1


def test_init_warns_when_a_shared_budget_leaves_a_leaf_without_a_unit():
  # ERK over three leaves of 4 units: at 0.75, 3 units are kept, one per
  # leaf; at 0.8 (round(9.6) = 10 pruned) only 2: one leaf goes whole.
  params = {k: jnp.ones((2, 2)) for k in "abc"}
  optax_prune.magnitude_pruning(0.75, distribution="erk").init(params)  # No warning.
  with pytest.warns(UserWarning, match=r"^1 pruned leaves .* 1 of \['a'\], \['b'\], \['c'\]"
                    r" \(at 0.8, 2 units kept"):
    optax_prune.magnitude_pruning(0.8, distribution="erk").init(params)


def test_a_step_without_mask_update_compiles_no_conditional():
  # No conditional: nothing for a GPU to read on the host on those steps.
  tx = optax.chain(optax.adam(0.05), optax_prune.magnitude_pruning(_EVERY_OTHER))
  p = _params()
  step = jax.jit(lambda p, s, flag: tx.update(p, s, p, update_masks=flag),
                 static_argnums=2)
  hlo = lambda flag: step.lower(p, tx.init(p), flag).compile().as_text()
  assert " conditional(" in hlo(None)
  assert " conditional(" not in hlo(False)


@pytest.mark.parametrize("flag", [jnp.array(True), np.array([True]), "yes", 1])
def test_update_masks_must_be_a_python_bool(flag):
  tx = optax_prune.magnitude_pruning(0.5)
  p = _params()
  with pytest.raises(ValueError, match="`update_masks` must be None .* True or False"):
    tx.update(p, tx.init(p), p, update_masks=flag)


def _compiled_step_text(leaves: int, **kwargs) -> str:
  """The optimized HLO of an adam + pruning update over `leaves` 8x8 kernels."""
  params = {f"layer_{i:03d}": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
            for i in range(leaves)}
  schedule = optax_prune.polynomial_schedule(0.9, begin_step=0, end_step=100, frequency=10)
  tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(schedule, **kwargs))
  step = jax.jit(lambda p, s: tx.update(p, s, p))
  return step.lower(params, tx.init(params)).compile().as_text()


@pytest.mark.parametrize("kwargs", [{}, {"distribution": "uniform", "threshold": "bisect"}])
def test_compiled_step_grows_linearly_and_ranks_alike_leaves_by_one_kernel(kwargs):
  # Deep models: the count arithmetic once on vectors (it was copied into every
  # leaf's fusions: quadratic growth), one kernel instance for leaves of one shape.
  small, double, deep = (_compiled_step_text(n, **kwargs) for n in (8, 16, 40))
  assert len(double) <= 2.1 * len(small)
  for op in (" sort(", " while(", " scatter("):
    assert deep.count(op) == small.count(op), op


# Scanned layer stacks (`layer_axis`): each layer pruned as a leaf of its own.

_LAYERS = 3


def _stack_and_layers(dtype=jnp.float32, axis=0):
  """A scanned model's params (a stack of 3 layers along ``axis`` and a plain
  leaf before it) and the unscanned model with the same weights, its layers
  named in slice order. Ties: one layer all zeros, another on a grid; a NaN."""
  rng = np.random.default_rng(3)
  layers = rng.standard_normal((_LAYERS, 8, 12)).astype(np.float32)
  layers[0] = 0.0
  layers[1] = np.round(layers[1])
  layers[2, 0, 0] = np.nan
  first = rng.standard_normal((12, 8)).astype(np.float32)
  scanned = {"a": {"kernel": first}, "stack": {"kernel": np.moveaxis(layers, 0, axis)}}
  unscanned = {"a": {"kernel": first}} | {f"stack_{j}": {"kernel": x}
                                          for j, x in enumerate(layers)}
  as_dtype = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  return as_dtype(scanned), as_dtype(unscanned)


def _layer_masks(masks, axis=0):
  return [np.asarray(masks["a"]["kernel"])] + list(np.moveaxis(
      np.asarray(masks["stack"]["kernel"]), axis, 0))


def _unscanned_masks(masks):
  return [np.asarray(masks["a"]["kernel"])] + [
      np.asarray(masks[f"stack_{j}"]["kernel"]) for j in range(_LAYERS)]


_SCHEDULE = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=2, frequency=1)
_STACK_RULES = {
    "erk": lambda **kw: optax_prune.magnitude_pruning(_SCHEDULE, **kw),
    "uniform-bisect": lambda **kw: optax_prune.magnitude_pruning(
        _SCHEDULE, distribution="uniform", threshold="bisect", **kw),
    "global-histogram": lambda **kw: optax_prune.magnitude_pruning(
        _SCHEDULE, scope="global", threshold="histogram", **kw),
    "n_of_m": lambda **kw: optax_prune.magnitude_pruning(
        0.5, granularity=optax_prune.n_of_m(2, 4, axis=0), **kw),
    "channels": lambda **kw: optax_prune.magnitude_pruning(
        _SCHEDULE, granularity=optax_prune.channels(axis=-1), **kw),
    "blocks": lambda **kw: optax_prune.magnitude_pruning(
        0.5, granularity=optax_prune.blocks((2, 4)), scope="global", **kw),
    "straight_through": lambda **kw: optax_prune.straight_through(_SCHEDULE, **kw),
}


@pytest.mark.parametrize("rule", list(_STACK_RULES))
def test_a_scanned_stack_gets_the_masks_of_its_unscanned_layers(rule):
  scanned, unscanned = _stack_and_layers()
  out = []
  for params, kwargs in ((scanned, {"layer_axis": {"a": None, "stack": 0}}), (unscanned, {})):
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), _STACK_RULES[rule](**kwargs))
    runs = list(helpers.train(tx, params, 3))
    out.append([optax_prune.unpack_masks(optax_prune.find_pruning_state(s).masks, p)
                for _, _, s, p in runs])
  for step, (got, want) in enumerate(zip(*out)):
    for g, w in zip(_layer_masks(got), _unscanned_masks(want)):
      np.testing.assert_array_equal(g, w, err_msg=f"step {step}")
  assert not _layer_masks(out[0][-1])[1].all()


@pytest.mark.parametrize("dtype,axis", [(jnp.float32, 2), (jnp.bfloat16, 0)])
def test_each_layer_of_a_stack_loses_round_s_n_as_the_reference_ranks_it(dtype, axis):
  scanned, _ = _stack_and_layers(dtype, axis)
  sparsity = 0.7
  tx = optax_prune.magnitude_pruning(sparsity, distribution="uniform", layer_axis=by_stack(axis))
  state = tx.init(scanned)
  _, state = jax.jit(tx.update)(scanned, state, scanned)
  masks = _layer_masks(state.masks, axis)
  layers = [np.asarray(scanned["a"]["kernel"], np.float32)] + list(
      np.moveaxis(np.asarray(scanned["stack"]["kernel"], np.float32), axis, 0))
  for got, x in zip(masks, layers):
    np.testing.assert_array_equal(got, reference.keep_masks([x], sparsity)[0])
  # One entry per layer in `pruned_units`; one target per leaf.
  np.testing.assert_array_equal(
      state.pruned_units, [reference.prune_count(sparsity, 96)] * (1 + _LAYERS))
  np.testing.assert_array_equal(state.target_sparsity, np.float32([sparsity] * 2))


def by_stack(axis):
  return optax_prune.by_path({"stack": axis}, default=None)


def test_rigl_drops_and_grows_within_each_layer_of_a_stack():
  scanned, _ = _stack_and_layers()
  scanned = jax.tree.map(lambda x: jnp.nan_to_num(x) + 0.01, scanned)
  tx = optax_prune.rigl(optax.sgd(0.1), 0.75, end_step=4, frequency=1,
                        distribution="uniform", layer_axis=by_stack(0))
  state = tx.init(scanned)
  step = jax.jit(lambda p, s: tx.update(jax.grad(helpers.loss)(p), s, p))
  masks = [_layer_masks(state.masks.masks)]
  for _ in range(3):
    updates, state = step(scanned, state)
    scanned = optax.apply_updates(scanned, updates)
    masks.append(_layer_masks(state.masks.masks))
  for before, after in zip(masks, masks[1:]):
    for b, a in zip(before, after):
      assert int((~a).sum()) == reference.prune_count(0.75, 96)  # Exact per layer.
  assert any(not np.array_equal(b, a) for b, a in zip(masks[0], masks[-1]))
  np.testing.assert_array_equal(state.masks.pruned_units, [72] * (1 + _LAYERS))


def test_a_state_of_another_layer_axis_and_a_bad_axis_are_clear_errors():
  scanned, _ = _stack_and_layers()
  state = optax_prune.magnitude_pruning(0.5).init(scanned)
  tx = optax_prune.magnitude_pruning(0.5, layer_axis=by_stack(0))
  with pytest.raises(ValueError, match="another `layer_axis`"):
    tx.update(scanned, state, scanned)
  with pytest.raises(ValueError, match=r"`layer_axis=3` does not fit leaf \['stack'\]"):
    optax_prune.magnitude_pruning(0.5, layer_axis=by_stack(3)).init(scanned)
  with pytest.raises(ValueError, match="`layer_axis=0` does not fit leaf"):
    optax_prune.magnitude_pruning(0.5, where=lambda p, x: True, layer_axis=0).init(
        {"b": jnp.ones(4)})
  with pytest.raises(ValueError, match="`layer_axis` must be None, an int"):
    optax_prune.magnitude_pruning(0.5, layer_axis=0.5)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = jnp.ones((3, 5))
  groups = optax_prune.channel_groups(
      lambda p, x: model.apply({"params": p}, x),
      model.init(jax.random.key(0), x)["params"], x)
  with pytest.raises(ValueError, match="`layer_axis` cannot be combined with `coupled_channels`"):
    optax_prune.magnitude_pruning(
        0.5, granularity=optax_prune.coupled_channels(groups), layer_axis=0)
  with pytest.raises(ValueError, match=r"n_of_m.*\['stack'\]\['kernel'\] \(a layer of it\)"):
    optax_prune.magnitude_pruning(0.5, granularity=optax_prune.n_of_m(2, 8, axis=1),
                                  layer_axis=by_stack(0)).init(scanned)


def test_one_shot_prune_and_sensitivity_take_a_stack_per_layer():
  scanned, unscanned = _stack_and_layers()
  for compare in ("leaf", "output"):
    _, masks = optax_prune.prune(scanned, 0.6, compare=compare, layer_axis=by_stack(0))
    _, want = optax_prune.prune(unscanned, 0.6, compare=compare)
    for g, w in zip(_layer_masks(masks), _unscanned_masks(want)):
      np.testing.assert_array_equal(g, w, err_msg=compare)
  # One curve for the stack: all its layers pruned, each by round(s * n).
  seen = []
  report = optax_prune.sensitivity(
      scanned, lambda p: seen.append(p) or 0.0, [0.5], layer_axis=by_stack(0))
  assert list(report.losses) == ["['a']['kernel']", "['stack']['kernel']"]
  stack = np.asarray(seen[-1]["stack"]["kernel"])
  assert [int((layer == 0).sum()) for layer in stack[1:]] == [48, 48]


def _pruned_nonzero(tree, masks):
  read = optax_prune.unpack_masks(masks, tree)
  return sum(int(jnp.sum((x != 0) & ~m)) for x, m in zip(
      jax.tree.leaves(tree), jax.tree.leaves(read, is_leaf=lambda m: isinstance(
          m, optax.MaskedNode))) if not isinstance(m, optax.MaskedNode))


@pytest.mark.parametrize("masked", [False, True])
def test_weight_copies_of_schedule_free_and_lookahead_are_masked(masked):
  # Schedule-free: the weights to evaluate mix the params with its `z`.
  params = helpers.params()
  tx = optax.chain(optax.contrib.schedule_free_adamw(1e-2, warmup_steps=0),
                   optax_prune.magnitude_pruning(0.75))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(helpers.loss)(p), s, p)
    p = optax.apply_updates(p, updates)
    return (p, optax_prune.mask_weight_copies(s, s)) if masked else (p, s)

  for _ in range(5):
    params, state = step(params, state)
  masks = optax_prune.find_pruning_state(state).masks
  evaluated = optax.contrib.schedule_free_eval_params(state[0], params)
  assert _pruned_nonzero(params, masks) == 0
  assert (_pruned_nonzero(evaluated, masks) == 0) == masked
  assert optax_prune.sparsity_summary(evaluated, masks).pruned_nonzero == (
      0 if masked else _pruned_nonzero(evaluated, masks))
  # Lookahead: slow weights, and the fast ones right after a sync.
  tx = optax.lookahead(optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(0.75)),
                       sync_period=3, slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(helpers.params())
  state = tx.init(params)

  @jax.jit
  def lookahead_step(p, s):
    updates, s = tx.update(jax.grad(helpers.loss)(p.fast), s, p)
    p = optax.apply_updates(p, updates)
    return (optax_prune.mask_weight_copies(p, s), s) if masked else (p, s)

  for _ in range(6):  # Ends on a sync.
    params, state = lookahead_step(params, state)
  masks = optax_prune.find_pruning_state(state).masks
  for copy in (params.slow, params.fast):
    assert (_pruned_nonzero(copy, masks) == 0) == masked
