"""Every Python code block of the README and of the guides runs, with checks of what it computed.

The blocks of one file run in order in one namespace (``tests/doc_blocks.py``).
Beside the asserts the guides show their readers, ``CHECKS`` tests what a
block leaves behind; each check names a substring found in exactly one block
of its file, so a check cannot silently stop running when a guide changes.
"""

import os
import pathlib
import subprocess
import sys

import optax
import pytest

import optax_prune
from tests import doc_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
FILES = [ROOT / "README.md", *GUIDES]
# Guides whose examples need several devices: run in a subprocess on 8 faked CPU devices.
EIGHT_DEVICES = {"sharding.md"}
PROSE_ONLY = {"design.md"}  # Its one code block is a diagram.


def _state(scope, name="opt_state"):
  return optax_prune.find_pruning_state(scope[name])


def _check_mask_update_steps(scope):
  assert scope["due"] == {0, 100, 200, 300}
  state = _state(scope)
  assert int(state.count) == 400 and int(state.skipped_mask_updates) == 0
  summary = optax_prune.sparsity_summary(scope["p"], scope["opt_state"])
  assert summary.masked_sparsity == pytest.approx(0.9, abs=1e-3) and "WARNING" not in str(summary)


def _check_erk(scope):
  sparsities = [float((scope["erk"][n]["kernel"] == 0).mean()) for n in scope["params"]]
  kernels = [scope["params"][n]["kernel"].size for n in scope["params"]]
  pruned = sum(round(s * k) for s, k in zip(sparsities, kernels))
  assert pruned == round(0.9 * sum(kernels))  # ERK: 0.9 of all kernels together.
  assert len(set(sparsities)) > 1 and max(sparsities) < 1
  assert all(float((scope["uniform"][n]["kernel"] == 0).mean()) == pytest.approx(0.9, abs=1e-3)
             for n in scope["params"])


def _check_weight_copies(scope):
  masks = _state(scope).masks
  for name, mask in masks.items():
    kernel = mask["kernel"]
    if not isinstance(kernel, optax.MaskedNode):
      assert not (scope["evaluated"][name]["kernel"] * ~kernel).any(), name


def _check_shrink(scope):
  assert scope["widths"] == (32, 32)
  assert len(scope["groups"].prunable) == 2


def _check_scanned(scope):
  assert _state(scope).pruned_units.tolist() == [320] + [2048] * 12


def _check_lottery(scope):
  masks = scope["masks"]
  for leaf in optax_prune.unpack_masks(masks, scope["ticket"]).values():
    kernel = leaf["kernel"]
    assert int((~kernel).sum()) == round(scope["sparsity"] * kernel.size)


CHECKS = {
    "gradual_pruning.md": [("mask_update_steps(", _check_mask_update_steps),
                           ('distribution="uniform"))', _check_erk),
                           ("schedule_free_eval_params", _check_weight_copies)],
    "shrinking.md": [("widths = (small.params", _check_shrink)],
    "scanned_stacks.md": [("layer_axis=layers", _check_scanned)],
    "oneshot_and_sensitivity.md": [("early_params, is_leaf", _check_lottery)],
}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_code_block_runs(path):
  code = doc_blocks.blocks(path)
  assert bool(code) != (path.name in PROSE_ONLY), f"{path.name}: {len(code)} Python code blocks"
  checks = CHECKS.get(path.name, [])
  for marker, _ in checks:
    assert sum(marker in block for block in code) == 1, (path.name, marker)
  if path.name in EIGHT_DEVICES:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8"
               " --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-m", "tests.doc_blocks", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stderr[-4000:]
    return
  done = []

  def after(block, scope):
    for marker, check in checks:
      if marker in block:
        check(scope)
        done.append(marker)

  doc_blocks.run(path, after)
  assert len(done) == len(checks)


def test_every_guide_is_linked_from_the_index_and_the_readme():
  index = (ROOT / "docs" / "index.rst").read_text()
  readme = (ROOT / "README.md").read_text()
  for guide in GUIDES:
    assert f"guides/{guide.stem}\n" in index, guide.name
  assert len(readme.splitlines()) <= 220  # A newcomer reads it in ten minutes; the rest is guides.
  for guide in GUIDES:
    assert f"docs/guides/{guide.name}" in readme, guide.name
