"""Credentials in repository URLs: refused at the API (`repository_credential`), masked in any
text that is output (`redact`). One module, so the refusal and the mask agree.

A repository URL ends up in six kinds of event and in the runner's clone log, so it must never
carry a secret. The policy, in every spelling (also percent-encoded, also upper case):
- `http(s)://`, `git://`, `ftp(s)://` and any other scheme but ssh: no userinfo at all
  (`https://token@host` is a token; `git://` has no authentication, so a user there is a smell).
- `ssh://`, `git+ssh://` and scp-style `host:path`: a user name is how SSH is spoken
  (`git@github.com:o/r.git`), so a *name* is accepted — at most 32 characters of
  `[A-Za-z0-9_.-]`, starting with a letter or `_` — but never a password (`user:pw@`) and
  never a known token prefix (`ghp_…@`). Keys, not URLs, authenticate SSH.
- no query string and no fragment: git needs neither, and both are where tokens hide
  (`?access_token=`, `?private_token=`, `#token=`).
- no well-known token (GitHub, GitLab, Slack, bearer JWTs) anywhere in the URL.
- no whitespace or control character (`%20` is fine): such a string is not a URL.
Clones authenticate through host-side credential helpers instead (ARCHITECTURE §8).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

REDACTED = "***"

_SSH_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git"})
_SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# Tokens recognisable by their form, wherever they appear.
_TOKEN = re.compile(
    r"(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}|glpat-[A-Za-z0-9_-]{16,}"
    r"|gl(?:dt|rt|cbt|ptt|ft|imt|agent|soat)-[A-Za-z0-9_-]{16,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# `[user@]host:path` without a scheme (git's scp-like syntax); `C:\\...` paths have no host dot
# or user, and a path before the first colon (`./a:b`) makes it a local path, as git decides.
_SCP = re.compile(r"^(?:(?P<userinfo>[^@/]*)@)?(?P<host>[^:/@]+):(?!//)")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")

REFUSAL = "repository URLs must not carry credentials (they would be stored in the log)"


def _decoded_forms(url: str) -> list[str]:
    """`url` and its percent-decodings (nested encodings too), so `%40`, `%3A` hide nothing."""
    forms = [url]
    while len(forms) < 4 and (decoded := unquote(forms[-1])) != forms[-1]:
        forms.append(decoded)
    return forms


def _ssh_user_ok(userinfo: str) -> bool:
    return bool(_SSH_USER.fullmatch(userinfo)) and not _TOKEN.search(userinfo)


def _form_credential(url: str) -> str | None:
    if _TOKEN.search(url):
        return REFUSAL
    if _SCHEME.match(url):
        try:
            parts = urlsplit(url)
        except ValueError:
            return "the repository URL cannot be parsed"
        if parts.query or parts.fragment or "?" in url or "#" in url:
            return "a repository URL may not have a query string or fragment (tokens hide there)"
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and not (parts.scheme.lower() in _SSH_SCHEMES and _ssh_user_ok(userinfo)):
            return REFUSAL
        return None
    scp = _SCP.match(url)
    if scp is not None and scp["userinfo"] is not None and not _ssh_user_ok(scp["userinfo"]):
        return REFUSAL
    if scp is not None and ("?" in url or "#" in url):
        return "a repository URL may not have a query string or fragment (tokens hide there)"
    return None


def repository_credential(url: str) -> str | None:
    """Why `url` may not be accepted as a repository (it carries or may hide a credential), or
    None when it is clean. See the module docstring for the policy."""
    if _CONTROL_OR_SPACE.search(url):
        return "a repository URL may not contain whitespace or control characters"
    for form in _decoded_forms(url):
        problem = _form_credential(form)
        if problem is not None:
            return problem
    return None


# In free text: a URL's userinfo, the values of its query and fragment, `key=value` pairs whose
# key names a secret, and the tokens above.
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"^([^:/]+://)[^/@]*@")
_PARAM_VALUE = re.compile(r"([?&#;][^=&#\s]*=)[^&#\s]*")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b((?:access|private|oauth|auth|refresh|id)?_?token|password|passwd|secret|api_?key)"
    r"(\s*[=:]\s*)(?!\*\*\*)[^\s&'\"]+"
)
_SCP_PASSWORD = re.compile(r"(?<![\w/:.-])([\w.-]+):[^\s@/:]+@([\w.-]+):")


def _redact_url(match: re.Match[str]) -> str:
    url = _USERINFO.sub(r"\1", match[0])
    return _PARAM_VALUE.sub(rf"\1{REDACTED}", url)


def redact(text: str) -> str:
    """`text` with every credential this module knows of removed or masked: for output (logs,
    events, error details) of anything that slipped past `repository_credential`."""
    text = _URL_IN_TEXT.sub(_redact_url, text)
    text = _SCP_PASSWORD.sub(rf"\1:{REDACTED}@\2:", text)
    text = _SECRET_ASSIGNMENT.sub(rf"\1\2{REDACTED}", text)
    return _TOKEN.sub(REDACTED, text)
