"""Where a repository named with a git provider is cloned from, and as which git user its token
is offered: one pure place, used by the gateway (to refuse a bad name early) and the runner.

A repository given as a path (`owner/name`, or `org/project/name` on Azure DevOps) with a
`git_provider` resolves as OpenHands' ProviderHandler does: `https://<host>/<path>.git`, and
`https://<host>/<org>/<project>/_git/<name>` on Azure DevOps. The host is the provider's
public one unless the user's token names its own (GitHub Enterprise, a self-hosted GitLab; the
`generic` provider has no default). A token host is `name[:port]` (https) or, for a server
the operator reaches over plain HTTP (a test server on 127.0.0.1), `http://name[:port]`.
A repository given as a full URL is cloned as given; the token is then offered to its host.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from taskbus.contracts.specs import GitProvider

DEFAULT_HOSTS: dict[GitProvider, str | None] = {
    GitProvider.GITHUB: "github.com",
    GitProvider.GITLAB: "gitlab.com",
    GitProvider.BITBUCKET: "bitbucket.org",
    GitProvider.AZURE_DEVOPS: "dev.azure.com",
    GitProvider.GENERIC: None,
}

# The user name each provider expects beside a token over HTTPS (Azure DevOps takes any).
USERNAMES: dict[GitProvider, str] = {
    GitProvider.GITHUB: "x-access-token",
    GitProvider.GITLAB: "oauth2",
    GitProvider.BITBUCKET: "x-token-auth",
    GitProvider.AZURE_DEVOPS: "taskbus",
    # Gitea, Forgejo, GitLab and most other hosts take a token with any user name.
    GitProvider.GENERIC: "oauth2",
}

_HOST_PATTERN = r"^(https?://)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?$"
# A token host: a DNS name or IPv4 address, an optional port, optionally `http(s)://` before.
TokenHost = Annotated[str, msgspec.Meta(max_length=270, pattern=_HOST_PATTERN)]
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


class GitProviderError(ValueError):
    """A repository that cannot be resolved for its provider; the message says why."""


class CloneSource(msgspec.Struct, frozen=True, kw_only=True):
    """What to clone, and where a token may be offered: git asks a credential helper with the
    protocol and host (`name[:port]`) of each request, and only these get the token."""

    url: str
    protocol: str
    host: str


def is_repository_path(repository: str) -> bool:
    """Whether `repository` names a repository of a provider (`owner/name`, `a/b/c`) rather
    than a URL or a local path."""
    if "://" in repository or repository.startswith(("/", ".", "~")):
        return False
    parts = repository.removesuffix(".git").split("/")
    return len(parts) >= 2 and all(_SEGMENT.fullmatch(part) and part != ".." for part in parts)


def split_host(host: str) -> tuple[str, str]:
    """(protocol, `name[:port]`) of a token host."""
    if host.startswith("http://"):
        return "http", host.removeprefix("http://")
    return "https", host.removeprefix("https://")


def resolve(repository: str, provider: GitProvider, token_host: str | None = None) -> CloneSource:
    """The clone source of `repository` for `provider`; `token_host` overrides the provider's
    host. Raises GitProviderError for a name the provider cannot have."""
    if not is_repository_path(repository):
        return _as_url(repository)
    _check_path(repository, provider)
    host = token_host or DEFAULT_HOSTS[provider]
    if host is None:
        raise GitProviderError(
            f"the {provider.value} provider has no default host: give the repository as an "
            "http(s) URL, or store the token with its host"
        )
    protocol, netloc = split_host(host)
    path = repository.removesuffix(".git")
    if provider is GitProvider.AZURE_DEVOPS:
        organization, project, name = path.split("/")
        url = f"{protocol}://{netloc}/{organization}/{project}/_git/{name}"
    else:  # GitLab (and generic hosts) nest groups: group/subgroup/name
        url = f"{protocol}://{netloc}/{path}.git"
    return CloneSource(url=url, protocol=protocol, host=netloc)


def repository_problem(repository: str, provider: GitProvider) -> str | None:
    """Why `repository` can never resolve for `provider`, whatever host a token names, or None
    (the gateway's early check; the runner resolves with the user's token)."""
    try:
        if is_repository_path(repository):
            _check_path(repository, provider)
        else:
            _as_url(repository)
    except GitProviderError as error:
        return str(error)
    return None


def _check_path(repository: str, provider: GitProvider) -> None:
    path = repository.removesuffix(".git")
    parts = path.split("/")
    if provider is GitProvider.AZURE_DEVOPS and len(parts) != 3:
        raise GitProviderError(
            f"an Azure DevOps repository is organization/project/repository, not {path!r}"
        )
    if provider in (GitProvider.GITHUB, GitProvider.BITBUCKET) and len(parts) != 2:
        raise GitProviderError(f"a {provider.value} repository is owner/name, not {path!r}")


def _as_url(repository: str) -> CloneSource:
    try:
        parts = urlsplit(repository)
    except ValueError as error:
        raise GitProviderError(f"{repository[:80]!r} is not a valid URL") from error
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise GitProviderError(
            "a repository cloned with a provider token is owner/name or an http(s) URL"
        )
    return CloneSource(url=repository, protocol=parts.scheme, host=parts.netloc)
