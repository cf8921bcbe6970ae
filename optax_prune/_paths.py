"""Which value and which mask belong to which leaf of the params.

* :func:`by_path` rules and pytree prefixes both give one setting per leaf
  (:func:`per_leaf`); :func:`layer_axes` makes ``layer_axis`` rules from the
  axis names flax records;
* :func:`default_where` is the rule for the leaves pruned by default;
* :func:`normalized` is the path rules and predicates see: an nnx
  ``Variable``'s trailing ``.value`` dropped, so linen, nnx and plain pytrees
  name a leaf alike;
* :func:`pair_masks` pairs a tree's leaves with the pruning state's masks.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_prune import _bits


@dataclasses.dataclass(frozen=True)
class PathRules:
  """Ordered ``(pattern, value)`` rules and a default; see :func:`by_path`."""

  rules: tuple[tuple[str, Any], ...]
  default: Any

  def values(self) -> list:
    return [value for _, value in self.rules] + [self.default]

  def resolve(self, path: str) -> Any:
    for pattern, value in self.rules:
      if re.search(pattern, path):
        return value  # The first rule that matches wins.
    return self.default


def by_path(rules: Mapping[str, Any], default: Any) -> PathRules:
  r"""Per-leaf values chosen by regular expressions on the leaf's path.

  Usable for ``magnitude_pruning``'s ``schedule``, ``granularity`` and
  ``layer_axis``. A
  leaf's path is ``jax.tree_util.keystr`` of its key path (such as
  ``"['Dense_0']['kernel']"``); the first pattern that ``re.search`` finds in
  it decides, else ``default``.

  Args:
    rules: ``{pattern: value}``, tried in order.
    default: the value of leaves that no pattern matches.

  Returns:
    Rules that ``magnitude_pruning`` resolves per leaf at ``init``.

  Examples:
    Keep the first and last layers dense, prune the rest along one schedule
    (with ``distribution="erk"`` the target is shared among the rest):

    >>> import optax_prune
    >>> schedule = optax_prune.by_path(  # Anchored: not Dense_30.
    ...     {r"\['Dense_(0|3)'\]": None}, default=optax_prune.polynomial_schedule(
    ...         0.9, begin_step=0, end_step=1000, frequency=100))
    >>> tx = optax_prune.magnitude_pruning(schedule, distribution="erk")
  """
  if not isinstance(rules, Mapping):
    raise ValueError(f"`rules` must be a mapping {{pattern: value}}; got {rules!r}.")
  for pattern in rules:
    if not isinstance(pattern, str):
      raise ValueError(f"`rules` keys must be regular expressions (str); got {pattern!r}.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"`rules` pattern {pattern!r} is not a regular expression: {e}") from e
  return PathRules(tuple(rules.items()), default)


def layer_axes(tree: Any, axis_name: str = "layers") -> PathRules:
  r"""``layer_axis`` rules from the axis names that flax records on params.

  flax records a scanned stack's layer axis by name where the params carry
  axis names: linen's ``nn.scan(..., metadata_params={nn.PARTITION_NAME:
  "layers"})`` over layers whose params are boxed by ``nn.with_partitioning``
  (``nn.Partitioned.names``), and nnx's ``nnx.scan`` / ``nnx.vmap`` with
  ``transform_metadata={nnx.PARTITION_NAME: "layers"}`` over ``Variable``\s
  that have ``out_sharding`` metadata. Pass the params as flax holds them
  (linen's boxed ``variables["params"]``, ``nnx.state(model, nnx.Param)``);
  the rules match the unboxed or pure params that ``update`` then gets.

  Args:
    tree: params with linen boxes or nnx ``Variable``\s.
    axis_name: the name given to the layer axis.

  Returns:
    :func:`by_path` rules: each leaf whose names hold ``axis_name`` gets its
    position, every other leaf None.

  Raises:
    ValueError: no leaf records ``axis_name`` (the names seen are listed).

  Examples:
    >>> import jax, flax.linen as nn, optax_prune
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "mlp"))
    ...     return nn.Dense(4, kernel_init=init)(x), None
    >>> stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
    ...                 length=3, metadata_params={nn.PARTITION_NAME: "layers"})
    >>> params = stack().init(jax.random.key(0), jax.numpy.ones((2, 4)), None)["params"]
    >>> optax_prune.layer_axes(params, "layers").rules
    (("^\\['Dense_0'\\]\\['kernel'\\]$", 0),)
  """
  is_box = lambda x: hasattr(x, "get_metadata") or hasattr(x, "unbox")
  rules, seen = {}, set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
    names = _axis_names(leaf) if is_box(leaf) else None
    seen.update(n for n in names or () if n is not None)
    if names and axis_name in names:
      key = jax.tree_util.keystr(normalized(path))
      rules["^" + re.escape(key) + "$"] = tuple(names).index(axis_name)
  if not rules:
    raise ValueError(
        f"no leaf of the tree records an axis named {axis_name!r} (names seen:"
        f" {sorted(map(str, seen)) or 'none'}). flax records a scanned layer axis only"
        " on params with axis names (linen `nn.with_partitioning` and"
        " `metadata_params={nn.PARTITION_NAME: ...}`, nnx `out_sharding` and"
        " `transform_metadata`), and only on the boxed params. Otherwise pass"
        " `layer_axis` yourself: `by_path({pattern: axis}, default=None)`.")
  return by_path(rules, default=None)


def _axis_names(box: Any) -> Optional[tuple]:
  """The axis names of a linen box (``.names``) or an nnx ``Variable``
  (its ``out_sharding`` or ``sharding_names`` metadata), if any."""
  names = getattr(box, "names", None)
  if names is None and hasattr(box, "get_metadata"):
    metadata = box.get_metadata()
    names = metadata.get("out_sharding") or metadata.get("sharding_names")
  return tuple(names) if isinstance(names, (tuple, list)) else None


def spec_values(spec: Any, is_leaf: Callable[[Any], bool]) -> list:
  """Every value a per-leaf setting can take: a prefix tree's leaves, or rules'."""
  if isinstance(spec, PathRules):
    return spec.values()
  return jax.tree.leaves(spec, is_leaf=is_leaf)


def per_leaf(
    spec: Any, tree: Any, is_leaf: Optional[Callable[[Any], bool]], name: str
) -> list:
  """One value of ``spec`` per leaf of ``tree``: by path rules, or by prefix.

  A prefix tree's value applies to every leaf of the subtree it stands for,
  as in ``optax.masked``.
  """
  if isinstance(spec, PathRules):
    paths = [jax.tree_util.keystr(normalized(path))
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    unused = [p for p, _ in spec.rules if paths and not any(re.search(p, x) for x in paths)]
    if unused:
      raise ValueError(
          f"`{name}`'s `by_path` rule {unused[0]!r} matches no leaf; the leaves'"
          f" paths are like {paths[0]!r} (first match wins, `re.search`)."
          " Fix or remove the rule."
      )
    return [spec.resolve(p) for p in paths]
  values, prefix_def = jax.tree.flatten(spec, is_leaf=is_leaf)
  try:
    subtrees = prefix_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"`{name}` must be a single value or a pytree whose structure is a"
        f" prefix of the params' structure; they do not match: {e}"
    ) from e
  return [v for v, sub in zip(values, subtrees) for _ in jax.tree.leaves(sub)]


def normalized(path: tuple) -> tuple:
  """``path`` without an nnx ``Variable``'s trailing ``.value`` attribute."""
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
    return path[:-1]
  return path


