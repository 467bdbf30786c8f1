"""The generated nats-server users parse, and no service user may administer streams (the
event-store may only purge the log, of deleted conversations)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from taskbus.contracts import subjects
from taskbus.contracts.bus import read_credential
from taskbus.devtools import bus_auth
from taskbus.devtools.launcher import write_nats_config
from taskbus.devtools.nats_server import nats_server_binary


def test_the_written_config_is_valid_and_its_files_are_private(tmp_path: Path) -> None:
    credentials = bus_auth.new_credentials(tmp_path)
    write_nats_config(tmp_path / "auth.conf", credentials)
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "auth.conf"), "-t"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    for user in bus_auth.USERS:
        path = bus_auth.credential_file(tmp_path, user)
        assert path.stat().st_mode & 0o077 == 0
        assert read_credential(path) == credentials[user]
    assert len({c.password for c in credentials.values()}) == len(bus_auth.USERS)


def test_no_service_may_append_unless_it_must_nor_administer_streams() -> None:
    for user in bus_auth.SERVICE_USERS:
        block = bus_auth.permissions(user)
        assert block is not None
        allowed = block["publish"]["allow"]
        assert (subjects.ALL_EVENTS in allowed) is (
            user in (bus_auth.SESSION_MANAGER, bus_auth.RUNTIME_RUNNER)
        )
        for verb in ("CREATE", "UPDATE", "DELETE"):
            assert not any(s.startswith(f"$JS.API.STREAM.{verb}") for s in allowed), user
        purges = [s for s in allowed if s.startswith("$JS.API.STREAM.PURGE")]
        # Only the event-store purges, and only the log (a deleted conversation's events).
        assert purges == (
            [f"$JS.API.STREAM.PURGE.{subjects.EVENTS_STREAM}"]
            if user == bus_auth.EVENT_STORE
            else []
        ), user
        assert not any(s.startswith("$JS.API.STREAM.MSG.DELETE") for s in allowed), user
        assert block["subscribe"]["allow"][0] == f"_INBOX_{user}.>"
    settings_writers = [
        user
        for user in bus_auth.SERVICE_USERS
        if f"$KV.{subjects.SETTINGS_BUCKET}.>" in bus_auth.permissions(user)["publish"]["allow"]  # type: ignore[index]
    ]
    assert settings_writers == [bus_auth.SESSION_MANAGER]
    assert bus_auth.permissions(bus_auth.ADMIN) is None
