"""The shrunk model as a callable (`shrink(...).apply`), against the masked model.

Each model of tests/test_coupling.py (GPT-2's heads, split from a fused
projection, among them), and a model-zoo style network whose widths are
literals in its code, is pruned with `coupled_channels`, shrunk, and run
through `apply`: jitted, it gives the masked model's outputs (rtol 1e-5, atol
1e-5 * max|output|), it differentiates, and it exports with `jax.export` to a
fresh process.
"""

import functools
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_prune
from optax_prune import _small_model
from tests import test_coupling as models

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ZooNet(nn.Module):
  """Widths written as literals, as model zoos write them: no width arguments.

  BatchNorm, a residual block, a block with a projection shortcut, a
  depthwise convolution, and attention over positions whose heads come from
  a reshape (BERT's way), then a classifier.
  """

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)
    x = nn.relu(bn()(nn.Conv(16, (3, 3))(x)))
    y = nn.relu(bn()(nn.Conv(12, (3, 3))(x)))
    x = nn.relu(x + bn()(nn.Conv(16, (3, 3))(y)))
    y = nn.relu(bn()(nn.Conv(8, (3, 3), strides=2)(x)))  # Projection shortcut: 16 -> 24.
    x = nn.relu(bn()(nn.Conv(24, (1, 1), strides=2)(x)) + bn()(nn.Conv(24, (3, 3))(y)))
    x = nn.Conv(24, (3, 3), feature_group_count=24)(x)  # Depthwise.
    tokens = x.reshape(x.shape[0], -1, 24)
    q, k, v = (nn.Dense(16)(tokens).reshape(x.shape[0], -1, 4, 4) for _ in range(3))
    tokens = tokens + nn.Dense(24)(models._attention(q, k, v))  # pylint: disable=protected-access
    return nn.Dense(10)(jnp.mean(tokens, axis=1))


def _linen(model, x, with_state):
  variables = models._perturbed(jax.jit(model.init)(jax.random.key(0), x))  # pylint: disable=protected-access
  if not with_state:
    return (lambda p, x: model.apply({"params": p}, x)), variables["params"], None, x
  state = {"batch_stats": jax.tree.map(jnp.abs, variables["batch_stats"])}
  return (lambda p, s, x: model.apply({"params": p, **s}, x)), variables["params"], state, x


def _nnx():
  model = models.NnxMLP((8, 10), nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = jax.tree.map(jnp.abs, models._perturbed(rest))  # pylint: disable=protected-access
  return (lambda p, s, x: nnx.merge(graphdef, p, s)(x)), params, rest, jnp.ones((4, 6))


CASES = {
    "res_cnn": lambda: models._res_cnn(),  # pylint: disable=protected-access,unnecessary-lambda
    "flatten": lambda: _linen(models.FlatCNN(), jax.random.normal(jax.random.key(1), (2, 6, 6, 2)), False),
    "transformer": lambda: _linen(models.TinyTransformer(),
                                  jax.random.randint(jax.random.key(2), (2, 5), 0, 11), False),
    "zoo": lambda: _linen(ZooNet(), jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), True),
    # Heads behind a reshape, cut from a fused q/k/v kernel by `split`.
    "gpt2": lambda: _linen(models.GPT2Block(), jax.random.normal(jax.random.key(1), (2, 5, 16)),
                           False),
    "nnx": _nnx,
}


@functools.cache
def _shrunk(name):
  fn, params, state, x = CASES[name]()
  args = (params,) if state is None else (params, state)
  groups = optax_prune.channel_groups(fn, *args, x) if state is None else \
      optax_prune.channel_groups(fn, params, x, state=state)
  chosen = [g for g in groups.prunable if "['value']" not in g.name]  # One qkv_features.
  pruned, _ = models._prune(params, chosen, 0.5)  # pylint: disable=protected-access
  small = optax_prune.shrink(chosen, pruned, state)
  masked = jax.jit(fn)(pruned, x) if state is None else jax.jit(fn)(pruned, state, x)
  smalls = (small.params,) if state is None else (small.params, small.state)
  return small, smalls, masked, x, params


@pytest.mark.parametrize("name", list(CASES))
def test_the_shrunk_callable_computes_the_masked_outputs(name):
  small, smalls, masked, x, params = _shrunk(name)
  out = jax.jit(small.apply)(*smalls, x)
  scale = float(jnp.max(jnp.abs(masked)))
  np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-5 * scale)
  assert small.max_abs_diff <= 1e-5 * scale
  assert sum(a.size for a in jax.tree.leaves(smalls[0])) < sum(a.size for a in jax.tree.leaves(params))
  # Differentiable, in the small params' shapes.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(small.apply(p, *smalls[1:], x) ** 2)))(smalls[0])
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, smalls[0])
  with pytest.raises(ValueError, match="the shrunk model takes"):
    small.apply(params, *smalls[1:], x)


def test_a_mismatch_is_refused_with_the_largest_difference(monkeypatch):
  fn, params, state, x = models._res_cnn()  # pylint: disable=protected-access
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  pruned, _ = models._prune(params, groups, 0.5)  # pylint: disable=protected-access
  build = _small_model.build
  # A model whose shrunk form differs (as a width read in Python would make it).
  monkeypatch.setattr(_small_model, "build", lambda *a: (
      lambda *args: jax.tree.map(lambda y: y + 0.5, build(*a)(*args))))
  with pytest.warns(UserWarning, match=r"cannot give a callable.*differ .* by up to 0\.5"):
    small = optax_prune.shrink(groups, pruned, state)
  assert small.params["stem"]["kernel"].shape[-1] == 4  # The params still shrink.
  with pytest.raises(ValueError, match=r"by up to 0\.5"):
    small.apply(small.params, small.state, x)


def test_the_shrunk_model_exports_and_runs_in_a_fresh_process(tmp_path):
  small, smalls, masked, x, _ = _shrunk("zoo")
  exported = jax.export.export(jax.jit(small.apply))(*smalls, x)
  assert exported.platforms == ("cpu",)
  (tmp_path / "model.bin").write_bytes(exported.serialize())
  leaves = jax.tree.leaves((*smalls, x))
  np.savez(tmp_path / "args.npz", *[np.asarray(a) for a in leaves])
  script = (
      "import sys, numpy as np, jax\n"
      "from jax import export\n"
      "exported = export.deserialize(open(sys.argv[1] + '/model.bin', 'rb').read())\n"
      "args = np.load(sys.argv[1] + '/args.npz')\n"
      "leaves = [args[f'arr_{i}'] for i in range(len(args.files))]\n"
      "flat = jax.tree.unflatten(exported.in_tree, leaves)\n"
      "np.save(sys.argv[1] + '/out.npy', np.asarray(exported.call(*flat[0], **flat[1])))\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), masked, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(masked))))


def test_an_nnx_model_is_shrunk_in_place_by_nnx_update():
  model = models.NnxMLP((8, 10), nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (4, 6))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = optax_prune.channel_groups(lambda p, s, x: nnx.merge(graphdef, p, s)(x), params, x,
                                      state=rest)
  pruned, _ = models._prune(params, groups, 0.5)  # pylint: disable=protected-access
  nnx.update(model, pruned)
  masked = model(x)
  small = optax_prune.shrink(groups, pruned, rest)
  nnx.update(model, small.params, small.state)  # The module's arrays take the new shapes.
  assert model.up.kernel.value.shape == (6, 4) and model.norm.mean.value.shape == (4,)
  np.testing.assert_allclose(model(x), masked, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(masked))))
