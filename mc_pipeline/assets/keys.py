"""The asset keys and group of the data path, in one place: every module and test names an asset from here."""

from dagster import AssetKey

PAGES_KEY = AssetKey(["mailchimp", "member_pages"])
MEMBERS_KEY = AssetKey(["mailchimp", "members"])
CONTACTS_KEY = AssetKey(["ometria", "contacts"])
GROUP = "mailchimp_to_ometria"
OWNERS = ["team:data-integrations"]  # who answers for a list's sync; shown on every asset and check
