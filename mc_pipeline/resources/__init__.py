"""Dagster resources: the client registry and the Mailchimp and Ometria HTTP clients."""

from mc_pipeline.resources.mailchimp import MailchimpResource
from mc_pipeline.resources.ometria import OmetriaResource
from mc_pipeline.resources.registry import ClientRegistryResource

__all__ = ["ClientRegistryResource", "MailchimpResource", "OmetriaResource"]
