"""Errors that name the client, the list and the cause; never a key.

`retryable` says whether a later run could succeed without anyone changing anything; the
failure sensor and the alerts use it to tell "fix the credentials" from "it will pass".
A cause is our own text: never an HTTP library's exception message, which can quote a header
(a key) or a URL (see `ApiSession` in http.py, which turns those into safe exceptions).
"""

from __future__ import annotations


class ApiError(Exception):
    service = "API"
    retryable = False

    def __init__(self, message: str, *, client_id: str, list_id: str | None = None, status: int | None = None) -> None:
        where = f"client {client_id!r}" + (f", list {list_id}" if list_id else "")
        super().__init__(f"{self.service} {where}: {message}")
        self.client_id = client_id
        self.list_id = list_id
        self.status = status
        self.cause = message


class CredentialError(ApiError):
    """A key that is missing, unreadable or malformed: found before the first request. Not retried."""

    service = "Credentials of"


class MailchimpError(ApiError):
    service = "Mailchimp"


class MailchimpAuthError(MailchimpError):
    """401/403: the key is wrong, revoked or the account disabled. Not retried."""


class MailchimpNotFound(MailchimpError):
    """404: the list (or the datacenter) does not exist for this key. Not retried."""


class MailchimpRequestError(MailchimpError):
    """Another 4xx: the request itself is wrong. Not retried."""


class MailchimpUnavailable(MailchimpError):
    """Retries exhausted on 5xx, timeouts, dropped connections or malformed pages."""

    retryable = True


class OmetriaError(ApiError):
    service = "Ometria"


class OmetriaAuthError(OmetriaError):
    """401/403: the Ometria key is wrong or revoked. The client's import stops at once."""


class OmetriaQuotaError(OmetriaError):
    """402 or another quota-type refusal. The client's import stops at once."""


class OmetriaRequestError(OmetriaError):
    """A request that could not be sent or was redirected: the registry's URL or key is wrong. Not retried."""


class OmetriaBatchRejected(OmetriaError):
    """400: Ometria refused a whole batch (malformed, too large)."""


class OmetriaSystemicRejection(OmetriaError):
    """Ometria refuses most records, or whole requests beyond the isolation budget: a mapping bug or
    a changed rule, not bad members. Not retried: someone has to look."""


class PushStopped(OmetriaError):
    """Another thread met a refusal that stops the account's pushes; this one sent nothing more."""


class OmetriaUnavailable(OmetriaError):
    """Retries exhausted on 429s, 5xx, timeouts or dropped connections."""

    retryable = True
