"""Secret values opened for a conversation never reach the log from the runner: every string
field of every event is masked, and a value split across output chunks is masked too."""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    CmdOutputChunk,
    CmdOutputObservation,
    ErrorObservation,
    EventSource,
    MCPObservation,
)
from taskbus.contracts.streams import read_batch
from taskbus.runtime_runner.masking import MASK, MaskingAppender, SecretMasks, masked
from taskbus.runtime_runner.sandbox import CommandRequest, secrets_carrier
from taskbus.runtime_runner.workspace import HostWorkspaceSandbox

from .conftest import SandboxMaker
from .test_shell_contract import Chunks

SECRET = "hunter2-Zq9"
OTHER = "s3cr3t-value"


def masks_for(cid: str, *values: str) -> SecretMasks:
    masks = SecretMasks()
    masks.add(cid, values)
    return masks


async def logged(js: JetStreamContext, cid: str) -> list[str]:
    """Every stored event of the conversation, as the bytes the log holds (read by its subject:
    other tests purge their conversations from this shared stream, leaving holes)."""
    messages, left = await read_batch(js, subjects.conversation_events(cid), 1, 1000)
    assert left == 0
    return [data.decode() for _, data in messages]


def test_every_string_field_is_masked_and_enums_and_ids_are_kept() -> None:
    observation = MCPObservation(
        conversation_id=SECRET,  # an id is never rewritten
        source=EventSource.ENVIRONMENT,
        cause=3,
        name="lookup",
        content=f"token={SECRET} and {OTHER}{SECRET}",
        arguments={"query": [SECRET, {"nested": f"x{OTHER}x"}], SECRET: 1},
    )
    result = masked(observation, [OTHER, SECRET])
    assert result.conversation_id == SECRET
    assert result.source is EventSource.ENVIRONMENT
    assert result.content == f"token={MASK} and {MASK}{MASK}"
    assert result.arguments == {"query": [MASK, {"nested": f"x{MASK}x"}], MASK: 1}
    assert masked(observation, ["absent"]) is observation


async def test_the_appender_masks_each_conversation_with_its_own_values(
    js: JetStreamContext,
) -> None:
    mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    masks = masks_for(mine, SECRET)
    appender = MaskingAppender(js, masks)
    await appender.append(
        ErrorObservation(
            conversation_id=mine, source=EventSource.ENVIRONMENT, content=f"bad {SECRET}"
        )
    )
    await appender.append(
        ErrorObservation(
            conversation_id=theirs, source=EventSource.ENVIRONMENT, content=f"bad {SECRET}"
        )
    )
    assert all(SECRET not in data for data in await logged(js, mine))
    assert any(SECRET in data for data in await logged(js, theirs))  # not a value of theirs


async def test_a_value_split_across_chunks_is_masked_and_the_observation_has_it_all(
    js: JetStreamContext,
) -> None:
    cid = uuid.uuid4().hex
    appender = MaskingAppender(js, masks_for(cid, SECRET))

    def chunk(text: str, seq: int) -> CmdOutputChunk:
        return CmdOutputChunk(
            conversation_id=cid, source=EventSource.ENVIRONMENT, cause=7, content=text, seq=seq
        )

    output = f"start {SECRET} middle {SECRET} end"
    cut = output.index(SECRET) + 4  # "hunt" | "er2-Zq9 middle hunter2-Zq9 end"
    second_cut = output.rindex(SECRET) + 1
    pieces = [output[:cut], output[cut:second_cut], output[second_cut:]]
    sent = [await appender.append(chunk(piece, n)) for n, piece in enumerate(pieces)]
    observation = await appender.append(
        CmdOutputObservation(
            conversation_id=cid,
            source=EventSource.ENVIRONMENT,
            cause=7,
            content=output,
            command="cat secret",
        )
    )
    streamed = "".join(event.content for event in sent)
    assert streamed == f"start {MASK} middle {MASK} end"
    assert observation.content == f"start {MASK} middle {MASK} end"
    for data in await logged(js, cid):
        assert SECRET not in data
        for length in range(4, len(SECRET)):  # no piece that gives the value away
            assert SECRET[:length] not in data, length


def test_secrets_reach_the_shell_as_one_inert_variable() -> None:
    carrier = secrets_carrier({"API_TOKEN": "a'b\nc $(id)", "LD_PRELOAD": "/workspace/x.so"})
    assert list(carrier) == ["TASKBUS_SANDBOX_SECRETS"]
    assert "export LD_PRELOAD=/workspace/x.so" in carrier["TASKBUS_SANDBOX_SECRETS"]


class FixedSecrets:
    """What a conversation's secrets give its sandbox (credentials.ConversationSecrets)."""

    async def environment(self) -> dict[str, str]:
        return {"API_TOKEN": "a'b c $(id)", "LD_PRELOAD": "/nonexistent.so"}


async def test_the_shell_exports_the_secrets_and_forgets_the_carrier(
    make_sandbox: SandboxMaker,
) -> None:
    sandbox = await make_sandbox()
    assert isinstance(sandbox, HostWorkspaceSandbox)
    sandbox.secrets = FixedSecrets()  # type: ignore[assignment]
    await sandbox.shell.close()  # the next shell reads the secrets as it starts
    await sandbox.shell.start()
    outcome = await sandbox.run_command(
        CommandRequest(command='printf "%s|" "$API_TOKEN"; tr "\\0" "\\n" < /proc/$$/environ'),
        Chunks(),
    )
    assert outcome.content.startswith("a'b c $(id)|")
    assert "API_TOKEN=a'b c $(id)" in outcome.content  # in the shell's own environment
    assert "TASKBUS_SANDBOX_SECRETS" not in outcome.content
