"""The sandbox's Ometria subscription hierarchy: what a listing does to a contact's `marketing_optin`.

As Ometria documents it (support.ometria.com, articles 9881943263389 "Force opt-in",
360011293458 "How does Ometria subscribe and unsubscribe contacts?", 9881990633117
"Subscription timestamps"):
- a listing with `@force_optin: true` sets the status it carries (opted in or out) whatever the
  contact's other listings say, and only another forced listing overrides it; it "only needs to be
  sent once", so later unforced listings leave it in force;
- without a forced listing, opt-outs take precedence: one listing opted out keeps the contact
  opted out, whatever the others say;
- a listing without `marketing_optin` does not touch the subscription;
- the subscribe event (it starts welcome campaigns) fires the first time a contact is subscribed,
  and only when `marketing_optin` and `timestamp_subscribed` come in the same listing; the
  unsubscribe event fires the first time a contact is unsubscribed.

Each contact has two listings here: `api` (what was pushed) and `ometria` (Ometria's own
unsubscribe link or preference centre, set through the sandbox's admin route). The state lives in
the stored record under `KEY` and is never shown as a field.
"""

from __future__ import annotations

from typing import Any

OPTED_IN, OPTED_OUT, NOT_SPECIFIED = "EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED"
KEY = "~consent"
API, OMETRIA = "api", "ometria"


def status(state: dict[str, Any] | None) -> str | None:
    """The contact's effective `marketing_optin`; None when no listing said anything."""
    if not state:
        return None
    if state.get("forced"):
        return str(state["forced"])
    said = [v for v in state.get("listings", {}).values() if v]
    if OPTED_OUT in said:
        return OPTED_OUT
    if OPTED_IN in said:
        return OPTED_IN
    return NOT_SPECIFIED if said else None


def listing(state: dict[str, Any] | None, source: str) -> str | None:
    return (state or {}).get("listings", {}).get(source)


def apply_listing(
    state: dict[str, Any] | None, source: str, optin: str | None, *, forced: bool, timestamp_subscribed: bool
) -> tuple[dict[str, Any], list[str]]:
    """The state after one listing from `source`, and the events it fires."""
    new: dict[str, Any] = {
        "listings": dict((state or {}).get("listings", {})),
        "forced": (state or {}).get("forced"),
        "fired": list((state or {}).get("fired", [])),
    }
    before = status(state)
    new["listings"][source] = optin
    if forced and optin in (OPTED_IN, OPTED_OUT):
        new["forced"] = optin
    after = status(new)
    events = []
    if after == OPTED_IN != before and optin == OPTED_IN and timestamp_subscribed and "subscribed" not in new["fired"]:
        events.append("subscribed")
    if after == OPTED_OUT != before and "unsubscribed" not in new["fired"]:
        events.append("unsubscribed")
    new["fired"] += events
    return new, events
