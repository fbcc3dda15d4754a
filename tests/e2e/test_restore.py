"""Bake -> docker run -> restore, end to end with the real vLLM, CRIU and Docker.

Parametrised by FV_E2E_DEVICE: CPU CI runs it on the CPU image of synthetic:tiny; GPU CI runs the
very same tests on the CUDA image (README). Answers are compared with those the server gave
before the checkpoint (recorded in the manifest at bake time).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import pytest

from fvboot.capabilities import docker_run_flags
from fvboot.layout import RUN_DIR  # fvboot's run folder in its containers
import requests

from conftest import CANARY, IMAGE_ENV, REPO, e2e_device, fvbuild

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
CAPS = docker_run_flags() + ["--network", "host"]  # the documented capability set


@functools.lru_cache(maxsize=None)
def _gpu_flags() -> tuple[str, ...]:
    if e2e_device() != "cuda":
        return ()
    from fvbuild.gpu import gpu_run_flags

    return tuple(gpu_run_flags(os.environ.get("FV_GPU_ACCESS", "auto"), os.environ.get("FV_NVIDIA_DRIVER_DIR")))


def gpu_flags() -> list[str]:
    """`docker run` flags for the GPU, as the builder gives them (FV_GPU_ACCESS: auto, toolkit or
    devices; FV_NVIDIA_DRIVER_DIR for devices); none on CPU. Asked of Docker once per session."""
    return list(_gpu_flags())


@pytest.fixture(scope="session")
def manifest(baked_image) -> dict:
    r = fvbuild("inspect", baked_image)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _completion_body(prompt: str, max_tokens: int, model: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 2, "seed": 0}


def _complete(prompt: str, max_tokens: int, model: str, timeout: float = 600, headers: dict | None = None) -> dict:
    r = requests.post(f"{URL}/v1/completions", timeout=timeout, json=_completion_body(prompt, max_tokens, model),
                      headers=headers)
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"text": c["text"], "logprobs": c["logprobs"]["token_logprobs"]}


def _probe_asks(manifest: dict) -> list[tuple[str, int, str]]:
    """(prompt, max_tokens, model) of each of the bake's probe answers, asked again."""
    name = manifest["model"]["served_name"]
    return [(p["prompt"], len(p["logprobs"]) or 12, name) for p in manifest["probe"]]


def _answers(manifest: dict, headers: dict | None = None) -> list[dict]:
    return [_complete(*ask, headers=headers) for ask in _probe_asks(manifest)]


# How far a normal start's logprob may be from the bake's on a GPU. A normal start need not
# reproduce the bake server's kernels and batches, and the synthetic models' random weights give
# near-uniform logits that show such differences large: the 3B image's fallbacks answered the
# same greedy text with logprobs up to 0.51 nats from the bake's (H200, 2026-12-04,
# bench/results/gpu_3b_cuda_image_h200_2026-12-04/); 0.03 (one bf16 step) on 2026-12-03. Text
# identical and this bound: another model, or garbage (NaN, -inf), still fails.
NORMAL_START_LOGPROB_TOL = 1.0


def _assert_same_as_bake(manifest: dict, exact: bool = True, answers: list[dict] | None = None) -> None:
    """Greedy text identical; logprobs identical to 4 decimals for a restored server (EXACT); a
    normal start on a GPU (not EXACT) within NORMAL_START_LOGPROB_TOL of the bake's. ANSWERS: the
    server's, asked elsewhere (default: asked here, on the host's network)."""
    for got, baked in zip(_answers(manifest) if answers is None else answers, manifest["probe"]):
        assert got["text"] == baked["text"]
        now = [round(x, 4) for x in got["logprobs"]]
        if exact:
            assert now == baked["logprobs"]
        else:
            assert len(now) == len(baked["logprobs"])
            off = [(abs(a - b), i) for i, (a, b) in enumerate(zip(now, baked["logprobs"]))]
            worst = max(off)
            assert worst[0] <= NORMAL_START_LOGPROB_TOL, \
                f"logprob {worst[1]} off by {worst[0]:.4f}: {now} vs {baked}"


def _wait_ready(timeout: float = 900, container: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready():
            return
        if container and subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container],
                                        capture_output=True, text=True).stdout.strip() != "true":
            raise AssertionError("container exited:\n" + _logs(container)[-4000:])
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s:\n" + (_logs(container)[-4000:] if container else ""))


def _logs(container: str) -> str:
    r = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
    return r.stdout + r.stderr


