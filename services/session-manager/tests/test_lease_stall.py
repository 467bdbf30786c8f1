"""A session-manager whose event loop stalls until its leases lapse (as its first import of
litellm did on a loaded CI run) finds its renewals refused and gives its partitions up, cutting
off the LLM call in flight; when it takes them back, the conversation goes on from the log: the
call is made again, the task finishes. (A shorter stall keeps them: test_partitions.)"""

from __future__ import annotations

import time
from pathlib import Path

from taskbus.contracts.events import LLMWaiting
from taskbus.contracts.partitions import LEASE_SECONDS, RENEW_SECONDS
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus

from .test_agent_loop import agent_stack, finish, status_reached, think


async def test_a_step_cut_off_by_lost_leases_is_taken_again_once_they_are_back(
    tmp_path: Path,
) -> None:
    # The first attempt is answered only after 3 s; the call made again is answered at once.
    script = {"steps": [{**think("slow"), "delay": {"seconds": 3, "times": 1}}, finish()]}
    async with (
        agent_stack(tmp_path, script, llm_heartbeat_seconds=0.25) as stack,
        stack.conversation("stella", ConversationSpec(initial_user_msg="Hi.")) as runtime,
    ):
        await runtime.wait_for(lambda events: any(isinstance(e, LLMWaiting) for e in events))
        time.sleep(LEASE_SECONDS + RENEW_SECONDS)  # noqa: ASYNC251 (the stall under test: the loop is blocked)
        await runtime.wait_for(status_reached(ConversationStatus.FINISHED))
