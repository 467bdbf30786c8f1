"""Repositories named with a git provider resolve as OpenHands resolves them; the stored secrets
change only as their commands say, and stay within what one NATS message carries."""

from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts.commands import (
    DeleteSecret,
    SecretsTooMany,
    StoreProviderTokens,
    StoreSecret,
    UnsetProviderTokens,
    decode_command,
    encode_command,
)
from taskbus.contracts.git_providers import (
    CloneSource,
    GitProviderError,
    is_repository_path,
    repository_problem,
    resolve,
)
from taskbus.contracts.secret_box import SecretBox, generate_key
from taskbus.contracts.specs import NATS_DEFAULT_MAX_PAYLOAD, ConversationSpec, GitProvider
from taskbus.contracts.user_secrets import (
    MAX_CUSTOM_SECRETS,
    MAX_DESCRIPTION_CHARS,
    MAX_SECRET_VALUE_BYTES,
    CustomSecret,
    ProviderToken,
    ProviderTokenUpdate,
    UserSecrets,
    custom_secret_context,
    encode_user_secrets,
    name_problem,
)

G = GitProvider


@pytest.mark.parametrize(
    ("repository", "provider", "host", "url"),
    [
        ("octo/hello", G.GITHUB, None, "https://github.com/octo/hello.git"),
        ("octo/hello.git", G.GITHUB, None, "https://github.com/octo/hello.git"),
        ("octo/hello", G.GITHUB, "ghe.example.com", "https://ghe.example.com/octo/hello.git"),
        ("group/sub/proj", G.GITLAB, None, "https://gitlab.com/group/sub/proj.git"),
        ("team/repo", G.BITBUCKET, None, "https://bitbucket.org/team/repo.git"),
        ("org/project/repo", G.AZURE_DEVOPS, None, "https://dev.azure.com/org/project/_git/repo"),
        ("a/b", G.GENERIC, "git.example.com:8443", "https://git.example.com:8443/a/b.git"),
        ("a/b", G.GITHUB, "http://127.0.0.1:8080", "http://127.0.0.1:8080/a/b.git"),
        # A URL is cloned as given; the token is offered to its host.
        ("https://h.example/x/y.git", G.GITHUB, None, "https://h.example/x/y.git"),
    ],
)
def test_a_repository_resolves_to_its_providers_url(
    repository: str, provider: GitProvider, host: str | None, url: str
) -> None:
    source = resolve(repository, provider, host)
    assert source.url == url
    assert url.startswith(f"{source.protocol}://{source.host}/")


def test_the_credential_goes_to_the_resolved_host_and_protocol_only() -> None:
    assert resolve("o/r", G.GITHUB, "http://127.0.0.1:9") == CloneSource(
        url="http://127.0.0.1:9/o/r.git", protocol="http", host="127.0.0.1:9"
    )
    assert resolve("https://ghe:8443/o/r", G.GITHUB).host == "ghe:8443"


@pytest.mark.parametrize(
    ("repository", "provider"),
    [
        ("octo/hello/extra", G.GITHUB),  # GitHub and Bitbucket are owner/name
        ("team/a/b", G.BITBUCKET),
        ("org/repo", G.AZURE_DEVOPS),  # Azure DevOps is org/project/repo
        ("file:///etc", G.GITHUB),  # a token is offered over http(s) only
        ("ssh://git@github.com/o/r", G.GITHUB),
    ],
)
def test_a_repository_its_provider_cannot_have_is_refused(
    repository: str, provider: GitProvider
) -> None:
    with pytest.raises(GitProviderError):
        resolve(repository, provider, "host.example")
    assert repository_problem(repository, provider) is not None


def test_generic_needs_a_host_for_a_path_but_the_early_check_cannot_know_it() -> None:
    with pytest.raises(GitProviderError, match="no default host"):
        resolve("a/b", G.GENERIC)
    assert repository_problem("a/b", G.GENERIC) is None  # the token may name one


@pytest.mark.parametrize("repository", ["/srv/repo", "./repo", "../x/y", "a/../b", "repo"])
def test_paths_and_single_names_are_not_provider_repositories(repository: str) -> None:
    assert not is_repository_path(repository)


