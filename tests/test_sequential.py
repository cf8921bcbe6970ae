"""Sequential one-shot pruning against the same walk done by hand: each block
calibrated on the outputs of the pruned blocks before it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune


def _block(p, x):
  """A residual MLP block: two kernels, a bias."""
  h = jax.nn.relu(x @ p["up"]["kernel"] + p["up"]["bias"])
  return x + h @ p["down"]["kernel"]


def _model(seed=0, blocks=3, width=16):
  rng = np.random.default_rng(seed)
  params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((10, width)), jnp.float32)}}
  for i in range(blocks):
    params[f"layers_{i}"] = {
        "up": {"kernel": jnp.asarray(rng.standard_normal((width, 2 * width)) / 4, jnp.float32),
               "bias": jnp.asarray(rng.standard_normal(2 * width) / 4, jnp.float32)},
        "down": {"kernel": jnp.asarray(rng.standard_normal((2 * width, width)) / 6, jnp.float32)},
    }
  x = rng.standard_normal((2, 24, 4)) @ rng.standard_normal((4, width))  # Correlated inputs.
  return params, [jnp.asarray(b, jnp.float32) for b in x]


def _by_hand(params, batches, method, **options):
  """The walk written out: statistics of block i on the outputs of pruned block i-1."""
  xs, out, masks = list(batches), dict(params), {}
  run = jax.jit(_block)
  for name in ("layers_0", "layers_1", "layers_2"):
    block = params[name]
    if method == "magnitude":
      block, masks[name] = optax_prune.prune(block, 0.5, distribution="uniform")
    elif method == "wanda":
      norms = optax_prune.input_norms(_block, block, xs)
      block, masks[name] = optax_prune.prune(block, 0.5, input_norms=norms, compare="output")
    else:
      hessians = optax_prune.hessians(_block, block, xs)
      block, masks[name] = optax_prune.sparsegpt(block, hessians, 0.5, **options)
    out[name] = block
    xs = [run(block, x) for x in xs]
  return out, masks


BLOCKS = [(f"layers_{i}", _block) for i in range(3)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_each_block_is_pruned_on_the_outputs_of_the_pruned_blocks_before(method):
  params, batches = _model()
  options = {"blocksize": 8} if method == "sparsegpt" else {}
  got, masks = optax_prune.prune_sequential(params, BLOCKS, batches, 0.5, method=method,
                                            **options)
  want, want_masks = _by_hand(params, batches, method, **options)
  for name in want_masks:
    for layer in ("up", "down"):
      np.testing.assert_array_equal(masks[name][layer]["kernel"], want_masks[name][layer]["kernel"])
      np.testing.assert_allclose(got[name][layer]["kernel"], want[name][layer]["kernel"],
                                 rtol=1e-6, atol=1e-6)
      assert (~np.asarray(masks[name][layer]["kernel"])).mean() == 0.5
    assert got[name]["up"]["bias"] is params[name]["up"]["bias"]  # Biases not pruned.
    assert isinstance(masks[name]["up"]["bias"], optax.MaskedNode)
  assert got["embed"] is params["embed"] and isinstance(masks["embed"]["embedding"],
                                                        optax.MaskedNode)


def test_sequential_sparsegpt_differs_from_all_at_once_after_the_first_block():
  params, batches = _model(1)
  seq, _ = optax_prune.prune_sequential(params, BLOCKS, batches, 0.5, blocksize=8)
  # All at once: every block's Hessian from the dense model's activations.
  dense = lambda p, x: _block(p["layers_2"], _block(p["layers_1"], _block(p["layers_0"], x)))
  hessians = optax_prune.hessians(dense, params, batches)
  once, _ = optax_prune.sparsegpt(params, hessians, 0.5, blocksize=8)
  first = lambda tree: np.asarray(tree["layers_0"]["up"]["kernel"])
  np.testing.assert_allclose(first(seq), first(once), rtol=1e-5, atol=1e-6)
  assert not np.allclose(seq["layers_2"]["down"]["kernel"], once["layers_2"]["down"]["kernel"])


def test_nested_keys_path_rules_and_two_of_four():
  params, batches = _model(2, blocks=2)
  nested = {"encoder": {k: v for k, v in params.items() if k.startswith("layers")}}
  blocks = [(("encoder", "layers_0"), _block), (["encoder", "layers_1"], _block)]
  sparsity = optax_prune.by_path({r"\['down'\]": 1.0}, default=None)
  nm = optax_prune.n_of_m(2, 4, axis=0)
  # Rules over the whole params: this one matches a leaf of the second block only.
  granularity = optax_prune.by_path({r"layers_1.*\['down'\]": nm}, default=nm)
  got, masks = optax_prune.prune_sequential(nested, blocks, batches, sparsity,
                                            granularity=granularity, blocksize=8)
  for name in ("layers_0", "layers_1"):
    keep = np.asarray(masks["encoder"][name]["down"]["kernel"])
    assert (keep.reshape(8, 4, 16).sum(1) == 2).all()
    optax_prune.to_nm(got["encoder"][name]["down"]["kernel"], jnp.asarray(keep), nm)
    assert isinstance(masks["encoder"][name]["up"]["kernel"], optax.MaskedNode)
    assert got["encoder"][name]["up"]["kernel"] is nested["encoder"][name]["up"]["kernel"]


def test_bad_arguments_name_the_argument():
  params, batches = _model(blocks=1)
  for blocks, message in [([], "non-empty sequence"), ("layers_0", "non-empty sequence"),
                          ([("layers_0",)], "the entry"), ([("layers_9", _block)], "names no subtree")]:
    with pytest.raises(ValueError, match=message):
      optax_prune.prune_sequential(params, blocks, batches, 0.5)
  with pytest.raises(ValueError, match="`method` must be one of"):
    optax_prune.prune_sequential(params, BLOCKS[:1], batches, 0.5, method="obs")
  with pytest.raises(ValueError, match="`sparsity` must be in"):
    optax_prune.prune_sequential(params, BLOCKS[:1], batches, 2.0)
  # Before any block's statistics: a fn that cannot run is never called.
  broken = [("layers_0", lambda p, x: 1 / 0)]
  with pytest.raises(ValueError, match="`compare` must be one of \\('leaf', 'output'\\)"):
    optax_prune.prune_sequential(params, broken, batches, 0.5, method="wanda", compare="block")
  with pytest.raises(ValueError, match="`blocksize` must be an integer >= 1"):
    optax_prune.prune_sequential(params, broken, batches, 0.5, blocksize=0)
  with pytest.raises(ValueError, match="`dampening` must be a finite number > 0"):
    optax_prune.prune_sequential(params, broken, batches, 0.5, dampening=-1.0)
