"""Shared test set-up."""

import jax
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def strict_promotion():
  """Strict dtype promotion: implicit promotions in our code are bugs.

  Not global: optax's own optimizers rely on standard promotion.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield
