"""Property-based tests: no member, however malformed, fails a page or the transform.

Members are drawn with missing keys, wrong types, nulls, `""` timestamps, huge strings, odd
unicode and unexpected merge fields; every member must end as a staged row or a dead letter,
every staged row as a contact or a dead letter, and the properties must match a plain-Python
reference of the mapping.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc_pipeline.staging import parse_page
from mc_pipeline.transform import EMAIL_PATTERN, properties_json, to_contacts

ODD_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # any code point JSON can carry
    max_size=40,
) | st.sampled_from(["", " ", "\u200d", "\u202e", "Ω≈ç√", "\U0001d54f", "a" * 5000, '"', "\\", "\n", "null"])
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
)  # JSON has neither | ODD_TEXT
ANY_JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3), max_leaves=8
)
TIMESTAMPS = (
    st.sampled_from(
        [
            "",
            "2024-01-02T03:04:05+00:00",
            "2024-01-02T03:04:05Z",
            "2024-13-40T99:99:99+00:00",
            "yesterday",
            "2024-01-02T03:04:05+05:30",
        ]
    )
    | SCALARS
)
MERGE_KEYS = st.sampled_from(["FNAME", "LNAME", "PHONE", "BIRTHDAY", "ADDRESS", "COMPANY", "MMERGE7"]) | st.from_regex(
    r"[A-Z][A-Z0-9_]{0,9}", fullmatch=True
)
MERGE_FIELDS = st.dictionaries(MERGE_KEYS, SCALARS | st.dictionaries(ODD_TEXT, SCALARS, max_size=3), max_size=6)


@st.composite
def members(draw: Any) -> Any:
    if draw(st.integers(0, 30)) == 0:
        return draw(ANY_JSON)  # not even an object, now and then
    fields: dict[str, Any] = {
        "id": st.from_regex(r"[0-9a-f]{32}", fullmatch=True) | SCALARS,
        "email_address": st.emails() | ODD_TEXT | SCALARS,
        "unique_email_id": ODD_TEXT | SCALARS,
        "contact_id": st.from_regex(r"[0-9a-f]{32}", fullmatch=True) | SCALARS,
        "full_name": ODD_TEXT | SCALARS,
        "status": st.sampled_from(["subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived"])
        | SCALARS,
        "merge_fields": MERGE_FIELDS | SCALARS,
        "timestamp_signup": TIMESTAMPS,
        "timestamp_opt": TIMESTAMPS,
        "last_changed": TIMESTAMPS,
        "language": ODD_TEXT | SCALARS,
        "vip": SCALARS,
        "member_rating": SCALARS,
        "location": st.fixed_dictionaries({}, optional={"country_code": ODD_TEXT | SCALARS}) | SCALARS,
        "source": ODD_TEXT | SCALARS,
        "tags": st.lists(
            st.fixed_dictionaries({}, optional={"name": ODD_TEXT | SCALARS, "id": SCALARS}) | SCALARS, max_size=3
        )
        | SCALARS,
    }
    chosen = draw(st.sets(st.sampled_from(sorted(fields))))
    member = {k: draw(fields[k]) for k in sorted(chosen)}
    if draw(st.booleans()):
        member["unexpected_" + draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True))] = draw(ANY_JSON)
    return member


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(members(), max_size=25))
def test_no_member_fails_a_page_or_the_transform(page: list[Any]) -> None:
    raw = orjson.dumps({"members": page, "total_items": len(page)})
    staged, dead = parse_page(raw, 0)
    assert staged.num_rows + len(dead) == len(page)
    good, bad = to_contacts(staged, "mailchimp-0123456789")
    assert good.num_rows + bad.num_rows == staged.num_rows
    for record in good.to_pylist():  # what is sent would pass Ometria's own checks
        assert record["id"].strip() and re.match(EMAIL_PATTERN, record["email"])
        assert record["marketing_optin"] in ("EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED")
        if record["properties_json"] is not None:
            assert isinstance(orjson.loads(record["properties_json"]), dict)
    assert set(bad.column("reason").to_pylist()) <= {
        "no stable id: contact_id and unique_email_id are empty",
        "email missing or not a valid address",
        "record over Ometria's 60 KB limit",
    }


def _reference(merge: dict[str, Any]) -> dict[str, Any] | None:
    """The documented rule, in plain Python: empty values go at any depth; FNAME, LNAME and PHONE
    go when they are plain values (an object there maps to nothing else, so it stays)."""

    def empty(v: Any) -> bool:
        return v is None or (isinstance(v, str) and v == "")

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not empty(v)}
        return value

    mapped = ("FNAME", "LNAME", "PHONE")
    out = {k: clean(v) for k, v in merge.items() if not empty(v) and not (k in mapped and not isinstance(v, dict))}
    return out or None


@settings(max_examples=500, deadline=None)
@given(MERGE_FIELDS)
def test_properties_equal_a_plain_python_reference(merge: dict[str, Any]) -> None:
    got = properties_json(pa.array([orjson.dumps(merge).decode()])).to_pylist()[0]
    assert (orjson.loads(got) if got else None) == _reference(merge)


@st.composite
def well_formed_members(draw: Any) -> dict[str, Any]:
    """Members of the documented types (the fast path's domain), with odd but valid values."""
    text = ODD_TEXT
    merge = draw(
        st.dictionaries(
            MERGE_KEYS,
            text
            | st.integers(-(10**6), 10**6)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.fixed_dictionaries({}, optional={"addr1": text, "country": text | st.integers(0, 99), "zip": text}),
            max_size=6,
        )
    )
    return {
        "id": draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
        "email_address": draw(st.emails() | text),
        "unique_email_id": draw(text),
        "contact_id": draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True) | st.just("")),
        "full_name": draw(text),
        "status": draw(st.sampled_from(["subscribed", "unsubscribed", "cleaned", "pending", "transactional"])),
        "merge_fields": merge,
        "timestamp_signup": draw(TIMESTAMPS.filter(lambda v: isinstance(v, str))),
        "timestamp_opt": draw(TIMESTAMPS.filter(lambda v: isinstance(v, str))),
        "last_changed": draw(TIMESTAMPS.filter(lambda v: isinstance(v, str))),
        "language": draw(text),
        "vip": draw(st.booleans()),
        "member_rating": draw(st.integers(0, 5) | st.integers(-(2**40), 2**40)),
        "location": {"country_code": draw(text)},
        "source": draw(text),
        "tags": draw(st.lists(st.fixed_dictionaries({"id": st.integers(0, 999), "name": text}), max_size=3)),
    }


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else str(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _time(v: Any) -> datetime | None:
    try:
        return datetime.strptime(v, "%Y-%m-%dT%H:%M:%S%z") if isinstance(v, str) else None
    except ValueError:
        return None


def _object(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def reference_rows(page: list[Any], page_offset: int) -> tuple[list[dict[str, Any]], int]:
    """The documented staging of a page, member by member in plain Python: (rows, dead letters)."""
    rows, dead = [], 0
    for m in page:
        if not (isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]):
            dead += 1
            continue
        merge = _object(m.get("merge_fields"))
        rating = m.get("member_rating")
        rows.append(
            {
                "member_id": m["id"],
                **{k: _text(m.get(k)) for k in ("email_address", "unique_email_id", "contact_id", "full_name")},
                "status": _text(m.get("status")),
                **{k.lower(): _text(merge.get(k)) for k in ("FNAME", "LNAME", "PHONE", "BIRTHDAY")},
                "address_country": _text(_object(merge.get("ADDRESS")).get("country")),
                "merge_fields_json": orjson.dumps(merge).decode(),
                **{k: _time(m.get(k)) for k in ("timestamp_signup", "timestamp_opt", "last_changed")},
                "language": _text(m.get("language")),
                "vip": m.get("vip") if isinstance(m.get("vip"), bool) else None,
                "member_rating": rating
                if isinstance(rating, int) and not isinstance(rating, bool) and -(2**15) <= rating < 2**15
                else None,
                "country_code": _text(_object(m.get("location")).get("country_code")),
                "source": _text(m.get("source")),
                "tags": [t["name"] for t in m.get("tags") if isinstance(t, dict) and isinstance(t.get("name"), str)]
                if isinstance(m.get("tags"), list)
                else [],
                "page_offset": page_offset,
            }
        )
    return rows, dead


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(members() | well_formed_members(), max_size=20))
def test_the_parser_equals_a_per_member_reference(page: list[Any]) -> None:
    """Column-wise parsing decides every odd value exactly as the plain-Python rule does."""
    raw = orjson.dumps({"members": page, "total_items": len(page)})
    staged, dead = parse_page(raw, 7)
    rows, n_dead = reference_rows(page, 7)
    assert staged.to_pylist() == rows
    assert len(dead) == n_dead


def test_real_pages_equal_the_reference() -> None:
    """A page as the sandbox serves it (the pipeline's fields): no dead letters, the reference's rows."""
    from mc_pipeline.resources.paging import MEMBER_FIELDS
    from mc_pipeline.sandbox.fields import parse_paths, project
    from mc_pipeline.sandbox.generate import MemberFactory

    factory = MemberFactory(42, "0123456789", "us6", 1_790_000_000)
    tree = parse_paths(",".join(MEMBER_FIELDS))
    members = [project(factory.make(i), tree, None) for i in range(1000)]
    staged, dead = parse_page(orjson.dumps({"members": members, "total_items": 1000}), 0)
    assert not dead
    assert staged.to_pylist() == reference_rows(members, 0)[0]
