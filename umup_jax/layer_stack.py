"""Converting trees between the looped and the scanned layer layout (``model.scan_layers``).

A Python loop of blocks names them ``layer_0`` … ``layer_{L-1}``; ``nn.scan`` stores one
``layers`` subtree whose leaves carry a leading axis of size L.  The two layouts hold the same
numbers (:class:`umup_jax.model.Block` is the same module either way), so any tree built from
the params converts losslessly:

* params, gradients, updates, sown activations, FP8 probe statistics;
* the optimizer state (optax's ``ScaleByAdamState.mu``/``nu`` are param-shaped trees inside
  tuples/NamedTuples; an orbax restore without a target gives dicts and lists instead);
* the metadata tree of :func:`umup_jax.parametrization.param_metadata`: stacking a
  :class:`~umup_jax.parametrization.ParamMeta` adds the logical axis name ``layers`` in front,
  as ``nn.scan`` does; unstacking removes it.

To resume a looped run's checkpoint in a scanned model (or the reverse), restore its state as
host arrays, convert it with :func:`stack_layers` (or :func:`unstack_layers`) and save it under
the new config; see ``tests/test_layer_stack.py``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

LAYERS = "layers"
_LAYER_KEY = re.compile(r"^layer_(\d+)$")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _rebuild(node: Any, children: list) -> Any:
    if _is_namedtuple(node):
        return type(node)(*children)
    return type(node)(children)


def _layer_keys(node: Mapping) -> list[str]:
    """The ``layer_<i>`` keys of a mapping, in order of i; they must be 0 … L−1."""
    found = sorted((int(m.group(1)), k) for k in node if (m := _LAYER_KEY.match(str(k))))
    if [i for i, _ in found] != list(range(len(found))):
        raise ValueError(f"layer keys {[k for _, k in found]} are not layer_0 … layer_{{L-1}}")
    return [k for _, k in found]


def _fields(box: Any) -> dict:
    """A metadata box's static fields (role, fan-in, names, …), without its value."""
    return {f.name: getattr(box, f.name) for f in dataclasses.fields(box) if f.name != "value"}


def _stack_leaves(path: str, leaves: list) -> Any:
    first = leaves[0]
    if isinstance(first, flax_meta.AxisMetadata):
        if any(type(m) is not type(first) or _fields(m) != _fields(first) for m in leaves):
            raise ValueError(f"{path}: the layers' metadata differ, they cannot be stacked")
        values = [m.value for m in leaves]
        value = None if values[0] is None else _stack(values)
        return first.replace_boxed(value).add_axis(0, {nn.PARTITION_NAME: LAYERS})
    shapes = {np.shape(x) for x in leaves}
    if len(shapes) != 1:
        raise ValueError(f"{path}: the layers' arrays differ in shape {sorted(shapes)}")
    return _stack(leaves)


def _stack(arrays: list) -> Any:
    """np.stack for host arrays, jnp.stack for JAX arrays and tracers (inside jit)."""
    if all(isinstance(a, (np.ndarray, np.generic, int, float)) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def _stack_trees(path: str, trees: list) -> Any:
    """One tree whose leaves are the stacked leaves of ``trees`` (same structure)."""
    is_leaf = lambda x: isinstance(x, flax_meta.AxisMetadata)  # noqa: E731
    flat = [jax.tree_util.tree_flatten(t, is_leaf=is_leaf) for t in trees]
    treedef = flat[0][1]
    for i, (_, other) in enumerate(flat[1:], 1):
        if other != treedef:
            raise ValueError(f"{path}: layer_{i} has a different structure than layer_0")
    leaves = [_stack_leaves(path, list(group)) for group in zip(*(f[0] for f in flat))]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def stack_layers(tree: Any, _path: str = "") -> Any:
    """Every mapping in ``tree`` with keys ``layer_0`` … ``layer_{L-1}`` gets them replaced by
    one ``layers`` entry whose leaves are the layers' leaves stacked on a new leading axis."""
    if isinstance(tree, flax_meta.AxisMetadata):
        return tree
    if isinstance(tree, Mapping):
        keys = _layer_keys(tree)
        out = {}
        for k, v in tree.items():
            if k in keys:
                continue
            out[k] = stack_layers(v, f"{_path}/{k}")
        if keys:
            if LAYERS in tree:
                raise ValueError(f"{_path or '/'} has both layer_<i> keys and {LAYERS!r}")
            out[LAYERS] = _stack_trees(f"{_path}/{LAYERS}", [tree[k] for k in keys])
        return type(tree)(out) if not isinstance(tree, dict) else out
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [stack_layers(v, f"{_path}/{i}") for i, v in enumerate(tree)])
    return tree


def _unstack_leaf(path: str, leaf: Any, i: int, depth: int) -> Any:
    if isinstance(leaf, flax_meta.AxisMetadata):
        names = tuple(getattr(leaf, "names", ()))
        if not names or names[0] != LAYERS:
            raise ValueError(f"{path}: metadata names {names} do not start with {LAYERS!r}")
        value = leaf.value
        meta = leaf.remove_axis(0, {nn.PARTITION_NAME: LAYERS})
        return meta.replace_boxed(None if value is None else value[i])
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] != depth:
        raise ValueError(f"{path}: shape {np.shape(leaf)} has no leading layers axis of "
                         f"size {depth}")
    return leaf[i]


def _depth(path: str, stacked: Any) -> int:
    is_leaf = lambda x: isinstance(x, flax_meta.AxisMetadata)  # noqa: E731
    sizes = set()
    for leaf in jax.tree_util.tree_leaves(stacked, is_leaf=is_leaf):
        value = leaf.value if isinstance(leaf, flax_meta.AxisMetadata) else leaf
        if value is not None and np.ndim(value):
            sizes.add(np.shape(value)[0])
    if len(sizes) > 1:
        raise ValueError(f"{path}: leading axes of different sizes {sorted(sizes)}")
    if not sizes:
        raise ValueError(f"{path}: no arrays to take the number of layers from; pass depth")
    return sizes.pop()


def unstack_layers(tree: Any, depth: int | None = None, _path: str = "") -> Any:
    """The inverse of :func:`stack_layers`: every ``layers`` entry of a mapping becomes
    ``layer_0`` … ``layer_{L-1}``, slicing its leaves' leading axis (L from the arrays, or
    ``depth`` for a metadata tree without values)."""
    if isinstance(tree, flax_meta.AxisMetadata):
        return tree
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            if k != LAYERS:
                out[k] = unstack_layers(v, depth, f"{_path}/{k}")
                continue
            path = f"{_path}/{k}"
            if _layer_keys(tree):
                raise ValueError(f"{_path or '/'} has both layer_<i> keys and {LAYERS!r}")
            n = depth if depth is not None else _depth(path, v)
            is_leaf = lambda x: isinstance(x, flax_meta.AxisMetadata)  # noqa: E731
            for i in range(n):
                out[f"layer_{i}"] = jax.tree.map(
                    lambda leaf, i=i: _unstack_leaf(path, leaf, i, n), v, is_leaf=is_leaf)
        return type(tree)(out) if not isinstance(tree, dict) else out
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [unstack_layers(v, depth, f"{_path}/{i}")
                               for i, v in enumerate(tree)])
    return tree
