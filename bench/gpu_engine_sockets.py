#!/usr/bin/env python3
"""Which addresses a GPU engine's sockets are bound to, with fvboot's loopback settings
(launcher.LOOPBACK_SETTINGS) and without: the check behind fvboot/sockets.py on a GPU. CRIU puts
every socket back on its address, so any address but loopback and the wildcard ties a checkpoint
to the bake's network (the CUDA image fell back in a --network none container, 2026-12-05).

Two engines at once on the GPU (vLLM's `LLM` in this process's children, its engine in-process,
`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the same executor and distributed setup as the served engine
core), one with the settings and one without; each lists its inet sockets after one answer.

    python3 bench/gpu_engine_sockets.py [MODEL_DIR]   # default: makes synthetic:tiny in $FV_BENCH_HOME

Writes ($OUT or /tmp) gpu_engine_sockets.json and each child's log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import link_fvboot, log, record  # noqa: E402

HOME = Path(os.environ.get("FV_BENCH_HOME", "/root/fv-sockets"))
CHILD_LIMIT_S = 240


def _decode(hex_addr: str) -> str:
    """/proc/net/tcp's ADDRESS:PORT (each 32-bit word in host order) as text."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, words)}:{int(port, 16)}"


def inet_sockets() -> list[dict]:
    """This process's TCP and UDP sockets: protocol, local and remote address, state."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/self/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                out.append({"proto": proto, "local": _decode(f[1]), "remote": _decode(f[2]), "state": f[3]})
    return out


def child(model_dir: str, loopback: bool) -> None:
    from fvboot.launcher import LOOPBACK_SETTINGS
    from fvboot.sockets import needs_this_network

    if loopback:
        for k, v in LOOPBACK_SETTINGS.items():
            os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=512)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=2, temperature=0))
    found = inet_sockets()
    tied = sorted({s["local"].rsplit(":", 1)[0] for s in found if needs_this_network(s["local"].rsplit(":", 1)[0])})
    print("RESULT " + json.dumps({"answer": out[0].outputs[0].text, "sockets": found, "tied_to": tied}), flush=True)
    os._exit(0)  # the engine's teardown is not what is measured


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3] == "loopback")
        return 0
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    lib = link_fvboot(HOME / "lib")
    sys.path.insert(0, str(lib))
    from fvboot.launcher import LOOPBACK_SETTINGS
    env = dict(os.environ, PYTHONPATH=f"{lib}:{os.environ.get('PYTHONPATH', '')}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HOME / "model"
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "fvboot", "make-model", "synthetic:tiny", str(model_dir)], env=env,
                       check=True)
    t0 = time.monotonic()
    procs = {}
    for arm in ("loopback", "default"):
        arm_env = dict(env)
        if arm == "default":
            for k in LOOPBACK_SETTINGS:
                arm_env.pop(k, None)
        logf = open(out_dir / f"engine-sockets-{arm}.log", "w")
        procs[arm] = (subprocess.Popen([sys.executable, __file__, "--child", str(model_dir), arm], env=arm_env,
                                       stdout=logf, stderr=subprocess.STDOUT, text=True), logf)
    res: dict = {"bench": "gpu_engine_sockets", "arms": {}}
    for arm, (p, logf) in procs.items():
        try:
            rc = p.wait(max(1.0, CHILD_LIMIT_S - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        logf.close()
        text = (out_dir / f"engine-sockets-{arm}.log").read_text(errors="replace")
        result = next((json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")), None)
        res["arms"][arm] = {"rc": rc, **(result or {"tail": text.splitlines()[-8:]})}
        log(f"{arm}: exit {rc}; bound to other than loopback/wildcard: {(result or {}).get('tied_to')}")
    record("gpu_engine_sockets", res)
    return 0 if all(a.get("rc") == 0 for a in res["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
