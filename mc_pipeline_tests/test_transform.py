"""The Mailchimp -> Ometria mapping, on pages built by hand: every status, names, timestamps, dead letters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pytest

from mc_pipeline.staging import parse_page
from mc_pipeline.transform import (
    MAX_RECORD_BYTES,
    date_of_birth,
    encode_records,
    map_optin,
    properties_json,
    push_body,
    record_dicts,
    to_contacts,
)


def member(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "0" * 31 + "1",
        "email_address": "Ada.Lovelace+news@Example.org",
        "unique_email_id": "abcdef0123",
        "contact_id": "c" * 32,
        "full_name": "Ada Lovelace",
        "status": "subscribed",
        "merge_fields": {
            "FNAME": "Ada",
            "LNAME": "Lovelace",
            "ADDRESS": "",
            "PHONE": "+44 20 7946 0000",
            "BIRTHDAY": "12/10",
        },
        "timestamp_signup": "2024-01-02T03:04:05+00:00",
        "timestamp_opt": "2024-01-03T03:04:05+00:00",
        "last_changed": "2024-02-01T00:00:00+00:00",
        "language": "en",
        "vip": False,
        "member_rating": 3,
        "location": {"country_code": "GB"},
        "source": "Import",
        "tags": [{"id": 1, "name": "vip"}],
    }
    base.update(overrides)
    return base


def convert(*members: dict[str, Any], collection: str = "mailchimp-0123456789"):
    staged, dead = parse_page(orjson.dumps({"members": list(members), "total_items": len(members)}))
    assert not dead
    return to_contacts(staged, collection)


@pytest.mark.parametrize(
    ("status", "optin", "unsubscribed"),
    [
        ("subscribed", "EXPLICITLY_OPTEDIN", False),
        ("unsubscribed", "EXPLICITLY_OPTEDOUT", True),
        ("cleaned", "EXPLICITLY_OPTEDOUT", True),
        ("archived", "EXPLICITLY_OPTEDOUT", True),
        ("pending", "NOT_SPECIFIED", False),
        ("transactional", "NOT_SPECIFIED", False),
    ],
)
def test_every_status_maps_to_an_optin(status: str, optin: str, unsubscribed: bool) -> None:
    good, _ = convert(member(status=status))
    rec = good.to_pylist()[0]
    assert rec["marketing_optin"] == optin
    assert rec["@force_optin"] is unsubscribed  # opt-outs are forced; opt-ins only by the registry's setting
    assert (rec["timestamp_unsubscribed"] is not None) is unsubscribed
    if unsubscribed:
        assert rec["timestamp_unsubscribed"] == datetime(2024, 2, 1, tzinfo=UTC)


def test_unknown_status_is_not_specified() -> None:
    assert map_optin(pa.array(["weird", None, "subscribed"])).to_pylist() == [
        "NOT_SPECIFIED",
        "NOT_SPECIFIED",
        "EXPLICITLY_OPTEDIN",
    ]


def test_core_fields() -> None:
    good, dead = convert(member())
    assert dead.num_rows == 0
    rec = good.to_pylist()[0]
    assert rec["id"] == "c" * 32
    assert rec["@collection"] == "mailchimp-0123456789"
    assert rec["email"] == "Ada.Lovelace+news@Example.org"
    assert (rec["firstname"], rec["lastname"]) == ("Ada", "Lovelace")
    assert rec["phone_number"] == "+44 20 7946 0000"
    assert rec["country_id"] == "GB"
    assert rec["timestamp_subscribed"] == datetime(2024, 1, 3, 3, 4, 5, tzinfo=UTC)
    assert rec["timestamp_acquired"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert rec["date_of_birth"] is None  # Mailchimp's MM/DD has no year
    assert orjson.loads(rec["properties_json"]) == {"BIRTHDAY": "12/10"}


def test_id_falls_back_to_unique_email_id() -> None:
    good, _ = convert(member(contact_id=""))
    assert good.column("id").to_pylist() == ["abcdef0123"]


def test_names_fall_back_to_full_name_only_when_both_merge_fields_are_empty() -> None:
    good, _ = convert(
        member(merge_fields={"FNAME": "", "LNAME": ""}, full_name="  Zoë   de la Cruz "),
        member(id="2" * 32, contact_id="d" * 32, merge_fields={"LNAME": "O'Brien"}, full_name="O'Brien"),
        member(id="3" * 32, contact_id="e" * 32, merge_fields={}, full_name=""),
    )
    rows = good.to_pylist()
    assert (rows[0]["firstname"], rows[0]["lastname"]) == ("Zoë", "de la Cruz")
    assert (rows[1]["firstname"], rows[1]["lastname"]) == (None, "O'Brien")
    assert (rows[2]["firstname"], rows[2]["lastname"]) == (None, None)


def test_unicode_names_pass_unchanged() -> None:
    good, _ = convert(member(merge_fields={"FNAME": "さくら", "LNAME": "محمد 🌸"}))
    rec = good.to_pylist()[0]
    assert (rec["firstname"], rec["lastname"]) == ("さくら", "محمد 🌸")
    body = orjson.loads(push_body(good))
    assert body[0]["firstname"] == "さくら"


def test_empty_timestamps_are_left_out() -> None:
    good, _ = convert(member(timestamp_signup="", timestamp_opt="", status="pending"))
    rec = good.to_pylist()[0]
    assert rec["timestamp_subscribed"] is None and rec["timestamp_acquired"] is None
    sent = orjson.loads(push_body(good))[0]
    assert "timestamp_subscribed" not in sent and "timestamp_acquired" not in sent
    assert "@force_optin" not in sent


def test_acquired_falls_back_to_opt_in_time() -> None:
    good, _ = convert(member(timestamp_signup=""))
    assert good.column("timestamp_acquired")[0].as_py() == datetime(2024, 1, 3, 3, 4, 5, tzinfo=UTC)


def test_country_from_address_when_location_is_empty() -> None:
    good, _ = convert(
        member(location={"country_code": ""}, merge_fields={"ADDRESS": {"addr1": "1 Rue", "country": "fr"}}),
        member(id="2" * 32, contact_id="d" * 32, location={}, merge_fields={"ADDRESS": {"country": "France"}}),
    )
    assert good.column("country_id").to_pylist() == ["FR", None]  # not an ISO code: left out


def test_date_of_birth_formats() -> None:
    got = date_of_birth(pa.array(["1990-05-17", "05/17/1990", "05/17", "", None, "1990-02-31", "13/01/1990"]))
    assert got.to_pylist() == ["1990-05-17", "1990-05-17", None, None, None, None, None]


def test_dead_letters_carry_their_reason() -> None:
    good, dead = convert(
        member(),
        member(id="2" * 32, contact_id="", unique_email_id=""),
        member(id="3" * 32, contact_id="f" * 32, email_address="not-an-email"),
        member(id="4" * 32, contact_id="a" * 32, email_address="ada\x00@example.org"),
        member(id="5" * 32, contact_id="b" * 32, email_address="ada@exam\x7fple.org"),
        member(id="6" * 32, contact_id="d" * 32, email_address="ada\u0085x@example.org"),
    )
    assert good.num_rows == 1
    reasons = dict(zip(dead.column("member_id").to_pylist(), dead.column("reason").to_pylist(), strict=True))
    assert reasons == {
        "2" * 32: "no stable id: contact_id and unique_email_id are empty",
        "3" * 32: "email missing or not a valid address",
        "4" * 32: "email missing or not a valid address",  # a NUL byte: pushed before, refused now
        "5" * 32: "email missing or not a valid address",
        "6" * 32: "email missing or not a valid address",
    }
    assert set(dead.column("stage").to_pylist()) == {"transform"}


def test_control_characters_in_names_are_replaced_by_a_space() -> None:
    good, _ = convert(
        member(merge_fields={"FNAME": "Ada\x00", "LNAME": "Love\tlace\x1b[0m"}),
        member(id="2" * 32, contact_id="b" * 32, full_name="Grace\x07 Hopper", merge_fields={}),
    )
    names = list(zip(good.column("firstname").to_pylist(), good.column("lastname").to_pylist(), strict=True))
    assert names == [("Ada", "Love lace [0m"), ("Grace", "Hopper")]


def test_the_size_limit_is_checked_on_the_exact_bytes_sent() -> None:
    """JSON escapes a quote as two bytes and a control character as six: an estimate from the
    text's length let these through, and Ometria refused the whole batch."""
    quotes = member(merge_fields={"FNAME": '"' * 31_000})  # 31 KB of text, 62 KB as sent
    controls = member(id="2" * 32, contact_id="b" * 32, merge_fields={"NOTES": "\x01" * 10_500})  # 63 KB
    small = member(id="3" * 32, contact_id="d" * 32, merge_fields={"NOTES": "x" * 59_000})
    good, dead = convert(quotes, controls, small)
    assert good.num_rows == 3 and dead.num_rows == 0  # the size is judged where the bytes exist
    records = record_dicts(good)
    encoded, too_large = encode_records(records)
    assert [p for p, _ in too_large] == [0, 1]
    assert all("60 KB limit" in why and "bytes as sent" in why for _, why in too_large)
    assert [p for p, _ in encoded] == [2]
    assert encoded[0][1] == orjson.dumps(records[2])
    assert all(len(orjson.dumps(records[p])) > MAX_RECORD_BYTES for p, _ in too_large)
    body = b"[" + b",".join(raw for _, raw in encoded) + b"]"
    assert body == orjson.dumps([records[2]])  # the body is exactly the bytes that were checked


