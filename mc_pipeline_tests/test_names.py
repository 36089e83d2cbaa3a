"""Each class of the package has a name of its own: not defined twice (the sandbox's models of the
APIs and the pipeline's clients once shared three), and not one of Dagster's (`RetryPolicy` was)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import dagster

import mc_pipeline

PACKAGE = Path(mc_pipeline.__file__).parent


def _classes() -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(PACKAGE)))
    return where


def test_no_class_name_is_defined_twice() -> None:
    twice = {name: files for name, files in _classes().items() if len(files) > 1}
    assert twice == {}


def test_no_class_shadows_one_of_dagsters() -> None:
    assert sorted(set(_classes()) & set(dir(dagster))) == []
