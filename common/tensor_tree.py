"""State dicts (optimizer, LR schedule, gradient scaler) as a JSON tree plus a flat dict of tensors.

`torch.save` pickles such dicts, and unpickling can run code; JSON and safetensors cannot. `split_tensors`
turns a nested state dict into a JSON-able tree whose leaves are numbers, strings, booleans and None,
and whose tensors are references (`{"__tensor__": "optimizer/state/0/exp_avg"}`) into a flat dict for
one safetensors file; `join_tensors` rebuilds it. Tuples and integer-keyed dicts (the optimizer's
parameter ids) are tagged, floats are written with `repr` precision, so `join_tensors(split_tensors(d))`
equals `d` bit for bit and a resumed optimizer continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"
_TAGS = (TENSOR, TUPLE, INT_KEYS)
_LEAVES = (bool, int, float, str, type(None))


def split_tensors(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON tree of `value`; its tensors go to `tensors` (as contiguous CPU tensors) under their path from `name`.

    A type JSON cannot hold exactly (a numpy scalar, a dtype, a function) is a TypeError: a state dict
    that needs it cannot be stored without pickling.
    """
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors of the state are both named {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {TENSOR: name}
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            if any(tag in value for tag in _TAGS):
                raise TypeError(f"{name}: a key of the state is one of the reserved names {_TAGS}")
            return {key: split_tensors(item, f"{name}/{key}", tensors) for key, item in value.items()}
        if all(isinstance(key, int) and not isinstance(key, bool) for key in value):
            return {INT_KEYS: {str(key): split_tensors(item, f"{name}/{key}", tensors) for key, item in value.items()}}
        raise TypeError(f"{name}: dict keys must be all strings or all integers, got {sorted({type(k).__name__ for k in value})}")
    if isinstance(value, (list, tuple)):
        items = [split_tensors(item, f"{name}/{index}", tensors) for index, item in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, _LEAVES):
        return value
    raise TypeError(f"{name}: a {type(value).__name__} cannot be stored in a training state without pickling it")


def join_tensors(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The state dict `split_tensors` split into `tree` and `tensors`; a ValueError for a tree it could not have written."""
    if isinstance(tree, dict):
        tag = next(iter(tree)) if len(tree) == 1 else None
        if tag == TENSOR:
            if tree[TENSOR] not in tensors:
                raise ValueError(f"no tensor named {tree[TENSOR]!r}")
            return tensors[tree[TENSOR]]
        if tag == TUPLE:
            return tuple(join_tensors(item, tensors) for item in _list(tree[TUPLE]))
        if tag == INT_KEYS:
            return {_int(key): join_tensors(item, tensors) for key, item in _dict(tree[INT_KEYS]).items()}
        return {key: join_tensors(item, tensors) for key, item in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(item, tensors) for item in tree]
    if isinstance(tree, _LEAVES):
        return tree
    raise ValueError(f"unexpected {type(tree).__name__} in the tree")


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def _dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def _int(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"expected an integer key, got {key!r}") from None
