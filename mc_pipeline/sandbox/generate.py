"""Deterministic Mailchimp members with the mess real audiences have.

Every member is a pure function of (seed, list id, index), so two sandboxes with the same seed
serve byte-identical lists. The mess is deliberate: non-ASCII and empty names, mixed-case and
plus-addressed emails, very long values, missing merge fields, `""` timestamps, an ADDRESS that
is an object or an empty string, and a few members per thousand with odd but valid data.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from typing import Any

STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived")
_STATUS_WEIGHTS = (70, 12, 5, 5, 4, 4)

_FIRST = (
    "James",
    "Mary",
    "Olivia",
    "Noah",
    "Amelia",
    "Liam",
    "Emma",
    "Ava",
    "Oliver",
    "Sophia",
    "José",
    "Zoë",
    "Björn",
    "Łukasz",
    "Søren",
    "François",
    "Chloé",
    "Ægir",
    "Małgorzata",
    "Ömer",
    "Дмитрий",
    "Ελένη",
    "محمد",
    "さくら",
    "王芳",
    "Nguyễn",
    "Ana 🌸",
    "D'Arcy",
    "Mary-Jane",
    "Jean Luc",
)
_FIRST_ASCII = (
    "james",
    "mary",
    "olivia",
    "noah",
    "amelia",
    "liam",
    "emma",
    "ava",
    "oliver",
    "sophia",
    "jose",
    "zoe",
    "bjorn",
    "lukasz",
    "soren",
    "francois",
    "chloe",
    "aegir",
    "malgorzata",
    "omer",
    "dmitry",
    "eleni",
    "mohammed",
    "sakura",
    "wangfang",
    "nguyen",
    "ana",
    "darcy",
    "maryjane",
    "jeanluc",
)
_LAST = (
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Johnson",
    "Davies",
    "Patel",
    "Wright",
    "O'Brien",
    "Smith-Jones",
    "van der Berg",
    "Müller",
    "García",
    "Øster",
    "Kowalczyk",
    "Şahin",
    "Иванов",
    "Παπαδόπουλος",
    "الحسن",
    "佐藤",
    "李",
    "Trần",
    "de la Cruz",
    "MacDonald",
)
_LAST_ASCII = (
    "smith",
    "jones",
    "taylor",
    "brown",
    "williams",
    "wilson",
    "johnson",
    "davies",
    "patel",
    "wright",
    "obrien",
    "smith-jones",
    "vanderberg",
    "muller",
    "garcia",
    "oster",
    "kowalczyk",
    "sahin",
    "ivanov",
    "papadopoulos",
    "alhassan",
    "sato",
    "li",
    "tran",
    "delacruz",
    "macdonald",
)
_DOMAINS = (
    "gmail.com",
    "yahoo.co.uk",
    "outlook.com",
    "hotmail.fr",
    "example.org",
    "icloud.com",
    "mail.example.co.jp",
    "web.de",
    "xn--bcher-kva.example",
    "proton.me",
)
_COUNTRIES = (
    ("GB", "Europe/London", "England"),
    ("US", "America/New_York", "NY"),
    ("FR", "Europe/Paris", "IDF"),
    ("DE", "Europe/Berlin", "BE"),
    ("JP", "Asia/Tokyo", "13"),
    ("BR", "America/Sao_Paulo", "SP"),
    ("ES", "Europe/Madrid", "MD"),
    ("AU", "Australia/Sydney", "NSW"),
    ("", "", ""),
)
_CITIES = ("London", "New York", "Paris", "Berlin", "東京", "São Paulo", "Madrid", "Sydney", "Zürich")
_LANGS = ("en", "fr", "de", "ja", "pt", "es", "")
_SOURCES = ("API - Generic", "Hosted Signup Form", "Import", "Admin Add", "Embedded Form")
_TAGS = ((101, "vip"), (102, "newsletter"), (103, "black-friday-2025"), (104, "Wholesale ✓"))
_UNSUB_REASONS = ("N/A (Unsubscribed by admin)", "I no longer want to receive these emails", "Spam")

SCHEMA_BASE = "https://us6.api.mailchimp.com/schema/3.0"


def iso(ts: int) -> str:
    """Mailchimp's timestamp format: second resolution with an explicit +00:00 offset."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def member_id(email: str) -> str:
    """Mailchimp's subscriber hash: MD5 of the lower-cased email address."""
    return hashlib.md5(email.lower().encode("utf-8")).hexdigest()


