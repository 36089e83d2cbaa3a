"""The query parameters of `GET /lists/{list_id}/members`: every documented one works or is refused.

The documented set is the OpenAPI specification's, as the official SDK (mailchimp-marketing
3.0.80, `get_list_members_info`) sends it. A client written by others must never get an answer
that silently ignored one of its filters: a value the sandbox cannot honour is a 400 problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mc_pipeline.sandbox.generate import STATUSES
from mc_pipeline.sandbox.mailchimp import MailchimpProblem

SORT_FIELDS = ("timestamp_opt", "timestamp_signup", "last_changed")
EMAIL_TYPES = ("html", "text")
INTEREST_MATCHES = ("any", "all", "none")
DOCUMENTED = frozenset(
    {
        "fields",
        "exclude_fields",
        "count",
        "offset",
        "email_type",
        "status",
        "since_timestamp_opt",
        "before_timestamp_opt",
        "since_last_changed",
        "before_last_changed",
        "unique_email_id",
        "vip_only",
        "interest_category_id",
        "interest_ids",
        "interest_match",
        "sort_field",
        "sort_dir",
        "since_last_campaign",
        "unsubscribed_since",
    }
)


def invalid(detail: str) -> MailchimpProblem:
    return MailchimpProblem(400, "Invalid Resource", detail)


def parse_time(value: str | None, name: str) -> int | None:
    """An ISO 8601 date-time; without a UTC offset it is read as UTC, as the real API does."""
    if value is None or value == "":
        return None
    try:
        dt = datetime.fromisoformat(value.replace(" ", "+"))  # a raw '+' in a query string decodes to ' '
    except ValueError as exc:
        raise invalid(f"The value for {name} must be an ISO 8601 date-time: {value!r}.") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def parse_bool(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise invalid(f"{name} must be true or false, not {value!r}.")


def _choice(value: str | None, name: str, allowed: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise invalid(f"{name} must be one of {list(allowed)}, not {value!r}.")
    return value


@dataclass(frozen=True)
class MemberQuery:
    """One listing's filters and order. Hashable: a list caches the slots of recent queries."""

    status: str | None = None
    since_last_changed: int | None = None
    before_last_changed: int | None = None
    since_timestamp_opt: int | None = None
    before_timestamp_opt: int | None = None
    unsubscribed_since: int | None = None
    email_type: str | None = None
    vip_only: bool = False
    unique_email_id: str | None = None
    interest_ids: tuple[str, ...] = ()
    interest_match: str | None = None
    sort_field: str | None = None
    sort_dir: str = "ASC"

    def reads_documents(self) -> bool:
        """Whether a filter needs the member itself, not only the list's query columns."""
        return bool(self.email_type or self.vip_only or self.unique_email_id or self.interest_match)

    def keeps(self, member: dict[str, Any]) -> bool:
        if self.email_type is not None and member.get("email_type") != self.email_type:
            return False
        if self.vip_only and not member.get("vip"):
            return False
        if self.unique_email_id is not None and member.get("unique_email_id") != self.unique_email_id:
            return False
        if self.interest_match is not None:
            interests = member.get("interests") or {}
            chosen = [bool(interests.get(i)) for i in self.interest_ids]
            wanted = {"any": any(chosen), "all": all(chosen), "none": not any(chosen)}
            return wanted[self.interest_match]
        return True


def member_query(q: Mapping[str, str], interest_category_id: str) -> MemberQuery:
    """The query of one request, every documented parameter checked (400 on a bad value)."""
    status = _choice(q.get("status"), "status", STATUSES)
    unsubscribed_since = parse_time(q.get("unsubscribed_since"), "unsubscribed_since")
    if unsubscribed_since is not None:
        if status not in (None, "unsubscribed"):
            raise invalid("unsubscribed_since can only be used with status=unsubscribed.")
        status = "unsubscribed"
    # No campaign has been sent from the sandbox: "since the last campaign" is every member.
    if parse_bool(q.get("since_last_campaign"), "since_last_campaign") and status is None:
        raise invalid("since_last_campaign needs a member status.")
    sort_dir = (q.get("sort_dir") or "ASC").upper()
    if sort_dir not in ("ASC", "DESC"):
        raise invalid("sort_dir must be ASC or DESC.")
    category, ids, match = q.get("interest_category_id"), q.get("interest_ids"), q.get("interest_match")
    if any((category, ids, match)):
        if not (category and ids and match):
            raise invalid("interest_category_id, interest_ids and interest_match must be given together.")
        if category != interest_category_id:
            raise invalid(f"The interest category {category!r} does not exist on this list.")
        _choice(match, "interest_match", INTEREST_MATCHES)
    return MemberQuery(
        status=status,
        since_last_changed=parse_time(q.get("since_last_changed"), "since_last_changed"),
        before_last_changed=parse_time(q.get("before_last_changed"), "before_last_changed"),
        since_timestamp_opt=parse_time(q.get("since_timestamp_opt"), "since_timestamp_opt"),
        before_timestamp_opt=parse_time(q.get("before_timestamp_opt"), "before_timestamp_opt"),
        unsubscribed_since=unsubscribed_since,
        email_type=_choice(q.get("email_type"), "email_type", EMAIL_TYPES),
        vip_only=parse_bool(q.get("vip_only"), "vip_only"),
        unique_email_id=q.get("unique_email_id") or None,
        interest_ids=tuple(i.strip() for i in (ids or "").split(",") if i.strip()),
        interest_match=match or None,
        sort_field=_choice(q.get("sort_field"), "sort_field", SORT_FIELDS),
        sort_dir=sort_dir,
    )