def readable(path: tuple) -> str:
  """``path`` as a slash-separated name for loggers: ``Dense_0/kernel``."""
  parts = []
  for key in normalized(path):
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(getattr(key, "key", key)))
  return "/".join(parts)


def leaf_name(path: tuple) -> Optional[str]:
  """The leaf's own name: its last dict key or attribute (None for an index)."""
  path = normalized(path)
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.DictKey):
    return str(last.key)
  if isinstance(last, jax.tree_util.GetAttrKey):
    return last.name
  return None


def default_where(path_leaves: list, tree: Any = None) -> list[bool]:
  """Per leaf, whether it is pruned by default.

  Floating leaves with ``ndim >= 2`` named ``kernel``: the weights of flax
  linen and nnx ``Dense``, ``Conv``, ``Einsum`` and attention projections, not
  their biases (2-D in attention), norm scales or embeddings. In equinox
  modules (``tree``), the ``weight`` of every ``eqx.nn.Linear``, ``Conv`` and
  ``ConvTranspose`` (those inside ``MLP`` and ``MultiheadAttention``
  included), not ``Embedding`` or norms. Params with neither (plain dicts,
  haiku) fall back to every floating leaf with ``ndim >= 2``; the gradual
  pruning guide shows the ``where`` to use there.
  """
  is_float = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
  matrix = [len(getattr(leaf, "shape", ())) >= 2 and is_float(leaf) for _, leaf in path_leaves]
  weights = _equinox_weights(tree)
  if weights is not None:
    return [m and jax.tree_util.keystr(path) in weights
            for m, (path, _) in zip(matrix, path_leaves)]
  kernel = [m and leaf_name(path) == "kernel" for m, (path, _) in zip(matrix, path_leaves)]
  return kernel if any(kernel) else matrix