def _wait_log(container: str, text: str, timeout: float) -> str:
    """The container's logs once they hold TEXT, or as they are after TIMEOUT s (the caller's
    assertions say what was missing)."""
    deadline = time.monotonic() + timeout
    while text not in (logs := _logs(container)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return logs


def _fallback_line(logs: str) -> str:
    """fvboot's `checkpoint not used: <reason>` line of LOGS, or (none there) their tail, for the
    caller's assertion to show."""
    return next((l for l in logs.splitlines() if "checkpoint not used" in l), f"no fallback line in:\n{logs[-3000:]}")


COMPOSE_FILE = REPO / "tests" / "e2e" / "docker-compose.yml"


def _compose_command() -> str:
    return os.environ.get("FV_COMPOSE", "docker-compose")


def _compose(project: str, *args: str) -> str:
    """Run docker-compose on the test's compose file and project; returns its stdout."""
    env = {**os.environ, "FV_E2E_IMAGE": os.environ.get("FV_E2E_IMAGE", "unused")}
    files = [str(COMPOSE_FILE)] + ([os.environ["FV_COMPOSE_GPU_FILE"]] if os.environ.get("FV_COMPOSE_GPU_FILE") else [])
    return subprocess.run([_compose_command(), *(a for f in files for a in ("-f", f)), "-p", project, *args],
                          capture_output=True, text=True, env=env).stdout


@pytest.fixture
def port_free(docker_compose_project_name):
    """The baked port is fixed and we share the host network: stop the compose service first."""
    _compose(docker_compose_project_name, "down")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _ready():
        time.sleep(0.2)


@functools.lru_cache(maxsize=None)
def run_flags(image: str) -> tuple[str, ...]:
    """`fvbuild run-flags IMAGE`, the documented way to get a restore's `docker run` flags (the
    image names its device; the GPU as gpu_flags() gives it): every Container runs with these."""
    args = ["run-flags", image]
    if e2e_device() == "cuda":
        args += ["--gpu-access", os.environ.get("FV_GPU_ACCESS", "auto")]
        if os.environ.get("FV_NVIDIA_DRIVER_DIR"):
            args += ["--nvidia-driver-dir", os.environ["FV_NVIDIA_DRIVER_DIR"]]
    r = fvbuild(*args)
    assert r.returncode == 0, r.stderr
    return tuple(shlex.split(r.stdout))


def test_run_flags_of_the_image_are_its_devices_and_criu_needs(baked_image):
    """What `fvbuild run-flags IMAGE` prints: CRIU's capabilities, and the GPU only for a CUDA
    image (the CPU image's flags on a host without a GPU, too); a --device the image is not is
    refused, naming the image's."""
    flags = run_flags(baked_image)
    assert list(flags[:len(docker_run_flags())]) == docker_run_flags()
    assert list(flags[len(docker_run_flags()):]) == gpu_flags()
    other = "cpu" if e2e_device() == "cuda" else "cuda"
    r = fvbuild("run-flags", baked_image, "--device", other)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"--device {other}: {baked_image} is a {e2e_device()} image" in r.stderr


class Container:
    """`docker run -d` of the baked image with the flags `fvbuild run-flags IMAGE` prints; removed
    on exit."""

    def __init__(self, image: str, *pre: str, entry: list[str] | None = None, network: str = "host") -> None:
        cmd = ["docker", "run", "-d", *run_flags(image), "--network", network, *pre]
        if entry:
            cmd += ["--entrypoint", entry[0], image, *entry[1:]]
        else:
            cmd.append(image)
        self.id = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    def logs(self) -> str:
        return _logs(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["docker", "rm", "-f", self.id], capture_output=True)


@pytest.fixture
def restored(baked_image, docker_services, docker_compose_project_name):
    """The baked image started by pytest-docker (compose), as a user starts it; started again
    if a test that needed the port (port_free) took it down."""
    if not _ready():
        _compose(docker_compose_project_name, "up", "-d")
    docker_services.wait_until_responsive(timeout=600, pause=0.2, check=lambda: _ready())
    return docker_services


def _ready() -> bool:
    try:
        return requests.get(f"{URL}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def docker_compose_file(tmp_path_factory):
    """The compose file, plus on a GPU an override giving the service the GPU the way
    gpu_flags() does (NVIDIA's runtime, or device nodes and the driver's folder)."""
    flags = gpu_flags()
    if not flags:
        return str(COMPOSE_FILE)
    override = tmp_path_factory.mktemp("compose") / "gpu.yml"
    override.write_text(compose_gpu_override(flags))
    os.environ["FV_COMPOSE_GPU_FILE"] = str(override)
    return [str(COMPOSE_FILE), str(override)]


def compose_gpu_override(flags: list[str], service: str = "fvllm") -> str:
    """A compose override giving SERVICE the GPU as the `docker run` FLAGS do."""
    if flags == ["--gpus", "all"]:
        return (f"services:\n  {service}:\n    deploy:\n      resources:\n        reservations:\n"
                "          devices:\n            - driver: nvidia\n              count: all\n"
                "              capabilities: [gpu]\n")
    pairs = list(zip(flags[::2], flags[1::2]))
    lines = ["services:", f"  {service}:"]
    for key, section in (("--device", "devices"), ("-v", "volumes"), ("-e", "environment")):
        values = [v for k, v in pairs if k == key]
        if values:
            lines.append(f"    {section}:")
            lines += [f"      - {json.dumps(v)}" for v in values]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def docker_compose_command():
    return _compose_command()


@pytest.fixture(scope="session")
def docker_setup(baked_image):
    os.environ["FV_E2E_IMAGE"] = baked_image
    return ["up -d"]


def test_restored_server_answers_like_before_the_checkpoint(restored, manifest):
    _assert_same_as_bake(manifest)


def test_logs_show_the_restored_server_and_the_timeline(restored, manifest, docker_compose_project_name):
    out = _compose(docker_compose_project_name, "logs", "--no-color")
    _complete("log line please", 4, manifest["model"]["served_name"])
    assert "restored from checkpoint" in out
    if manifest.get("probe_together"):  # asked in one request, answered as at bake: no second asking
        assert "asking one at a time" not in out
    assert "fvboot serve timeline" in out and "restore done" in out and "ready" in out
    assert '"fvboot_timeline"' in out
    deadline = time.monotonic() + 15  # fvboot marks the first request when the server's event reaches it
    while True:
        out = _compose(docker_compose_project_name, "logs", "--no-color")
        if "first request served" in out or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "POST /v1/completions" in out  # uvicorn's access log: the restored process's own output
    assert "first request served" in out


def _thp_line() -> str | None:
    """What the patched CRIU logs about huge pages on this host; None where the kernel has no THP
    switch (a sandboxed kernel such as gVisor): then it says nothing and reads into small pages."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    answer = "yes" if "[madvise]" in path.read_text() else "no (THP mode is not madvise)"
    return f"thp: huge pages for the page reads: {answer}"


def _assert_thp_logged(log: str) -> None:
    line = _thp_line()
    if line is None:
        assert "thp:" not in log
    else:
        assert line in log


def test_memory_restore_page_size_follows_the_host(restored, docker_compose_project_name):
    """By default huge pages are used unless the VM reports free memory to its host (then the
    first restore after other work would be slower); fvboot says which, CRIU's log agrees."""
    from fvboot.criu import free_page_reporting

    log = _compose(docker_compose_project_name, "exec", "-T", "fvllm", "cat", f"{RUN_DIR}/criu-restore.log")
    out = _compose(docker_compose_project_name, "logs", "--no-color")
    if free_page_reporting():
        assert "memory is restored into 4 KiB pages: virtio-balloon free page reporting" in out
        assert "thp:" not in log
    else:
        _assert_thp_logged(log)


def _map_pages(log: str) -> tuple[int, int]:
    """(bytes mapped, bytes read) by criu-patches/0003, summed over the restored processes."""
    import re

    found = re.findall(r"map-pages: (\d+) bytes mapped from the page image, (\d+) read", log)
    return sum(int(m) for m, _ in found), sum(int(r) for _, r in found)


def test_memory_is_mapped_from_the_checkpoint(restored, docker_compose_project_name):
    """criu-patches/0003: the restored processes map most of their memory from the page images
    instead of reading it back, CPU and GPU images alike (the GPU's state resumes from it)."""
    log = _compose(docker_compose_project_name, "exec", "-T", "fvllm", "cat", f"{RUN_DIR}/criu-restore.log")
    mapped, read = _map_pages(log)
    assert mapped > read > 0, (mapped, read)
    if e2e_device() == "cpu":
        assert mapped > 2 * read, (mapped, read)
    out = _compose(docker_compose_project_name, "logs", "--no-color")
    assert "memory is read back whole" not in out


def test_criu_restores_with_the_kernel_facts_learned_beside_the_checks(restored, docker_compose_project_name):
    """criu-patches/0004: fvboot's `criu check` kept what the kernel can do in its tmpfs folder
    while the image was checked, and the restore loaded that instead of probing the kernel again."""
    log = _compose(docker_compose_project_name, "exec", "-T", "fvllm", "cat", f"{RUN_DIR}/criu-restore.log")
    assert "Loaded kdat cache from /dev/shm/.fvboot-criu/criu.kdat" in log, log[:3000]


def test_metrics_say_how_the_server_started(restored):
    """vLLM's /metrics, with fvboot's lines after vLLM's own: the path, the phases, the gate."""
    text = requests.get(f"{URL}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10).text
    assert "vllm:" in text  # vLLM's own metrics are still there
    assert 'fastvllm_start_path{path="restored",reason=""} 1' in text
    assert 'fastvllm_startup_seconds{phase="restore_done"}' in text
    assert 'fastvllm_startup_seconds{phase="ready"}' in text
    assert "fastvllm_gate_held_requests_total " in text


def _samples(text: str, name: str) -> list[float]:
    """The values of metric NAME's samples (any labels) in a Prometheus text answer."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]


def test_a_restored_servers_metrics_count_only_its_clients_requests(baked_image, port_free):
    """The checkpoint holds the API server's metrics as the bake left them (found by hand,
    2026-12-05: 19 requests and 282 prompt tokens served before any client had asked, and a
    process start time computed with the bake machine's boot time). Opening the gate zeroes the
    counts: none until a client asks, then exactly its request; the start time is this start's."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        started = subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", c.id], capture_output=True,
                                 text=True, check=True).stdout.strip()
        assert "restored from checkpoint" in c.logs(), c.logs()[-3000:]
        text = requests.get(f"{URL}/metrics", timeout=10).text
        assert sum(_samples(text, "vllm:request_success_total")) == 0, text[:3000]
        assert sum(_samples(text, "vllm:prompt_tokens_total")) == 0
        assert sum(_samples(text, "vllm:e2e_request_latency_seconds_count")) == 0
        from datetime import datetime
        t0 = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp()
        (start,) = _samples(text, "process_start_time_seconds")
        assert t0 - 5 <= start <= time.time(), (start, t0)
        name = requests.get(f"{URL}/v1/models", timeout=10).json()["data"][0]["id"]
        _complete("one client request", 3, name)
        text = requests.get(f"{URL}/metrics", timeout=10).text
        assert sum(_samples(text, "vllm:request_success_total")) == 1
        assert sum(_samples(text, "vllm:e2e_request_latency_seconds_count")) == 1


def test_fvbuild_bench_times_the_restore_and_draws_it(baked_image, tmp_path, port_free):
    """Warm and cold restores, the disk measured in the same run, the targets that apply. (The
    picture where matplotlib is installed: CPU CI; its panels are checked in test_bench.py.)"""
    import importlib.util

    gpu = []
    if e2e_device() == "cuda":
        gpu = ["--gpu-access", os.environ.get("FV_GPU_ACCESS", "auto")]
        if os.environ.get("FV_NVIDIA_DRIVER_DIR"):
            gpu += ["--nvidia-driver-dir", os.environ["FV_NVIDIA_DRIVER_DIR"]]
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    draw = importlib.util.find_spec("matplotlib") is not None
    r = fvbuild("bench", baked_image, "--runs", "2", "--no-normal", "--cold", "--settle", "0.5", "--json", str(out),
                *(["--plot", str(png)] if draw else []), *gpu)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["restore_s"]) == 2 and all(0 < t < 600 for t in res["restore_s"])
    assert res["settle_s"] == 0.5  # said with the figures it shaped
    assert 0 < res["warmup_s"] < 600  # one untimed restore first: "warm" means the page cache is
    assert len(res["cold_s"]) == 2 and res["disk_read_gbps"] > 0  # measured under Docker's data, same run
    assert [t["what"].split(":")[0] for t in res["targets"]] == (
        ["warm restore", "cold restore"] if e2e_device() == "cpu" else ["cold restore"])
    assert res["last_restore_timeline"][-1]["event"] in ("ready", "first request served")
    for path in ("restore", "cold"):  # the slowest run of each path says where its time went
        assert res[f"slowest_{path}_timeline"][-1]["event"] in ("ready", "first request served")
    assert r.stdout.splitlines()[1].startswith("restore from checkpoint (warm)")
    assert not draw or png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_weight_dump_in_an_image_layer_is_seen_in_the_page_cache(baked_image):
    """In a container the weight dump is an overlayfs file, whose own page cache cachestat(2)
    counts as empty whatever is cached: the GPU restore then never took its page-cache path.
    After a read, fvboot's residency check must say "all cached" there."""
    code = ("import os; from fvboot import residency\n"
            "p = '/fv/weights/rank0.fvw'; open(p, 'rb').read(); fd = os.open(p, os.O_RDONLY)\n"
            "m = residency.FileMapping(fd, os.fstat(fd).st_size)\n"
            "print(residency.cachestat_pages(m.libc, fd, m.size), m.resident())")
    # the restore's own flags: Docker's default seccomp profile would refuse cachestat, hiding it
    r = subprocess.run(["docker", "run", "--rm", *CAPS, "--entrypoint", "python3", baked_image, "-c", code],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counted, resident = r.stdout.split()
    assert resident == "True", r.stdout  # (counted: what cachestat says there, 0 on overlayfs)


def test_checkpoint_anatomy_accounts_for_every_byte_a_restore_reads(baked_image, tmp_path):
    """bench/checkpoint_anatomy.py (what the checkpoint holds, for the speed work) decodes CRIU's
    own images: the pages it puts in memory areas must be every page of pages-*.img."""
    out = tmp_path / "out"
    r = subprocess.run(["python3", str(REPO / "bench" / "checkpoint_anatomy.py"), "--image", baked_image],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(out)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "checkpoint_anatomy.json").read_text())
    sizes = subprocess.run(["docker", "run", "--rm", "--entrypoint", "sh", baked_image, "-c",
                            "stat -c %s /fv/checkpoint/criu/pages-*.img"],
                           capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert res["dumped_gb"] == round(sum(map(int, sizes)) / 1e9, 3) > 0
    # the processes' own pages and the shared memory segments CRIU stores apart (a GPU engine's)
    parts = [p["dumped_gb"] for p in res["processes"]] + [s["dumped_gb"] for s in res["shared_memory"]]
    assert sum(parts) == pytest.approx(res["dumped_gb"], abs=0.01)
    assert 0 <= res["zero_pages_gb"] < res["dumped_gb"]
    assert {a["kind"] for a in res["largest_areas"]} & {"heap", "anon-private"}
    assert all(isinstance(p["gpu_code"], dict) for p in res["processes"])  # cubins, fatbins found in memory
    # the bake left the zero pages of private anonymous memory out (zeropages.py): none is stored
    assert [res["zero_by_kind_gb"].get(k, 0) for k in ("anon-private", "heap", "stack")] == [0, 0, 0]


def test_the_bake_leaves_zero_pages_out_and_says_so(manifest):
    """The manifest says per process how much all-zero memory the checkpoint does not store (the
    CPU image's KV cache is 64 MiB of zeros; a GPU image's sleeping device memory, gigabytes)."""
    left_out = [p["zero_bytes_left_out"] for p in manifest["processes"]]
    assert all(n >= 0 and n % 4096 == 0 for n in left_out)
    assert sum(left_out) >= 32 << 20


def test_the_bake_says_what_the_engines_heap_holds(manifest):
    """For the checkpoint's size (its largest part is the engine's live heap): the trim records
    malloc's bytes in use and Python's objects by type, the engine's own among them."""
    [heap] = [w["heap"] for w in manifest["trim"]]
    assert "error" not in heap, heap
    assert heap["python"]["objects"] > 100_000 and heap["python"]["bytes"] > 10 << 20
    names = [t[0] for t in heap["python"]["top"]]
    assert "dict" in names and "str" in names  # containers, and what they hold the collector does not track
    assert all(isinstance(v, int) and v >= 0 for v in heap["malloc"].values()), heap["malloc"]


@pytest.mark.parametrize("mapped", ["1", "0"], ids=["mapped", "read"])
def test_zero_pages_left_out_come_back_as_zeros_in_parent_and_child(baked_image, mapped):
    """zeropages.py against the image's own CRIU, on a parent, a forked child and its forked
    grandchild whose memory has each case it must get right: zeros the child wrote over data it
    inherited (CRIU drops those pages with MADV_DONTNEED), data over zeros, fresh areas written
    with zeros, zeros written before the forks and left alone in all three. Dumped, rewritten,
    restored (memory mapped from the images or read): every process's memory digests the same."""
    res = _tree_script_in_the_image(baked_image, "zero_pages_tree.py", mapped)
    assert res["after"] == res["before"], res
    assert len(res["left_out"]) == 3 and all(n > 400 for n in res["left_out"].values()), res  # 1.6 MiB+ each
    said = "private memory mapped from the page images: " + ("yes" if mapped == "1" else "no")
    assert sum(said in line for line in res["restore_log"]) == 3, res["restore_log"]


def _tree_script_in_the_image(image: str, script: str, mapped: str) -> dict:
    """tests/e2e/SCRIPT `run` in IMAGE as its restore runs (CRIU's capabilities), with
    CRIU_RESTORE_MAP_PAGES=MAPPED: the JSON it prints last."""
    r = subprocess.run(["docker", "run", "--rm", *CAPS, "-e", f"CRIU_RESTORE_MAP_PAGES={mapped}",
                        "-v", f"{REPO / 'tests' / 'e2e' / script}:/fv-test/{script}:ro",
                        "--entrypoint", "python3", image, f"/fv-test/{script}", "run", "/tmp/fv-test"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("mapped", ["1", "0"])
def test_code_written_at_run_time_still_runs_after_a_restore(baked_image, mapped):
    """oneDNN's JIT kernels live in read-write-execute anonymous memory: a run of it mapped from
    the page images (criu-patches/0003) lost PROT_EXEC, and the first long prompt after a
    restore killed the worker (found by review, 2026-12-06: a 128x4096x4096 bf16 matmul's
    kernels, runs of 64-108 KiB). Such areas are read back, keeping their protection."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the test's code is x86-64")
    res = _tree_script_in_the_image(baked_image, "jit_code_tree.py", mapped)
    assert res["before"] == "42" and res["after"] == "42", res
    said = "private memory mapped from the page images: " + ("yes" if mapped == "1" else "no")
    assert any(said in line for line in res["restore_log"]), res["restore_log"]


def test_the_checkpoint_holds_no_socket_bound_to_the_bakes_own_address(manifest):
    """The served tree's sockets stay on loopback (launcher.LOOPBACK_SETTINGS), so the image
    restores in any network: left alone, vLLM's GPU worker connected its TCP store from the bake
    container's address, and a restore anywhere else fell back (H200, 2026-12-05)."""
    assert manifest["criu"]["addresses"] == [], manifest["criu"]


def test_a_container_of_another_network_restores_and_answers(baked_image, manifest):
    """Restored where the bake's network does not exist (`--network none`; a Kubernetes pod, a
    Docker network of its own): the bake ran in the host's network. On the CUDA image this fell
    back until the served tree's sockets were kept on loopback (H200, 2026-12-05)."""
    with Container(baked_image, network="none") as c:
        _assert_same_as_bake_inside(c.id, manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]


def test_sockets_on_the_bakes_own_address_are_read_from_criu_and_named_where_missing(baked_image, tmp_path):
    """The image's CRIU dumps a process with a listener and a connection on the host's address
    (a container of the host's network, as the GPU suite's bake was, and vLLM's TCP store in it);
    fvboot.sockets reads that address from the images; restored in a container of no network,
    CRIU fails to bind it, and what fvboot says of the failure and of the address names it."""
    tree = REPO / "tests" / "e2e" / "socket_addresses_tree.py"
    run = ["docker", "run", "--rm", *docker_run_flags(), "-v", f"{tree}:/fv-test/tree.py:ro",
           "-v", f"{tmp_path}:/fv-test/work", "--entrypoint", "python3"]
    r = subprocess.run([*run, "--network", "host", baked_image, "/fv-test/tree.py", "dump", "/fv-test/work"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dumped = json.loads(r.stdout.splitlines()[-1])
    if dumped["own"] is None:
        pytest.skip("this host's network has no address but loopback")
    assert dumped["recorded"] == [dumped["own"]], dumped
    r = subprocess.run([*run, "--network", "none", baked_image, "/fv-test/tree.py", "restore", "/fv-test/work"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    restored = json.loads(r.stdout.splitlines()[-1])
    assert restored["rc"] != 0 and restored["missing_here"] == [dumped["own"]], restored
    assert "bound to an address this container's network does not have" in restored["last_error"], restored


def test_a_checkpoint_bound_to_an_address_this_network_lacks_falls_back_at_once(baked_image, port_free):
    """A manifest recording an address the container lacks (an image baked with its sockets on
    the bake container's address): refused before CRIU runs, the address named."""
    _refused_before_restore(
        baked_image, "python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));"
        "m['criu']['addresses']=['203.0.113.77'];json.dump(m,open(p,'w'))\"",
        "the checkpoint's sockets are bound to 203.0.113.77, which this container's network does not have")


def test_dev_endpoints_are_refused_to_clients(restored):
    for method, path in [("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("POST", "/collective_rpc"),
                         ("GET", "/is_sleeping"), ("POST", "/fv/gate/close")]:
        r = requests.request(method, URL + path, json={"method": "fv_release_weights"}, timeout=10)
        assert r.status_code == 403, (path, r.status_code)
    assert requests.get(f"{URL}/health", timeout=5).status_code == 200


def test_the_same_image_restores_again_in_fresh_containers(baked_image, manifest, port_free):
    for _ in range(2):
        with Container(baked_image) as c:
            _wait_ready(container=c.id)
            _assert_same_as_bake(manifest)
            assert "restored from checkpoint" in c.logs()


# Run inside a container of its own network (docker exec): waits for the server's /health, then
# asks each prompt of argv[2] (JSON) as _complete() does and prints the answers as JSON.
_ASK_INSIDE = """
import json, sys, time, urllib.request
port, asks = int(sys.argv[1]), json.loads(sys.argv[2])
deadline = time.monotonic() + 600
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
out = []
for body in asks:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    c = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]
    out.append({"text": c["text"], "logprobs": c["logprobs"]["token_logprobs"]})
print(json.dumps(out))
"""


def _assert_same_as_bake_inside(container: str, manifest: dict) -> None:
    """_assert_same_as_bake, asked from inside CONTAINER (a network of its own)."""
    asks = [_completion_body(*ask) for ask in _probe_asks(manifest)]
    r = subprocess.run(["docker", "exec", container, "python3", "-c", _ASK_INSIDE,
                        str(manifest["vllm"]["port"]), json.dumps(asks)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:] + "\n" + _logs(container)[-4000:]
    _assert_same_as_bake(manifest, answers=json.loads(r.stdout))


def _host_dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_containers_given_the_hosts_ipc_restore_side_by_side_and_leave_its_dev_shm_alone(baked_image, manifest):
    """`docker run --ipc=host` (vLLM's docs suggest it) gives a container the host's /dev/shm.
    fvboot restores into a /dev/shm of its own (private_mounts): before it, a second container of
    the image put the bake's shared-memory files back over the first one's live queues and that
    server stopped, and each container left its files on the host. Each container here has a
    network of its own (both serve the baked port); on a GPU one at a time, as two servers of
    the image do not fit one GPU."""
    before = _host_dev_shm()
    side_by_side = e2e_device() == "cpu"
    with Container(baked_image, "--ipc=host", network="none") as first:
        _assert_same_as_bake_inside(first.id, manifest)
        assert _host_dev_shm() <= before, _host_dev_shm() - before
        if side_by_side:
            with Container(baked_image, "--ipc=host", network="none") as second:
                _assert_same_as_bake_inside(second.id, manifest)
                _assert_same_as_bake_inside(first.id, manifest)  # still serving, unharmed
                assert "restored from checkpoint" in second.logs()
                assert "checkpoint not used" not in second.logs()
        logs = first.logs()
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]
    assert "are the ones this container was given" not in logs
    assert _host_dev_shm() <= before, _host_dev_shm() - before


@pytest.mark.parametrize("flags", [("--read-only",), ("--read-only", "--tmpfs", "/tmp")], ids=["read-only", "tmpfs-tmp"])
def test_a_read_only_root_filesystem_restores_and_answers(baked_image, manifest, port_free, flags):
    """`docker run --read-only` (Kubernetes: readOnlyRootFilesystem), with and without a tmpfs on
    /tmp: fvboot's run folder, its logs and this start's admin token are in its own /dev/shm,
    which the restored server binds too. (A /tmp mounted after the bake is not the restored
    server's /tmp: the token there answered 403, 2026-12-05.)"""
    with Container(baked_image, *flags) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]


def test_a_read_only_root_filesystem_still_gets_its_normal_start(baked_image, manifest, port_free):
    """The normal start under --read-only (here asked for, FV_RESTORE=0): vLLM's compile takes
    lock files in its caches, which are read-only there; fvboot lays an overlay in memory over
    them for this start (its own mount namespace), so it starts and answers as baked."""
    with Container(baked_image, "--read-only", "-e", "FV_RESTORE=0") as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest, exact=e2e_device() == "cpu")
        logs = c.logs()
    assert "FV_RESTORE=0 asks for a normal start" in logs
    assert "are read-only here" in logs and "what this start writes there goes to memory" in logs, logs[-4000:]


def test_docker_restart_restores_the_same_container_again(baked_image, manifest, port_free):
    """`docker restart` (what a restart policy does) starts the same container again: its
    writable layer still holds the first start's /tmp (fvboot's run folder, the sockets vLLM
    bound there). The second start restores too, with the bake's answers."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        subprocess.run(["docker", "restart", "-t", "30", c.id], capture_output=True, check=True, timeout=120)
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert logs.count("restored from checkpoint") == 2, logs[-4000:]
    assert "checkpoint not used" not in logs, logs[-4000:]


def test_a_restored_server_whose_engine_dies_ends_the_container_with_a_failure(baked_image, manifest, port_free):
    """The engine process of a restored server killed (a crash, the OOM killer): vLLM's API
    server then shuts down cleanly and exits 0, and the container ended "Exited (0)" (found by
    hand, 2026-12-05), which a restart policy of `on-failure` takes for a job done. It ends with
    1 now, saying why."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        top = subprocess.run(["docker", "top", c.id, "-eo", "pid,comm"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[1:]
        engines = [int(pid) for pid, comm in (line.split(None, 1) for line in top) if comm.startswith("VLLM::EngineCor")]
        assert len(engines) == 1, top
        os.kill(engines[0], signal.SIGKILL)
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=180).stdout.strip()
        logs = c.logs()
    assert "restored from checkpoint" in logs, logs[-3000:]
    assert code == "1", logs[-3000:]
    assert "fvboot: the server ended while serving, unasked (its log above says why): exit 1" in logs, logs[-3000:]


def test_criu_reads_memory_into_huge_pages_when_asked(baked_image, manifest, port_free):
    """criu-patches/0002 at work in the image's CRIU (FV_RESTORE_THP=1), answers unchanged."""
    with Container(baked_image, "-e", "FV_RESTORE_THP=1") as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        r = subprocess.run(["docker", "exec", c.id, "cat", f"{RUN_DIR}/criu-restore.log"],
                           capture_output=True, text=True)
        _assert_thp_logged(r.stdout)


def test_memory_read_back_whole_when_mapping_is_turned_off_answers_the_same(baked_image, manifest, port_free):
    """FV_RESTORE_MAP_PAGES=0: every page read back, as stock CRIU does; the same answers."""
    with Container(baked_image, "-e", "FV_RESTORE_MAP_PAGES=0") as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        log = subprocess.run(["docker", "exec", c.id, "cat", f"{RUN_DIR}/criu-restore.log"],
                             capture_output=True, text=True).stdout
    assert "map-pages: private memory mapped from the page images: no" in log
    assert _map_pages(log) == (0, 0)


@pytest.mark.parametrize("check", ["overlap", "inline"])
def test_the_weights_checked_either_way_answer_the_same(baked_image, manifest, port_free, check):
    """FV_WEIGHT_CHECK=overlap (default): the load returns with the bytes in place, the checksums
    finish beside the KV wake and the probe, and the gate waits for them; inline: every weight is
    checked before the load returns. Restored either way, with the same answers. (The worker's own
    load: on a GPU, the default stages the weights instead, tests/e2e_gpu.)"""
    with Container(baked_image, "-e", f"FV_WEIGHT_CHECK={check}", "-e", "FV_WEIGHT_STAGING=off") as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs
    checked = [l for l in logs.splitlines() if l.startswith("fvboot: weights checked:")]
    if check == "overlap":
        assert len(checked) == 1 and "'checks': 1" in checked[0], checked
    else:
        assert not checked, checked  # nothing was left running for the gate to wait for


def test_requests_sent_during_restore_are_all_answered_correctly(baked_image, manifest, port_free):
    """64 clients start asking while the container restores: every one gets the baked answer."""
    name = manifest["model"]["served_name"]
    prompts = [p["prompt"] for p in manifest["probe"]] * 22
    prompts = prompts[:64]
    tokens = {p["prompt"]: len(p["logprobs"]) or 12 for p in manifest["probe"]}
    results, errors = [None] * len(prompts), []

    def client(i):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                results[i] = _complete(prompts[i], tokens[prompts[i]], name)
                return
            except requests.ConnectionError:
                time.sleep(0.02)  # nothing listens yet: the restore has not created the socket
            except requests.HTTPError as e:
                errors.append(str(e))
                return
    with ThreadPoolExecutor(len(prompts)) as pool:
        with Container(baked_image) as c:
            futures = [pool.submit(client, i) for i in range(len(prompts))]
            for f in futures:
                f.result()
            logs = c.logs()
    assert not errors, errors
    assert "restored from checkpoint" in logs
    baked = {p["prompt"]: p["text"] for p in manifest["probe"]}
    for prompt, got in zip(prompts, results):
        assert got is not None and got["text"] == baked[prompt]


def _host_leftovers() -> dict:
    """What restores could leave on the host: containers, volumes, dangling images."""
    def count(*cmd: str) -> int:
        out = subprocess.run(["docker", *cmd, "-q"], capture_output=True, text=True, check=True).stdout
        return len(out.split())
    return {"containers": count("ps", "-a"), "volumes": count("volume", "ls"),
            "dangling images": count("images", "-f", "dangling=true")}


def test_twenty_restores_in_a_row_answer_the_same_and_leave_nothing(baked_image, manifest, port_free):
    before = _host_leftovers()
    for i in range(20):
        with Container(baked_image) as c:
            _wait_ready(container=c.id, timeout=300)
            _assert_same_as_bake(manifest)
            assert "restored from checkpoint" in c.logs(), f"restore {i + 1}"
    assert _host_leftovers() == before


def _fallback(baked_image: str, manifest: dict, shell: str, reason: str) -> str:
    """The container started after SHELL fell back with REASON and served the bake's answers;
    its logs."""
    with Container(baked_image, entry=["sh", "-c", shell + " && exec fvboot"]) as c:
        _wait_ready(container=c.id)
        # shown only when the test fails: what served, and which processes were left
        print(c.logs(), subprocess.run(["docker", "exec", c.id, "ps", "-eo", "pid,ppid,stat,etimes,args"],
                                       capture_output=True, text=True).stdout)
        _assert_same_as_bake(manifest, exact=e2e_device() == "cpu")
        metrics = requests.get(f"{URL}/metrics", timeout=10).text
        logs = c.logs()
    assert 'fastvllm_start_path{path="normal",reason="' in metrics and reason.split('"')[0][:40] in metrics
    line = _fallback_line(logs)
    assert reason in line, line
    assert "starting vLLM normally" in line
    return logs


def _refused_before_restore(baked_image: str, shell: str, reason: str) -> None:
    """The container started after SHELL refused its checkpoint with REASON before CRIU ran:
    nothing restored to clean up, the normal start begun. What follows is the normal start
    every fallback makes, whose answers the tests around (FV_RESTORE=0, the faults found after
    the restore began) compare with the bake's; waiting for it here again would cost a minute
    of CI per fault and test nothing more."""
    with Container(baked_image, entry=["sh", "-c", shell + " && exec fvboot"]) as c:
        logs = _wait_log(c.id, "checkpoint not used", 120)
    line = _fallback_line(logs)
    assert reason in line and "starting vLLM normally" in line, line
    assert "the failed restore left" not in logs and "restored from checkpoint" not in logs, logs[-3000:]


def _check(baked_image: str, *flags: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`docker run --rm ... IMAGE check ARGS`, as an operator tries a node before a rollout."""
    return subprocess.run(["docker", "run", "--rm", *run_flags(baked_image), "--network", "host",
                           *flags, baked_image, "check", *args], capture_output=True, text=True, timeout=300)


def test_check_says_whether_a_start_here_would_restore_and_why_not(baked_image, manifest, port_free):
    """`IMAGE check`: what a start checks before it restores, and nothing restored. It ran only
    `criu check` before ("Looks good." where the checkpoint would not be used)."""
    r = _check(baked_image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fvboot check: `criu check`: Looks good." in r.stdout
    assert f"fvboot check: the checkpoint would be restored here (this container: {e2e_device()}" in r.stdout, r.stdout
    r = _check(baked_image, args=("--max-model-len", "256"))
    assert r.returncode == 1 and "the checkpoint would not be used here: arguments ['--max-model-len', '256'] were" \
        " given" in r.stdout and "a start would serve vLLM started normally" in r.stdout, r.stdout + r.stderr
    r = _check(baked_image, "-e", "FV_WEIGHT_CHECK=bogus")
    assert r.returncode == 1 and "a start would end at once: FV_WEIGHT_CHECK='bogus'" in r.stdout, r.stdout + r.stderr
    r = _check(baked_image, "--user", "1000:1000")
    assert r.returncode == 1 and "the checkpoint would not be used here: fvboot runs as uid 1000 (docker run" \
        " --user?), and a restore needs root" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


def test_a_check_inside_a_serving_container_says_the_port_is_its_own_servers(baked_image, manifest, port_free):
    """`docker exec C fvboot check` in a serving container (tried as an operator would, 2026-12-06):
    it said the checkpoint would not be used, the port "taken ... by a process of the host". It
    now says the container serves already and checks the rest; the server answers on."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        r = subprocess.run(["docker", "exec", c.id, "fvboot", "check"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fvboot check: this container serves already (its server's init is pid " in r.stdout, r.stdout
        assert "by a process of the host" not in r.stdout
        assert f"the checkpoint would be restored here (this container: {e2e_device()}" in r.stdout, r.stdout
        _assert_same_as_bake(manifest)


def test_the_images_environment_reaches_the_bake_which_records_vllms_settings(manifest):
    """`fvbuild image --env` (the suite's image has conftest.IMAGE_ENV): the bake ran with it and
    recorded vLLM's settings, which every restore compares with its own (restored here: the
    image's environment is the same at every start)."""
    name, value = IMAGE_ENV.split("=", 1)
    assert manifest["vllm"]["env"].get(name) == value, manifest["vllm"].get("env")
    assert "VLLM_SERVER_DEV_MODE" not in manifest["vllm"]["env"]


def test_a_vllm_setting_given_at_run_time_gets_a_normal_start_that_has_it(baked_image, manifest, port_free):
    """`docker run -e VLLM_LOGGING_LEVEL=DEBUG` on an image baked with INFO: a restored server
    would keep INFO, so the checkpoint is not used, the log says which setting and how to bake
    it, and the normal start runs with DEBUG (vLLM's debug lines in its log)."""
    name, value = IMAGE_ENV.split("=", 1)
    logs = _fallback(baked_image, manifest, f"export {name}=DEBUG",
                     f"vLLM's settings differ from the bake's: {name}=DEBUG (baked: {value}); a restored server keeps"
                     " the bake's environment (bake them into the image: fvbuild image --env NAME=VALUE)")
    assert re.search(r"^(\(\w+ pid=\d+\) )?DEBUG \d\d-\d\d ", logs, re.M), logs[-3000:]


def _restored_logs(baked_image: str, manifest: dict, *flags: str, **container: Any) -> str:
    """The logs of a container of the image (Container's FLAGS and keywords) that restored and
    answered as at bake."""
    with Container(baked_image, *flags, **container) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs, logs[-3000:]
    return logs


@pytest.mark.parametrize("name,value", [("OMP_NUM_THREADS", "1"), ("LD_PRELOAD", "libgcc_s.so.1")])
def test_a_thread_setting_given_at_run_time_is_said_and_the_restore_goes_on(baked_image, manifest, port_free,
                                                                            name, value):
    """`docker run -e OMP_NUM_THREADS=1` (tried as an operator would, 2026-12-05: ignored without a
    word; it acts only when vLLM's processes start), or `-e LD_PRELOAD=...` (vLLM's CPU docs have
    operators preload tcmalloc; 2026-12-06: ignored without a word, and fvboot and CRIU run under
    it). Said with the bake's value; the restore goes on (a platform may set it on every
    container)."""
    if manifest["vllm"].get("library_env") is None:
        pytest.skip("this image was baked by an fvboot that did not record the libraries' settings")
    baked = manifest["vllm"]["library_env"].get(name, "unset")
    if baked == value:
        pytest.skip(f"this image was baked with {name}={value}")
    logs = _restored_logs(baked_image, manifest, "-e", f"{name}={value}")
    assert (f"{name}={value} (baked: {baked}): a restored server keeps the bake's (they act when its processes"
            " start); FV_RESTORE=0 gives a normal start that has them") in logs, logs[-3000:]


def test_fewer_cpus_than_the_bakes_are_said_and_the_restore_answers_the_same(baked_image, manifest, port_free):
    """`docker run --cpuset-cpus` (a node's CPU manager, a smaller machine): vLLM's CPU engine
    sized its threads and bound them at the bake, which a restore keeps. Said with both counts;
    the restore goes on with the bake's answers. A CPU image's concern (a GPU engine's work is
    the GPU's); a machine of one CPU cannot give fewer."""
    if e2e_device() != "cpu":
        pytest.skip("a GPU engine does its work on the GPU: the CPUs only feed it")
    baked = manifest["device"].get("cpus")
    if not baked or baked < 2:
        pytest.skip("the image records no CPU count, or was baked with one CPU")
    logs = _restored_logs(baked_image, manifest, "--cpuset-cpus", str(sorted(os.sched_getaffinity(0))[-1]))
    assert (f"this container may run on 1 CPU, the bake's on {baked}: the restored engine keeps the threads vLLM"
            " gave it at the bake (more of its threads than this container has CPUs") in logs, logs[-3000:]


def test_corrupt_checkpoint_file_falls_back(baked_image, manifest, port_free):
    victim = next(f["path"] for f in manifest["files"] if f["path"].endswith("pstree.img"))
    _refused_before_restore(baked_image, f"printf 'garbage' | dd of=/fv/{victim} bs=1 seek=4 conv=notrunc 2>/dev/null",
                            f"{victim} is corrupt")


def test_truncated_page_image_falls_back(baked_image, manifest, port_free):
    """The largest memory image (what a cut-off copy or pull would damage first) loses its last
    page: the restore refuses it before CRIU reads a byte."""
    pages = [f for f in manifest["files"] if "/pages-" in f["path"]]
    victim = max(pages, key=lambda f: f["size"])["path"]
    _refused_before_restore(baked_image, f"truncate -s -4096 /fv/{victim}",
                            f"{victim} has {max(f['size'] for f in pages) - 4096} bytes, expected")


def test_one_flipped_bit_in_a_memory_image_falls_back(baked_image, manifest, port_free):
    """One bit of the largest memory image changed (a bad disk, a damaged layer): CRIU restores it
    without complaint, but the piece digests checked while it is read keep the gate shut, and the
    same server starts normally and answers right."""
    pages = [f for f in manifest["files"] if "/pages-" in f["path"]]
    victim = max(pages, key=lambda f: f["size"])
    offset = victim["size"] // 2 + 123
    flip = (f"python3 -c \"f=open('/fv/{victim['path']}','r+b');f.seek({offset});b=f.read(1);f.seek({offset});"
            f"f.write(bytes([b[0]^1]))\"")
    piece = offset // (8 << 20) * (8 << 20)
    _fallback(baked_image, manifest, flip, f"{victim['path']} is corrupt: bytes {piece}-")


def test_a_full_disk_at_restore_gives_no_wrong_answer_and_no_hang(baked_image, manifest, port_free):
    """/dev/shm, where fvboot and CRIU write their run files (the token, CRIU's log) and vLLM its
    queues, has 16 KiB (fvboot's own /dev/shm is as large as the one it is given): the restore
    cannot finish. Either the normal start that follows serves the baked answers, or the
    container ends, bounded, with one fvboot line saying what failed."""
    with Container(baked_image, "--shm-size", "16k") as c:
        deadline = time.monotonic() + 600
        while not _ready() and time.monotonic() < deadline:
            if subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", c.id],
                              capture_output=True, text=True).stdout.strip() != "true":
                break
            time.sleep(0.5)
        serving = _ready()
        if serving:
            _assert_same_as_bake(manifest, exact=False)
        logs = c.logs()
        code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", c.id],
                              capture_output=True, text=True).stdout.strip()
    assert "restored from checkpoint" not in logs, logs[-3000:]
    assert "checkpoint not used" in logs, logs[-3000:]
    if not serving:
        fv = [line for line in logs.splitlines() if line.startswith("fvboot: ")]
        assert code not in ("", "0") and fv, (code, logs[-3000:])
        assert "No space left" in logs or "no space" in logs.lower(), fv[-3:]


@pytest.mark.parametrize("other", ["http", "tcp"])
def test_a_port_another_process_holds_ends_the_start_at_once_with_the_reason(baked_image, manifest, port_free, other):
    """With the host's network another process already holds the baked port: an HTTP server that
    answers /health, or a listener that speaks no HTTP at all (found by hand, 2026-12-05: the
    restore failed on CRIU's bind, then a normal start spent its imports only for vLLM to fail on
    the same bind with a traceback). Neither the restore nor a normal start can serve there: the
    container ends before either runs, naming the port and how to find the process; nothing but
    the port is touched (another server must never be taken for ours: no request reaches it)."""
    import http.server
    import socket
    import threading

    probed = []

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            probed.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    port = manifest["vllm"]["port"]
    if other == "http":
        holder = http.server.ThreadingHTTPServer(("0.0.0.0", port), Other)
        threading.Thread(target=holder.serve_forever, daemon=True).start()
        close = lambda: (holder.shutdown(), holder.server_close())  # noqa: E731
    else:
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", port))
        holder.listen(8)
        close = holder.close
    try:
        with Container(baked_image) as c:
            code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=300).stdout.strip()
            logs = c.logs()
    finally:
        close()
    assert code not in ("", "0"), logs[-3000:]
    assert f"checkpoint not used: port {port} is taken in this container's network" in logs, logs[-3000:]
    assert f"ss -ltnp 'sport = :{port}'" in logs and f"docker run -p HOST_PORT:{port}" in logs, logs[-3000:]
    assert "starting vLLM with" not in logs and "criu restore" not in logs, logs[-3000:]  # neither start ran
    assert "restored from checkpoint" not in logs and "Traceback" not in logs, logs[-3000:]
    assert probed == [], "no request may reach another server on the port"


def test_two_containers_started_at_once_on_the_hosts_network_never_answer_wrong(baked_image, manifest, port_free):
    """`docker run` twice at once with the host's network (compose's `scale` with `network_mode:
    host`; tried by hand, 2026-12-06): both pass the port's check before either restores, and
    both restored servers listen on the port (vLLM's socket has SO_REUSEPORT), the kernel handing
    each connection to either. Each start ends serving what the bake served or exits 1 saying why
    (a server not its own refused its calls, the port is taken); whatever serves answers as baked."""
    port = manifest["vllm"]["port"]
    with ThreadPoolExecutor(2) as pool:
        starts = list(pool.map(lambda _: Container(baked_image), range(2)))
    try:
        deadline = time.monotonic() + 600
        states: dict[str, str] = {}
        while len(states) < 2 and time.monotonic() < deadline:
            for c in starts:
                status = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", c.id],
                                        capture_output=True, text=True).stdout.split()
                if status[0] == "exited":
                    states[c.id] = f"exited {status[1]}"
                elif '"event": "ready"' in c.logs():
                    states[c.id] = "serving"
            time.sleep(0.5)
        assert len(states) == 2, {c.id: c.logs()[-2000:] for c in starts}
        for c in starts:
            logs = c.logs()
            if states[c.id] != "serving":
                assert states[c.id] == "exited 1", (states[c.id], logs[-3000:])
                assert f"port {port} is taken" in logs, logs[-3000:]
                said = _fallback_line(logs)
                assert "answered 403" not in said, said  # the other server's refusal is named as such
                assert "Traceback" not in logs, logs[-3000:]
        if "serving" in states.values():
            for _ in range(3):  # each connection may reach either server
                _assert_same_as_bake(manifest)
    finally:
        for c in starts:
            c.__exit__()


def test_manifest_from_another_device_falls_back(baked_image, port_free):
    other = "cuda" if e2e_device() == "cpu" else "cpu"
    _refused_before_restore(
        baked_image, f"python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));m['device']['kind']='{other}';"
        f"json.dump(m,open(p,'w'))\"", f"baked on {other}")


def test_a_cpu_without_an_extension_of_the_bakes_falls_back_at_once(baked_image, manifest, port_free):
    """The bake's CPU had an extension this one lacks (here: one no CPU has): refused before
    CRIU runs, with what is missing; the restored code would have used the bake's kernels."""
    assert manifest["device"]["cpu_isa"], "the bake records its CPU's extensions"
    _refused_before_restore(
        baked_image, "python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));m['device']['cpu_isa'].append('amx_none');"
        "json.dump(m,open(p,'w'))\"", "baked on a CPU with amx_none, which this CPU lacks")


def test_missing_weight_dump_falls_back(baked_image, port_free):
    _refused_before_restore(baked_image, "rm -f /fv/weights/rank0.fvw", "weights/rank0.fvw is missing")


def test_the_bake_records_the_probe_asked_in_one_request(manifest):
    """The probe's prompts asked together (one batch, a third of the steps of asking them one
    after another) give the same texts as asked alone; on the CPU image the same logprobs too, so
    the bake records them (a GPU's batch may round otherwise: only the texts are held)."""
    together = manifest.get("probe_together")
    if e2e_device() == "cpu":
        assert together == manifest["probe"]
    elif together is not None:
        assert [p["text"] for p in together] == [p["text"] for p in manifest["probe"]]


def _edit_manifest(python: str) -> str:
    return f"python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));{python};json.dump(m,open(p,'w'))\""


def test_answers_together_that_differ_send_the_probe_one_prompt_at_a_time(baked_image, manifest, port_free):
    """The recorded answers to the prompts asked together differ from the server's (as a batch
    that formed otherwise can round otherwise on a GPU): the prompts go one at a time, their
    answers are the bake's, and the checkpoint serves."""
    edit = _edit_manifest("m['probe_together']=[dict(a,text=a['text']+' (edited)') for a in m['probe']]")
    logs = _restored_logs(baked_image, manifest, entry=["sh", "-c", edit + " && exec fvboot"])
    first = manifest["probe"][0]["prompt"]
    assert f"prompts asked in one request answered otherwise (probe {first!r} answered" in logs
    assert "asking one at a time" in logs


def test_answers_that_differ_asked_either_way_fall_back(baked_image, manifest, port_free):
    edit = _edit_manifest("m['probe']=[dict(a,text=a['text']+' (edited)') for a in m['probe']];"
                          "m['probe_together']=m['probe']")
    _fallback(baked_image, manifest, edit,
              f"restored server gives other answers than the baked one: probe {manifest['probe'][0]['prompt']!r} answered")

def test_canary_token_is_nowhere_in_the_image(baked_image):
    """HF_TOKEN was set while building and baking: no layer, config or checkpoint page holds it.
    `docker save` writes uncompressed layer tars, so the canary would appear in its byte stream;
    the stream is scanned as it comes (a GPU image is ~30 GB: no room for a copy)."""
    needle = CANARY.encode()
    proc = subprocess.Popen(["docker", "save", baked_image], stdout=subprocess.PIPE)
    found, tail, scanned = [], b"", 0
    while True:
        chunk = proc.stdout.read(8 << 20)
        if not chunk:
            break
        if needle in tail + chunk:
            found.append(scanned)
        tail, scanned = chunk[-len(needle):], scanned + len(chunk)
    assert proc.wait() == 0 and scanned > 100 << 20, "docker save failed or was cut short"
    assert not found, f"canary at stream offsets near {found}"
    cfg = subprocess.run(["docker", "inspect", baked_image], capture_output=True, text=True).stdout
    assert CANARY not in cfg


def test_normal_start_on_request_keeps_the_baked_arguments(baked_image, manifest, port_free):
    """FV_RESTORE=0 (an operator's escape hatch, and the benchmark's cold start) serves the same
    model name, arguments and answers as the checkpoint."""
    _fallback(baked_image, manifest, "export FV_RESTORE=0", "FV_RESTORE=0 asks for a normal start")


def _unprobed_answers(manifest: dict) -> list:
    """Answers to requests the bake's probe never makes, asked one at a time: the bake's own
    warm-up prompts (their prefixes were in the engine's cache before it slept), a long prompt
    with every prompt token's logprob (the whole prefill, every weight on its way), a chat
    request (the model's chat template) and, on a CPU, seeded sampling with two choices and
    unseeded sampling (the engine's generator as a start leaves it)."""
    from fvboot.bake import WARMUP_PROMPT

    model = manifest["model"]["served_name"]
    asks = [("/v1/completions", {"prompt": WARMUP_PROMPT.format(i=i) * (1 + i % 3), "max_tokens": 8 + 8 * (i % 4),
                                 "temperature": 0.0, "logprobs": 1}) for i in range(4)]
    asks.append(("/v1/completions", {"prompt": " ".join(f"word{i} is followed by" for i in range(30)),  # ~250 tokens: within 512
                                      "max_tokens": 6, "temperature": 0.0, "logprobs": 1, "echo": True}))
    asks.append(("/v1/chat/completions", {"messages": [{"role": "system", "content": "Answer briefly."},
                                                       {"role": "user", "content": "Name three rivers."}],
                                          "max_tokens": 12, "temperature": 0.0, "logprobs": True}))
    if e2e_device() == "cpu":  # a GPU normal start's own kernels may turn a sampled token: CPU only
        asks.append(("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.8,
                                         "seed": 7, "n": 2, "logprobs": 1}))
        # unseeded: the engine's own generator, which vLLM seeds at its start (--seed, 0 by default),
        # so two normal starts sample alike; the checkpoint's must be where a start leaves it
        asks.append(("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0,
                                         "logprobs": 1}))
    answers = []
    for route, body in asks:
        r = requests.post(f"{URL}{route}", json={"model": model, **body}, timeout=600)
        assert r.status_code == 200, (route, body, r.text[:2000])
        for c in r.json()["choices"]:
            if "message" in c:
                text = c["message"]["content"]
                logprobs = [t["logprob"] for t in c["logprobs"]["content"]]
            else:
                text = c["text"]
                logprobs = [x for x in c["logprobs"]["token_logprobs"] if x is not None]
            answers.append({"route": route, "text": text, "logprobs": [round(x, 4) for x in logprobs]})
    return answers


def test_prompts_the_probe_never_asks_are_answered_as_a_normal_start_answers_them(baked_image, manifest, port_free):
    """The probe checks the restored server with the bake's own prompts, so it cannot see what
    only other requests reach (a stale prefix cache, a damaged page only a long prompt reads, the
    chat template, the sampler's state). A restored server and a normal start of the same image
    are asked the same other requests: on a CPU the answers are identical, to the logprob; on a
    GPU the text is, and the logprobs are within a normal start's own tolerance."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        restored = _unprobed_answers(manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs, logs[-3000:]
    with Container(baked_image, "-e", "FV_RESTORE=0") as c:
        _wait_ready(container=c.id)
        normal = _unprobed_answers(manifest)
        logs = c.logs()
    assert "FV_RESTORE=0 asks for a normal start" in _fallback_line(logs)
    assert len(restored) == len(normal) >= (8 if e2e_device() == "cpu" else 6)  # sampling asked on a CPU only
    for got, want in zip(restored, normal):
        assert got["text"] == want["text"], (got, want)
        assert len(got["logprobs"]) == len(want["logprobs"]) > 0, (got, want)
        if e2e_device() == "cpu":
            assert got["logprobs"] == want["logprobs"], (got, want)
        else:
            worst = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
            assert worst <= NORMAL_START_LOGPROB_TOL, (worst, got, want)


def test_a_container_run_as_another_user_starts_normally_and_answers_the_same(baked_image, manifest, port_free):
    """docker run --user (a cluster's rule against root; tried as an operator would: the normal
    start died on the model's weights, which only root could read, then on the compile caches):
    the restore, which needs root, is refused by name before CRIU runs; the normal start reads
    the model, gets a copy of the baked caches it may write, and serves the bake's answers."""
    with Container(baked_image, "--user", "1000:1000") as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest, exact=e2e_device() == "cpu")
        logs = c.logs()
    line = _fallback_line(logs)
    assert "fvboot runs as uid 1000 (docker run --user?), and a restore needs root" in line, line
    assert "starting vLLM normally" in line and "criu restore" not in logs, logs[-3000:]
    assert "(fvboot runs as uid 1000, not root: docker run --user?): this start uses a copy of them in /tmp/fvboot-cache-" in logs, logs[-3000:]


FLIP_EMBEDDING_BYTE = (  # the embedding's last row: a token no probe prompt produces
    "python3 -c \"from fvboot import weights as wf; p='/fv/weights/rank0.fvw'; "
    "e=next(e for k, e in wf.read_index(p).entries.items() if 'embed_tokens' in k); "
    "f=open(p, 'r+b'); f.seek(e.offset + e.nbytes - 2); b=f.read(1); f.seek(e.offset + e.nbytes - 2); "
    "f.write(bytes([b[0] ^ 0x10])); f.close()\"")


def test_a_model_folder_changed_after_the_bake_gets_the_normal_start(baked_image, manifest, port_free):
    """Tried as an operator would (2026-12-05): an image built FROM the baked one with another chat
    template (or tokenizer, or fine-tuned weights), or a mount over /fv/model, restored the bake's
    server, which has the baked model in memory, without a word. The bake lists the model folder
    in the manifest; a changed or added file gets the normal start, which reads the folder as it is."""
    if not any(f["path"].startswith("model/") for f in manifest["files"]):
        pytest.skip("this image was baked by an fvboot that did not list the model folder")
    _fallback(baked_image, manifest, "echo '{# changed after the bake #}' >> /fv/model/chat_template.jinja",
              "the model folder is not the one the server was baked with: model/chat_template.jinja has")


def test_a_python_package_installed_after_the_bake_gets_the_normal_start(baked_image, manifest, port_free):
    """Tried as an operator would (2026-12-06): an image built FROM the baked one that installs a
    package (`pip install` of a vLLM plugin, which vLLM loads only when it starts, or of a fixed
    release) restored the bake's server, which runs the code it imported then, without a word.
    The bake records each site folder's package entries; one added gets the normal start, which
    imports the packages as they are."""
    if not manifest.get("packages"):
        pytest.skip("this image was baked by an fvboot that did not record the Python packages")
    site = next(iter(manifest["packages"]))
    probe = f"{site}/fv_e2e_probe-1.0.dist-info"
    _fallback(baked_image, manifest, f"mkdir {probe} && printf 'Metadata-Version: 2.1\\nName: fv-e2e-probe\\n"
              f"Version: 1.0\\n' > {probe}/METADATA",
              f"the Python packages are not the ones the server was baked with: in {site}, fv_e2e_probe-1.0.dist-info"
              " was not there at the bake (an image built FROM this one?); the normal start imports them as they are now")


@pytest.mark.parametrize("check", ["inline", "overlap"])
def test_one_damaged_weight_byte_the_probe_cannot_see_falls_back(baked_image, manifest, port_free, check):
    """A byte the probe prompts never reach (found by an operator: it was served as a wrong
    answer). Every weight is checked against the dump's checksums beside the KV wake and the
    probe (FV_WEIGHT_CHECK=overlap, the default), or while it loads (inline): the gate stays shut
    either way. (The worker's own load: on a GPU the default stages the weights instead, and
    tests/e2e_gpu damages them that way too.)"""
    _fallback(baked_image, manifest, f"{FLIP_EMBEDDING_BYTE} && export FV_WEIGHT_CHECK={check} FV_WEIGHT_STAGING=off",
              "checksum mismatch")


class _OtherEngine:
    """A second Docker engine on this host, with a data root of its own: what another node's
    engine is to an image pulled there (its layers unpacked anew: other files, inodes and overlay
    paths than the engine that baked it). Stopped and its files removed on exit."""

    def __init__(self) -> None:
        import shutil
        import tempfile

        dockerd = shutil.which("dockerd")
        if dockerd is None:
            pytest.skip("no dockerd on PATH to start a second Docker engine with")
        self.root = Path(tempfile.mkdtemp(prefix="fv-e2e-engine-", dir="/var/tmp"))
        self.run = Path(tempfile.mkdtemp(prefix="fv-e2e-", dir="/run"))  # short: socket paths are limited
        self.host = f"unix://{self.run}/docker.sock"
        self.log = open(self.root / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.run / "exec"),
             "--pidfile", str(self.run / "docker.pid"), "-H", self.host, "--bridge=none", "--iptables=false",
             "--ip-masq=false"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.docker("info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"the second Docker engine did not start:\n{(self.root / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", self.host, *args], capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        # dockerd leaves its network namespace's bind mount (exec-root/netns/default) behind
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith(f"{self.run}/") or point.startswith(f"{self.root}/"):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)


@pytest.mark.skipif(e2e_device() == "cuda", reason="a second copy of the CUDA image (its base is the GPU"
                    " machine's own vLLM install) costs that machine's 64 GB disk and minutes of device time")
def test_the_image_shipped_to_another_docker_engine_restores_and_answers_as_baked(baked_image, manifest, port_free):
    """What a registry push and a pull on another node do to the image: its layers as a tar
    stream (`docker save`), unpacked by another engine, cold (nothing of it in the page cache:
    new files). Restored there and answering as baked; the product's promise is an artifact,
    not a snapshot tied to the engine that baked it."""
    engine = _OtherEngine()
    try:
        save = subprocess.Popen(["docker", "save", baked_image], stdout=subprocess.PIPE)
        loaded = subprocess.run(["docker", "-H", engine.host, "load"], stdin=save.stdout, capture_output=True,
                                text=True, timeout=900)
        save.stdout.close()
        assert save.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr[-2000:]
        cid = engine.docker("run", "-d", *run_flags(baked_image), "--network", "host", baked_image).stdout.strip()
        deadline = time.monotonic() + 900
        while not _ready() and time.monotonic() < deadline:
            assert engine.docker("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() == "true", \
                engine.docker("logs", cid, check=False).stderr[-4000:]
            time.sleep(0.2)
        logs = (lambda r: r.stdout + r.stderr)(engine.docker("logs", cid, check=False))
        assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]
        _assert_same_as_bake(manifest)
    finally:
        engine.docker("rm", "-f", *engine.docker("ps", "-aq", check=False).stdout.split(), check=False)
        engine.close()


def _podman_ulimits() -> list[str]:
    """Podman's own defaults (nofile 1048576, nproc 32768), capped at what this process may set:
    without CAP_SYS_RESOURCE (this project's CI machines) runc cannot raise them."""
    import resource

    out = []
    for name, kind, default in (("nofile", resource.RLIMIT_NOFILE, 1048576), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(kind)[1]
        n = default if hard == resource.RLIM_INFINITY else min(default, hard)
        out += ["--ulimit", f"{name}={n}:{n}"]
    return out


@pytest.mark.skipif(e2e_device() == "cuda", reason="a second copy of the CUDA image costs the GPU machine's 64 GB"
                    " disk, and its setup brings no Podman")
def test_the_image_restores_under_podman_and_answers_as_baked(baked_image, manifest, port_free):
    """The image Docker baked, run by Podman (its storage library and defaults are CRI-O's, the
    engine of OpenShift and other Kubernetes distributions): the container's root directory is
    0555 there, 0755 under Docker, and CRIU refused the tree ("File . has bad mode 040555 (expect
    040755)", tried by hand, 2026-12-05); its default capabilities lack NET_RAW, MKNOD and
    AUDIT_WRITE, which the served tree gives up. Restored, answering as baked."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("no podman on PATH (.ci/setup-cpu-host.sh installs it)")
    name = f"fv-e2e-podman-{os.getpid()}"
    save = subprocess.Popen(["docker", "save", baked_image], stdout=subprocess.PIPE)
    loaded = subprocess.run([podman, "load", "-q"], stdin=save.stdout, capture_output=True, text=True, timeout=900)
    save.stdout.close()
    assert save.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr[-2000:]
    try:
        subprocess.run([podman, "run", "-d", "--name", name, *_podman_ulimits(), *run_flags(baked_image),
                        "--network", "host", baked_image], capture_output=True, text=True, check=True, timeout=300)
        deadline = time.monotonic() + 900
        while not _ready() and time.monotonic() < deadline:
            state = subprocess.run([podman, "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
            assert state.stdout.strip() == "true", subprocess.run([podman, "logs", name], capture_output=True,
                                                                  text=True).stderr[-4000:]
            time.sleep(0.2)
        logs = (lambda r: r.stdout + r.stderr)(subprocess.run([podman, "logs", name], capture_output=True, text=True))
        assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]
        _assert_same_as_bake(manifest)
    finally:
        subprocess.run([podman, "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)
        subprocess.run([podman, "rmi", "-f", baked_image], capture_output=True, timeout=300)


_CONTAINERD_SOCKETS = ("/run/containerd/containerd.sock", "/var/run/docker/containerd/containerd.sock")


def _ctr_caps(image: str) -> list[str]:
    """`fvbuild run-flags`' capabilities as ctr spells them; ctr adds no seccomp or AppArmor
    profile unless asked, as the run flags ask of Docker."""
    flags = run_flags(image)
    return [f for i, v in enumerate(flags) if v == "--cap-add" for f in ("--cap-add", f"CAP_{flags[i + 1]}")]


@pytest.mark.skipif(e2e_device() == "cuda", reason="a second copy of the CUDA image costs the GPU machine's 64 GB"
                    " disk")
def test_the_image_run_by_containerd_without_docker_restores_or_names_the_mount_it_lacks(baked_image, manifest,
                                                                                          port_free):
    """containerd is what runs a Kubernetes pod; `ctr run` is containerd without Docker or a CRI
    spec, and mounts less than either: no cgroup file system, no /etc/hosts unless it shares the
    host's network. Found by hand, 2026-12-06: an image baked on a cgroup v1 host fell back there,
    CRIU saying only "mnt-v2: Can't stat mountpoint .../cpu". The bake now detaches the cgroup
    mounts from the checkpoint, so the image restores under containerd and answers as baked; and a
    container lacking a path the checkpoint's mounts are bound from (/etc/hosts, without the
    host's network) is refused before CRIU runs, by name."""
    ctr = shutil.which("ctr")
    socket = next((s for s in _CONTAINERD_SOCKETS if os.path.exists(s)), None)
    if ctr is None or socket is None:
        pytest.skip("no ctr on PATH or no containerd socket (Docker's own containerd has one)")
    ns = f"fv-e2e-{os.getpid()}"
    base = [ctr, "--address", socket, "--namespace", ns]
    ref = f"docker.io/{baked_image}" if baked_image.count("/") == 1 else baked_image
    save = subprocess.Popen(["docker", "save", baked_image], stdout=subprocess.PIPE)
    loaded = subprocess.run([*base, "images", "import", "-"], stdin=save.stdout, capture_output=True, text=True,
                            timeout=900)
    save.stdout.close()
    assert save.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr[-2000:]

    def start(name: str, *options: str) -> subprocess.Popen:
        out = open(f"/tmp/{ns}-{name}.log", "w+")
        return subprocess.Popen([*base, "run", "--rm", *options, *_ctr_caps(baked_image), ref, name], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def stop(name: str, proc: subprocess.Popen) -> str:
        subprocess.run([*base, "tasks", "kill", "--signal", "SIGKILL", name], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*base, "containers", "rm", name], capture_output=True, timeout=60)
        return Path(f"/tmp/{ns}-{name}.log").read_text(errors="replace")

    try:
        served = start("served", "--net-host")  # ctr then binds the host's /etc/hosts and resolv.conf
        try:
            deadline = time.monotonic() + 300
            while not _ready() and time.monotonic() < deadline and served.poll() is None:
                time.sleep(0.2)
            _assert_same_as_bake(manifest)
        finally:
            logs = stop("served", served)
        assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-4000:]

        lacking = start("lacking")  # a network of its own: no /etc/hosts at all in this image
        try:
            deadline = time.monotonic() + 120
            log = Path(f"/tmp/{ns}-lacking.log")
            while "checkpoint not used" not in log.read_text(errors="replace") and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            logs = stop("lacking", lacking)
        assert ("checkpoint not used: this container has no /etc/hosts, which the checkpoint's mounts are bound "
                "from") in logs, logs[-4000:]
        assert "criu restore" not in logs  # refused before CRIU ran
    finally:
        subprocess.run([*base, "images", "rm", "--sync", ref], capture_output=True, timeout=300)
        subprocess.run([ctr, "--address", socket, "namespaces", "remove", ns], capture_output=True, timeout=60)
        for name in ("served", "lacking"):
            Path(f"/tmp/{ns}-{name}.log").unlink(missing_ok=True)


@pytest.mark.skipif(e2e_device() == "cuda", reason="the API server's listening socket, the same on a GPU; a second"
                    " bake there costs minutes of device time")
def test_an_image_baked_to_listen_on_ipv6_too_restores_and_answers_on_both(baked_image, manifest, port_free):
    """`fvbuild image --vllm-arg=--host=::` (an IPv6-only Kubernetes cluster: the pod's address is
    IPv6): the server's socket is dual-stack, and CRIU must put it back so: the restored server
    answers as baked on IPv6 and on IPv4 (fvboot's own calls). Baked here as fvbuild bakes, on
    the suite's image with the same arguments and `--host ::`."""
    name = f"fv-e2e-bake-v6-{os.getpid()}"
    tag = f"fv-test/ipv6-{os.getpid()}:cpu"
    cmd = ["docker", "run", "--name", name, *run_flags(baked_image), "--network", "host", "--entrypoint", "fvboot",
           baked_image, "bake", "--model", manifest["model"]["source"], "--port", str(manifest["vllm"]["port"]),
           "--", *manifest["vllm"]["args"], "--host", "::"]
    try:
        bake = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert bake.returncode == 0, (bake.stdout + bake.stderr)[-4000:]
        subprocess.run(["docker", "commit", "-c", 'ENTRYPOINT ["fvboot"]', "-c", "CMD []", name, tag],
                       capture_output=True, check=True, timeout=300)
        with Container(tag) as c:
            _wait_ready(container=c.id)
            assert "restored from checkpoint" in c.logs(), c.logs()[-3000:]
            listening = subprocess.run(["docker", "exec", c.id, "python3", "-c", _LISTENING_ON, str(PORT)],
                                       capture_output=True, text=True, timeout=60)
            assert listening.stdout.split() == ["::"], listening.stdout + listening.stderr
            _assert_same_as_bake(manifest)  # over IPv4
            ask = _probe_asks(manifest)[0]
            r = requests.post(f"http://[::1]:{PORT}/v1/completions", json=_completion_body(*ask), timeout=60)
            assert r.json()["choices"][0]["text"] == manifest["probe"][0]["text"]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


# the local addresses of the listening TCP sockets on a port, from /proc (no ss in the image)
_LISTENING_ON = """
import ipaddress, sys
port = int(sys.argv[1])
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(name).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            raw = bytes.fromhex(addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            print(ipaddress.ip_address(raw))
"""


def test_a_pids_limit_without_room_for_the_server_is_said_before_criu_runs(baked_image, manifest, port_free):
    """`docker run --pids-limit` (a Kubernetes pod's pids limit) below the server's threads
    (found by hand, 2026-12-05: CRIU's restorer failed with "Unable to create a thread: -11"): the
    checks say so, with the number the bake recorded, before CRIU runs."""
    tasks = manifest["criu"]["tasks"]
    assert tasks > 10, manifest["criu"]  # vLLM's processes and their threads
    limit = tasks // 2
    with Container(baked_image, "--pids-limit", str(limit)) as c:
        logs = _wait_log(c.id, "checkpoint not used", 60)
        line = _fallback_line(logs)
        assert f"this container may run {limit} processes and threads" in line, line
        assert f"the checkpoint's server has {tasks}: raise the limit" in line, line
        assert "Unable to create a thread" not in logs and "criu restore" not in logs, logs[-3000:]


def _normal_start_refused(baked_image: str, *flags: str, args: tuple[str, ...] = ()) -> str:
    """fvboot's last line from a normal start (FV_RESTORE=0) of the image with FLAGS instead of
    its run flags and ARGS after it, which vLLM refuses: the container must end with 1."""
    cid = subprocess.run(["docker", "run", "-d", *flags, "--network", "host", "-e", "FV_RESTORE=0", baked_image,
                          *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        code = subprocess.run(["docker", "wait", cid], capture_output=True, text=True, timeout=600).stdout.strip()
        logs = _logs(cid)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    assert code == "1", logs[-3000:]
    return [l for l in logs.splitlines() if l.startswith("fvboot: ")][-1]


def test_a_normal_start_that_vllm_refuses_ends_with_vllms_own_reason(baked_image, port_free):
    """Found by hand, 2026-12-06: a normal start that vLLM refused ended in "the vLLM server
    exited before it became healthy (see its log above)", and vLLM's reason, with what to do, was
    pages up. fvboot's last line now carries it (vLLM's GPU build prefixes each line with its
    process: "(APIServer pid=N) ")."""
    last = _normal_start_refused(baked_image, *run_flags(baked_image), args=("--max-model-len=1048576",))
    assert last.startswith("fvboot: the vLLM server exited before it became healthy; vLLM said: "), last
    assert "User-specified max_model_len (1048576) is greater than" in last, last


@pytest.mark.skipif(e2e_device() == "cuda", reason="vLLM's GPU build serves in Docker's default 64 MB /dev/shm"
                    " (H100, 2026-12-06: such a start ran until the test's bound)")
def test_a_normal_start_in_dockers_default_dev_shm_ends_with_vllms_advice(baked_image, port_free):
    """The case found by hand (2026-12-06): the CPU image's normal start in a container with
    Docker's default 64 MB /dev/shm (the restore fits there); vLLM's CPU build refuses it and says
    what to do, which must be fvboot's last line."""
    flags = [f for f in run_flags(baked_image) if f not in ("--shm-size", "1g")]
    assert len(flags) == len(run_flags(baked_image)) - 2
    last = _normal_start_refused(baked_image, *flags)
    assert last.startswith("fvboot: the vLLM server exited before it became healthy; vLLM said: RuntimeError: "
                           "Insufficient space in /dev/shm"), last
    assert "Increase /dev/shm (e.g. --shm-size or --ipc=host)" in last, last


def test_an_open_files_limit_too_low_for_the_server_is_named_where_the_restore_and_the_start_fail(baked_image,
                                                                                                   port_free):
    """`docker run --ulimit nofile=64` (found by hand, 2026-12-05): CRIU said only "sfd: Can't chose
    service_fd_base: 0 38", and the normal start ended in a worker's traceback. Both now name the
    limit and what to raise it to; the container ends, bounded."""
    with Container(baked_image, "--ulimit", "nofile=64:64") as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=600).stdout.strip()
        logs = c.logs()
    assert code == "1", logs[-3000:]
    said = "this container's open-files limit is 64 (docker run --ulimit nofile=..., or the runtime's default?)"
    assert said in _fallback_line(logs), logs[-3000:]
    ended = [l for l in logs.splitlines() if "the vLLM server exited before it became healthy" in l]
    assert ended and f"; {said}" in ended[-1], logs[-3000:]  # after vLLM's own reason ("Too many open files")


def test_a_memory_limit_too_small_for_the_server_is_named_as_what_ended_it(baked_image, port_free):
    """`docker run --memory` (a pod's resources.limits.memory) below what vLLM needs (found by
    hand, 2026-12-05): the kernel kills one of its processes, vLLM prints nothing of it, and
    fvboot said only "exited before it became healthy" -- or, restoring, was itself the process
    the kernel chose (its mapping of the checked memory images counted ~0.5 GB in its resident
    set) and the container ended with no word at all. A normal start (the restore's fallback,
    which needs more memory than a restore) under 300 MiB: its last line names the kill and
    the limit."""
    with Container(baked_image, "--memory", "300m", "--memory-swap", "300m", "-e", "FV_RESTORE=0") as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=300).stdout.strip()
        logs = c.logs()
        assert code == "1", logs[-3000:]
        last = [l for l in logs.splitlines() if l.startswith("fvboot:")][-1]
        assert "the kernel's OOM killer ended" in last and "its memory limit, 300 MiB, is too small" in last, last
        assert "raise it (docker run --memory, or the pod's resources.limits.memory)" in last, last


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_arguments_given_at_docker_run_are_added_to_the_baked_ones(baked_image, manifest, port_free, how):
    """`docker run IMAGE --port 9000`: a restored server has only the baked arguments, so the
    start is a normal one, said with the arguments, and it keeps the baked ones (tried as an
    operator would, 2026-12-05: the run's arguments replaced them, so the server on 9000 ran
    without the baked --max-model-len -- on a GPU, without a baked --gpu-memory-utilization).
    The same for `-e FV_PORT=9000 -e FV_SERVED_MODEL=...` (FV_PORT is in the image's config, at
    the baked port): both were ignored without a word, the restored server on the baked port."""
    from fvboot.launcher import arg_value

    baked_len = arg_value(manifest["vllm"]["args"], "--max-model-len")
    if baked_len is None:
        pytest.skip("this image was baked without --max-model-len")
    if how == "argument":
        container, name = Container(baked_image, entry=["fvboot", "--port", "9000"]), manifest["model"]["served_name"]
        said = ["checkpoint not used: arguments ['--port', '9000'] were given, and a restored server has only the"
                " baked ones", "starting vLLM with the baked command and ['--port', '9000']"]
    else:
        name = "asked-at-run"
        container = Container(baked_image, "-e", "FV_PORT=9000", "-e", f"FV_SERVED_MODEL={name}")
        said = ["checkpoint not used: FV_PORT=9000 asks for port 9000, and a restored server listens on the baked"
                f" {manifest['vllm']['port']} (to keep the restore, publish that one instead: docker run -p"
                f" 9000:{manifest['vllm']['port']}); FV_SERVED_MODEL='{name}' asks for that name",
                f"starting vLLM with the baked command and ['--port', '9000', '--served-model-name', '{name}']"]
    with container as c:
        deadline, models = time.monotonic() + 900, None
        while time.monotonic() < deadline and models is None:
            try:
                models = requests.get("http://127.0.0.1:9000/v1/models", timeout=5).json()["data"]
            except (requests.RequestException, ValueError, KeyError):
                assert subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", c.id], capture_output=True,
                                      text=True).stdout.strip() == "true", c.logs()[-3000:]
                time.sleep(1)
        logs = c.logs()
        assert models, logs[-3000:]
        assert models[0]["max_model_len"] == int(baked_len) and models[0]["id"] == name, models
        for line in said:
            assert line in logs, logs[-3000:]


def test_arguments_given_at_docker_run_that_change_nothing_keep_the_restore(baked_image, manifest, port_free):
    """`docker run IMAGE --port 8000 --max-model-len 512`, the baked values (vLLM's image is called
    with its arguments, and an operator keeps them): a normal start until 2026-12-05, now the
    restore, since the server would be the same."""
    from fvboot.launcher import arg_value

    baked = manifest["vllm"]["command"]
    same = [a for opt in ("--port", "--max-model-len") if arg_value(baked, opt) for a in (opt, arg_value(baked, opt))]
    with Container(baked_image, entry=["fvboot", *same]) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-3000:]


def test_the_baked_model_named_as_vllms_image_is_called_keeps_the_restore_and_another_ends_at_once(
        baked_image, manifest, port_free):
    """`docker run IMAGE MODEL --max-model-len 512`, how vLLM's own image (entrypoint `vllm serve`)
    is called: tried as an operator would (2026-12-05), the model counted as an argument the
    bake did not have (no restore), and the normal start ended in vLLM's "unrecognized arguments:
    MODEL"; `docker run IMAGE bash` the same. Now the baked model is served as baked, restored,
    and any other name ends the start at once, saying what the arguments after the image are."""
    from fvboot.launcher import arg_value

    baked = manifest["vllm"]["command"]
    same = [a for opt in ("--max-model-len",) if arg_value(baked, opt) for a in (opt, arg_value(baked, opt))]
    with Container(baked_image, entry=["fvboot", manifest["model"]["served_name"], *same]) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(manifest)
        logs = c.logs()
    assert "names the model this image was baked with: served as baked" in logs, logs[-3000:]
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-3000:]
    with Container(baked_image, entry=["fvboot", "bash", "-c", "echo hi"]) as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=120).stdout.strip()
        logs = c.logs()
    assert code == "1", logs[-3000:]
    assert "fvboot: 'bash' was given as the model to serve, and this image serves only the one it was baked" in logs
    assert "docker run --entrypoint PROGRAM IMAGE" in logs and "starting vLLM" not in logs, logs[-3000:]


