"""The shared contract, run over every pair of options.

score x granularity x scope x threshold x distribution x optimizer x dtype x mask
layout: the full
product is hundreds of compiles, so the battery is a set of configurations
that covers every allowed pair of values (`helpers.all_pairs`, checked
below). Each configuration trains the small CNN for 10 steps along a schedule
with mask updates at steps 0, 4 and 8, and must keep the contract:

* exact counts: at an update step, exactly round(s * units) units pruned per
  leaf (layer scope), per group (global scope), per schedule (ERK);
* exact zeros after `apply_updates`, and no revival by momentum, Adam moments
  or weight decay: a pruned weight stays exactly 0, a pruned mask entry stays
  pruned (masks nested);
* masks unchanged between update steps;
* the target sparsity in the state is the one asked;
* one compile for the whole run, and an eager update equal to the jitted one;
* for unstructured magnitude masks, equality with the NumPy reference.

The params hold a scanned stack of layers (`layer_axis`): each of its layers
is held to the contract as a leaf of its own (counts, ERK shares, the
reference's ranking, in leaf order), so every option runs per layer too.

A new option joins the battery by adding its values to `FACTORS`.
"""

import jax
import numpy as np
import optax
import pytest

import optax_prune
from tests import helpers
from tests import reference

SCHEDULE = optax_prune.polynomial_schedule(0.75, begin_step=0, end_step=8, frequency=4)
STEPS = 10
# "twin": the dense shape again; "stack": 3 such layers in one leaf.
KERNELS = ("conv", "dense", "out", "stack", "twin")

FACTORS = {
    "score": ["magnitude", "saliency", "random"],
    "granularity": [
        None,
        optax_prune.n_of_m(2, 4, axis=-2),
        optax_prune.blocks((3, 4)),  # Ragged edge blocks on every kernel.
        optax_prune.blocks((3, 4), reduce="max"),
        optax_prune.channels(norm="l1"),
        optax_prune.channels(axis=-2, norm="l2"),
    ],
    "scope": ["layer", "global"],
    "threshold": ["sort", "bisect", "histogram"],  # "auto" is one of them per group.
    "distribution": ["uniform", "erk"],
    "optimizer": ["sgd-momentum", "adamw"],
    "dtype": ["float32", "bfloat16"],
    "masks": ["bool", "packed"],  # The state's mask layout (`packed_masks`).
    # Mask updates decided inside one compiled step (`update_masks=None`), or
    # by the loop: `update_masks=step in mask_update_steps(...)`, two compiles.
    "mask_step": ["in-step", "static"],
}
OPTIMIZERS = {
    "sgd-momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(0.05, weight_decay=0.1),
}


def _allowed(config):
  return config["distribution"] == "uniform" or config["scope"] == "layer"


BATTERY = helpers.all_pairs(FACTORS, _allowed)


def _name(config):
  g = config["granularity"]
  return "-".join([config["score"], "unstructured" if g is None else repr(g),
                   config["scope"], config["threshold"], config["distribution"],
                   config["optimizer"], config["dtype"], config["masks"],
                   config["mask_step"]])


def test_battery_covers_every_allowed_pair():
  names = list(FACTORS)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      for va in FACTORS[a]:
        for vb in FACTORS[b]:
          if not _allowed({**{n: FACTORS[n][0] for n in names}, a: va, b: vb}):
            continue
          assert any(c[a] == va and c[b] == vb for c in BATTERY), (a, va, b, vb)
  assert len(BATTERY) < 30  # Pairs, not the product (1728).


def _expected_counts(config, sparsity, shapes):
  """Units pruned per kernel, or in total (None per kernel) under global/ERK."""
  g = config["granularity"]
  units = [helpers.units(g, s) for s in shapes]
  if config["scope"] == "global" or config["distribution"] == "erk":
    return None, reference.prune_count(sparsity, sum(units))
  return [reference.prune_count(sparsity, n) for n in units], None


