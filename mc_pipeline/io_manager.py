"""Hands descriptors between steps as JSON files: readable by people, tolerant of restarts.

The data itself never passes through here (it is in the run folder); only the small pydantic
descriptors that say where it is. One file per asset partition, so a retried or re-executed
step finds what the last successful upstream step wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from dagster import ConfigurableIOManager, InputContext, OutputContext
from pydantic import BaseModel, Field

from mc_pipeline.assets.models import MODELS
from mc_pipeline.registry import parse_partition_key
from mc_pipeline.storage import RUN_ID_RE, default_data_dir


class StateIOManager(ConfigurableIOManager):
    base_dir: str | None = Field(default=None, description="default: <data dir>/state")

    def _root(self) -> Path:
        return Path(self.base_dir) if self.base_dir else default_data_dir() / "state"

    def _path(self, context: OutputContext | InputContext) -> Path:
        if context.has_asset_key:
            parts = [p for p in context.asset_key.path if p.replace("_", "").isalnum()]
            if context.has_asset_partitions:
                client_id, list_id = parse_partition_key(context.asset_partition_key)
                return self._root().joinpath(*parts, client_id, f"{list_id}.json")
            return self._root().joinpath(*parts, "unpartitioned.json")
        output = context if isinstance(context, OutputContext) else context.upstream_output
        if output is None:
            raise ValueError("an op input with no upstream output has no stored state")
        if not RUN_ID_RE.match(output.run_id):
            raise ValueError("unsafe run id")
        return self._root() / "ops" / output.run_id / f"{_safe(output.step_key)}.{_safe(output.name)}.json"

    def handle_output(self, context: OutputContext, obj: BaseModel) -> None:
        if obj is None:
            return
        path = self._path(context)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps({"kind": type(obj).__name__, "data": obj.model_dump(mode="json")}))
        tmp.replace(path)

    def load_input(self, context: InputContext) -> BaseModel:
        path = self._path(context)
        try:
            doc = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: materialize the upstream asset for this partition first"
            ) from None
        return MODELS[doc["kind"]].model_validate(doc["data"])


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)
