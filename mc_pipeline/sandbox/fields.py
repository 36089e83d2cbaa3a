"""Mailchimp's `fields` / `exclude_fields` query parameters: comma-separated dotted paths.

A path applies through lists, as on the real API: `members.tags.name` keeps the name of every tag
of every member.
"""

from __future__ import annotations

from typing import Any

Tree = dict[str, "Tree | None"]  # None marks a leaf: the whole value at that path


def parse_paths(spec: str | None) -> Tree | None:
    """`"members.id,total_items"` -> `{"members": {"id": None}, "total_items": None}`."""
    if not spec:
        return None
    tree: Tree = {}
    for raw in spec.split(","):
        path = [p for p in raw.strip().split(".") if p]
        if not path:
            continue
        node = tree
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if last:
                node[part] = None  # a shorter path wins over a longer one
                break
            child = node.get(part, {})
            if child is None:  # already included whole
                break
            node[part] = child
            node = child
    return tree or None


def include(value: Any, tree: Tree | None) -> Any:
    if tree is None:
        return value
    if isinstance(value, list):
        return [include(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: include(value[k], sub) for k, sub in tree.items() if k in value}


def exclude(value: Any, tree: Tree | None) -> Any:
    if tree is None:
        return value
    if isinstance(value, list):
        return [exclude(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in tree:
            sub = tree[k]
            if sub is None:
                continue
            out[k] = exclude(v, sub)
        else:
            out[k] = v
    return out


def project(value: Any, fields: Tree | None, excluded: Tree | None) -> Any:
    return exclude(include(value, fields), excluded)


def subtree(tree: Tree | None, key: str) -> tuple[bool, Tree | None]:
    """Whether `key` is selected by `tree`, and the tree below it (None: everything)."""
    if tree is None:
        return True, None
    if key not in tree:
        return False, None
    return True, tree[key]


def excluded_subtree(tree: Tree | None, key: str) -> tuple[bool, Tree | None]:
    """Whether `key` survives exclusion, and the exclusion tree below it."""
    if tree is None or key not in tree:
        return True, None
    sub = tree[key]
    return (sub is not None), sub
