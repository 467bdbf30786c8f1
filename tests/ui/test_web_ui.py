"""The web UI in a real browser (Debian's chromium, headless, driven by Playwright) against a
real stack: sign in, start a task from the form, watch its plan change live, confirm and reject
actions, see FINISHED; the controls; a wrong key; and an agent, a sandbox and a user whose
every word is an HTML attack, which must only ever show as text."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from ..conftest import Stack, running_stack
from ..public_api import all_events_via_rest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# As long as the API tests wait for an event (tests/public_api.py): a fresh stack's first task
# also pays session-manager's first import of litellm, 10-16 s on a loaded two-core CI run.
WAIT_MS = 60_000
# Runs only if some text is parsed as HTML (a CSP violation is recorded even where the
# policy stops it running).
PAYLOAD = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'
# Its first line streams out at once; the rest waits until the test uploads `go`, so the page
# is seen showing output of a command still running, whatever the machine's speed.
PAYLOAD_COMMAND = (
    "echo '<img src=x onerror=window.__xss=1>' > notes.html && cat notes.html"
    " && until [ -e go ]; do sleep 0.1; done; echo finished"
)
STREAMED = "<img src=x onerror=window.__xss=1>\n"


def plan(first: str, second: str) -> dict[str, Any]:
    tasks = [
        {"id": "1", "title": f"Write notes {PAYLOAD}", "status": first},
        {"id": "2", "title": "Write the summary", "status": second},
    ]
    return {"name": "task_tracker", "arguments": {"command": "plan", "task_list": tasks}}


# Plan, run a command, move the plan on, edit a file, finish the plan, finish: in confirmation
# mode the command and the edit each wait for the user. Every text the agent writes carries the
# attack.
SCRIPT = {
    "steps": [
        {"content": f"Planning first. {PAYLOAD}", "tool_calls": [plan("in_progress", "todo")]},
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": PAYLOAD_COMMAND}}]},
        {"tool_calls": [plan("done", "in_progress")]},
        {
            "tool_calls": [
                {
                    "name": "str_replace_editor",
                    "arguments": {
                        "command": "create",
                        "path": "summary.md",
                        "file_text": f"# Summary\n{PAYLOAD}\n",
                    },
                }
            ]
        },
        {"tool_calls": [plan("done", "done")]},
        {"tool_calls": [{"name": "finish", "arguments": {"message": f"Done. {PAYLOAD}"}}]},
    ]
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("web-ui"), SCRIPT) as running:
        yield running


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        await browser.close()


WRONG_KEY = "tb_not_a_key_of_this_stack"


@pytest.fixture
async def page(browser: Browser, stack: Stack) -> AsyncIterator[Page]:
    """A fresh tab (its own sessionStorage) that records its requests, dialogs and CSP
    violations; the test fails if a dialog opened, the policy had to stop anything, or a key
    was ever in a URL."""
    context: BrowserContext = await browser.new_context(base_url=stack.url)
    await context.add_init_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.__violations.push(e.violatedDirective));"
    )
    page = await context.new_page()
    dialogs: list[str] = []
    urls: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.on("request", lambda request: urls.append(request.url))
    yield page
    assert any("/api/conversations" in url for url in urls)
    assert [url for url in urls if re.search(f"{stack.api_key}|{WRONG_KEY}|api_key", url)] == []
    assert await page.evaluate("window.__violations") == []
    assert await page.evaluate("window.__xss") is None
    assert dialogs == []
    await context.close()


async def sign_in(page: Page, key: str) -> None:
    await page.goto("/")
    await page.fill("#login-key", key)
    await page.click("#login-form button[type=submit]")


async def signed_in(page: Page, stack: Stack) -> None:
    await sign_in(page, stack.api_key)
    await expect(page.locator("#app")).to_be_visible(timeout=WAIT_MS)


def plan_item(page: Page, task_id: str) -> Any:
    return page.locator(f'#plan li[data-task-id="{task_id}"]')


async def open_conversation(page: Page, cid: str) -> None:
    await page.locator(f'#conversations li[data-id="{cid}"] button').click(timeout=WAIT_MS)
    await expect(page.locator("#view-status")).to_have_attribute("data-status", re.compile("."))


async def test_a_task_from_the_form_runs_live_to_finished(page: Page, stack: Stack) -> None:
    await signed_in(page, stack)
    await page.fill("#task-text", "Write notes and a summary.")
    await page.check("#task-confirm")
    await page.click("#task-form button[type=submit]")

    # The new conversation opens; its plan arrives with the first item in progress, and the
    # command waits for confirmation.
    await expect(plan_item(page, "1")).to_have_attribute(
        "data-status", "in_progress", timeout=WAIT_MS
    )
    await expect(plan_item(page, "2")).to_have_attribute("data-status", "todo")
    confirm = page.locator('.controls [data-command="confirm"]')
    await expect(confirm).to_be_enabled(timeout=WAIT_MS)
    await expect(page.locator("#pending-action")).to_have_text(f"$ {PAYLOAD_COMMAND}")
    await expect(page.locator("#view-status")).to_have_attribute("data-status", "RUNNING")
    await expect(page.locator('.controls [data-command="resume"]')).to_be_disabled()
    cid = await page.locator("#conversations li.selected").get_attribute("data-id")
    assert cid

    # Confirmed: the command runs and its first output streams into its block while it runs;
    # once it ends, its whole output and exit code replace that.
    await confirm.click()
    command_block = page.locator('#events li[data-kind="CmdRunAction"]')
    output = command_block.locator("pre.output")
    await expect(output).to_have_text(STREAMED, timeout=WAIT_MS)
    await expect(command_block.locator(".exit")).to_have_count(0)
    await release_command(stack, cid)
    await expect(command_block.locator(".exit")).to_have_text("exit code 0", timeout=WAIT_MS)
    await expect(output).to_have_text(f"{STREAMED}finished\n")
    # The plan moves on, in the page as it is, without a reload.
    await expect(plan_item(page, "1")).to_have_attribute("data-status", "done", timeout=WAIT_MS)
    await expect(plan_item(page, "2")).to_have_attribute("data-status", "in_progress")

    # The edit waits next. Rejected, the agent waits for the user; told to go on, it finishes.
    await expect(page.locator("#pending-action")).to_have_text("create summary.md", timeout=WAIT_MS)
    await page.locator('.controls [data-command="reject"]').click()
    await expect(page.locator("#view-agent")).to_have_attribute(
        "data-agent-state", "user_rejected", timeout=WAIT_MS
    )
    await expect(page.locator("#pending")).to_be_hidden()
    await page.fill("#message-text", "Skip the summary.")
    await page.click("#message-form button[type=submit]")
    await expect(page.locator("#view-status")).to_have_attribute(
        "data-status", "FINISHED", timeout=WAIT_MS
    )
    await expect(plan_item(page, "2")).to_have_attribute("data-status", "done", timeout=WAIT_MS)
    await expect(page.locator('#events li[data-kind="ConfirmationGiven"]')).to_have_text(
        [re.compile("confirmed$"), re.compile("rejected$")]
    )
    await expect(page.locator('#events li.source-user[data-kind="MessageAction"]')).to_have_text(
        [re.compile("Write notes and a summary.$"), re.compile("Skip the summary.$")]
    )
    await expect(page.locator(f'#conversations li[data-id="{cid}"]')).to_have_attribute(
        "data-status", "FINISHED", timeout=WAIT_MS
    )

    # Cost and iterations are the conversation's own.
    async with stack.client() as api:
        await expect_figures(page, api, cid)
    for command in ("confirm", "reject", "pause", "resume", "stop"):
        await expect(page.locator(f'.controls [data-command="{command}"]')).to_be_disabled()


async def release_command(stack: Stack, cid: str) -> None:
    """Let the script's command finish: it waits for a file named `go` in its workspace."""
    async with stack.client() as api:
        uploaded = await api.post(
            f"/api/conversations/{cid}/upload-files", files=[("files", ("go", b""))]
        )
        assert uploaded.status_code == 200, uploaded.text