def _equinox_weights(tree: Any) -> Optional[set[str]]:
  """Paths of the ``weight`` of equinox's linear and convolution layers in
  ``tree``; None if it holds no equinox module. Equinox is not imported here:
  a tree cannot hold its modules unless the user imported it."""
  eqx = sys.modules.get("equinox")
  if eqx is None or tree is None:
    return None
  layers = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
  is_module = lambda x: isinstance(x, eqx.Module)
  found = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, layers))[0]
  if not is_module(tree) and not any(isinstance(x, layers) for _, x in found):
    return None
  return {jax.tree_util.keystr(path + (jax.tree_util.GetAttrKey("weight"),))
          for path, x in found if isinstance(x, layers)}


def is_masked(x: Any) -> bool:
  """Whether ``x`` stands for a leaf without a mask (``optax.MaskedNode``)."""
  return isinstance(x, optax.MaskedNode)


def pair_masks(tree: Any, masks: Any, name: str, *, unpack: bool = True) -> tuple[list, list]:
  """``tree``'s (path, leaf) pairs and each leaf's mask (None: not pruned).

  ``masks`` is like the pruning state's: keep-masks and ``optax.MaskedNode``
  (read as None), or None for no masks at all. The same leaves under wrapper
  nodes (an ``nnx.State`` of ``Param`` beside the optimizer state's pure
  dicts) are paired by path prefix.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if masks is None:
    return path_leaves, [None] * len(path_leaves)
  try:
    mask_leaves = treedef.flatten_up_to(masks)
  except (ValueError, TypeError):
    mask_paths = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked)[0]
    mask_leaves = [m for _, m in mask_paths]
    if len(mask_paths) != len(path_leaves) or not all(
        jax.tree_util.keystr(path).startswith(jax.tree_util.keystr(mask_path))
        for (mask_path, _), (path, _) in zip(mask_paths, path_leaves)
    ):
      raise ValueError(
          f"`masks` must have the structure of `{name}`, as the pruning"
          " state's `masks` have for the params."
      ) from None
  if not unpack:
    return path_leaves, [None if is_masked(m) else m for m in mask_leaves]
  # Packed masks (`packed_masks=True`) are read as bool masks here, on the host.
  return path_leaves, [
      None if is_masked(m) else
      _bits.unpack_np(m, np.shape(x)) if hasattr(x, "shape") and _bits.is_packed_for(m, np.shape(x))
      else m for m, (_, x) in zip(mask_leaves, path_leaves)]
