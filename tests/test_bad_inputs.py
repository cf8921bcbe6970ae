"""The catalogue of unusual inputs (docs/bad_inputs.md), one test each."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import optax_prune


def _update(tx, params):
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  return optax.apply_updates(params, updates), state


def test_zero_size_and_one_element_leaves():
  params = {"empty": jnp.zeros((0, 5)), "one": jnp.full((1, 1), 3.0)}
  for s, pruned_one in [(0.4, 0), (0.6, 1), (1.0, 1)]:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "pruned whole" at 0.6 (its own test below).
      new, state = _update(optax_prune.magnitude_pruning(s), params)
    assert state.masks["empty"].shape == (0, 5)
    assert int((~state.masks["one"]).sum()) == pruned_one
    assert float(new["one"][0, 0]) == (0.0 if pruned_one else 3.0)


def test_a_leaf_pruned_whole_below_sparsity_one_is_warned_about_at_init():
  params = {"small": jnp.ones((4, 1)), "large": jnp.ones((16, 16))}
  with pytest.warns(UserWarning, match=r"pruned whole: \['small'\] \(4 units at 0.9\)"):
    optax_prune.magnitude_pruning(0.9, distribution="uniform").init(params)
  with pytest.warns(UserWarning, match=r"\['small'\] \(4 units at 0.9\)"):  # ERK, one leaf.
    optax_prune.magnitude_pruning(optax_prune.polynomial_schedule(
        0.9, begin_step=0, end_step=10, frequency=1)).init({"small": params["small"]})
  tiny = {name: jnp.ones((2, 1)) for name in "abc"}  # ERK: 1 unit kept over 3 leaves.
  with pytest.warns(UserWarning, match=r"2 pruned leaves .* 2 of \['a'\], \['b'\], \['c'\]"):
    optax_prune.magnitude_pruning(0.9).init(tiny)
  stack = {"stack": jnp.ones((2, 4, 1))}
  with pytest.warns(UserWarning, match=r"\['stack'\] layer 0 \(4 units at 0.9\), \['stack'\] layer 1"):
    optax_prune.magnitude_pruning(0.9, distribution="uniform", layer_axis=0).init(stack)
  with warnings.catch_warnings():  # ERK keeps part of every leaf; 0.8 keeps 1 of 4.
    warnings.simplefilter("error")
    optax_prune.magnitude_pruning(0.9).init(params)
    optax_prune.magnitude_pruning(0.8, distribution="uniform").init(params)
    optax_prune.magnitude_pruning(1.0, distribution="uniform").init(params)


def test_integer_bool_and_complex_leaves_are_skipped_by_default_and_rejected_if_chosen():
  params = {"i": jnp.ones((3, 3), jnp.int32), "b": jnp.ones((3, 3), bool),
            "c": jnp.ones((3, 3), jnp.complex64), "w": jnp.ones((3, 3))}
  state = optax_prune.magnitude_pruning(0.5).init(params)
  for name in ("i", "b", "c"):
    assert isinstance(state.masks[name], optax.MaskedNode)
  for name in ("i", "b", "c"):
    with pytest.raises(ValueError, match="only floating leaves"):
      optax_prune.magnitude_pruning(0.5, where={k: k == name for k in params}).init(params)


def test_nan_and_inf_weights_are_kept_until_sparsity_one():
  params = {"w": jnp.array([[jnp.nan, 1.0, -jnp.inf, 0.5]])}
  new, state = _update(optax_prune.magnitude_pruning(0.5), params)
  np.testing.assert_array_equal(state.masks["w"], [[True, False, True, False]])
  assert bool(jnp.isnan(new["w"][0, 0])) and float(new["w"][0, 2]) == -np.inf
  # At sparsity 1 they are pruned too; -p cannot cancel a non-finite p, so the
  # weight becomes NaN rather than 0 (documented).
  new, state = _update(optax_prune.magnitude_pruning(1.0), params)
  assert not bool(state.masks["w"].any())
  assert bool(jnp.isnan(new["w"][0, 0])) and float(new["w"][0, 1]) == 0.0


def test_schedule_values_outside_the_unit_interval_are_clipped():
  def wild(step):
    return optax_prune.PruningTarget(jnp.float32(7.0), step == 0)
  _, state = _update(optax_prune.magnitude_pruning(wild), {"w": jnp.ones((4, 4))})
  assert not bool(state.masks["w"].any())


def test_step_counter_saturates_instead_of_wrapping():
  schedule = optax_prune.constant_schedule(0.5)
  tx = optax_prune.magnitude_pruning(schedule)
  params = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}
  state = tx.init(params)._replace(count=jnp.int32(np.iinfo(np.int32).max))
  _, state = tx.update(params, state, params)
  assert int(state.count) == np.iinfo(np.int32).max  # Not wrapped to step 0.
  assert bool(state.masks["w"].all())  # So no new one-shot update ran.


def test_params_that_change_structure_between_init_and_update():
  tx = optax_prune.magnitude_pruning(0.5)
  state = tx.init({"w": jnp.ones((3, 3))})
  for params in ({"w": jnp.ones((3, 3)), "x": jnp.ones((2, 2))}, [jnp.ones((3, 3))]):
    with pytest.raises(ValueError, match="do not match the pruning state"):
      tx.update(params, state, params)


# Random valid and invalid configurations: every invalid argument is refused at
# construction with a ValueError naming it; every valid one builds and runs.
_INT32_MAX = np.iinfo(np.int32).max
_not_a_number = st.sampled_from(["0.5", None, [0.5], True, False, np.bool_(True), 1j])
_bad_fraction = st.one_of(
    _not_a_number, st.floats(allow_nan=True).filter(lambda v: not 0 <= v <= 1))
_fraction = st.floats(0, 1) | st.sampled_from([0, 1, np.float32(0.25), np.float64(0.75)])


def _bad_int(minimum):
  return st.one_of(
      _not_a_number, st.integers(max_value=minimum - 1),
      st.integers(min_value=_INT32_MAX + 1), st.sampled_from([1.0, 2.5, np.float32(3)]))


def _int(minimum, maximum=10**6):
  return st.integers(minimum, maximum) | st.integers(minimum, minimum + 100).map(np.int64)


# Per function: valid values per argument, and invalid ones where they exist.
_VALID = {
    optax_prune.log_schedule: dict(
        sparsity_upper_bound=_fraction, interval_pass=_int(1), end_pass=_int(0),
        steps_per_epoch=_int(1)),
    optax_prune.polynomial_schedule: dict(
        final_sparsity=_fraction, begin_step=_int(0, 1000), end_step=_int(1000),
        frequency=_int(1), initial_sparsity=_fraction,
        power=st.floats(0.01, 10) | st.sampled_from([1, 3])),
    optax_prune.constant_schedule: dict(sparsity=_fraction, step=_int(0)),
    optax_prune.magnitude_pruning: dict(
        schedule=_fraction, scope=st.sampled_from(["layer", "global"]),
        threshold=st.sampled_from(["auto", "sort", "bisect", "histogram"]),
        where=st.sampled_from([None, {"w": True, "b": False}, lambda path, x: True])),
}
_INVALID = {
    "sparsity_upper_bound": _bad_fraction, "final_sparsity": _bad_fraction,
    "initial_sparsity": _bad_fraction, "sparsity": _bad_fraction,
    # None (nothing pruned) and lists (a pytree of schedules) are valid schedules.
    "schedule": _bad_fraction.filter(lambda v: v is not None and not isinstance(v, list)),
    "interval_pass": _bad_int(1), "end_pass": _bad_int(0), "steps_per_epoch": _bad_int(1),
    "begin_step": _bad_int(0), "end_step": _bad_int(0), "frequency": _bad_int(1),
    "step": _bad_int(0),
    "power": st.one_of(_not_a_number, st.floats(max_value=0), st.sampled_from([np.inf, np.nan])),
    "scope": st.text(max_size=8).filter(lambda v: v not in ("layer", "global")) | _not_a_number,
    "threshold": st.text(max_size=8).filter(lambda v: v not in ("auto", "sort", "bisect", "histogram")),
    "where": st.sampled_from([[1, 2], {"w": 1}, "kernel", 0.5]),
}
_POSITIONAL = {optax_prune.magnitude_pruning: "schedule"}


@st.composite
def _configurations(draw, valid):
  fn = draw(st.sampled_from(list(_VALID)))
  kwargs = {name: draw(values) for name, values in _VALID[fn].items()}
  bad = None
  if not valid:
    bad = draw(st.sampled_from([n for n in _VALID[fn] if n in _INVALID]))
    kwargs[bad] = draw(_INVALID[bad])
  return fn, kwargs, bad


def _call(fn, kwargs):
  kwargs = dict(kwargs)
  args = [kwargs.pop(_POSITIONAL[fn])] if fn in _POSITIONAL else []
  return fn(*args, **kwargs)


@given(config=_configurations(valid=False))
def test_random_invalid_configurations_name_the_argument(config):
  fn, kwargs, bad = config
  with pytest.raises(ValueError, match=f"`{bad}`"):
    _call(fn, kwargs)


# Small leaves at high sparsity are pruned whole: warned about, and tested, elsewhere.
@pytest.mark.filterwarnings("ignore:.*pruned whole:UserWarning")
@settings(max_examples=30)
@given(config=_configurations(valid=True))
def test_random_valid_configurations_build_and_prune(config):
  fn, kwargs, _ = config
  built = _call(fn, kwargs)
  tx = built if fn is optax_prune.magnitude_pruning else optax_prune.magnitude_pruning(built)
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3)}
  _, state = jax.eval_shape(tx.update, params, tx.init(params), params)
  assert state.masks["w"].shape == (3, 4)


def test_a_group_past_int32_entries_is_refused_at_init():
  # Abstract params: no 8 GiB leaf is allocated.
  params = {"a": jax.ShapeDtypeStruct((2**16, 2**15 - 1), jnp.float32),
            "b": jax.ShapeDtypeStruct((256, 257), jnp.float32)}
  with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
    jax.eval_shape(optax_prune.magnitude_pruning(0.5, scope="global").init, params)
  # Per layer each group fits.
  jax.eval_shape(optax_prune.magnitude_pruning(0.5).init, params)


# Misuses that used to pass silently (issue: no silent mistakes).


def test_pruning_before_the_optimizer_is_counted_and_shown():
  from tests import helpers
  results = {}
  for order in ("last", "first"):
    pruning = optax_prune.magnitude_pruning(0.5)
    tx = (optax.chain(optax.adamw(1e-2), pruning) if order == "last"
          else optax.chain(pruning, optax.adamw(1e-2)))
    step = helpers.make_step(tx)
    params, state = helpers.params(), tx.init(helpers.params())
    for _ in range(4):
      params, state = step(params, state)
    summary = optax_prune.sparsity_summary(
        params, optax_prune.find_pruning_state(state).masks)
    results[order] = (int(optax_prune.pruning_metrics(state)["pruning/pruned_nonzero"]),
                      summary.pruned_nonzero, str(summary))
  assert results["last"][:2] == (0, 0) and "WARNING" not in results["last"][2]
  assert results["first"][0] > 0 and results["first"][1] > 0
  assert "not zero. Is the pruning link (`magnitude_pruning`, `static_sparse` or" \
      " `straight_through`) the last link" in results["first"][2]



def test_multisteps_before_pruning_is_counted_and_shown():
  from tests import helpers
  results = {}
  for order in ("outside", "inside"):
    pruning = optax_prune.magnitude_pruning(0.5)
    tx = (optax.chain(optax.MultiSteps(optax.adam(1e-2), 4), pruning) if order == "inside"
          else optax.MultiSteps(optax.chain(optax.adam(1e-2), pruning), 4))
    step = helpers.make_step(tx)
    params, state = helpers.params(), tx.init(helpers.params())
    for _ in range(8):
      params, state = step(params, state)
    summary = optax_prune.sparsity_summary(params, state)  # The optimizer state itself.
    metrics = optax_prune.pruning_metrics(state)
    results[order] = (int(metrics["pruning/step"]), int(metrics["pruning/zero_update_steps"]),
                      summary.steps, summary.zero_update_steps, str(summary))
  # MultiSteps outside: 2 real steps, none idle. Inside (before pruning): 8
  # micro-batches counted as steps, 6 of them with zero updates.
  assert results["outside"][:4] == (2, 0, 2, 0)
  assert "MultiSteps" not in results["outside"][4]
  assert results["inside"][:4] == (8, 6, 8, 6)
  assert "6 of 8 steps brought all-zero updates" in results["inside"][4]
  assert "optax.MultiSteps(optax.chain(adamw, magnitude_pruning(...)), k)" in results["inside"][4]


def test_a_single_zero_update_step_is_not_flagged():
  # A learning rate warmed up from 0 gives one all-zero step: no warning.
  from tests import helpers
  lr = optax.linear_schedule(0.0, 1e-2, 4)
  tx = optax.chain(optax.adam(lr), optax_prune.magnitude_pruning(0.5))
  step = helpers.make_step(tx)
  params, state = helpers.params(), tx.init(helpers.params())
  for _ in range(3):
    params, state = step(params, state)
  summary = optax_prune.sparsity_summary(params, state)
  assert (summary.steps, summary.zero_update_steps) == (3, 1)
  assert "WARNING" not in str(summary)


def _flax_params():
  """Params of linen and nnx models with attention, embeddings and norms."""
  import flax.linen as nn
  from flax import nnx

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(11, 8)(tokens)
      x = nn.SelfAttention(num_heads=2)(x)
      x = nn.LayerNorm()(x)
      x = nn.Conv(8, (3,))(x)
      return nn.Dense(4)(x)

  linen = Linen().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]

  class Nnx(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 8, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
          num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
      self.norm = nnx.LayerNorm(8, rngs=rngs)
      self.out = nnx.Linear(8, 4, rngs=rngs)

  return linen, Nnx(nnx.Rngs(0))


def test_default_where_prunes_flax_kernels_only():
  from flax import nnx
  linen, model = _flax_params()
  masks = optax_prune.magnitude_pruning(0.5).init(linen).masks
  pruned = sorted(jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
      if not isinstance(m, optax.MaskedNode))
  assert pruned == [
      "['Conv_0']['kernel']", "['Dense_0']['kernel']",
      "['SelfAttention_0']['key']['kernel']", "['SelfAttention_0']['out']['kernel']",
      "['SelfAttention_0']['query']['kernel']", "['SelfAttention_0']['value']['kernel']"]
  # nnx: the same rule through nnx.Optimizer (paths end in `.value`).
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.5)),
                            wrt=nnx.Param)
  state = optax_prune.find_pruning_state(optimizer.opt_state)
  names = [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(state.masks) if hasattr(state.masks, "to_pure_dict") else state.masks,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
      if not isinstance(m, optax.MaskedNode) and getattr(m, "ndim", 0) >= 2]
  assert len(names) == 5 and all("kernel" in n for n in names), names
  assert not any("embed" in n or "bias" in n for n in names)
  # Without any `kernel` (plain dicts): every floating leaf of ndim >= 2.
  plain = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  assert not isinstance(optax_prune.magnitude_pruning(0.5).init(plain).masks["w"], optax.MaskedNode)


def test_nnx_paths_look_like_linen_ones_to_rules_and_predicates():
  from flax import nnx
  _, model = _flax_params()
  by_name = lambda path, leaf: jax.tree_util.keystr(path).endswith("['kernel']")
  anchored = optax_prune.by_path({r"\['out'\]\['kernel'\]$": 0.5}, default=None)
  for tx in (optax_prune.magnitude_pruning(0.5, where=by_name),
             optax_prune.magnitude_pruning(anchored)):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    masks = jax.tree.leaves(optax_prune.find_pruning_state(optimizer.opt_state).masks)
    assert masks and all(m.dtype == jnp.bool_ for m in masks)


def test_a_rule_or_predicate_that_matches_nothing_is_an_error():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="`schedule`'s `by_path` rule 'Dnse_0' matches no leaf"):
    optax_prune.magnitude_pruning(optax_prune.by_path({"Dnse_0": None}, default=0.5)).init(params)
  with pytest.raises(ValueError, match="`where` selects no leaf"):
    optax_prune.magnitude_pruning(0.5, where=lambda path, leaf: False).init(params)
  with pytest.raises(ValueError, match="`where` must be called as `where\\(path, leaf\\)"):
    optax_prune.magnitude_pruning(0.5, where=lambda leaf: leaf.ndim > 1).init(params)


def test_find_pruning_state_says_where_to_look():
  with pytest.raises(ValueError, match="found 0. Pass the optimizer state itself"):
    optax_prune.find_pruning_state({"params": jnp.ones(2)})


def test_inject_hyperparams_on_pruning_says_how_to_wrap_instead():
  with pytest.raises(ValueError, match="`schedule` is a JAX array.*inject_hyperparams"):
    optax.inject_hyperparams(optax_prune.magnitude_pruning)(schedule=0.5).init({"w": jnp.ones((2, 2))})


def test_an_optax_schedule_is_adapted_or_refused_with_the_adapter_named():
  ramp = optax.linear_schedule(0.0, 0.8, 100)
  with pytest.raises(ValueError, match="from_optax_schedule"):
    optax_prune.magnitude_pruning(ramp)
  schedule = optax_prune.from_optax_schedule(ramp, every=25, begin_step=10)
  steps = np.arange(120)
  expected_update = (steps >= 10) & ((steps - 10) % 25 == 0)
  got = jax.vmap(schedule)(jnp.asarray(steps))
  np.testing.assert_array_equal(got.update, expected_update)
  np.testing.assert_allclose(got.sparsity, np.minimum(steps, 100) * 0.008, atol=1e-6)
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = optax_prune.magnitude_pruning(schedule)
  state = tx.init(params)._replace(count=jnp.int32(60))
  assert int((~jax.jit(tx.update)(params, state, params)[1].masks["w"]).sum()) == round(0.48 * 16)


def test_n_of_m_axis_is_required_and_packing_along_another_axis_is_refused():
  with pytest.raises(TypeError, match="axis"):
    optax_prune.n_of_m(2, 4)  # No default that could silently be the wrong axis.
  kernel = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
  tx = optax_prune.magnitude_pruning(1.0, granularity=optax_prune.n_of_m(2, 4, axis=0))
  mask = tx.update({"w": kernel}, tx.init({"w": kernel}), {"w": kernel})[1].masks["w"]
  packed = optax_prune.to_nm(kernel, mask, optax_prune.n_of_m(2, 4, axis=0))
  np.testing.assert_array_equal(packed.todense(), jnp.where(mask, kernel, 0))
  with pytest.raises(ValueError, match="keeps more than n=2 of every m=4 entries along axis 1"):
    optax_prune.to_nm(kernel, mask, optax_prune.n_of_m(2, 4, axis=1))


def test_default_where_prunes_equinox_linear_and_conv_weights_not_embeddings():
  import equinox as eqx  # pylint: disable=import-outside-toplevel

  class Model(eqx.Module):
    embed: eqx.nn.Embedding
    mlp: eqx.nn.MLP
    conv: eqx.nn.Conv2d
    attention: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm

  keys = jax.random.split(jax.random.key(0), 4)
  model = Model(eqx.nn.Embedding(10, 4, key=keys[0]), eqx.nn.MLP(4, 2, 8, 1, key=keys[1]),
                eqx.nn.Conv2d(1, 4, 3, key=keys[2]),
                eqx.nn.MultiheadAttention(2, 4, key=keys[3]), eqx.nn.LayerNorm(4))
  params = eqx.filter(model, eqx.is_array)
  _, state = _update(optax_prune.magnitude_pruning(0.5), params)
  pruned = {jax.tree_util.keystr(path) for path, m in jax.tree_util.tree_flatten_with_path(
      state.masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
            if not isinstance(m, optax.MaskedNode)}
  assert pruned == {".mlp.layers[0].weight", ".mlp.layers[1].weight", ".conv.weight",
                    ".attention.query_proj.weight", ".attention.key_proj.weight",
                    ".attention.value_proj.weight", ".attention.output_proj.weight"}
