"""Singer's tap-mailchimp (1.3.3) against the sandbox, run as a subprocess: discover, then sync
the `lists` and `list_members` streams, and every non-archived member arrives exactly once.

The tap hard-pins requests==2.33.0 and singer-python==6.0.1 (jsonschema 2.6), which would
downgrade this project's environment, so it lives in a venv of its own (18 packages, ~8 s to
install): `TAP_MAILCHIMP_PYTHON` names its interpreter, else one is made once under
~/.cache/mc_pipeline/. Without network and without that venv the test is skipped, saying why.

The tap builds `https://{dc}.api.mailchimp.com` itself; the launcher below points that one
attribute at the sandbox (as test_sdk.py sets the SDK's `host`) and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mc_pipeline.sandbox import Sandbox

pytestmark = pytest.mark.slow
TAP = "tap-mailchimp==1.3.3"
LAUNCHER = """
import sys
import tap_mailchimp
import tap_mailchimp.client as client

base_url = sys.argv.pop(1)
init = client.MailchimpClient.__init__

def pointed(self, config):
    init(self, config)
    self._MailchimpClient__base_url = base_url

client.MailchimpClient.__init__ = pointed
tap_mailchimp.main()
"""


@pytest.fixture(scope="session")
def tap_python() -> str:
    given = os.environ.get("TAP_MAILCHIMP_PYTHON")
    if given:
        return given
    venv = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mc_pipeline" / "tap-mailchimp-1.3.3"
    python = venv / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--retries", "1", "--timeout", "15", TAP],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"{TAP} could not be installed in its own venv ({venv}): {exc}")
    return str(python)


def run_tap(python: str, sb: Sandbox, tmp: Path, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [python, "-c", LAUNCHER, sb.base_url, "--config", str(tmp / "config.json"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "--discover" in args:
        return [json.loads(proc.stdout)]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_tap_mailchimp_syncs_every_member(sb: Sandbox, tap_python: str, tmp_path: Path) -> None:
    client = sb.client("client-1")
    config = {"api_key": client.mailchimp_key, "dc": "us6", "start_date": "2015-01-01T00:00:00Z", "page_size": "200"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    catalog = run_tap(tap_python, sb, tmp_path, "--discover")[0]
    for stream in catalog["streams"]:
        if stream["tap_stream_id"] in ("lists", "list_members"):
            root = [e for e in stream["metadata"] if e["breadcrumb"] == []]
            if not root:  # the tap's discover writes none
                root = [{"breadcrumb": [], "metadata": {}}]
                stream["metadata"].append(root[0])
            root[0]["metadata"]["selected"] = True
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    messages = run_tap(tap_python, sb, tmp_path, "--catalog", str(tmp_path / "catalog.json"))
    records: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        if m["type"] == "RECORD":
            records.setdefault(m["stream"], []).append(m["record"])
    assert [x["id"] for x in records["lists"]] == list(client.list_ids)
    got = [(m["list_id"], m["id"]) for m in records["list_members"]]
    expected = {
        (lid, m["id"]) for lid in client.list_ids for m in sb.mailchimp_list(lid).members(include_archived=False)
    }
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected
    state = [m for m in messages if m["type"] == "STATE"][-1]["value"]
    assert set(state["bookmarks"]["lists"]) >= set(client.list_ids)
