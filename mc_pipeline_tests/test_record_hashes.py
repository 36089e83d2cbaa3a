"""The hash a record is skipped by (issue 11, item 4): computed column-wise from the contact rows, it
must change whenever any byte Ometria would receive changes, and only then be equal."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_pipeline.staging import parse_page
from mc_pipeline.transform import (
    CONTACT_SCHEMA,
    NOT_SENT,
    RECORD_HASH_VERSION,
    SENT,
    push_body,
    record_hashes,
    to_contacts,
)
from mc_pipeline_tests.test_transform import member

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "\x00\x00\x00\x00", "\xff\xff\xff\xff", '{"CITY":"London"}', "null", "a" * 300]
)
EPOCH = datetime(1990, 1, 1, tzinfo=UTC)
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # stored as 0: must not read as null
TIMESTAMPS = st.just(UNIX_EPOCH) | st.integers(0, 2_000_000_000_000).map(lambda ms: EPOCH + timedelta(milliseconds=ms))


def _values(name: str) -> st.SearchStrategy[Any]:
    typ = CONTACT_SCHEMA.field(name).type
    if pa.types.is_timestamp(typ):
        values: st.SearchStrategy[Any] = TIMESTAMPS
    elif pa.types.is_boolean(typ):
        values = st.booleans()
    else:
        values = TEXT
    return values if CONTACT_SCHEMA.field(name).nullable else values.filter(lambda v: v != "")


def _row(draw: Any) -> dict[str, Any]:
    row = {}
    for f in CONTACT_SCHEMA:
        values = _values(f.name)
        row[f.name] = draw(values if not f.nullable else st.none() | values)
    return row


@st.composite
def mutations(draw: Any) -> tuple[list[dict[str, Any]], int, str, Any]:
    """Some contact rows, one of them, one of its columns and a value that column did not hold."""
    rows = [_row(draw) for _ in range(draw(st.integers(1, 4)))]
    at = draw(st.integers(0, len(rows) - 1))
    name = draw(st.sampled_from(CONTACT_SCHEMA.names))
    f = CONTACT_SCHEMA.field(name)
    value = draw((st.none() | _values(name) if f.nullable else _values(name)).filter(lambda v: v != rows[at][name]))
    return rows, at, name, value


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CONTACT_SCHEMA)


@settings(max_examples=300, deadline=None)
@given(mutations())
def test_changing_any_single_sent_field_changes_the_hash(case: tuple[list[dict[str, Any]], int, str, Any]) -> None:
    rows, at, name, value = case
    changed = [dict(r) for r in rows]
    changed[at][name] = value
    before, after = record_hashes(_table(rows)), record_hashes(_table(changed))
    assert before.dtype == np.uint64 and len(before) == len(rows) and (before != 0).all()
    others = [i for i in range(len(rows)) if i != at]
    assert (before[others] == after[others]).all()  # a row's hash is its own: no neighbour moves it
    if name in NOT_SENT:
        assert after[at] == before[at]  # Mailchimp's last_changed, the lineage: not sent, not hashed
    else:
        assert after[at] != before[at], (name, rows[at][name], value)
    # The same row alone, or in a table of several chunks, hashes alike.
    assert record_hashes(_table(rows[at : at + 1]))[0] == before[at]
    chunked = pa.concat_tables([_table(rows[:at]), _table(rows[at:])])
    assert (record_hashes(chunked) == before).all()


def test_the_encoding_tells_apart_what_plain_concatenation_would_not() -> None:
    """A byte moved from one string to the next, null and empty or 0, a string that looks like a header."""
    base = {**dict.fromkeys(CONTACT_SCHEMA.names), "id": "i", "@collection": "c"}
    variants = [
        {"firstname": "ab", "lastname": "c"},
        {"firstname": "a", "lastname": "bc"},
        {"firstname": "abc"},
        {"lastname": "abc"},
        {"firstname": ""},
        {"lastname": ""},
        {},
        {"firstname": "\xff\xff\xff\xff"},
        {"@force_optin": False},
        {"@force_optin": True},
        {"timestamp_subscribed": EPOCH},
        {"timestamp_acquired": EPOCH},
        {"timestamp_acquired": UNIX_EPOCH},
    ]
    hashes = record_hashes(_table([{**base, **v} for v in variants]))
    assert len(set(hashes.tolist())) == len(variants)


def test_the_hash_sees_every_sent_column_and_a_new_kind_of_column_fails_loudly() -> None:
    assert set(SENT) == set(CONTACT_SCHEMA.names) - set(NOT_SENT)
    odd = CONTACT_SCHEMA.append(pa.field("score", pa.float64()))
    import mc_pipeline.transform as transform

    sent = transform.SENT
    try:
        transform.SENT = (*sent, "score")
        table = pa.Table.from_pylist([{"id": "x", "@collection": "c", "score": 1.0}], schema=odd)
        try:
            record_hashes(table)
        except TypeError as exc:
            assert "score" in str(exc)
        else:
            raise AssertionError("a column of a type the hash does not encode must not be left out silently")
    finally:
        transform.SENT = sent


def test_hashes_follow_the_mapping_of_real_members() -> None:
    """From Mailchimp members through the mapping: what moves a record sent moves its hash."""

    def hashed(m: dict[str, Any], collection: str = "mailchimp-0123456789", force: bool = False) -> int:
        staged, _ = parse_page(orjson.dumps({"members": [m], "total_items": 1}))
        (h,) = record_hashes(to_contacts(staged, collection, force)[0]).tolist()
        return int(h)

    h = hashed(member())
    for changed in (
        {"timestamp_opt": "2024-01-03T03:04:06+00:00"},
        {"timestamp_signup": "2024-01-02T03:04:06+00:00"},
        {"status": "unsubscribed"},
        {"merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace", "CITY": "London"}},
        {"email_address": "ada@example.org"},
    ):
        assert hashed(member(**changed)) != h, changed
    assert hashed(member(), force=True) != h  # @force_optin
    assert hashed(member(), collection="mailchimp-0a1b2c3d4e") != h
    assert hashed(member(last_changed="2031-01-01T00:00:00+00:00")) == h  # a bump: nothing sent changes
    out = member(status="unsubscribed")  # for an opt-out, last_changed is timestamp_unsubscribed: sent
    assert hashed({**out, "last_changed": "2031-01-01T00:00:00+00:00"}) != hashed(out)


def test_the_record_bytes_and_their_hash_are_pinned_to_the_version() -> None:
    """The hash is computed from the contact columns, not from the bytes a push sends: if those bytes
    change for the same columns (record_dicts, the serialization) or the encoding does, the known
    hashes no longer say what Ometria holds. Then bump transform.RECORD_HASH_VERSION (stored hashes
    of another version read as unknown: each record is pushed once) and update these pins. (A change
    of the mapping, to_contacts, changes the columns themselves: the hashes follow without a bump.)"""
    full = {
        "id": "c" * 32,
        "@collection": "mailchimp-0123456789",
        "email": "ada@example.org",
        "firstname": "Ada",
        "lastname": "Lovelace",
        "marketing_optin": "EXPLICITLY_OPTEDIN",
        "@force_optin": False,
        "timestamp_subscribed": datetime(2024, 1, 3, 3, 4, 5, 123000, tzinfo=UTC),
        "timestamp_unsubscribed": None,
        "timestamp_acquired": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "phone_number": "+44 20 7946 0000",
        "date_of_birth": "1815-12-10",
        "country_id": "GB",
        "properties_json": '{"BIRTHDAY":"12/10","CITY":"London"}',
        "member_id": "0" * 32,
        "last_changed": datetime(2024, 2, 1, tzinfo=UTC),
    }
    sparse = {**dict.fromkeys(CONTACT_SCHEMA.names), "id": "d" * 32, "@collection": "mailchimp-0123456789"}
    sparse |= {"marketing_optin": "EXPLICITLY_OPTEDOUT", "@force_optin": True, "timestamp_unsubscribed": EPOCH}
    contacts = _table([full, sparse])
    body = push_body(contacts)
    pins = (RECORD_HASH_VERSION, hashlib.sha256(body).hexdigest()[:16], [f"{h:016x}" for h in record_hashes(contacts)])
    assert pins == (2, "aeaf8c19a157c535", ["fd86c29d30fdf317", "ebc7e6780261e940"]), pins