def _reference_properties(merge: dict[str, Any]) -> dict[str, Any] | None:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v not in ("", None)}
        return value

    out = {k: clean(v) for k, v in merge.items() if k not in ("FNAME", "LNAME", "PHONE") and v not in ("", None)}
    return out or None


@pytest.mark.parametrize(
    "merge",
    [
        {},
        {"FNAME": "a", "LNAME": "b", "PHONE": ""},
        {"FNAME": "a", "ADDRESS": {"addr1": "1 High St", "addr2": "", "city": "Zürich"}, "BIRTHDAY": "01/02"},
        {"COMPANY": 'He said "hi", then ,"FNAME":"x"', "NUM": 42, "EMPTY": "", "NULL": None},
        {"LNAME": "x\\", "Z": '\\"', "FNAME": None},
        {"A": "", "B": "", "C": "kept"},
    ],
)
def test_properties_match_a_reference_implementation(merge: dict[str, Any]) -> None:
    got = properties_json(pa.array([orjson.dumps(merge).decode()])).to_pylist()[0]
    assert (orjson.loads(got) if got else None) == _reference_properties(merge)


def test_push_body_is_what_ometria_takes() -> None:
    good, _ = convert(member())
    body = orjson.loads(push_body(good))
    assert body == [
        {
            "@type": "contact",
            "id": "c" * 32,
            "@collection": "mailchimp-0123456789",
            "email": "Ada.Lovelace+news@Example.org",
            "firstname": "Ada",
            "lastname": "Lovelace",
            "marketing_optin": "EXPLICITLY_OPTEDIN",
            "timestamp_subscribed": "2024-01-03T03:04:05+00:00",
            "timestamp_acquired": "2024-01-02T03:04:05+00:00",
            "phone_number": "+44 20 7946 0000",
            "country_id": "GB",
            "properties": {"BIRTHDAY": "12/10"},
        }
    ]


