#!/usr/bin/env bash
# The Python packages GPU CI carries to a GPU machine that has no network (Python 3.12, x86_64),
# as wheels under .whl/ (git-ignored): what fvbuild and the suite need beyond what the machine's
# Python and the device kit's vLLM already bring. Run on a CPU machine with the package registries;
# re-running reuses what is there. .ci/gpu-run setup installs them with --no-deps, so the lists
# below are pinned, not resolved.
#
#   .whl/*.whl          docker-py (fvbuild's engine API) and pytest-docker (the suite's fixtures)
#   .whl/b3/            blake3 (the weight dump's default checksum; the e2e tests read dumps)
#   .whl/bench/         zstandard and lz4 (bench/checkpoint_compression.py, `.ci/gpu-run compression`)
#   .whl/compose/       docker-compose 1.29 and what it imports, in a folder of its own: it needs
#                       docker-py 6 and requests 2.31, older than fvbuild's (the machine's Docker
#                       engine is 20.10 with no compose plugin; pytest-docker drives compose)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=$REPO/.whl
mkdir -p "$W/b3" "$W/bench" "$W/compose"
PY="--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64"

get() {  # DIR REQ...: wheels only, no dependency resolution
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: $PY -d "$dir" "$@"
}

get "$W" "docker==7.1.0" "pytest-docker==3.2.3"
get "$W/b3" "blake3==1.0.8"
get "$W/bench" "zstandard==0.25.0" "lz4==4.4.5"
get "$W/compose" "docker-compose==1.29.2" "docker==6.1.3" "requests==2.31.0" \
    "jsonschema==3.2.0" "attrs==23.2.0" "pyrsistent==0.20.0" "six==1.16.0" "python-dotenv==0.21.1" \
    "texttable==1.7.0" "websocket-client==0.59.0" "cached-property==1.5.2" "distro==1.9.0" \
    "setuptools==69.5.1"
# published only as source archives (pure Python): their wheels are built here
for req in "docopt==0.6.2" "dockerpty==0.4.1"; do
  ls "$W/compose/${req%%==*}"-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w "$W/compose" "$req"
done
ls "$W" "$W/b3" "$W/bench" "$W/compose" | tr '\n' ' '; echo
