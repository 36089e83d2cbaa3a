"""The Mailchimp -> Ometria contact mapping: pure, column-wise (pyarrow compute), documented.

| Ometria field            | from Mailchimp                                                          |
|--------------------------|-------------------------------------------------------------------------|
| `id`                     | `contact_id` (stable across email changes, not PII); else `unique_email_id` |
| `@collection`            | one per client list: `<prefix>-<list_id>` (see the registry)            |
| `email`                  | `email_address`, trimmed                                                |
| `firstname`, `lastname`  | FNAME, LNAME; when both are empty, the first word / rest of `full_name` |
| `marketing_optin`        | subscribed -> EXPLICITLY_OPTEDIN; unsubscribed, cleaned, archived ->    |
|                          | EXPLICITLY_OPTEDOUT; pending, transactional, unknown -> NOT_SPECIFIED   |
| `@force_optin`           | true on every opt-out; on opt-ins only with the registry's              |
|                          | `ometria.force_optin: true` (default false). See "Consent" below.       |
| `timestamp_subscribed`   | `timestamp_opt` (when the member confirmed the opt-in)                  |
| `timestamp_unsubscribed` | `last_changed`, for unsubscribed, cleaned and archived members          |
| `timestamp_acquired`     | `timestamp_signup`, else `timestamp_opt`                                |
| `phone_number`           | PHONE, when not empty                                                   |
| `date_of_birth`          | BIRTHDAY when it is a full date (YYYY-MM-DD or MM/DD/YYYY); Mailchimp's |
|                          | year-less MM/DD birthday stays in `properties.BIRTHDAY`                 |
| `country_id`             | `location.country_code`, else ADDRESS.country (ISO 3166-1 alpha-2)      |
| `properties`             | every merge field but FNAME, LNAME, PHONE (empty values left out)       |

Members deleted outright in Mailchimp vanish from its API; the weekly full refresh finds the
contacts this pipeline pushed that Mailchimp no longer lists and sends each an opt-out
(`marketing_optin` EXPLICITLY_OPTEDOUT, `timestamp_unsubscribed`, `properties.mailchimp_deleted`,
with `@merge` so Ometria keeps the rest of the record). See `reconcile.tombstones`.

Consent (Ometria's subscription hierarchy, support.ometria.com articles 9881943263389 "Force
opt-in" and 360011293458 "How does Ometria subscribe and unsubscribe contacts?"): a listing with
`@force_optin` sets its `marketing_optin` whatever any other listing of the contact says (Ometria's
own unsubscribe links and preference centre, other importers) and only another forced listing
overrides it; Ometria advises against forcing a listing you do not fully trust. Mailchimp is a
third party to Ometria, so opt-ins are not forced by default: a person who unsubscribed through
Ometria stays unsubscribed when the next push of their record says "subscribed".
`ometria: {force_optin: true}` restores forced opt-ins for a client whose Mailchimp list is the
one authority on consent, at that risk: every push of a subscribed member then re-subscribes them,
overriding any opt-out they made in Ometria.
Opt-outs are always forced. Without force Ometria already lets an opt-out win over other
non-forced opt-ins, but not over a forced opt-in, and a forced listing "only needs to be sent
once": every subscribed member pushed before this setting existed (and with `force_optin: true`)
holds a forced opt-in that an unforced opt-out from Mailchimp would never beat. Forcing can only
withdraw consent here, the direction that cannot email anyone who said no. The price, by the
same rule: a member unsubscribed in Mailchimp who opts in again through Ometria's own forms is
opted out again when their Mailchimp record is next pushed, and a Mailchimp re-subscription
reaches Ometria only with `force_optin: true`. Tombstones are forced for the same reason.
A record is pushed only when its bytes differ from those Ometria last accepted (`record_hashes`),
so an opt-out is forced again only when the member's record changes (or with `push_all`), not at
every weekly full refresh.

Why these choices: archived members can no longer be emailed from Mailchimp, so they leave
Ometria as opted out rather than silently stale; pending and transactional members never gave
marketing consent, so they are NOT_SPECIFIED.

What Ometria refuses is caught here, before any push, so a rejection is rare and means news:
- no stable id, or an email that is not an address -> a dead letter with its reason. An address
  holding a control character (NUL, tab, newline, DEL, C1) is not one (RFC 5321 allows none, so
  Ometria cannot deliver to it): it is a dead letter, never "cleaned" into another address.
- control characters in `firstname` / `lastname` (a copy-paste artefact, never part of a name;
  Ometria answers "not a valid value" at `root > lastname`) are replaced by a space, then trimmed:
  the person still arrives, under a readable name.
- the 60 KB per record ("Payload invalid: Record is too large.", which refuses the whole request)
  is checked in `encode_records` on the exact bytes that are sent, not estimated: a merge field
  of quotes or control characters doubles or sextuples when JSON escapes it. The docs say "60KB";
  the check takes the stricter reading, 60,000 bytes.
- 100 records per request and one @type per request are held by the push client.
The docs give no length limit for names, phone or properties: none is checked.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from mc_pipeline.staging import UTC_TS

OPTIN = {
    "subscribed": "EXPLICITLY_OPTEDIN",
    "unsubscribed": "EXPLICITLY_OPTEDOUT",
    "cleaned": "EXPLICITLY_OPTEDOUT",
    "archived": "EXPLICITLY_OPTEDOUT",
    "pending": "NOT_SPECIFIED",
    "transactional": "NOT_SPECIFIED",
}
OPTED_OUT_STATUSES = ("unsubscribed", "cleaned", "archived")
# Ometria refuses these; the same rules as its validator, so nothing is sent only to be rejected.
# No whitespace and no control character (C0, DEL, C1) anywhere in an address; RE2 and Python `re` alike.
_NOT_IN_ADDRESS = r"@\s\x00-\x1f\x7f-\x9f"
EMAIL_PATTERN = rf"^[^{_NOT_IN_ADDRESS}]{{1,64}}@[^{_NOT_IN_ADDRESS}.]+(\.[^{_NOT_IN_ADDRESS}.]+)+$"
MAX_RECORD_BYTES = 60_000  # "60KB" per record, in the stricter (decimal) reading
CONTROL_CHARS = r"[\x00-\x1f\x7f-\x9f]+"

CONTACT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("@collection", pa.string(), nullable=False),
        pa.field("email", pa.string()),
        pa.field("firstname", pa.string()),
        pa.field("lastname", pa.string()),
        pa.field("marketing_optin", pa.string()),
        pa.field("@force_optin", pa.bool_()),
        pa.field("timestamp_subscribed", UTC_TS),
        pa.field("timestamp_unsubscribed", UTC_TS),
        pa.field("timestamp_acquired", UTC_TS),
        pa.field("phone_number", pa.string()),
        pa.field("date_of_birth", pa.string()),
        pa.field("country_id", pa.string()),
        pa.field("properties_json", pa.string()),
        pa.field("member_id", pa.string(), metadata={"doc": "lineage back to the staging row; not sent"}),
        pa.field("last_changed", UTC_TS, metadata={"doc": "Mailchimp's; not sent"}),
    ]
)
NOT_SENT = ("member_id", "last_changed")


def _nonempty(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Trimmed strings, with empty ones as null."""
    trimmed = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), pa.scalar(None, pa.string()), trimmed)


