# Rendered by fvbuild 0.1.0 for synthetic:tiny (cuda). Do not edit: change the options.
# Works with the legacy builder (no BuildKit features). Layers are ordered from what changes least.
# ---- criu: CRIU v4.2.1 from https://github.com/checkpoint-restore/criu.git with the patch series, built on the runtime's distro ----
FROM vllm/vllm-openai:v0.26.0 AS criu
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates build-essential pkg-config git patch xz-utils python3 python3-protobuf \
        libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libnl-3-dev \
        libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev uuid-dev libnftables-dev \
    && rm -rf /var/lib/apt/lists/*
ARG CRIU_REPO="https://github.com/checkpoint-restore/criu.git"
ARG CRIU_REF="v4.2.1"
RUN git init -q /src/criu && cd /src/criu \
    && (git fetch -q --depth 1 "$CRIU_REPO" "$CRIU_REF" \
        || { echo "fvbuild-error: criu-ref: cannot fetch $CRIU_REF from $CRIU_REPO"; exit 1; }) \
    && git checkout -q FETCH_HEAD
COPY criu-patches /src/patches
# Patch series: 0001-version-mark-fast-vllm-builds.patch, 0002-restore-thp-fill.patch, 0003-restore-map-pages.patch, 0004-kerndat-cache-dir.patch, 0005-restore-log-areas-at-debug.patch
RUN cd /src/criu && for p in 0001-version-mark-fast-vllm-builds.patch 0002-restore-thp-fill.patch 0003-restore-map-pages.patch 0004-kerndat-cache-dir.patch 0005-restore-log-areas-at-debug.patch; do \
        patch -p1 --forward --batch --silent < "/src/patches/$p" \
        || { echo "fvbuild-error: patch: $p does not apply to CRIU v4.2.1 from https://github.com/checkpoint-restore/criu.git"; exit 1; }; \
    done
RUN make -C /src/criu -j"$(nproc)" criu cuda_plugin >/tmp/criu-build.log 2>&1 \
        || { tail -n 40 /tmp/criu-build.log; exit 1; } \
    && mkdir -p /out && cp /src/criu/criu/criu /src/criu/plugins/cuda/cuda_plugin.so /out/
# cuda-checkpoint for CRIU's cuda plugin: a C client of fvboot's cuda-checkpoint service
COPY fvboot/cuda_checkpoint_client.c /src/fv/
RUN gcc -O2 -Wall -Wextra -Werror -DFALLBACK='"/usr/local/libexec/fv-cuda-checkpoint"' \
        -o /out/cuda-checkpoint /src/fv/cuda_checkpoint_client.c

# ---- runtime: the base image plus CRIU, vmtouch and fvboot -------------------------------------
FROM vllm/vllm-openai:v0.26.0 AS runtime
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates vmtouch util-linux iproute2 libprotobuf-c1 libnl-3-200 libnet1 libcap2 libaio1 \
        libbsd0 libgnutls30 libnftables1 libuuid1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=criu /out/criu /usr/local/sbin/criu
COPY --from=criu /out/cuda_plugin.so /usr/lib/criu/cuda_plugin.so
COPY --from=criu /out/cuda-checkpoint /usr/local/bin/cuda-checkpoint
COPY fvboot /opt/fast-vllm/lib/fvboot
# fvboot goes in next to the base's Python (no pip); the base must bring vLLM, tar and unshare.
# A base whose vLLM has no `vllm` command (installed without its console script) gets one.
# fvboot is byte-compiled here: a new container would otherwise compile it at every start.
# `fvboot serve` (the restore) runs without site (-S), with the folders site adds here (found at
# build: sys.path with site less sys.path without) put on sys.path by hand: the base's .pth hooks
# cost every start up to ~70 ms (numba-cuda's redirector in the CUDA base) and fvboot needs none
# of them; vLLM, started by fvboot, gets its site whole.
RUN set -eu; \
    for tool in python3 tar unshare; do command -v "$tool" >/dev/null 2>&1 \
        || { echo "fvbuild-error: base-tool: $tool"; exit 1; }; done; \
    python3 -c 'import vllm' >/dev/null 2>&1 \
        || { echo "fvbuild-error: no-vllm: $(python3 -c 'import vllm' 2>&1 | tail -n 1)"; exit 1; }; \
    py=$(command -v python3); \
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    echo /opt/fast-vllm/lib > "$site/fast-vllm.pth"; \
    "$py" -m compileall -q /opt/fast-vllm/lib/fvboot >/dev/null; \
    added=$("$py" -c 'import json, subprocess, sys; bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(repr(sys.path))"], capture_output=True, text=True, check=True).stdout; print(json.dumps([p for p in sys.path if p and p not in eval(bare)]))'); \
    printf '#!/bin/sh\ncase "${1:-}" in bake|inspect|check|make-model|cuda-checkpoint|-h|--help|-V|--version) exec %s -m fvboot "$@";; esac\nexec %s -S -c %s "$@"\n' \
        "$py" "$py" "'import sys; sys.path[:0] = [\"/opt/fast-vllm/lib\"]; sys.path += $added; from fvboot.cli import main; sys.exit(main())'" \
        > /usr/local/bin/fvboot; \
    command -v vllm >/dev/null 2>&1 || { printf '#!/bin/sh\nexec %s -m vllm.entrypoints.cli.main "$@"\n' "$py" \
        > /usr/local/bin/vllm; chmod 0755 /usr/local/bin/vllm; }; \
    mkdir -p /usr/local/libexec; \
    printf '#!/bin/sh\nPYTHONPATH=/opt/fast-vllm/lib exec %s -S -m fvboot.cuda_checkpoint "$@"\n' "$py" > /usr/local/libexec/fv-cuda-checkpoint; \
    chmod 0755 /usr/local/libexec/fv-cuda-checkpoint; \
    cuda-checkpoint --help | grep -q -- --action; \
    chmod 0755 /usr/local/bin/fvboot; \
    criu --version; fvboot --version
ENV FV_HOME=/fv \
    FV_PORT=8000 \
    VLLM_CACHE_ROOT=/fv/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/fv/cache/inductor \
    TRITON_CACHE_DIR=/fv/cache/triton \
    FLASHINFER_WORKSPACE_BASE=/fv/cache/flashinfer \
    CUDA_CACHE_PATH=/fv/cache/nv \
    HF_HOME=/fv/cache/hf
LABEL org.fast-vllm.version="0.1.0"
LABEL org.fast-vllm.model="synthetic:tiny"
LABEL org.fast-vllm.device="cuda"
LABEL org.fast-vllm.vllm-version="0.26.0"
LABEL org.fast-vllm.criu="v4.2.1 from https://github.com/checkpoint-restore/criu.git"
LABEL org.fast-vllm.criu-patches="0001-version-mark-fast-vllm-builds.patch,0002-restore-thp-fill.patch,0003-restore-map-pages.patch,0004-kerndat-cache-dir.patch,0005-restore-log-areas-at-debug.patch"
EXPOSE 8000
ENTRYPOINT ["fvboot"]
CMD []
