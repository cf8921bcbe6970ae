"""The public API: `__all__` matches the exports; every name is documented."""

import inspect

import optax_prune


def test_all_matches_public_names():
  public = {n for n in dir(optax_prune) if not n.startswith("_")}
  modules = {n for n in public if inspect.ismodule(getattr(optax_prune, n))}
  assert set(optax_prune.__all__) == public - modules


def test_every_public_name_has_a_docstring_with_an_example():
  for name in optax_prune.__all__:
    obj = getattr(optax_prune, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if inspect.isfunction(obj):
      assert ">>>" in doc, f"{name} has no example"
