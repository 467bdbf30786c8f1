#!/usr/bin/env bash
# Build the sandbox image locally, without any registry: debootstrap a minimal Debian rootfs with
# bash, git and python3, the mcp SDK (for MCP servers run in sandboxes) and the unprivileged user
# `taskbus` (uid/gid 1000) that sandboxes run as, then `docker import` it. Needs uv (the mcp SDK,
# at the version of uv.lock, comes from the package index). Usage: build.sh [IMAGE_TAG]
set -euo pipefail

tag="${1:-taskbus-sandbox:latest}"
suite="${TASKBUS_SANDBOX_SUITE:-bookworm}"
mirror="${TASKBUS_SANDBOX_MIRROR:-http://deb.debian.org/debian}"
# Bumped whenever the image's contents change, so an image of an older build.sh is rebuilt.
revision=3
# The mcp SDK of the workspace's lock, for the image's Python (Debian's 3.11).
lock="$(dirname "$0")/../../uv.lock"
mcp_version="$(sed -n '/^name = "mcp"$/{n;s/^version = "\(.*\)"$/\1/p;}' "$lock")"

built="$(docker image inspect -f '{{index .Config.Labels "taskbus.sandbox-image"}}' "$tag" 2>/dev/null || true)"
if [ "$built" = "$revision" ] && [ "${TASKBUS_SANDBOX_REBUILD:-0}" != 1 ]; then
    echo "$tag already exists (TASKBUS_SANDBOX_REBUILD=1 rebuilds it)"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

rootfs="$(mktemp -d /tmp/taskbus-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase \
    --include=bash,git,python3,ca-certificates,procps,coreutils,findutils,grep,sed \
    "$suite" "$rootfs" "$mirror" >/dev/null
# MCP servers written with the SDK run with the image's python3: the SDK and its dependencies
# live under /opt/taskbus/python, on every python3's path through a .pth file.
uv pip install --quiet --target "$rootfs/opt/taskbus/python" --python-version 3.11 \
    --python-platform "$(uname -m)-manylinux_2_28" "mcp==${mcp_version:?no mcp in uv.lock}"
echo /opt/taskbus/python >"$rootfs/usr/lib/python3/dist-packages/taskbus-toolbox.pth"
# Trim what a sandbox never needs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
# The sandbox user: no password, no sudo, a home the runner mounts a tmpfs on.
echo 'taskbus:x:1000:1000:Taskbus sandbox:/home/taskbus:/bin/bash' >>"$rootfs/etc/passwd"
echo 'taskbus:x:1000:' >>"$rootfs/etc/group"
echo 'taskbus:!:19000::::::' >>"$rootfs/etc/shadow"
mkdir -p "$rootfs/workspace" "$rootfs/home/taskbus"
chown 1000:1000 "$rootfs/workspace" "$rootfs/home/taskbus"

tar -C "$rootfs" -c . | docker import \
    --change 'WORKDIR /workspace' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["sleep", "infinity"]' \
    --change 'USER taskbus' \
    --change "LABEL taskbus.sandbox-image=$revision" \
    - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
