"""What one step hands the next: small descriptors of files on disk, stored as JSON by the IO manager."""

from __future__ import annotations

import hashlib
from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """`since_last_changed` (exclusive; None for a full sync) and `before_last_changed` (inclusive).

    Archived members are swept with their own bounds: Mailchimp lists them only when asked for
    by status, in a sweep of its own that runs at the same time.
    """

    since: datetime | None
    before: datetime
    full_refresh: bool
    archived_since: datetime | None = None
    archived_before: datetime | None = None  # None: not swept this time

    def describe(self) -> str:
        start = self.since.isoformat() if self.since else "the beginning"
        return f"({start}, {self.before.isoformat()}]"


class Destination(_Model):
    """Where a list's contacts go. A watermark holds only for the destination it was recorded for:
    a new collection, account, key or URL has none of the list yet, so it starts with a full sync."""

    base_url: str
    account: str
    collection: str
    key: str  # a fingerprint of the Ometria key (resources/limits.py), never the key

    @property
    def id(self) -> str:
        """A short stable name: the folder of its known contacts, the match of its watermark."""
        raw = "\n".join((self.base_url, self.account, self.collection, self.key))
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


class RunFiles(_Model):
    partition: str
    client_id: str
    list_id: str
    run_id: str
    folder: str
    window: Window
    destination: Destination | None = None  # None only in descriptors written before destinations
    push_all: bool = False  # SyncConfig.push_all: push every record, unchanged ones too
    list_name: str = ""  # Mailchimp's name of the list, shown beside the partition key in the UI


class PageSet(_Model):
    run: RunFiles
    total_items: int  # as Mailchimp reported it for the window, at the first page
    total_last: int  # the smallest total any page reported: members leave a window, never enter
    pages: int
    members: int
    archived: int = 0
    passes: int = 1


class StagedMembers(_Model):
    run: RunFiles
    total_items: int
    path: str
    rows: int
    duplicates: int
    dead_letters: int


class ContactsFile(_Model):
    run: RunFiles
    total_items: int
    staged_rows: int
    path: str
    collection: str
    records: int
    dead_letters: int
    # On a full refresh: the keys of every member listed (storage.save_keys), which the import judges
    # deletions by. None otherwise, and in descriptors written before it (their import skips the judging).
    listed: str | None = None


class ImportResult(_Model):
    run: RunFiles
    collection: str
    records: int
    unchanged_skipped: int = 0
    pushed: int
    accepted: int
    rejected: int
    dead_letters: int
    watermark: datetime


MODELS: dict[str, type[_Model]] = {m.__name__: m for m in (PageSet, StagedMembers, ContactsFile, ImportResult)}
