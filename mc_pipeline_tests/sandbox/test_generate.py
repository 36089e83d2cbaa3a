"""Generated members: deterministic from the seed, and as messy as real audiences."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from mc_pipeline.sandbox import Sandbox, SandboxClock, SandboxConfig
from mc_pipeline.sandbox.generate import MemberFactory
from mc_pipeline_tests.sandbox.wire import TIMEOUT, all_members

SIZES = [150, 400]


def raw_pages(sb: Sandbox, client_id: str = "client-1") -> list[bytes]:
    """The exact bytes served for every list of a client: lists, then each list's members."""
    c = sb.client(client_id)
    auth = ("x", c.mailchimp_key)
    out = [requests.get(f"{sb.mailchimp_url}/lists", auth=auth, timeout=TIMEOUT).content]
    for list_id in c.list_ids:
        for status in ("", "archived"):
            r = requests.get(
                f"{sb.mailchimp_url}/lists/{list_id}/members",
                params={"count": 1000, "status": status},
                auth=auth,
                timeout=TIMEOUT,
            )
            assert r.status_code == 200
            out.append(r.content)
    return out


def clock_at(when: datetime) -> SandboxClock:
    clock = SandboxClock()
    clock.set(when)
    return clock


class TestDeterminism:
    def test_same_seed_serves_identical_bytes(self, make_sandbox: Callable[..., Sandbox]) -> None:
        a = make_sandbox(members=SIZES, seed=7)
        b = make_sandbox(members=SIZES, seed=7)
        assert a.client("client-1").mailchimp_key == b.client("client-1").mailchimp_key
        assert a.client("client-1").ometria_key == b.client("client-1").ometria_key
        assert a.client("client-1").list_ids == b.client("client-1").list_ids
        assert raw_pages(a) == raw_pages(b)

    def test_same_seed_started_hours_apart_the_same_day_is_identical(self) -> None:
        """Timestamps must not depend on the start-up second (regression: they used to)."""
        config = SandboxConfig.generated(members=SIZES, seed=7)
        morning = Sandbox(config, clock=clock_at(datetime(2026, 3, 14, 8, 0, 1, tzinfo=UTC)))
        evening = Sandbox(config, clock=clock_at(datetime(2026, 3, 14, 21, 59, 58, tzinfo=UTC)))
        with morning, evening:
            assert raw_pages(morning) == raw_pages(evening)
            newest = max(m["last_changed"] for m in all_members(morning, morning.client("client-1").list_ids[0]))
            # ...and still end at least a day before start-up.
            assert datetime.fromisoformat(newest) <= datetime(2026, 3, 13, 8, 0, 1, tzinfo=UTC)

    def test_different_seed_differs(self, make_sandbox: Callable[..., Sandbox]) -> None:
        a = make_sandbox(members=SIZES, seed=7)
        b = make_sandbox(members=SIZES, seed=8)
        assert a.client("client-1").mailchimp_key != b.client("client-1").mailchimp_key
        assert set(a.client("client-1").list_ids).isdisjoint(b.client("client-1").list_ids)
        emails_a = {m["email_address"] for m in all_members(a, a.client("client-1").list_ids[0])}
        emails_b = {m["email_address"] for m in all_members(b, b.client("client-1").list_ids[0])}
        assert emails_a != emails_b

    def test_member_is_a_pure_function_of_seed_list_and_index(self) -> None:
        one = MemberFactory(42, "abcdef0123", "us6", epoch=1_700_000_000)
        two = MemberFactory(42, "abcdef0123", "us6", epoch=1_700_000_000)
        other = MemberFactory(43, "abcdef0123", "us6", epoch=1_700_000_000)
        assert [one.make(i) for i in range(50)] == [two.make(i) for i in range(50)]
        assert one.make(3) != one.make(4)
        assert one.make(3)["email_address"] != other.make(3)["email_address"]


@pytest.fixture(scope="module")
def everyone(sb: Sandbox) -> list[dict[str, Any]]:
    """Every member of client-1's two lists (300 + 2500, seed 42), archived ones included, as served."""
    out: list[dict[str, Any]] = []
    for list_id in sb.client("client-1").list_ids:
        out += all_members(sb, list_id) + all_members(sb, list_id, status="archived")
    assert len(out) == 2800
    return out


class TestMess:
    """Over the wire, on the session sandbox's data."""

    def test_non_ascii_names(self, everyone: list[dict[str, Any]]) -> None:
        names = [m["full_name"] for m in everyone]
        assert sum(not n.isascii() for n in names) > 100
        assert any("\u0400" <= ch <= "\u04ff" for n in names for ch in n)  # Cyrillic
        assert any("\u4e00" <= ch <= "\u9fff" for n in names for ch in n)  # CJK

    def test_empty_names(self, everyone: list[dict[str, Any]]) -> None:
        assert any(m["merge_fields"].get("FNAME") == "" for m in everyone)
        assert any(m["merge_fields"].get("LNAME") == "" for m in everyone)

    def test_mixed_case_emails(self, everyone: list[dict[str, Any]]) -> None:
        assert sum(m["email_address"] != m["email_address"].lower() for m in everyone) > 50

    def test_plus_addressed_emails(self, everyone: list[dict[str, Any]]) -> None:
        assert sum("+" in m["email_address"].split("@")[0] for m in everyone) > 50

    def test_very_long_values(self, everyone: list[dict[str, Any]]) -> None:
        def strings(value: Any) -> list[str]:
            if isinstance(value, str):
                return [value]
            if isinstance(value, dict):
                return [s for v in value.values() for s in strings(v)]
            if isinstance(value, list):
                return [s for v in value for s in strings(v)]
            return []

        long_ones = [m for m in everyone if any(len(s) > 200 for s in strings({**m, "_links": None}))]
        assert long_ones
        assert any(len(m["merge_fields"].get("LNAME", "")) > 200 for m in long_ones)

    def test_missing_merge_fields(self, everyone: list[dict[str, Any]]) -> None:
        assert any(m["merge_fields"] == {} for m in everyone)

    def test_emails_unique_once_lower_cased(self, everyone: list[dict[str, Any]]) -> None:
        lowered = [m["email_address"].lower() for m in everyone]
        assert len(set(lowered)) == len(lowered)

    def test_emails_look_like_emails(self, everyone: list[dict[str, Any]]) -> None:
        for m in everyone:
            local, _, domain = m["email_address"].rpartition("@")
            assert 0 < len(local) <= 64 and "." in domain and " " not in m["email_address"]