# ------------------------------------------------------------------------------------------ consent
def test_a_subscribed_member_is_not_forced_by_default() -> None:
    """A forced opt-in would override an opt-out the person made in Ometria (issue 9, item 16)."""
    sent = orjson.loads(push_body(convert(member())[0]))[0]
    assert sent["marketing_optin"] == "EXPLICITLY_OPTEDIN"
    assert "timestamp_subscribed" in sent  # with marketing_optin: Ometria's subscribe event
    assert "@force_optin" not in sent


@pytest.mark.parametrize(
    ("status", "forced"),
    [("subscribed", True), ("unsubscribed", True), ("cleaned", True), ("archived", True), ("pending", False)],
)
def test_the_registry_setting_forces_opt_ins(status: str, forced: bool) -> None:
    staged, _ = parse_page(orjson.dumps({"members": [member(status=status)], "total_items": 1}))
    sent = orjson.loads(push_body(to_contacts(staged, "mailchimp-0123456789", force_optin=True)[0]))[0]
    assert sent.get("@force_optin", False) is forced  # never on NOT_SPECIFIED: force needs an opt-in value


def test_tombstones_are_forced_opt_outs() -> None:
    from mc_pipeline.reconcile import tombstones

    (t,) = tombstones(pa.table({"id": ["x"], "email": ["x@example.org"]}), "mailchimp-0123456789", datetime.now(UTC))
    assert t["marketing_optin"] == "EXPLICITLY_OPTEDOUT" and t["@force_optin"] is True and t["@merge"] is True
