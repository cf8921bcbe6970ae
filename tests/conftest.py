"""Shared test set-up."""

import jax
import pytest
from hypothesis import settings

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