def member_links(dc: str, list_id: str, mid: str) -> list[dict[str, str]]:
    base = f"https://{dc}.api.mailchimp.com/3.0/lists/{list_id}/members/{mid}"
    schema = f"{SCHEMA_BASE}/Definitions/Lists/Members"
    return [
        {"rel": "self", "href": base, "method": "GET", "targetSchema": f"{schema}/Response.json"},
        {
            "rel": "parent",
            "href": base.rsplit("/", 1)[0],
            "method": "GET",
            "targetSchema": f"{schema}/CollectionResponse.json",
            "schema": f"{SCHEMA_BASE}/Paths/Lists/Members/Collection.json",
        },
        {
            "rel": "update",
            "href": base,
            "method": "PATCH",
            "targetSchema": f"{schema}/Response.json",
            "schema": f"{schema}/PATCH.json",
        },
        {
            "rel": "upsert",
            "href": base,
            "method": "PUT",
            "targetSchema": f"{schema}/Response.json",
            "schema": f"{schema}/PUT.json",
        },
        {"rel": "delete", "href": base, "method": "DELETE"},
        {
            "rel": "activity",
            "href": f"{base}/activity",
            "method": "GET",
            "targetSchema": f"{schema}/Activity/Response.json",
        },
        {"rel": "goals", "href": f"{base}/goals", "method": "GET", "targetSchema": f"{schema}/Goals/Response.json"},
        {
            "rel": "notes",
            "href": f"{base}/notes",
            "method": "GET",
            "targetSchema": f"{schema}/Notes/CollectionResponse.json",
        },
        {
            "rel": "events",
            "href": f"{base}/events",
            "method": "POST",
            "targetSchema": "https://us6.api.mailchimp.com/schema/3.0/Definitions/Lists/Members/Events/POST.json",
        },
        {"rel": "delete_permanent", "href": f"{base}/actions/delete-permanent", "method": "POST"},
    ]


