"""The one partitions definition: a partition per client list, keyed `<client_id>:<list_id>`."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

MAILCHIMP_LISTS = "mailchimp_lists"
mailchimp_lists = DynamicPartitionsDefinition(name=MAILCHIMP_LISTS)
