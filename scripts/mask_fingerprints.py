"""Fingerprints of the masks that `magnitude_pruning` computes, for refactors.

Runs a fixed set of configurations (score x granularity x scope x threshold x
distribution) on the digits CNN's params, and a depth sweep's (threshold x
distribution x scope) on a 16-kernel MLP whose 12 kernels of one shape share
one kernel instance, for 40 Adam steps along a cubic schedule, hashes every mask at every step, and writes the hashes as JSON; with
``--compare`` it diffs two such files. Run it before and after a change that
should not change behaviour:

    python scripts/mask_fingerprints.py /tmp/before.json   # on the old commit
    python scripts/mask_fingerprints.py /tmp/after.json    # on the new one
    python scripts/mask_fingerprints.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_prune
from benchmarks.demo_digits import CNN

STEPS = 40


def configurations():
  """(name, magnitude_pruning keyword arguments) pairs."""
  schedule = optax_prune.polynomial_schedule(
      0.9, begin_step=0, end_step=30, frequency=5)
  two_of_four = lambda params: jax.tree.map(
      lambda x: None if x.ndim < 2 else optax_prune.n_of_m(
          2, 4, axis=-2 if x.shape[-2] % 4 == 0 else -1), params)
  out = []
  for scope in ("layer", "global"):
    for threshold in ("sort", "bisect", "histogram", "auto"):
      for score in ("magnitude", "saliency", "random"):
        out.append((f"{scope}-{threshold}-{score}",
                    dict(schedule=schedule, scope=scope, threshold=threshold, score=score)))
  for threshold in ("sort", "bisect", "histogram"):
    for name, granularity in (
        ("blocks-mean", optax_prune.blocks((4, 4))),
        ("blocks-max", optax_prune.blocks((4, 4), reduce="max")),
        ("channels-l1", optax_prune.channels(norm="l1")),
        ("channels-l2", optax_prune.channels()),
        ("2:4", two_of_four),
    ):
      for scope in ("layer", "global"):
        out.append((f"{name}-{scope}-{threshold}",
                    dict(schedule=schedule, scope=scope, threshold=threshold,
                         granularity=granularity)))
    out.append((f"erk-{threshold}", dict(schedule=schedule, threshold=threshold,
                                         distribution="erk")))
    out.append((f"erk-by-path-{threshold}", dict(
        schedule=optax_prune.by_path({r"Dense_1": None}, default=schedule),
        threshold=threshold, distribution="erk")))
  out.append(("per-subtree", dict(schedule={
      "Conv_0": 0.6, "Conv_1": schedule, "Dense_0": schedule, "Dense_1": None})))
  return out


def deep_configurations():
  """(name, kwargs) on the deep MLP (`deep_params`): many leaves of one shape,
  ranked by one kernel instance, beside leaves of other shapes."""
  schedule = optax_prune.polynomial_schedule(
      0.9, begin_step=0, end_step=30, frequency=5)
  out = [("deep-default", dict(schedule=schedule))]
  for distribution in ("erk", "uniform"):
    for threshold in ("sort", "bisect", "histogram"):
      out.append((f"deep-{distribution}-{threshold}", dict(
          schedule=schedule, distribution=distribution, threshold=threshold)))
  out.append(("deep-global", dict(schedule=schedule, scope="global")))
  out.append(("deep-saliency", dict(schedule=schedule, score="saliency")))
  return out


def deep_params():
  """12 kernels of 16x16 (ties: a few exact zeros and repeated values) and
  four of other shapes, with biases."""
  rng = np.random.default_rng(0)
  shapes = [(16, 16)] * 12 + [(16, 8), (8, 16), (16, 8), (4, 4)]
  params = {}
  for i, shape in enumerate(shapes):
    kernel = np.round(rng.standard_normal(shape), 1).astype(np.float32)
    kernel[0, :3] = 0.0
    params[f"layer_{i:02d}"] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(shape[-1])}
  return params


def fingerprints() -> dict[str, list[str]]:
  cnn = CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  loss = lambda p: sum(jnp.sum(jnp.sin(3.0 * x) + 0.1 * x) for x in jax.tree.leaves(p))
  result = {}
  runs = ([(name, kwargs, cnn) for name, kwargs in configurations()]
          + [(name, kwargs, deep_params()) for name, kwargs in deep_configurations()])
  for name, kwargs, params in runs:
    kwargs = dict(kwargs)
    if callable(kwargs.get("granularity")) and not hasattr(kwargs["granularity"], "unit_scores"):
      kwargs["granularity"] = kwargs["granularity"](params)
    tx = optax.chain(optax.adam(0.02), optax_prune.magnitude_pruning(**kwargs))

    @jax.jit
    def step(p, s, tx=tx):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s

    p, s = params, tx.init(params)
    digest = hashlib.sha256()
    for _ in range(STEPS):
      p, s = step(p, s)
      masks = optax_prune.find_pruning_state(s).masks
      for leaf in jax.tree.leaves(masks):
        digest.update(np.asarray(leaf).tobytes())
    result[name] = digest.hexdigest()
    print(name, result[name][:16], flush=True)
  return result


def main(argv):
  if argv[:1] == ["--compare"]:
    before, after = (json.loads(open(f).read()) for f in argv[1:3])
    differ = sorted(k for k in before if before[k] != after.get(k))
    print(f"{len(before)} configurations, {len(differ)} differ: {differ}")
    return 1 if differ else 0
  with open(argv[0], "w") as f:
    json.dump(fingerprints(), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
