"""One-shot pruning against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from optax_prune import _oneshot
from tests import helpers
from tests import reference

KERNELS = ("conv", "dense", "out")


def _kernels(tree):
  return [np.asarray(tree[k]["kernel"]) for k in KERNELS]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_matches_the_reference_and_keeps_kept_weights_bitwise(scope):
  params = helpers.params()
  pruned, masks = optax_prune.prune(params, 0.6, scope=scope, distribution="uniform")
  kernels = _kernels(params)
  if scope == "global":
    expected = reference.keep_masks(kernels, 0.6)
  else:
    expected = [reference.keep_masks([x], 0.6)[0] for x in kernels]
  for got, want, x, out in zip(_kernels(masks), expected, kernels, _kernels(pruned)):
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(out, np.where(want, x, 0))
  for k in KERNELS:  # Biases are not pruned by default.
    assert isinstance(masks[k]["bias"], optax.MaskedNode)
    np.testing.assert_array_equal(pruned[k]["bias"], params[k]["bias"])


def test_prune_counts_are_exact_with_ties_and_structure():
  params = {"w": jnp.zeros((8, 12)), "v": jnp.ones((12, 4)).at[0].set(0.0)}
  pruned, masks = optax_prune.prune(params, {"w": 0.25, "v": 0.5})
  assert int((~masks["w"]).sum()) == reference.prune_count(0.25, 96)
  assert int((~masks["v"]).sum()) == reference.prune_count(0.5, 48)
  # All-zero weights tie: the first ones by position go.
  np.testing.assert_array_equal(~masks["w"].reshape(-1), np.arange(96) < 24)
  two_four, nm_masks = optax_prune.prune(
      helpers.params(), 1.0, granularity=optax_prune.n_of_m(2, 4, axis=-2))
  for m in _kernels(nm_masks):
    groups = np.moveaxis(m, -2, -1).reshape(-1, 4)
    assert (groups.sum(-1) == 2).all()


def test_saliency_ranks_by_the_grads_given():
  params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
  grads = {"w": jnp.array([[4.0, 0.1, 2.0, 0.5]])}  # |w * g| = 4, 0.2, 6, 2.
  _, masks = optax_prune.prune(params, 0.5, grads=grads, score="saliency",
                               where=lambda path, x: True)
  np.testing.assert_array_equal(masks["w"], [[True, False, True, False]])


def test_per_output_pruning_ranks_each_output_of_each_layer_of_a_stack():
  # Wanda's comparison group, per layer: each column of each layer of the
  # stack loses round(0.7 * 4) = 3 (not 2) of its 4 weights.
  w = np.random.default_rng(1).standard_normal((2, 4, 3)).astype(np.float32)
  w[1] *= 10.0  # Layers of other scales: ranked together, layer 0 would lose most.
  pruned, masks = optax_prune.prune({"w": jnp.asarray(w)}, 0.7, compare="output", layer_axis=0)
  expected = np.ones(w.shape, bool)
  for layer in range(2):
    for column in range(3):
      order = np.argsort(reference.magnitude_keys(w[layer, :, column]), kind="stable")
      expected[layer, order[:3], column] = False
  np.testing.assert_array_equal(np.asarray(masks["w"]), expected)
  np.testing.assert_array_equal(np.asarray(pruned["w"]), np.where(expected, w, 0))


def test_prune_takes_numbers_only():
  params = helpers.params()
  with pytest.raises(ValueError, match="schedules belong to `magnitude_pruning`"):
    optax_prune.prune(params, optax_prune.constant_schedule(0.5))
  with pytest.raises(ValueError, match="`sparsity` must be in \\[0, 1\\]"):
    optax_prune.prune(params, 1.5)


def test_pruned_params_seed_a_fine_tune_that_keeps_the_masks():
  # Pruning then fine-tuning: the pruned params, a constant schedule of the
  # same sparsity, and the masks come back the same (pruned weights are 0).
  params = helpers.params()
  pruned, masks = optax_prune.prune(params, 0.7)
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(0.7))
  state = tx.init(pruned)
  step = helpers.make_step(tx)
  for _ in range(3):
    pruned, state = step(pruned, state)
  jax.tree.map(np.testing.assert_array_equal, optax_prune.find_pruning_state(state).masks, masks)


def test_iterative_pruning_with_rewinding_keeps_masks_nested_and_counts_exact():
  # Lottery tickets (Frankle & Carbin): train, prune, rewind the kept weights
  # to an early checkpoint, train again with the masks kept, repeat.
  def train(params, sparsity, steps):
    tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(sparsity, distribution="uniform"))
    step, state = helpers.make_step(tx), tx.init(params)
    for _ in range(steps):
      params, state = step(params, state)
    return params, optax_prune.find_pruning_state(state).masks

  params, _ = train(helpers.params(), 0.0, 2)
  early = params  # The checkpoint to rewind to.
  params, _ = train(params, 0.0, 4)
  previous = None
  for round_ in range(1, 3):
    sparsity = 1 - 0.8 ** round_
    _, masks = optax_prune.prune(params, sparsity, distribution="uniform")
    # Rewind: kept weights back to the early checkpoint, pruned ones 0.
    rewound = jax.tree.map(lambda m, w: w if isinstance(m, optax.MaskedNode)
                           else jnp.where(m, w, 0.0), masks, early,
                           is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    for k in ("conv", "dense", "out"):
      m = np.asarray(masks[k]["kernel"])
      assert (~m).sum() == reference.prune_count(sparsity, m.size)
      np.testing.assert_array_equal(np.asarray(rewound[k]["kernel"])[m],
                                    np.asarray(early[k]["kernel"])[m])
      if previous is not None:
        assert not (m & ~previous[k]["kernel"]).any(), "a pruned weight came back"
    params, kept = train(rewound, sparsity, 4)
    jax.tree.map(np.testing.assert_array_equal, kept, masks)  # Masks held while training.
    previous = jax.tree.map(np.asarray, masks)


def test_calls_with_equal_options_and_shapes_compile_once():
  # Iterative pruning and sweeps call `prune` many times: one compile.
  rng = np.random.default_rng(3)
  params = [{"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)} for _ in range(3)]
  _oneshot._COMPILED.clear()  # Other tests of this worker may have filled the LRU.
  before = len(_oneshot._COMPILED)
  # A sweep over sparsities too: they are an argument of the compiled update.
  for p, sparsity in zip(params + params, (0.4, 0.4, 0.4, 0.1, 0.75, 1.0)):
    _, masks = optax_prune.prune(p, sparsity, threshold="bisect", scope="global")
    assert int((~masks["w"]).sum()) == reference.prune_count(sparsity, 30)
    np.testing.assert_array_equal(masks["w"], reference.keep_masks([p["w"]], sparsity)[0])
  assert len(_oneshot._COMPILED) == before + 1
  (update,) = [u for u in _oneshot._COMPILED.values()][-1:]
  assert update._cache_size() == 1


def test_a_coupled_channel_sweep_compiles_once():
  # A new `coupled_channels(groups)` per call, over the same groups: shared.
  rng = np.random.default_rng(4)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}}
  groups = optax_prune.channel_groups(
      lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"], params, jnp.ones((2, 5)))
  _oneshot._COMPILED.clear()
  previous = np.ones(8, bool)
  # Reference: smallest sum of the members' channel L2 norms first.
  norms = (np.linalg.norm(np.asarray(params["a"]["kernel"]), axis=0)
           + np.linalg.norm(np.asarray(params["b"]["kernel"]), axis=1))
  for sparsity in (0.25, 0.5, 0.75):
    _, masks = optax_prune.prune(params, sparsity,
                                 granularity=optax_prune.coupled_channels(groups))
    kept = np.asarray(masks["a"]["kernel"]).all(0)
    np.testing.assert_array_equal(kept, np.isin(np.arange(8), np.argsort(norms)[
        reference.prune_count(sparsity, 8):]))
    assert not (kept & ~previous).any()
    previous = kept
  assert len(_oneshot._COMPILED) == 1
  assert next(iter(_oneshot._COMPILED.values()))._cache_size() == 1
