#!/usr/bin/env bash
# Build the sandbox image locally, without any registry: debootstrap a minimal Debian rootfs with
# bash, git and python3, then `docker import` it. Usage: build.sh [IMAGE_TAG]
set -euo pipefail

tag="${1:-taskbus-sandbox:latest}"
suite="${TASKBUS_SANDBOX_SUITE:-bookworm}"
mirror="${TASKBUS_SANDBOX_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$tag" >/dev/null 2>&1 && [ "${TASKBUS_SANDBOX_REBUILD:-0}" != 1 ]; then
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
# Trim what a sandbox never needs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
mkdir -p "$rootfs/workspace"

tar -C "$rootfs" -c . | docker import \
    --change 'WORKDIR /workspace' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["sleep", "infinity"]' \
    - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