@pytest.mark.parametrize("config", BATTERY, ids=_name)
def test_contract(config):
  tx = _transformation(config)
  granularity = config["granularity"]
  previous = None
  due = (set(optax_prune.mask_update_steps(SCHEDULE, STEPS).tolist())
         if config["mask_step"] == "static" else None)
  for t, before, state, after in helpers.train(tx, _params(config), STEPS, due_steps=due):
    pstate = optax_prune.find_pruning_state(state)
    assert int(pstate.skipped_mask_updates) == 0
    stored = [pstate.masks[k]["kernel"] for k in KERNELS]
    assert all(m.dtype == (np.uint8 if config["masks"] == "packed" else bool) for m in stored)
    read = optax_prune.unpack_masks(pstate.masks, after)
    masks = _layers([read[k]["kernel"] for k in KERNELS])
    assert all(isinstance(pstate.masks[k]["bias"], optax.MaskedNode) for k in KERNELS)
    target = SCHEDULE(t)
    sparsity = float(target.sparsity)
    if bool(target.update):
      shapes = [m.shape for m in masks]
      per_leaf, total = _expected_counts(config, sparsity, shapes)
      counts = [helpers.pruned_units(granularity, m) for m in masks]
      if per_leaf is not None:
        assert counts == per_leaf, (t, counts, per_leaf)
        np.testing.assert_array_equal(pstate.target_sparsity, np.float32(sparsity))
      else:
        assert sum(counts) == total, (t, counts, total)
      if granularity is None and config["score"] == "magnitude":
        kernels = _layers([np.asarray(before[k]["kernel"], np.float32) for k in KERNELS])
        if config["scope"] == "global":
          expected = reference.keep_masks(kernels, sparsity)
        elif config["distribution"] == "uniform":
          expected = [reference.keep_masks([x], sparsity)[0] for x in kernels]
        else:  # ERK: each leaf keeps its own count, smallest first.
          expected = [_smallest_pruned(x, n) for x, n in zip(kernels, counts)]
        for got, want in zip(masks, expected):
          np.testing.assert_array_equal(got, want)
    elif previous is not None:
      for got, old in zip(masks, previous):
        # Unchanged between updates (tests/test_transform.py shows it where a
        # new ranking would differ).
        np.testing.assert_array_equal(got, old)
    if previous is not None:
      for got, old in zip(masks, previous):
        assert not (got & ~old).any(), "a pruned entry was revived"
    weights = _layers([np.asarray(after[k]["kernel"], np.float32) for k in KERNELS])
    assert all(after[k]["kernel"].dtype == config["dtype"] for k in KERNELS)
    for j, (x, m) in enumerate(zip(weights, masks)):
      assert (x[~m] == 0).all(), f"step {t}: pruned weights of kernel {j} are not 0"
    previous = masks


def _layers(per_kernel):
  """NumPy arrays per kernel, the stack's layers each in its place."""
  out = []
  for k, x in zip(KERNELS, per_kernel):
    out.extend(list(np.asarray(x)) if k == "stack" else [np.asarray(x)])
  return out


def _smallest_pruned(x, n):
  """Keep-mask pruning the n smallest |x| (ties by position), NumPy."""
  keys = reference.magnitude_keys(x)
  keep = np.ones(x.size, bool)
  keep[np.argsort(keys, kind="stable")[:n]] = False
  return keep.reshape(x.shape)


def _transformation(config):
  kwargs = {k: v for k, v in config.items()
            if k not in ("optimizer", "dtype", "masks", "mask_step")}
  kwargs["packed_masks"] = config["masks"] == "packed"
  kwargs["layer_axis"] = helpers.STACKED
  return optax.chain(OPTIMIZERS[config["optimizer"]](),
                     optax_prune.magnitude_pruning(SCHEDULE, **kwargs))


def _params(config):
  return helpers.params(dtype=config["dtype"], twin=True, stack=True)


# Eager runs are slow to dispatch: two configurations, structured and not.
@pytest.mark.parametrize("config", [c for c in BATTERY if c["score"] == "magnitude"][:2],
                         ids=_name)
def test_eager_update_equals_jit(config):
  tx = _transformation(config)
  p = _params(config)
  grads = jax.grad(helpers.loss)(p)
  state = tx.init(p)
  eager = tx.update(grads, state, p)
  jitted = jax.jit(tx.update)(grads, state, p)
  masks = lambda out: optax_prune.unpack_masks(optax_prune.find_pruning_state(out[1]).masks, p)
  jax.tree.map(np.testing.assert_array_equal, masks(eager), masks(jitted))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               eager[0], jitted[0])
