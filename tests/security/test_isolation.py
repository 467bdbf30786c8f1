"""The sandbox isolation suite: what hostile code inside a sandbox tries, run for real on every
isolating backend (local under bubblewrap, docker with runc, docker with gVisor's runsc),
through the runner's own sandbox classes and persistent shell.

Each attack is paired with a control that shows the probe itself works (the same command on an
allowed target succeeds, or the target really is there on the host), so a refusal means the
isolation held, not that the probe was broken. The host targets are made as readable as they
could be (world-readable files, a fake service running as the sandbox's own uid), so only the
isolation stands between them and the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.backend import sandbox_user
from taskbus.runtime_runner.bubblewrap import probe
from taskbus.runtime_runner.docker_sandbox import DockerEngine, DockerSandbox, DockerSandboxConfig
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.local import LocalConfinement, LocalSandbox
from taskbus.runtime_runner.sandbox import CommandOutcome, CommandRequest, Sandbox
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.runtime_runner.shell import ShellLimits

IMAGE = "taskbus-sandbox:latest"
BUILD_SCRIPT = Path(__file__).parents[2] / "deploy" / "sandbox-image" / "build.sh"
RUN_LABEL = "taskbus.isolation_test"
RUN = uuid.uuid4().hex[:12]
SECRET = "tb_secret_" + uuid.uuid4().hex
LIMITS = ShellLimits(
    no_change_seconds=3.0,
    command_seconds=30.0,
    max_output_bytes=16 * 1024,
    max_streamed_bytes=64 * 1024,
)
# gVisor's own threads (its kernel, the ptrace stubs) count against the container's pids limit.
RESOURCES = SandboxResources(cpus=1, memory_mb=256, pids=256, network=NetworkMode.NONE)
# The user a root runner's sandboxes drop to (None: the runner's own), and who that is.
SANDBOX_USER = sandbox_user(RuntimeRunnerSettings())
USER = SANDBOX_USER or (os.getuid(), os.getgid())

BACKENDS = [
    "bwrap",
    pytest.param("runc", marks=pytest.mark.docker),
    pytest.param("runsc", marks=pytest.mark.docker),
]

MakeSandbox = Callable[..., Awaitable[Sandbox]]


def confinement(resources: SandboxResources) -> LocalConfinement:
    """The runner's own local confinement: bubblewrap, as the sandbox user when root."""
    return LocalConfinement(
        bubblewrap=True, user=SANDBOX_USER, resources=resources, max_file_bytes=64 * 1024 * 1024
    )


@pytest.fixture(scope="module")
def host_dir() -> Iterator[Path]:
    """A data dir as exposed as it could be: world-traversable, its files world-readable."""
    root = Path(tempfile.mkdtemp(prefix="taskbus-isolation-"))
    root.chmod(0o755)
    data = root / ".taskbus"
    data.mkdir(mode=0o755)
    (data / "api_keys").write_text(SECRET + "\n")
    (data / "api_keys").chmod(0o644)
    (data / "workspaces").mkdir(mode=0o755)
    shared = root / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # anyone on the host may write here; a sandbox may not
    yield data
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_service() -> Iterator[int]:
    """A host process with a secret in its environment, running as the sandbox's own uid."""
    uid, gid = USER

    def become_sandbox_user() -> None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    process = subprocess.Popen(
        ["sleep", "600"],
        env={"PATH": "/usr/bin:/bin", "TASKBUS_LLM_API_KEY": SECRET},
        preexec_fn=become_sandbox_user if os.geteuid() == 0 else None,
    )
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A host TCP service on every interface (as NATS would be), counting its connections."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[DockerEngine]:
    try:
        client = docker.APIClient()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine answers: {error}")
    subprocess.run([str(BUILD_SCRIPT), IMAGE], check=True, timeout=600)
    engine = DockerEngine(docker.APIClient(max_pool_size=32), cpus=client.info()["NCPU"])
    yield engine
    for container in client.containers(all=True, filters={"label": f"{RUN_LABEL}={RUN}"}):
        client.remove_container(container["Id"], force=True)
    engine.close()
    client.close()


