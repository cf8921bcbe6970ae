"""Shared test set-up."""

import os

import jax
import pytest
from hypothesis import settings

from tests import mesh_run

# The suite is mostly compilation. LLVM's backend optimisation buys run speed
# the tests do not need, for a third of the suite's CPU time; what they check
# (masks, counts, partitioning, outputs against references) does not depend on
# it. Set before any backend starts, so the subprocesses of the suite (smoke
# runs of the benchmarks, notebooks, fresh-process checks) inherit it too.
# Benchmarks run with XLA's defaults.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# 30 examples per property keep the whole suite near 4 minutes on 2 cores.
settings.register_profile("ci", max_examples=30, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def strict_promotion():
  """Strict dtype promotion: implicit promotions in our code are bugs.

  Not global: optax's own optimizers rely on standard promotion.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield


def _selects_mesh_checks(config) -> bool:
  """Whether the session runs all of tests/test_sharding.py (no -k, no -m)."""
  if config.option.keyword or config.option.markexpr or config.option.collectonly:
    return False
  target = os.path.join(mesh_run.ROOT, "tests", "test_sharding.py")
  paths = [os.path.abspath(a.split("::")[0]) for a in config.args] or [os.getcwd()]
  return any(target == p or target.startswith(p.rstrip(os.sep) + os.sep) for p in paths)


def pytest_sessionstart(session):
  # The controller (or a plain run) starts the 8-device mesh checks now, in the
  # background, so they overlap with the other tests (tests/mesh_run.py).
  config = session.config
  if hasattr(config, "workerinput") or not _selects_mesh_checks(config):
    return
  config.mesh_run = mesh_run.start(config._tmp_path_factory.getbasetemp())


def pytest_sessionfinish(session):
  proc = getattr(session.config, "mesh_run", None)
  if proc is not None:
    mesh_run.stop(proc)  # Still running only if no test waited for it.