async def expect_figures(page: Page, api: httpx.AsyncClient, cid: str) -> None:
    info = (await api.get(f"/api/conversations/{cid}")).json()
    await expect(page.locator("#view-cost")).to_have_text(f"${info['accumulated_cost']:.4f}")
    steps = [e for e in await all_events_via_rest(api, cid) if e["kind"] == "LLMMetrics"]
    assert len(steps) >= len(SCRIPT["steps"])
    # "<steps> / <limit>": the limit is the one that applied (here session-manager's default).
    await expect(page.locator("#view-iterations")).to_have_text(
        re.compile(rf"^{len(steps)} / \d+$")
    )


async def test_pause_resume_and_stop_from_the_controls(page: Page, stack: Stack) -> None:
    async with stack.client() as api:
        created = await api.post(
            "/api/conversations",
            json={"initial_user_msg": "Hold on.", "confirmation_mode": True},
        )
        assert created.status_code == 201, created.text
        cid = created.json()["conversation_id"]
    await signed_in(page, stack)
    await open_conversation(page, cid)
    status = page.locator("#view-status")
    await expect(page.locator('.controls [data-command="confirm"]')).to_be_enabled(timeout=WAIT_MS)
    for command, after in (("pause", "PAUSED"), ("resume", "RUNNING"), ("stop", "STOPPED")):
        await page.locator(f'.controls [data-command="{command}"]').click(timeout=WAIT_MS)
        await expect(status).to_have_attribute("data-status", after, timeout=WAIT_MS)
    await expect(page.locator("#view-error")).to_have_text("")
    await expect(page.locator('.controls [data-command="stop"]')).to_be_disabled()


