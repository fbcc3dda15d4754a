# Rendered by fvbuild 0.1.0 for synthetic:tiny (cuda). Do not edit: change the options.
# Works with the legacy builder (no BuildKit features). Layers are ordered from what changes least.

# ---- runtime: the base image plus CRIU, vmtouch and fvboot -------------------------------------
FROM fv-local/gpu-base:1 AS runtime
# No package step (air-gapped sites): CRIU and its libraries come prebuilt; vLLM's base has the rest.
# CRIU prebuilt by `fvbuild criu`: from criu_4.2.1.orig.tar.xz (prebuilt: criu-prebuilt-cuda.tar.gz)
# criu runs through a wrapper that gives it its own libraries (they stay off the global loader
# path, where they could shadow the base's); the cuda plugin, cuda-checkpoint and vmtouch too.
COPY criu-prebuilt.tar.gz /tmp/fv-criu-prebuilt.tar.gz
RUN set -eu; \
    for tool in tar unshare; do command -v "$tool" >/dev/null 2>&1 \
        || { echo "fvbuild-error: base-tool: $tool"; exit 1; }; done; \
    tar -xzf /tmp/fv-criu-prebuilt.tar.gz -C /usr/local --no-same-owner; \
    rm -f /tmp/fv-criu-prebuilt.tar.gz; \
    mkdir -p /usr/lib/criu; mv /usr/local/lib/criu/cuda_plugin.so /usr/lib/criu/cuda_plugin.so; \
    rmdir /usr/local/lib/criu 2>/dev/null || true; \
    for cmd in "criu --version" "vmtouch /usr/local/sbin/criu"; do \
        out=$($cmd 2>&1) || { echo "fvbuild-error: criu-prebuilt: ${cmd%% *}: $(printf '%s\n' "$out" \
            | grep -m 1 -E 'not found|cannot open|No such' || printf '%s\n' "$out" | head -n 1)"; exit 1; }; \
    done
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
    printf '#!/bin/sh\n[ -z "${FV_CRIU_WRAPPED:-}" ] || if [ -n "$FV_CRIU_SAVED_LD_LIBRARY_PATH" ]; then export LD_LIBRARY_PATH="$FV_CRIU_SAVED_LD_LIBRARY_PATH"; else unset LD_LIBRARY_PATH; fi\nPYTHONPATH=/opt/fast-vllm/lib exec %s -S -m fvboot.cuda_checkpoint "$@"\n' "$py" > /usr/local/libexec/fv-cuda-checkpoint; \
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
LABEL org.fast-vllm.criu="from criu_4.2.1.orig.tar.xz (prebuilt: criu-prebuilt-cuda.tar.gz)"
LABEL org.fast-vllm.criu-patches="0001-version-mark-fast-vllm-builds.patch,0002-restore-thp-fill.patch"
EXPOSE 8000
ENTRYPOINT ["fvboot"]
CMD []