def _name(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A name with its control characters replaced by a space, trimmed; empty as null."""
    return _nonempty(pc.replace_substring_regex(arr, CONTROL_CHARS, " "))


def _where(mask: Any, value: Any, typ: pa.DataType) -> pa.Array:
    return pc.if_else(pc.fill_null(mask, False), value, pa.scalar(None, typ))


def map_optin(status: pa.ChunkedArray | pa.Array) -> pa.Array:
    statuses = pa.array(list(OPTIN))
    values = pa.array([*OPTIN.values(), "NOT_SPECIFIED"])
    idx = pc.fill_null(pc.index_in(status, value_set=statuses), len(OPTIN))
    return pc.take(values, idx)


def forced_optin(optin: pa.ChunkedArray | pa.Array, force_optin: bool) -> pa.Array:
    """`@force_optin` per record: every opt-out; opt-ins only when the client's registry says so."""
    forced = ("EXPLICITLY_OPTEDOUT", "EXPLICITLY_OPTEDIN") if force_optin else ("EXPLICITLY_OPTEDOUT",)
    return pc.is_in(optin, value_set=pa.array(forced))


# Merge tags are letters, digits and '_'; orjson writes compact JSON, so these patterns see
# structure, never the inside of a string (where every '"' is escaped).
_STRING = r'"(?:[^"\\]|\\.)*"'
_SCALAR = rf"(?:{_STRING}|null|true|false|-?[0-9][0-9.eE+-]*)"
_DROPPED = rf'(?:"(?:FNAME|LNAME|PHONE)":{_SCALAR}|{_STRING}:(?:""|null))'


def properties_json(merge_fields_json: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Merge fields minus FNAME, LNAME, PHONE (mapped to their own fields) and empty values ("" or
    null, at any depth). FNAME, LNAME or PHONE holding an object stays: it maps to nothing else."""
    out = pc.replace_substring_regex(merge_fields_json, rf",{_DROPPED}", "")
    out = pc.replace_substring_regex(out, rf"\{{{_DROPPED},?", "{")
    return _where(pc.not_equal(out, "{}"), out, pa.string())


def split_full_name(full_name: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    parts = pc.extract_regex(full_name, r"^\s*(?P<first>\S+)(?:\s+(?P<rest>.*?))?\s*$")
    first = pc.struct_field(parts, "first")
    rest = pc.struct_field(parts, "rest")
    return _nonempty(first), _nonempty(rest)


def date_of_birth(birthday: pa.ChunkedArray | pa.Array) -> pa.Array:
    b = pc.utf8_trim_whitespace(birthday)
    iso = pc.match_substring_regex(b, r"^\d{4}-\d{2}-\d{2}$")
    us = pc.match_substring_regex(b, r"^\d{2}/\d{2}/\d{4}$")
    us_as_iso = pc.replace_substring_regex(b, r"^(\d{2})/(\d{2})/(\d{4})$", r"\3-\1-\2")
    out = pc.if_else(pc.fill_null(iso, False), b, _where(us, us_as_iso, pa.string()))
    # A date Ometria would refuse (month 13, 31 Feb) is dropped, not sent.
    parsed = pc.strptime(out, format="%Y-%m-%d", unit="s", error_is_null=True)
    round_trip = pc.strftime(parsed, format="%Y-%m-%d")  # 1990-02-31 parses, but comes back as March
    return _where(pc.equal(round_trip, out), out, pa.string())


def contact_ids(staged: pa.Table) -> pa.Array:
    """Each member's Ometria id: `contact_id`, else `unique_email_id` (null when neither is set)."""
    return pc.coalesce(_nonempty(staged.column("contact_id")), _nonempty(staged.column("unique_email_id")))


def to_contacts(staged: pa.Table, collection: str, force_optin: bool = False) -> tuple[pa.Table, pa.Table]:
    """Staged members -> (Ometria contact records, dead letters), column by column.

    `force_optin`: the client's registry setting; forced opt-ins override opt-outs made in Ometria."""
    n = staged.num_rows
    c = staged.column
    record_id = contact_ids(staged)
    email = _nonempty(c("email_address"))
    fname, lname = _name(c("fname")), _name(c("lname"))
    no_name_fields = pc.and_(pc.is_null(fname), pc.is_null(lname))  # only then is full_name a fallback
    # Split only the names that are used: the regex costs more per row than most other columns.
    first_from_name, rest_from_name = split_full_name(
        _where(no_name_fields, pc.replace_substring_regex(c("full_name"), CONTROL_CHARS, " "), pa.string())
    )
    status = c("status")
    opted_out = pc.is_in(status, value_set=pa.array(OPTED_OUT_STATUSES))
    country = pc.utf8_upper(pc.coalesce(_nonempty(c("country_code")), _nonempty(c("address_country"))))
    country = _where(pc.match_substring_regex(country, r"^[A-Z]{2}$"), country, pa.string())
    optin = map_optin(status)

    records = pa.table(
        {
            "id": record_id,
            "@collection": pa.array([collection] * n, pa.string()),
            "email": email,
            "firstname": pc.coalesce(fname, _where(no_name_fields, first_from_name, pa.string())),
            "lastname": pc.coalesce(lname, _where(no_name_fields, rest_from_name, pa.string())),
            "marketing_optin": optin,
            "@force_optin": forced_optin(optin, force_optin),
            "timestamp_subscribed": c("timestamp_opt"),
            "timestamp_unsubscribed": _where(opted_out, c("last_changed"), UTC_TS),
            "timestamp_acquired": pc.coalesce(c("timestamp_signup"), c("timestamp_opt")),
            "phone_number": _nonempty(c("phone")),
            "date_of_birth": date_of_birth(c("birthday")),
            "country_id": country,
            "properties_json": properties_json(c("merge_fields_json")),
            "member_id": c("member_id"),
            "last_changed": c("last_changed"),
        },
        schema=CONTACT_SCHEMA,
    )

    reason = pc.if_else(
        pc.is_null(record_id),
        "no stable id: contact_id and unique_email_id are empty",
        _where(
            pc.invert(pc.fill_null(pc.match_substring_regex(email, EMAIL_PATTERN), False)),
            "email missing or not a valid address",
            pa.string(),
        ),
    )
    valid = pc.is_null(reason)
    good = records.filter(valid)
    bad = staged.filter(pc.invert(valid))
    bad_reasons = reason.filter(pc.invert(valid))
    dead = pa.table(
        {
            "stage": pa.array(["transform"] * bad.num_rows, pa.string()),
            "member_id": bad.column("member_id"),
            "record_id": record_id.filter(pc.invert(valid)),
            "reason": bad_reasons,
            "payload": pa.array([orjson.dumps(r, default=str).decode() for r in bad.to_pylist()], pa.string()),
        }
    )
    return good, dead


def record_dicts(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Contact rows -> the JSON objects Ometria takes: nulls left out, properties as an object."""
    out = []
    for row in batch.to_pylist():
        props = row.pop("properties_json")
        for name in NOT_SENT:
            row.pop(name, None)
        record = {"@type": "contact"}
        record.update({k: v for k, v in row.items() if v is not None})
        if not record.get("@force_optin"):
            record.pop("@force_optin", None)
        if props:
            record["properties"] = orjson.loads(props)
        out.append(record)
    return out


def push_body(batch: pa.RecordBatch | pa.Table) -> bytes:
    """A push request body: the batch's records as a JSON array (timestamps as ISO 8601)."""
    return orjson.dumps(record_dicts(batch))


def _encode(record: dict[str, Any]) -> bytes:
    """One record as a push sends it: the one serialization both the push and its hash use."""
    return orjson.dumps(record)


def record_hashes(records: list[dict[str, Any]]) -> np.ndarray:
    """A 64-bit hash (uint64, never 0: 0 is "no hash known") of each record's exact bytes as sent.

    Everything Ometria stores is in those bytes (`timestamp_*`, `@force_optin`, `properties`), so two
    records hash alike only when a push of the second would change nothing Ometria holds. BLAKE2b
    is stable across processes and versions (Python's `hash` is salted per process)."""
    digests = b"".join(hashlib.blake2b(_encode(r), digest_size=8).digest() for r in records)
    hashes = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    hashes[hashes == 0] = 1
    return hashes


def encode_records(records: list[dict[str, Any]]) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
    """(position, the exact bytes a push sends) of each record within Ometria's per-record limit
    (`b"[" + b",".join(...) + b"]"` is the body orjson would write), and (position, reason) of the rest."""
    encoded: list[tuple[int, bytes]] = []
    too_large: list[tuple[int, str]] = []
    for i, record in enumerate(records):
        raw = _encode(record)
        if len(raw) > MAX_RECORD_BYTES:
            too_large.append((i, f"record over Ometria's 60 KB limit ({len(raw):,} bytes as sent)"))
        else:
            encoded.append((i, raw))
    return encoded, too_large