def test_a_bad_setting_ends_the_start_at_once_and_a_misspelt_one_is_said(baked_image, port_free):
    """Tried as an operator would (2026-12-05): FV_WEIGHT_CHECK=bogus cost the whole restore (a
    normal start), FV_START_TIMEOUT_S=soon was ignored until a normal start died on it, and
    FV_RESTOR=0 was ignored without a word. Now a bad value ends the container at once with
    what it takes, and an unknown FV_* name is said with the closest one fvboot knows."""
    # and one of the GPU loader's, which the default restore (weights put in place) never reads
    with Container(baked_image, "-e", "FV_WEIGHT_CHECK=bogus", "-e", "FV_LOAD_BUFFERS=0") as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=120).stdout.strip()
        logs = c.logs()
        assert code == "1", logs[-3000:]
        assert "fvboot: FV_WEIGHT_CHECK='bogus': expected inline or overlap" in logs, logs[-3000:]
        assert "FV_LOAD_BUFFERS='0': expected a whole number in [1, 256]" in logs, logs[-3000:]
        assert "starting vLLM" not in logs and "Traceback" not in logs, logs[-3000:]
    with Container(baked_image, "-e", "FV_RESTOR=0") as c:
        _wait_ready(container=c.id)
        logs = c.logs()
        assert "FV_RESTOR is not a setting of fvboot (did you mean FV_RESTORE?): it changes nothing" in logs, logs[-3000:]
        assert "restored from checkpoint" in logs, logs[-3000:]
