"""No key in any output: keys are checked and normalised when loaded, and errors never quote one.

Unit tests cover each way a key can be malformed (whitespace, newlines, control and non-ASCII
characters, a Mailchimp key without its datacenter) and each way a reference can fail. Runs then
show the failures are Dagster `Failure`s naming client, list and field, found before any request
(`member_pages` resolves both accounts first), and not retryable. The end-to-end test runs the
README's `dagster asset materialize` on a PostgreSQL instance with keys that end in a newline (they
must work) and keys with control and non-ASCII characters inside (they must be refused), revokes a
key for an API failure, posts the alerts, and then searches every output for every key: the
processes' stdout/stderr, every file under DAGSTER_HOME (compute logs), the data dir (gzip and
Parquet decoded), a pg_dump of the whole database, and the webhook's payloads.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from dagster import (
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    build_run_status_sensor_context,
)

from mc_pipeline.assets.keys import CONTACTS_KEY
from mc_pipeline.automation.sensors import sync_failure_alerts
from mc_pipeline.local import LocalEnvironment, patched_environ, sandbox_environment
from mc_pipeline.partitions import MAILCHIMP_LISTS
from mc_pipeline.registry import Client, SecretError, SecretRef, write_registry
from mc_pipeline.sandbox import AccountSpec, ListSpec, SandboxConfig
from mc_pipeline.sandbox.registry import key_env_names, registry_entries
from mc_pipeline_tests.automation.test_sensors import _Hook
from mc_pipeline_tests.conftest import PG
from mc_pipeline_tests.helpers import dagster_materialize_command, sync

MAILCHIMP_KEY = "5ec7e75ec7e75ec7e75ec7e75ec7e75e-us6"  # "secret" in hex-ish, easy to find
OMETRIA_KEY = "om-SECRET-MARKER-7f3a9c"


# --------------------------------------------------------------------------- loading a key
def resolve_env(monkeypatch: pytest.MonkeyPatch, value: str, **kw: object) -> str:
    monkeypatch.setenv("TEST_KEY", value)
    return SecretRef(env="TEST_KEY").resolve(**kw).get_secret_value()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw", [f"{OMETRIA_KEY}\n", f"  {OMETRIA_KEY}\t", f"\r\n{OMETRIA_KEY}\r\n", f"{OMETRIA_KEY}\u00a0"]
)
def test_surrounding_whitespace_is_stripped(raw: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_env(monkeypatch, raw) == OMETRIA_KEY
    (tmp_path / "key").write_text(raw, encoding="utf-8")
    assert SecretRef(file=str(tmp_path / "key")).resolve().get_secret_value() == OMETRIA_KEY


INNER = [
    ("om-LEFT RIGHT", "whitespace"),
    ("om-LEFT\tRIGHT", "whitespace"),
    ("om-LEFT\nRIGHT", "whitespace"),
    ("om-LEFT\r\nX-Injected: RIGHT", "whitespace"),
    ("om-LEFT\x07RIGHT", "a control character"),
    ("om-LEFT\x1b[0mRIGHT", "a control character"),
    ("om-LEFT\x7fRIGHT", "a control character"),
    ("om-LEFT\u00e9RIGHT", "a non-ASCII character"),
    ("om-LEFT\u200bRIGHT", "a non-ASCII character"),  # zero-width space: invisible when pasted
    ("om-LEFT\u2028RIGHT", "whitespace"),
]


def _assert_names_no_part(message: str) -> None:
    assert "LEFT" not in message and "RIGHT" not in message and "om-" not in message


@pytest.mark.parametrize(("raw", "kind"), INNER)
def test_a_key_with_whitespace_control_or_non_ascii_inside_is_refused(
    raw: str, kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(SecretError, match=f"environment variable TEST_KEY holds {kind} inside the key") as caught:
        resolve_env(monkeypatch, f"{raw}\n")
    _assert_names_no_part(str(caught.value))
    (tmp_path / "key").write_text(raw, encoding="utf-8")
    with pytest.raises(SecretError, match=f"holds {kind}") as caught:
        SecretRef(file=str(tmp_path / "key")).resolve()
    _assert_names_no_part(str(caught.value))


def test_a_nul_byte_or_non_utf8_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nul").write_bytes(b"om-LEFT\x00RIGHT\n")
    with pytest.raises(SecretError, match="holds a control character") as caught:
        SecretRef(file=str(tmp_path / "nul")).resolve()
    _assert_names_no_part(str(caught.value))
    (tmp_path / "latin1").write_bytes(b"om-LEFT\xe9RIGHT")
    with pytest.raises(SecretError, match="is not UTF-8 text") as caught:
        SecretRef(file=str(tmp_path / "latin1")).resolve()
    _assert_names_no_part(str(caught.value))


def client_with(mailchimp: dict[str, str], ometria: dict[str, str]) -> Client:
    return Client.model_validate(
        {"id": "acme", "mailchimp": {"api_key": mailchimp}, "ometria": {"api_key": ometria}, "lists": "all"}
    )


@pytest.mark.parametrize(
    ("mailchimp_value", "ometria_value", "expected"),
    [
        (None, OMETRIA_KEY, "client 'acme' field mailchimp.api_key: environment variable MC is not set"),
        ("", OMETRIA_KEY, "client 'acme' field mailchimp.api_key: environment variable MC is empty"),
        ("5ec7e75ec7e75ec7e75ec7e75ec7e75e", OMETRIA_KEY, "field mailchimp.api_key: environment variable MC is not "),
        ("5EC7E75EC7E75EC7E75EC7E75EC7E75E-us6", OMETRIA_KEY, "field mailchimp.api_key: .* is not a Mailchimp key"),
        ("5ec7e75e-us6", OMETRIA_KEY, "is not a Mailchimp key: 32 hex digits, '-', the datacenter"),
        (f"{MAILCHIMP_KEY}\u00e9", OMETRIA_KEY, "field mailchimp.api_key: .* holds a non-ASCII character"),
        (MAILCHIMP_KEY, None, "client 'acme' field ometria.api_key: environment variable OM is not set"),
        (MAILCHIMP_KEY, "om-LEFT\x1bRIGHT", "client 'acme' field ometria.api_key: .* holds a control character"),
    ],
)
def test_credentials_name_client_and_field_never_the_value(
    mailchimp_value: str | None, ometria_value: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("MC", mailchimp_value), ("OM", ometria_value)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, f"{value}\n")
    with pytest.raises(SecretError, match=expected) as caught:
        client_with({"env": "MC"}, {"env": "OM"}).credentials()
    message = str(caught.value)
    assert "5ec7e75e" not in message.lower() and "LEFT" not in message and OMETRIA_KEY not in message


def test_good_credentials_are_normalised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MC", f" {MAILCHIMP_KEY}\n")
    (tmp_path / "om").write_text(f"{OMETRIA_KEY}\r\n")
    keys = client_with({"env": "MC"}, {"file": str(tmp_path / "om")}).credentials()
    assert (keys.mailchimp.get_secret_value(), keys.ometria.get_secret_value()) == (MAILCHIMP_KEY, OMETRIA_KEY)
    assert MAILCHIMP_KEY not in repr(keys) and OMETRIA_KEY not in repr(keys)


# --------------------------------------------------------------------------- a run with a bad key
@pytest.fixture
def one_list(tmp_path: Path) -> Iterator[LocalEnvironment]:
    with sandbox_environment(SandboxConfig.generated(clients=1, lists_per_client=1, members=50), tmp_path / "w") as env:
        yield env


def _use_key_file(env: LocalEnvironment, service: str, path: Path) -> None:
    entries = registry_entries(env.sandbox.config, env.sandbox.base_url)
    entries[0][service]["api_key"] = {"file": str(path)}  # type: ignore[index]
    write_registry(env.registry, entries)


CASES = {
    "ometria env unset": ("ometria.api_key", "MC_SANDBOX_CLIENT_1_OMETRIA_KEY is not set"),
    "mailchimp env unset": ("mailchimp.api_key", "MC_SANDBOX_CLIENT_1_MAILCHIMP_KEY is not set"),
    "mailchimp key without datacenter": ("mailchimp.api_key", "is not a Mailchimp key"),
    "ometria file unreadable": ("ometria.api_key", "cannot be read (No such file or directory)"),
    "mailchimp file a directory": ("mailchimp.api_key", "cannot be read (Is a directory)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_credential_fails_the_run_before_any_request_and_is_not_retryable(
    case: str, one_list: LocalEnvironment, instance: DagsterInstance, tmp_path: Path
) -> None:
    sb = one_list.sandbox
    partition = one_list.partition_keys()[0]
    mc_env, om_env = key_env_names("client-1")
    if case == "ometria env unset":
        os.environ.pop(om_env)
    elif case == "mailchimp env unset":
        os.environ.pop(mc_env)
    elif case == "mailchimp key without datacenter":
        os.environ[mc_env] = os.environ[mc_env].rsplit("-", 1)[0]
    elif case == "ometria file unreadable":
        _use_key_file(one_list, "ometria", tmp_path / "missing")
    else:
        _use_key_file(one_list, "mailchimp", tmp_path)
    field, cause = CASES[case]
    result = sync(instance, partition, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data
    assert failure.user_failure_data is not None  # a Failure, not a raw exception with a stack trace
    description = failure.user_failure_data.description or ""
    assert f"client 'client-1', list {partition.split(':')[1]}: {field}: " in description and cause in description
    md = {k: v.value for k, v in failure.user_failure_data.metadata.items()}
    assert md["retryable"] is False and md["client"] == "client-1" and md["list"] == partition.split(":")[1]
    assert sb.stats("mailchimp:client-1")["requests"] == 0  # found before the first request
    assert sb.stats("ometria:client-1")["requests"] == 0


# --------------------------------------------------------------------------- every output, end to end
def _b64_basic(key: str) -> str:
    return base64.b64encode(f"mc-pipeline:{key}".encode()).decode()


def _text_of(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".parquet":
        return repr(pq.read_table(path).to_pylist()).encode()
    return data


def search(root: Path, markers: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = _text_of(path)
            hits += [f"{path}: {m}" for m in markers if m.encode() in data]
    return hits


@pytest.mark.slow
def test_keys_never_leave_the_environment_on_postgres(
    pg_database: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_ometria = "om-CTRLLEFT\x1b[31mCTRLRIGHT"  # a terminal escape pasted inside the key
    bad_mailchimp = "c0ffee00c0ffee00c0ffee00c0ffee\u00e9\u00e9-us6"  # non-ASCII inside, 32 "characters"
    config = SandboxConfig(
        accounts=[
            AccountSpec(
                client_id="acme", mailchimp_key=MAILCHIMP_KEY, ometria_key=OMETRIA_KEY, lists=[ListSpec(members=250)]
            ),
            AccountSpec(client_id="ctl", ometria_key="om-CTRLLEFT-CTRLRIGHT", lists=[ListSpec(members=20)]),
            AccountSpec(
                client_id="uni", mailchimp_key="c0ffee00c0ffee00c0ffee00c0ffee00-us6", lists=[ListSpec(members=20)]
            ),
        ]
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_db:\n"
        f"      hostname: {PG['host']}\n      port: {PG['port']}\n      username: {PG['user']}\n"
        f"      password: ''\n      db_name: {pg_database}\n      scheme: postgresql+psycopg2\n"
        "telemetry:\n  enabled: false\n"
    )
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("MC_PIPELINE_ALERT_WEBHOOK", f"http://127.0.0.1:{hook.server_port}/hook")
    _Hook.received.clear()
    with sandbox_environment(config, tmp_path / "work") as env, patched_environ({"DAGSTER_HOME": str(home)}):
        sb = env.sandbox
        # What a secret file read into a variable gives: a trailing newline, here with spaces too.
        acme_mc, acme_om = key_env_names("acme")
        os.environ[acme_mc], os.environ[acme_om] = f"{MAILCHIMP_KEY}\n", f"  {OMETRIA_KEY}\r\n"
        os.environ[key_env_names("ctl")[1]] = f"{bad_ometria}\n"
        os.environ[key_env_names("uni")[0]] = bad_mailchimp
        keys = [MAILCHIMP_KEY, OMETRIA_KEY, sb.client("ctl").mailchimp_key, sb.client("uni").ometria_key]
        markers = [
            *keys,
            MAILCHIMP_KEY.split("-")[0],
            "SECRET-MARKER",
            _b64_basic(MAILCHIMP_KEY),
            "CTRLLEFT",
            "CTRLRIGHT",
            "c0ffee00c0ffee00",
        ]
        partitions = {c: f"{c}:{sb.client(c).list_ids[0]}" for c in ("acme", "ctl", "uni")}
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(MAILCHIMP_LISTS, list(partitions.values()))

        def materialize(partition: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                dagster_materialize_command(partition), capture_output=True, env=dict(os.environ), timeout=300
            )

        ok = materialize(partitions["acme"])
        assert ok.returncode == 0, ok.stderr.decode()[-2000:]
        assert len(sb.ometria_contacts("acme")) == 250  # the sync really ran with the normalised keys
        runs = [ok]
        for client in ("ctl", "uni"):
            refused = materialize(partitions[client])
            assert refused.returncode != 0
            assert sb.stats(f"mailchimp:{client}")["requests"] == 0  # refused before any request
            runs.append(refused)
        sb.revoke("acme", "ometria")  # an API failure: its error must not carry the key either
        sb.add_member(partitions["acme"].split(":")[1], "after@example.org")
        revoked = materialize(partitions["acme"])
        assert revoked.returncode != 0 and b"403" in revoked.stdout + revoked.stderr
        runs.append(revoked)

        with DagsterInstance.get() as instance:  # the failure sensor: observations and the webhook
            failed = [r for r in instance.get_runs() if r.is_failure]
            assert len(failed) == 3
            for run in failed:
                event = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)[0].dagster_event
                sync_failure_alerts(
                    build_run_status_sensor_context(
                        sensor_name="sync_failure_alerts",
                        dagster_event=event,
                        dagster_instance=instance,
                        dagster_run=run,
                    ).for_run_failure()
                )
            for client, field in (("ctl", "ometria.api_key"), ("uni", "mailchimp.api_key")):
                observed = instance.fetch_observations(
                    AssetRecordsFilter(asset_key=CONTACTS_KEY, asset_partitions=[partitions[client]]), limit=1
                ).records[0]
                md = {k: v.value for k, v in observed.asset_observation.metadata.items()}
                assert md["retryable"] is False and md["client"] == client and field in md["cause"]
        hook.shutdown()
        assert len(_Hook.received) == 3

        output = b"".join(r.stdout + r.stderr for r in runs).decode(errors="replace") + "".join(capfd.readouterr())
        assert "holds a control character inside the key" in output  # the refusal is shown, the key is not
        assert "holds a non-ASCII character inside the key" in output
        assert [m for m in markers if m in output] == []
        assert [m for m in markers if m in json.dumps(_Hook.received)] == []
        compute_logs = [p for p in home.rglob("*") if p.suffix in (".err", ".out")]
        assert compute_logs and any(b"holds a control character" in p.read_bytes() for p in compute_logs)
        assert search(home, markers) == []  # compute logs and anything else the instance wrote
        assert search(env.data_dir, markers) == []
        dump = subprocess.run(
            ["pg_dump", "-h", PG["host"], "-p", str(PG["port"]), "-U", PG["user"], pg_database],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout.decode(errors="replace")
        assert "event_logs" in dump and "holds a control character" in dump  # the dump holds the failures
        assert [m for m in markers if m in dump] == []

        # The sandbox's own error pages do not echo a key either.
        wrong = "0123456789abcdef0123456789abcdef-us6"
        answer = requests.get(f"{sb.mailchimp_url}/lists", auth=("x", wrong), timeout=10)
        assert answer.status_code == 401 and wrong not in answer.text and "0123456789abcdef" not in answer.text
