"""Where a user's LLM settings may send requests (the operator's own LLM is trusted and exempt).

A user's base URL must fall under an entry of the operator's allow-list
(`TASKBUS_LLM_ALLOWED_BASE_URLS`, comma-separated; default: the providers' public endpoints in
`PROVIDER_ENDPOINTS`): same scheme, host and port, and a path at or below the entry's. A host
name must resolve only to public addresses: loopback, private, link-local, CGNAT, unspecified,
multicast and reserved ones (and IPv6 forms that embed them) are refused, so the cloud metadata
address or a service on the host is never reached through a name.

To let users reach a private endpoint, the operator lists it by IP address, e.g.
`http://10.0.0.5:8000/v1`: an entry whose host is an IP literal allows exactly that address.

The gateway checks at PUT /api/settings; session-manager checks again before every call, after
resolving the name anew, since DNS can change between the two.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Providers a user's model may name without a base URL, and the public endpoint it then uses.
PROVIDER_ENDPOINTS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "mistral": "https://api.mistral.ai/v1",
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com",
    "openrouter": "https://openrouter.ai/api/v1",
    "together_ai": "https://api.together.xyz/v1",
}
# litellm providers whose credential is the api_key we pass: others (bedrock, vertex_ai, ...)
# sign with the service's own cloud credentials, which a user's model must never borrow.
# hosted_vllm is any OpenAI-compatible server, so it needs a base URL.
USER_PROVIDERS = frozenset(PROVIDER_ENDPOINTS) | {"hosted_vllm"}
DEFAULT_ALLOWED_BASE_URLS = ",".join(PROVIDER_ENDPOINTS.values())
_DEFAULT_PORTS = {"http": 80, "https": 443}
_RESOLVE_SECONDS = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointRefused(ValueError):
    """A base URL a user's settings may not use; the message says why and holds no secret."""


class EndpointUnresolved(EndpointRefused):
    """The host has no address right now (no such name, or no DNS)."""


@dataclass(frozen=True)
class _Location:
    scheme: str
    host: str
    port: int
    path: str

    def under(self, entry: _Location) -> bool:
        return (self.scheme, self.host, self.port) == (entry.scheme, entry.host, entry.port) and (
            self.path == entry.path or self.path.startswith(entry.path + "/")
        )


def _location(url: str) -> _Location:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise EndpointRefused(f"{url!r} is not a valid URL") from error
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise EndpointRefused("the base URL must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise EndpointRefused("the base URL must not carry credentials")
    if parts.query or parts.fragment:
        raise EndpointRefused("the base URL must not have a query or fragment")
    path = parts.path.rstrip("/")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise EndpointRefused("the base URL's path must not contain . or .. segments")
    return _Location(
        scheme=parts.scheme,
        host=parts.hostname.lower(),
        port=port or _DEFAULT_PORTS[parts.scheme],
        path=path,
    )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is a public unicast one, also when IPv6 embeds an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if any(v4 is not None and not is_public(v4) for v4 in embedded):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


class AllowList:
    """The operator's base URL allow-list."""

    def __init__(self, entries: str) -> None:
        """`entries`: comma-separated base URLs (TASKBUS_LLM_ALLOWED_BASE_URLS)."""
        self.entries = tuple(_location(e) for e in entries.split(",") if e.strip())

    def admit(self, url: str) -> _Location:
        """The URL's location if an entry covers it, else EndpointRefused."""
        location = _location(url)
        if not any(location.under(entry) for entry in self.entries):
            raise EndpointRefused(
                f"{location.scheme}://{location.host}:{location.port} is not an LLM endpoint "
                "this server allows (TASKBUS_LLM_ALLOWED_BASE_URLS)"
            )
        return location


def user_base_url(model: str, base_url: str | None) -> str:
    """Where a user's model is called: their base URL, else its provider's public endpoint. The
    model must name its provider (`openai/gpt-4o`), one whose credential is the user's key."""
    provider, slash, _ = model.partition("/")
    if not slash or provider not in USER_PROVIDERS:
        raise EndpointRefused(
            f"llm_model must be provider/model with a provider among {sorted(USER_PROVIDERS)}"
        )
    if base_url:
        return base_url
    if provider not in PROVIDER_ENDPOINTS:
        raise EndpointRefused(f"provider {provider!r} needs llm_base_url")
    return PROVIDER_ENDPOINTS[provider]


async def check_destination(url: str, allowed: AllowList) -> None:
    """Raise EndpointRefused unless `url` is allowed and its host resolves, now, only to public
    addresses (an IP literal host is allowed as listed: the operator named that address)."""
    location = allowed.admit(url)
    if _ip_literal(location.host) is None:
        await _public_addresses(location)


async def check_open_destination(url: str, listed: AllowList) -> list[IPAddress]:
    """The addresses to connect to for a URL users choose freely (webhooks): its host must be
    public now, unless it is an IP literal an entry of `listed` (the operator's) covers. The
    caller connects to exactly these, so DNS gets no second say between check and connection."""
    location = _location(url)
    literal = _ip_literal(location.host)
    if literal is not None and any(location.under(entry) for entry in listed.entries):
        return [literal]
    return await _public_addresses(location)


async def _public_addresses(location: _Location) -> list[IPAddress]:
    """The host's addresses, resolved now, if every one is public; else EndpointRefused."""
    literal = _ip_literal(location.host)
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_RESOLVE_SECONDS):
                infos = await loop.getaddrinfo(
                    location.host, location.port, type=socket.SOCK_STREAM
                )
        except UnicodeError as error:  # a label IDNA cannot encode (empty, too long)
            raise EndpointRefused("the URL's host is not a valid host name") from error
        except (OSError, TimeoutError) as error:
            raise EndpointUnresolved(f"{location.host} does not resolve") from error
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not all(is_public(address) for address in addresses):
        raise EndpointRefused(
            f"{location.host} is or resolves to a loopback, private or link-local address"
        )
    return addresses
