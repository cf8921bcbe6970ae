"""Random nested pytrees (dicts, lists, tuples, None, flax structs, NamedTuples)
and configurations against the NumPy reference."""

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import optax_prune
from tests import reference

_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    elements=st.floats(-4, 4, width=32) | st.sampled_from([0.0, 1.0, -1.0]))


@flax.struct.dataclass
class _Block:  # A flax struct: two child subtrees and a static field.
  weight: Any  # Not `kernel`: the default `where` would then prune only kernels.
  extra: Any
  name: str = flax.struct.field(pytree_node=False, default="block")


class _Pair(NamedTuple):
  first: Any
  second: Any


_trees = st.recursive(
    _arrays | st.none(),
    lambda children: st.dictionaries(st.sampled_from("abcd"), children, max_size=3)
    | st.lists(children, max_size=3) | st.tuples(children, children)
    | st.builds(_Block, children, children, st.sampled_from(["x", "y"]))
    | st.builds(_Pair, children, children),
    max_leaves=6)


# Small leaves at high sparsity are pruned whole: warned about, tested in test_bad_inputs.
@pytest.mark.filterwarnings("ignore:.*pruned whole:UserWarning")
@settings(max_examples=30)
@given(tree=_trees, sparsity=st.floats(0, 1, width=32),
       scope=st.sampled_from(["layer", "global"]),
       threshold=st.sampled_from(["sort", "bisect", "histogram", "auto"]))
def test_random_pytrees_prune_like_the_reference(tree, sparsity, scope, threshold):
  # A container at the top: `params=None` is how optax says "not passed".
  params = {"root": jax.tree.map(jnp.asarray, tree)}
  tx = optax_prune.magnitude_pruning(float(sparsity), scope=scope, threshold=threshold,
                                    distribution="uniform")
  updates, state = tx.update(params, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  leaves = jax.tree.leaves(params)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  masks = jax.tree.leaves(state.masks, is_leaf=is_masked)
  pruned = [x for x, m in zip(leaves, masks) if not is_masked(m)]
  assert len(pruned) == sum(np.ndim(x) >= 2 for x in leaves)  # The default `where`.
  if scope == "global":
    expected = reference.keep_masks([np.asarray(x) for x in pruned], sparsity)
  else:
    expected = [reference.keep_masks([np.asarray(x)], sparsity)[0] for x in pruned]
  got = [np.asarray(m) for m in masks if not is_masked(m)]
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g, e)
  for x, m in zip(jax.tree.leaves(new), masks):
    if not is_masked(m):
      assert np.all(np.asarray(x)[~np.asarray(m)] == 0.0)