def test_the_provider_is_validated_by_the_request() -> None:
    spec = msgspec.json.decode(b'{"git_provider": "gitlab"}', type=ConversationSpec)
    assert spec.git_provider is G.GITLAB
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"git_provider": "sourceforge"}', type=ConversationSpec)


def _secret(value: str = "sealed:v1:x", **fields: object) -> CustomSecret:
    return CustomSecret(value=value, **fields)  # type: ignore[arg-type]


def test_secrets_commands_apply_as_they_say() -> None:
    stored = UserSecrets(custom_secrets={"A": _secret("sealed:v1:a")})
    created = StoreSecret(user_id="u", secret_name="B", secret=_secret("sealed:v1:b"))
    after = created.applied_to(stored)
    assert set(after.custom_secrets) == {"A", "B"}
    assert created.applied_to(after) == after  # stored: applying again changes nothing
    renamed = StoreSecret(user_id="u", secret_name="C", secret=_secret("sealed:v1:c"), replaces="A")
    assert set(renamed.applied_to(after).custom_secrets) == {"B", "C"}
    assert DeleteSecret(user_id="u", secret_name="B").applied_to(after).custom_secrets.keys() == {
        "A"
    }
    full = UserSecrets(custom_secrets={f"S{n}": _secret() for n in range(MAX_CUSTOM_SECRETS)})
    with pytest.raises(SecretsTooMany):
        created.applied_to(full)


def test_provider_tokens_merge_as_openhands_stores_them() -> None:
    stored = UserSecrets(
        provider_tokens={
            G.GITHUB: ProviderToken(token="sealed:v1:gh"),
            G.GITLAB: ProviderToken(token="sealed:v1:gl"),
        }
    )
    update = StoreProviderTokens(
        user_id="u",
        provider_tokens={
            G.GITHUB: ProviderTokenUpdate(host="ghe.example.com"),  # keeps its token
            G.BITBUCKET: ProviderTokenUpdate(token="sealed:v1:bb"),
            G.AZURE_DEVOPS: ProviderTokenUpdate(),  # nothing to keep: nothing stored
        },
    )
    tokens = update.applied_to(stored).provider_tokens
    assert tokens == {
        G.GITHUB: ProviderToken(token="sealed:v1:gh", host="ghe.example.com"),
        G.GITLAB: ProviderToken(token="sealed:v1:gl"),
        G.BITBUCKET: ProviderToken(token="sealed:v1:bb"),
    }
    assert UnsetProviderTokens(user_id="u").applied_to(stored).provider_tokens == {}


def test_reserved_names_are_refused() -> None:
    for name in ("PATH", "HOME", "PROMPT_COMMAND", "TASKBUS_SANDBOX", "BASH_ENV"):
        assert name_problem(name) is not None, name
    assert name_problem("GITHUB_TOKEN") is None


def test_a_full_entry_and_its_largest_command_fit_one_nats_message() -> None:
    box = SecretBox(generate_key())
    worst = "\U0001f511" * (MAX_SECRET_VALUE_BYTES // 4)  # 4 bytes each in UTF-8
    description = "\x01" * MAX_DESCRIPTION_CHARS  # 6 bytes each in JSON
    secrets = {
        f"NAME_{n:03d}_{'X' * 100}": _secret(
            box.seal(worst, custom_secret_context("u" * 64, f"N{n}")), description=description
        )
        for n in range(MAX_CUSTOM_SECRETS)
    }
    tokens = {p: ProviderToken(token=box.seal("t" * 4096, "c"), host="h" * 250) for p in G}
    entry = UserSecrets(provider_tokens=tokens, custom_secrets=secrets)
    encoded = encode_user_secrets(entry)
    assert len(encoded) < NATS_DEFAULT_MAX_PAYLOAD * 0.9, len(encoded)
    assert msgspec.json.decode(encoded, type=UserSecrets) == entry  # within every field limit
    command = StoreProviderTokens(
        user_id="u",
        provider_tokens={
            p: ProviderTokenUpdate(token=t.token, host=t.host) for p, t in tokens.items()
        },
    )
    assert decode_command(encode_command(command)) == command