@pytest.fixture(params=BACKENDS)
async def make_sandbox(
    request: pytest.FixtureRequest, host_dir: Path
) -> AsyncIterator[MakeSandbox]:
    backend: str = request.param
    if backend == "bwrap":
        problem = probe(SANDBOX_USER)
        assert problem is None, f"bubblewrap must work here (.ci/run installs it): {problem}"
        config = None
    else:
        engine = request.getfixturevalue("docker_engine")
        config = DockerSandboxConfig(
            engine, IMAGE, "isolation", {RUN_LABEL: RUN}, user=SANDBOX_USER, runtime=backend
        )
    started: list[Sandbox] = []

    async def make(resources: SandboxResources = RESOURCES) -> Sandbox:
        conversation_id = uuid.uuid4().hex
        sandbox: Sandbox
        if config is None:
            sandbox = LocalSandbox(
                conversation_id, host_dir / "workspaces", LIMITS, confinement(resources), 60
            )
        else:
            sandbox = DockerSandbox(
                config, conversation_id, "u1", host_dir / "workspaces", resources, LIMITS, 60
            )
        started.append(sandbox)
        await sandbox.start(None, None)
        return sandbox

    yield make
    await asyncio.gather(*(sandbox.close() for sandbox in started))


async def run(sandbox: Sandbox, command: str, blocking: bool = True) -> CommandOutcome:
    async def ignore(_: str) -> None:
        return None

    return await sandbox.run_command(CommandRequest(command=command, blocking=blocking), ignore)


def host_path(sandbox: Sandbox) -> Path:
    assert isinstance(sandbox, (LocalSandbox, DockerSandbox))
    return sandbox.files.host_root


async def test_another_conversations_workspace_is_out_of_reach(make_sandbox: MakeSandbox) -> None:
    mine, theirs = await make_sandbox(), await make_sandbox()
    await theirs.write_bytes("secret.txt", SECRET.encode())
    await mine.write_bytes("mine.txt", b"readable")
    assert (await run(mine, "cat mine.txt")).content.strip() == "readable"  # control
    their_file = host_path(theirs) / "secret.txt"
    assert await asyncio.to_thread(their_file.read_text) == SECRET  # there, on the host
    outcome = await run(mine, f"cat {their_file} 2>/dev/null; ls -1a {their_file.parents[1]}")
    assert SECRET not in outcome.content
    assert host_path(theirs).name not in outcome.content  # not even listed


async def test_the_data_dir_and_host_shadow_are_unreadable(
    make_sandbox: MakeSandbox, host_dir: Path
) -> None:
    sandbox = await make_sandbox()
    api_keys = host_dir / "api_keys"
    uid, gid = USER
    as_sandbox_user = await asyncio.to_thread(  # control: the host's permissions let it in
        subprocess.run,
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "cat", str(api_keys)],
        capture_output=True,
        text=True,
    )
    assert SECRET in as_sandbox_user.stdout
    outcome = await run(sandbox, f"cat {api_keys}")
    assert outcome.exit_code != 0 and SECRET not in outcome.content
    assert "api_keys" not in (await run(sandbox, f"ls -a {host_dir}")).content
    assert (await run(sandbox, "grep -c : /etc/passwd")).exit_code == 0  # control
    shadow = await run(sandbox, "cat /etc/shadow")
    assert shadow.exit_code != 0
    host_root_entry = (await asyncio.to_thread(Path("/etc/shadow").read_text)).splitlines()[0]
    assert host_root_entry not in shadow.content


async def test_a_host_services_environ_is_unreadable(
    make_sandbox: MakeSandbox, fake_service: int
) -> None:
    sandbox = await make_sandbox()
    # Control: the sandbox can read an environ (its own), and the service's holds the secret.
    own = await run(sandbox, "cat /proc/self/environ | tr '\\0' '\\n'")
    assert "HOME=" in own.content
    environ = await asyncio.to_thread(Path(f"/proc/{fake_service}/environ").read_bytes)
    assert SECRET.encode() in environ
    outcome = await run(
        sandbox, f"cat /proc/{fake_service}/environ; grep -a {SECRET} /proc/[0-9]*/environ"
    )
    assert SECRET not in outcome.content
    host_pids = (await run(sandbox, "ls /proc | grep -c '^[0-9]'")).content.strip()
    assert int(host_pids.splitlines()[-1]) < 20  # its own pid namespace, not the host's


