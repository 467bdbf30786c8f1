"""When `taskbus up` may run sandboxes unisolated: only a single-user loopback stack, or by the
operator's explicit opt-in; everything else refuses to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbus.devtools.sandbox_policy import (
    UnsandboxedRefused,
    allow_unsandboxed,
    is_single_user_loopback,
    needs_unsandboxed,
)


@pytest.mark.parametrize(
    ("backend", "docker", "bwrap", "needed"),
    [
        ("auto", True, False, False),  # docker first
        ("auto", False, True, False),  # then local under bwrap
        ("auto", False, False, True),
        ("local", True, False, True),  # local never uses docker
        ("local", False, True, False),
        ("docker", False, False, False),  # never falls back: the runner fails instead
    ],
)
def test_unsandboxed_only_when_nothing_can_isolate(
    backend: str, docker: bool, bwrap: bool, needed: bool
) -> None:
    assert needs_unsandboxed(backend, docker, bwrap) is needed


def test_only_a_single_user_loopback_stack_or_an_opt_in_may_run_unsandboxed(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("tb_one=local\n")
    assert is_single_user_loopback(keys, "127.0.0.1")
    assert not is_single_user_loopback(keys, "0.0.0.0")
    keys.write_text("tb_one=local\ntb_two=mallory\n")
    assert not is_single_user_loopback(keys, "127.0.0.1")

    assert allow_unsandboxed(single_user_loopback=True, operator_opt_in=False)
    assert allow_unsandboxed(single_user_loopback=False, operator_opt_in=True)
    with pytest.raises(UnsandboxedRefused, match="sudo apt-get install bubblewrap"):
        allow_unsandboxed(single_user_loopback=False, operator_opt_in=False)
