#!/usr/bin/env bash
# Prepare a Debian 12 machine (root) for building and testing CPU images: Docker engine,
# debootstrap, CRIU's build deps, the local base image, CRIU's source tarball, and this package.
# Idempotent; used by .ci/run and by newcomers. No registry is needed: the base image is made
# with debootstrap and CRIU's source comes from Debian's source index.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${FV_WORK:-$REPO/.fv-work}
BASE_IMAGE=${FV_BASE_IMAGE:-fv-local/debian:bookworm}
mkdir -p "$WORK"
# Each step says how long it took (a CI run's time is kept only in its output).
took() { echo "setup: $1 in $SECONDS s" >&2; SECONDS=0; }
SECONDS=0

# The machine's configured Debian mirror (sites with their own mirror or proxy set it in apt's
# sources): debootstrap and CRIU's source tarball come from there.
MIRROR=${FV_DEBIAN_MIRROR:-$( { awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null; awk '/^deb /{print $2}' /etc/apt/sources.list 2>/dev/null; } | grep -v security | head -1 || true)}
[ -n "$MIRROR" ] || { echo "no Debian mirror in apt's sources; set FV_DEBIAN_MIRROR" >&2; exit 1; }

need=""
command -v dockerd >/dev/null || need="$need docker.io"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v git >/dev/null || need="$need git"
command -v curl >/dev/null || need="$need curl"
command -v docker-compose >/dev/null || need="$need docker-compose"
command -v xz >/dev/null || need="$need xz-utils"
command -v podman >/dev/null || need="$need podman"  # the e2e test of the image under Podman (CRI-O's storage)
if [ -n "$need" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  took "installed$need"
fi

# Docker engine: no default bridge, so containers use --network host and tests stay on 127.0.0.1.
if ! docker info >/dev/null 2>&1; then
  setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $WORK/dockerd.log" >&2; exit 1; }
  took "started dockerd"
fi

# Local base image (no registry here): Debian 12 minbase by debootstrap.
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1
  tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  took "made the base image $BASE_IMAGE"
fi

# CRIU's release tarball from Debian's source index (GitHub is not reachable here).
if ! ls "$WORK"/criu_*.orig.tar.* >/dev/null 2>&1; then
  A=$WORK/apt; mkdir -p "$A/lists/partial"
  echo "deb-src $MIRROR sid main" > "$A/sources.list"
  o="-oDir::Etc::SourceList=$A/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$A/lists"
  apt-get $o update -qq
  read -r dir sum file < <(apt-cache $o showsrc criu | awk '/^Package:/{if(f)exit} /^Directory:/{d=$2} /^Checksums-Sha256:/{c=1;next} /^[A-Z]/{c=0} c&&/orig\.tar/{h=$1;f=$3} END{print d, h, f}')
  curl -fsSL -o "$WORK/$file" "$MIRROR/$dir/$file"
  echo "$sum  $WORK/$file" | sha256sum -c --quiet
  took "fetched CRIU's source"
fi
ls "$WORK"/criu_*.orig.tar.* | head -1 > "$WORK/criu-src.path"

# The tests import torch (weight-file format, GPU loader planning): the [test] extra pins the CPU
# build vLLM's CPU image uses (torch 2.13.0; this environment's pip finds that wheel locally).
python3 -m pip install -q -e "$REPO[test]"
took "installed fast-vllm[test]"
# What the tests import must load, not only be installed: a torch whose libraries cannot be
# loaded (a partial or damaged install) fails every test module that needs it at collection.
# Once, everything the extra names is installed afresh; then it loads or CI stops here, saying why.
TEST_IMPORTS="import torch, blake3, yaml, matplotlib, docker, requests, pytest_docker, kubernetes_validate"
if ! err=$(python3 -c "$TEST_IMPORTS" 2>&1); then
  echo "setup: the test packages do not load ($(echo "$err" | tail -1)); installing them afresh" >&2
  python3 -m pip install -q --force-reinstall --no-cache-dir -e "$REPO[test]"
  python3 -c "$TEST_IMPORTS" || { echo "setup: the test packages still do not load" >&2; exit 1; }
  took "installed the test packages afresh"
fi
echo "ready: base image $BASE_IMAGE, CRIU source $(cat "$WORK/criu-src.path")"
