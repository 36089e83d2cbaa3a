"""Where a key may be sent: the rules for API base URLs and for the address each connection reaches.

The registry applies them to `base_url` when it is loaded; the API session (resources/http.py)
applies `address_refusal` again to every connection's peer, since a DNS name can point anywhere
(a cloud's metadata address, a private network).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)
# Names that reach a cloud's instance metadata (and its credentials) or only a private network.
INTERNAL_NAMES = ("metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal")
INTERNAL_SUFFIXES = (".internal", ".local", ".localdomain", ".home.arpa", ".lan", ".intranet", ".corp")


def address_refusal(address: str, allow_private_network: bool = False, plain_http: bool = False) -> str | None:
    """Why a connection to this IP address is refused, or None: loopback (the sandbox) and public
    addresses are allowed; link-local (cloud metadata), private and other non-public ranges only
    with `allow_private_network`; plain http never to a public address. Checked on the registry's
    URLs and on every connection's peer (a DNS name can point anywhere)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if ip.is_global and not ip.is_multicast:
        return f"{ip} is a public address: plain http would carry the key in clear; use https" if plain_http else None
    if ip.is_unspecified or ip.is_multicast:
        return f"{ip} is not an address a server has"
    if allow_private_network:
        return None
    kind = "a link-local (cloud metadata) address" if ip.is_link_local else "a private or non-public address"
    return f"{ip} is {kind}; set allow_private_network: true on the account if it really serves the API"


def api_url(url: str, allow_private_network: bool = False) -> str:
    """A base URL credentials may be sent to: https (plain http only to loopback, for the sandbox, or
    within a private network that `allow_private_network` vouches for, e.g. a compose sandbox), no
    user:password, query or fragment, no metadata or private host unless allowed. ValueError says why."""
    if not re.fullmatch(r"https?://[\x21-\x7e]+", url):
        raise ValueError("must be an http(s) URL of printable ASCII without spaces")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@): keys come from api_key")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or a fragment")
    host = (parts.hostname or "").lower()
    try:
        parts.port  # noqa: B018 - validates the port
        ip: str | None = str(ipaddress.ip_address(host)) if host else None
    except ValueError:
        ip = None
    if not host:
        raise ValueError("has no host")
    loopback = is_loopback_url(url)
    plain = parts.scheme != "https"
    if plain and not loopback and not allow_private_network:
        raise ValueError(
            "must be https (plain http only to a loopback address, or to a private network the account "
            "allows with allow_private_network: true)"
        )
    if ip is not None:
        reason = address_refusal(ip, allow_private_network, plain)
        if reason:
            raise ValueError(reason)
    elif (
        not allow_private_network
        and not loopback
        and ("." not in host or host in INTERNAL_NAMES or host.endswith(INTERNAL_SUFFIXES))
    ):
        raise ValueError(
            f"host {host} is an internal or metadata name; set allow_private_network: true on the account "
            "if it really serves the API"
        )
    return url.rstrip("/")


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    try:
        return host in LOOPBACK_NAMES or ip_is_loopback(host)
    except ValueError:
        return False


def ip_is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback
