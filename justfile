# Taskbus: the entry point for humans and CI. `uv run just --list` shows every recipe.

export LITELLM_LOCAL_MODEL_COST_MAP := "True"

[doc("Start NATS, the scripted model (if no LLM is configured) and the four services")]
up:
    taskbus up

[doc("Start the stack, submit a sample task and print its events until it finishes")]
demo:
    taskbus demo

[doc("Run the whole test suite (real nats-server, chDB and processes); extra args go to pytest")]
test *args:
    # Two workers, a test file each at a time (its module-scoped stack stays in one worker):
    # most of the suite waits on processes, sandboxes and NATS, not on the CPU.
    pytest -n {{env_var_or_default("TASKBUS_TEST_WORKERS", "2")}} --dist loadfile {{args}}

[doc("ruff (lint + format check) and mypy --strict")]
lint:
    ruff check .
    ruff format --check .
    mypy

[doc("Build the Docker sandbox image locally (debootstrap + docker import; no registry)")]
sandbox-image tag="taskbus-sandbox:latest":
    deploy/sandbox-image/build.sh {{tag}}