async def test_nothing_outside_the_workspace_is_writable(
    make_sandbox: MakeSandbox, host_dir: Path
) -> None:
    sandbox = await make_sandbox()
    shared = host_dir.parent / "shared-tmp"
    targets = [shared / "pwned", host_dir / "pwned", Path("/usr/pwned"), Path("/etc/pwned")]
    outcome = await run(sandbox, "; ".join(f"touch {target}" for target in targets))
    assert outcome.exit_code != 0
    for target in targets:
        assert not target.exists(), target
    assert (await run(sandbox, "echo inside > inside.txt")).exit_code == 0  # control
    assert (host_path(sandbox) / "inside.txt").read_text() == "inside\n"


async def test_the_sandbox_is_never_root_on_the_host(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox()
    outcome = await run(sandbox, "id -u; touch made-here")
    assert outcome.exit_code == 0  # control: the probe ran
    assert outcome.content.strip().splitlines()[-1] != "0"
    owner = (host_path(sandbox) / "made-here").stat().st_uid
    assert owner != 0 and owner == USER[0]


def _host_addresses() -> list[str]:
    """Every IPv4 address of this host, loopback and the docker bridge included."""
    output = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
    return ["127.0.0.1", *output.split()]


async def test_no_host_service_is_reachable_without_network(
    make_sandbox: MakeSandbox, listener: int
) -> None:
    with socket.create_connection(("127.0.0.1", listener), timeout=2):
        pass  # control: the service answers on the host
    sandbox = await make_sandbox()
    probes = " ; ".join(
        f"timeout 3 bash -c 'echo > /dev/tcp/{address}/{listener}' && echo reached-{address}"
        for address in _host_addresses()
    )
    outcome = await run(sandbox, probes)
    assert "reached-" not in outcome.content, outcome.content


@pytest.mark.parametrize("network_probe", ["bwrap"])
async def test_the_network_probe_reaches_the_service_when_the_policy_allows_it(
    network_probe: str, host_dir: Path, listener: int
) -> None:
    """Control of the test above: the same probe, on a sandbox with network, gets through."""
    with_network = SandboxResources(cpus=1, memory_mb=256, pids=64, network=NetworkMode.BRIDGE)
    sandbox = LocalSandbox(
        uuid.uuid4().hex, host_dir / "workspaces", LIMITS, confinement(with_network), 60
    )
    await sandbox.start(None, None)
    try:
        outcome = await run(sandbox, f"echo > /dev/tcp/127.0.0.1/{listener} && echo reached")
        assert "reached" in outcome.content
    finally:
        await sandbox.close()


async def _answers_promptly(neighbour: Sandbox) -> None:
    started = time.monotonic()
    outcome = await run(neighbour, "echo alive")
    assert outcome.content.strip().endswith("alive")
    assert time.monotonic() - started < 10


async def test_a_fork_bomb_is_contained_and_the_neighbour_keeps_working(
    make_sandbox: MakeSandbox,
) -> None:
    bomb, neighbour = await make_sandbox(), await make_sandbox()
    # Not blocking: the soft timeout hands the bomb back while it keeps running.
    outcome = await run(bomb, "b() { b | b & }; b; sleep 2; echo bombed", blocking=False)
    for _ in range(3):
        await _answers_promptly(neighbour)
        await asyncio.sleep(1)
    with contextlib.suppress(Exception):
        await bomb.close()
    await _answers_promptly(neighbour)
    assert "Resource temporarily unavailable" in outcome.content or outcome.exit_code != 0


async def test_a_memory_bomb_is_contained_and_the_neighbour_keeps_working(
    make_sandbox: MakeSandbox,
) -> None:
    bomb, neighbour = await make_sandbox(), await make_sandbox()
    allocate = "python3 -c 'a = [bytearray({size}) for _ in range({count})]; print(\"held\")'"
    small = await run(bomb, allocate.format(size=10**6, count=50))  # control: 50 MB is fine
    assert small.content.strip().endswith("held")
    task = asyncio.create_task(run(bomb, allocate.format(size=10**7, count=1000)))  # 10 GB
    await _answers_promptly(neighbour)
    outcome = await task
    assert "held" not in outcome.content and outcome.exit_code != 0
    # (Under gVisor the memory is its kernel's, so the OOM killer takes the whole bomb sandbox.)
    await _answers_promptly(neighbour)