async def test_every_attack_in_agent_sandbox_and_user_text_shows_as_text(
    page: Page, stack: Stack
) -> None:
    async with stack.client() as api:
        created = await api.post(
            "/api/conversations",
            json={
                "initial_user_msg": f"Please {PAYLOAD}",
                "title": f"Title {PAYLOAD}",
                "confirmation_mode": False,
            },
        )
        assert created.status_code == 201, created.text
        cid = created.json()["conversation_id"]
    await signed_in(page, stack)
    await open_conversation(page, cid)
    await expect(page.locator("#events pre.output")).to_have_text(STREAMED, timeout=WAIT_MS)
    await release_command(stack, cid)
    await expect(page.locator("#view-status")).to_have_attribute(
        "data-status", "FINISHED", timeout=WAIT_MS
    )
    # The user asks again with the attack; it too shows as the user's words.
    await page.fill("#message-text", f"Again {PAYLOAD}")
    await page.click("#message-form button[type=submit]")
    await expect(
        page.locator('#events li.source-user[data-kind="MessageAction"] .message')
    ).to_have_text([f"Please {PAYLOAD}", f"Again {PAYLOAD}"], timeout=WAIT_MS)

    events = page.locator("#events")
    await expect(page.locator("#view-title")).to_have_text(f"Title {PAYLOAD}")
    await expect(page.locator(f'#conversations li[data-id="{cid}"] .conv-title')).to_have_text(
        f"Title {PAYLOAD}"
    )
    await expect(events.locator(".thought").first).to_have_text(f"Planning first. {PAYLOAD}")
    await expect(plan_item(page, "1").locator(".task-title")).to_have_text(f"Write notes {PAYLOAD}")
    await expect(events.locator(".finish")).to_have_text(f"Done. {PAYLOAD}")
    await expect(events.locator("pre.output")).to_have_text(f"{STREAMED}finished\n")
    # The edit shows as a diff whose added line is the attack, as text.
    await expect(events.locator(".diff-add", has_text=PAYLOAD)).to_have_text(f"+{PAYLOAD}\n")
    assert await page.locator("img").count() == 0


async def test_a_wrong_key_is_refused_and_never_kept(page: Page, stack: Stack) -> None:
    await sign_in(page, WRONG_KEY)
    await expect(page.locator("#login-error")).to_have_text(
        "That API key is not valid.", timeout=WAIT_MS
    )
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0

    # The right key is kept for this tab only, and signing out forgets it.
    await signed_in(page, stack)
    assert await page.evaluate("Object.values(sessionStorage)") == [stack.api_key]
    await page.reload()
    await expect(page.locator("#app")).to_be_visible(timeout=WAIT_MS)
    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
