"""The three partitioned assets: Mailchimp pages -> staged members -> Ometria contacts (pushed)."""

from mc_pipeline.assets.keys import CONTACTS_KEY, MEMBERS_KEY, PAGES_KEY
from mc_pipeline.assets.mailchimp import SyncConfig, member_pages, members
from mc_pipeline.assets.ometria import contacts

ASSETS = [member_pages, members, contacts]

__all__ = ["ASSETS", "CONTACTS_KEY", "MEMBERS_KEY", "PAGES_KEY", "SyncConfig", "contacts", "member_pages", "members"]