class MemberFactory:
    """Builds the members of one list; `make(i)` is deterministic in (seed, list_id, i)."""

    def __init__(self, seed: int, list_id: str, dc: str, epoch: int, span_s: int = 3 * 365 * 86400) -> None:
        self.seed = seed
        self.list_id = list_id
        self.dc = dc
        self.epoch = epoch  # the newest generated last_changed
        self.span_s = span_s
        # A per-list stable set of interests and an occasional list-specific merge field.
        rng = random.Random(f"{seed}:{list_id}:meta")
        self.interest_ids = [f"{rng.getrandbits(40):010x}" for _ in range(3)]
        self.extra_merge = ("COMPANY", "MMERGE6")[: rng.randint(0, 2)]
        self.interest_category_id = f"{rng.getrandbits(40):010x}"  # the category the interests belong to

    def make(self, i: int, *, email: str | None = None, status: str | None = None) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.list_id}:{i}")
        odd = rng.random() < 0.004  # a few per thousand with odd but valid data
        fi = rng.randrange(len(_FIRST))
        li = rng.randrange(len(_LAST))
        first, last = _FIRST[fi], _LAST[li]
        if rng.random() < 0.03:
            first = ""
        if rng.random() < 0.02:
            last = ""
        if odd and rng.random() < 0.5:
            last = (last or "Long") + "-" + "x" * rng.randint(200, 400)  # very long value
        if email is None:
            email = self._email(rng, fi, li, i, odd)
        if status is None:
            status = rng.choices(STATUSES, weights=_STATUS_WEIGHTS)[0]
        mid = member_id(email)

        # Signup/opt-in times precede last_changed; pending/transactional have no opt-in yet.
        last_changed = self.epoch - rng.randrange(self.span_s)
        signup_ts = last_changed - rng.randrange(30 * 86400) if rng.random() < 0.6 else None
        opt_ts = None if status in ("pending", "transactional") else last_changed - rng.randrange(86400)

        merge: dict[str, Any] = {}
        if rng.random() > 0.02:  # missing merge fields entirely, as after some imports
            merge["FNAME"] = first
            merge["LNAME"] = last
            if rng.random() < 0.5:
                cc, _, region = _COUNTRIES[rng.randrange(len(_COUNTRIES) - 1)]
                merge["ADDRESS"] = {
                    "addr1": f"{rng.randint(1, 999)} {'High Street' if not odd else 'Ünïcødé Straße ' * 12}",
                    "addr2": "" if rng.random() < 0.8 else f"Flat {rng.randint(1, 99)}",
                    "city": _CITIES[rng.randrange(len(_CITIES))],
                    "state": region,
                    "zip": f"{rng.randint(10000, 99999)}",
                    "country": cc,
                }
            else:
                merge["ADDRESS"] = ""
            merge["PHONE"] = "" if rng.random() < 0.4 else f"+44 7{rng.randint(100, 999)} {rng.randint(100000, 999999)}"
            merge["BIRTHDAY"] = "" if rng.random() < 0.5 else f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
            for field in self.extra_merge:
                merge[field] = "" if rng.random() < 0.5 else f"{field.lower()}-{rng.randint(1, 500)}"
        cc, tz, region = _COUNTRIES[rng.randrange(len(_COUNTRIES))]
        ntags = rng.choice((0, 0, 1, 2))
        tags = [{"id": t, "name": n} for t, n in rng.sample(_TAGS, ntags)]
        full_name = f"{first} {last}".strip()

        member: dict[str, Any] = {
            "id": mid,
            "email_address": email,
            "unique_email_id": f"{rng.getrandbits(40):010x}",
            "contact_id": f"{rng.getrandbits(128):032x}",
            "full_name": full_name,
            "web_id": 100_000_000 + i,
            "email_type": "html" if rng.random() < 0.95 else "text",
            "status": status,
            "consents_to_one_to_one_messaging": True,
            # The 3.0.80 schema's SMS fields; the sandbox's members have no SMS channel.
            "sms_phone_number": "",
            "sms_subscription_status": "",
            "sms_subscription_last_updated": "",
            "merge_fields": merge,
            "interests": {iid: rng.random() < 0.3 for iid in self.interest_ids},
            "stats": {"avg_open_rate": round(rng.random(), 2), "avg_click_rate": round(rng.random() / 4, 2)},
            "ip_signup": f"203.0.113.{rng.randint(1, 254)}" if signup_ts else "",
            "timestamp_signup": iso(signup_ts) if signup_ts else "",
            "ip_opt": f"198.51.100.{rng.randint(1, 254)}" if opt_ts else "",
            "timestamp_opt": iso(opt_ts) if opt_ts else "",
            "member_rating": rng.randint(1, 5),
            "last_changed": iso(last_changed),
            "language": rng.choice(_LANGS),
            "vip": rng.random() < 0.02,
            "email_client": "",
            "location": {
                "latitude": round(rng.uniform(-60, 60), 4) if cc else 0,
                "longitude": round(rng.uniform(-120, 150), 4) if cc else 0,
                "gmtoff": 0,
                "dstoff": 0,
                "country_code": cc,
                "timezone": tz,
                "region": region,
            },
            "source": rng.choice(_SOURCES),
            "tags_count": ntags,
            "tags": tags,
            "list_id": self.list_id,
            "_links": member_links(self.dc, self.list_id, mid),
        }
        if status == "unsubscribed":
            member["unsubscribe_reason"] = rng.choice(_UNSUB_REASONS)
        return member

    def _email(self, rng: random.Random, fi: int, li: int, i: int, odd: bool) -> str:
        local = f"{_FIRST_ASCII[fi]}.{_LAST_ASCII[li]}{i}"
        domain = _DOMAINS[rng.randrange(len(_DOMAINS))]
        r = rng.random()
        if r < 0.15:
            local = local.title()  # mixed case: John.Smith12@...
            domain = domain.capitalize()
        elif r < 0.25:
            local = f"{local}+{rng.choice(('news', 'shop', 'mc', 'promo.2025'))}"  # plus-addressed
        if odd:
            kind = rng.randrange(4)
            if kind == 0:
                local = (local + "." + "a" * 64)[:64]  # the longest local part allowed
            elif kind == 1:
                local = f"o'{local}"
            elif kind == 2:
                local = f"{i}_{local}".upper()
                domain = domain.upper()
            else:
                domain = f"mail.{'sub' * 8}.{domain}"
        return f"{local}@{domain}"
