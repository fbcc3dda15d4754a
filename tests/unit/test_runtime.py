"""fvboot's pieces that need no Docker: the gate middleware, the manifest checks, the compatibility
decision, the io_uring switch. The whole loop runs for real in tests/e2e."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import pytest

from fvboot import manifest
from fvboot.errors import CheckpointUnusable
from fvboot.layout import Layout
from fvboot.middleware import GateMiddleware
from fvboot.restore import check_compatible, same_answers


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _call(mw, path, admin=None):
    sent = []
    headers = [(b"x-fastvllm-admin", admin.encode())] if admin else []

    async def send(msg):
        sent.append(msg)

    await mw({"type": "http", "path": path, "headers": headers}, None, send)
    return sent[0]["status"], dict(sent[0].get("headers", []))


S3CRET = "5e" * 32  # the admin token of these tests' runtime file


@pytest.fixture
def gate(monkeypatch, tmp_path):
    import json

    (tmp_path / "runtime.json").write_text(json.dumps({"admin_token": S3CRET}))
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "runtime.json"))
    monkeypatch.setenv("FV_GATE_WAIT_S", "0.3")
    return GateMiddleware(_app)


def test_dev_endpoints_need_the_admin_token(gate):
    async def run():
        assert (await _call(gate, "/collective_rpc"))[0] == 403
        assert (await _call(gate, "/sleep"))[0] == 403
        assert (await _call(gate, "/fv/gate/open"))[0] == 403
        assert (await _call(gate, "/collective_rpc", admin="wrong"))[0] == 403
        assert (await _call(gate, "/collective_rpc", admin=S3CRET))[0] == 200
    asyncio.run(run())


def test_closed_gate_holds_requests_until_opened(gate):
    async def run():
        await _call(gate, "/fv/gate/close", admin=S3CRET)
        assert (await _call(gate, "/health"))[0] == 503
        waiting = asyncio.ensure_future(_call(gate, "/v1/completions"))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # held, not refused
        await _call(gate, "/fv/gate/open", admin=S3CRET)
        assert (await waiting)[0] == 200
    asyncio.run(run())


def test_gate_shut_too_long_answers_503_with_retry_after(gate):
    async def run():
        await _call(gate, "/fv/gate/close", admin=S3CRET)
        status, headers = await _call(gate, "/v1/completions")
        assert status == 503 and headers[b"retry-after"] == b"5"
    asyncio.run(run())


def test_without_a_runtime_file_no_request_is_admin(monkeypatch, tmp_path):
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "missing.json"))
    mw = GateMiddleware(_app)
    assert asyncio.run(_call(mw, "/collective_rpc", admin=""))[0] == 403
    assert asyncio.run(_call(mw, "/collective_rpc", admin=S3CRET))[0] == 403


def test_each_start_writes_a_new_root_only_token_the_middleware_follows(monkeypatch, tmp_path):
    """A restore rewrites the file at the bake's path: the restored middleware takes the new
    token at once and refuses the old one."""
    import os
    import stat

    from fvboot.launcher import write_runtime_settings

    path = tmp_path / "run" / "runtime.json"
    monkeypatch.setenv("FV_RUNTIME_FILE", str(path))
    first = write_runtime_settings(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    mw = GateMiddleware(_app)
    assert asyncio.run(_call(mw, "/collective_rpc", admin=first))[0] == 200
    second = write_runtime_settings(path)
    assert second != first and len(second) == 64
    assert asyncio.run(_call(mw, "/collective_rpc", admin=first))[0] == 403
    assert asyncio.run(_call(mw, "/collective_rpc", admin=second))[0] == 200
    assert [p.name for p in path.parent.iterdir()] == ["runtime.json"]  # no temp file left


def test_admin_token_is_nowhere_under_fv_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    layout = Layout(tmp_path / "fv")
    assert not str(layout.runtime_file).startswith(str(layout.home))
    assert not hasattr(layout, "admin_token_file")


def _home(tmp_path):
    layout = Layout(tmp_path)
    layout.images_dir.mkdir(parents=True)
    (layout.images_dir / "pstree.img").write_bytes(b"tree")
    (layout.images_dir / "pages-1.img").write_bytes(b"p" * 100)
    return layout


def test_verify_files_reports_missing_resized_and_corrupt(tmp_path):
    layout = _home(tmp_path)
    files = manifest.describe_files(tmp_path, [layout.checkpoint_dir])
    assert manifest.verify_files(tmp_path, files) is None
    assert [f.sha256 is None for f in files] == [True, False]  # pages: size only
    (layout.images_dir / "pstree.img").write_bytes(b"TREE")
    assert manifest.verify_files(tmp_path, files) == "checkpoint/criu/pstree.img is corrupt (sha256 mismatch)"
    (layout.images_dir / "pages-1.img").write_bytes(b"p")
    assert "checkpoint/criu/pages-1.img has 1 bytes, expected 100" == manifest.verify_files(tmp_path, files)
    (layout.images_dir / "pages-1.img").unlink()
    assert manifest.verify_files(tmp_path, files) == "checkpoint/criu/pages-1.img is missing"


def _manifest(tmp_path, device):
    layout = _home(tmp_path)
    return layout, manifest.Manifest(
        model=manifest.Model("m"),
        vllm=manifest.Vllm(("--max-model-len", "512"), ("vllm", "--max-model-len", "512"), 8000),
        device=manifest.Device.from_json(device), pipes=manifest.Pipes("pipe:[1]", "pipe:[2]"),
        files=manifest.describe_files(tmp_path, [layout.checkpoint_dir]), probe=())


def test_checkpoint_from_another_device_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "device_info", lambda: manifest.Device("cpu"))
    layout, m = _manifest(tmp_path, {"kind": "cuda", "gpus": [], "driver": "580"})
    with pytest.raises(CheckpointUnusable, match="baked on cuda, running on cpu"):
        check_compatible(m, layout, [])


def test_other_gpu_model_or_driver_is_refused(tmp_path, monkeypatch):
    here = manifest.Device("cuda", (manifest.Gpu("NVIDIA H200", "GPU-2", "580.1"),), "580.1")
    monkeypatch.setattr(manifest, "device_info", lambda: here)
    layout, m = _manifest(tmp_path, {"kind": "cuda", "driver": "580.1",
                                     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "driver": "580.1"}]})
    with pytest.raises(CheckpointUnusable, match="this machine has \\['NVIDIA H200'\\]"):
        check_compatible(m, layout, [])
    m = dataclasses.replace(m, device=dataclasses.replace(
        m.device, driver="575.2", gpus=(dataclasses.replace(m.device.gpus[0], name="NVIDIA H200"),)))
    with pytest.raises(CheckpointUnusable, match="baked with driver 575.2"):
        check_compatible(m, layout, [])


def test_other_run_arguments_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "device_info", lambda: manifest.Device("cpu"))
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    with pytest.raises(CheckpointUnusable, match="differ from the baked ones"):
        check_compatible(m, layout, ["--max-model-len", "1024"])


def test_probe_comparison_catches_text_and_logprob_drift():
    baked = [manifest.ProbeAnswer("p", "abc", (-1.0, -2.0))]
    assert same_answers([{"text": "abc", "logprobs": [-1.0, -2.0004]}], baked) is None
    assert "answered 'abd'" in same_answers([{"text": "abd", "logprobs": [-1.0, -2.0]}], baked)
    assert "logprobs differ" in same_answers([{"text": "abc", "logprobs": [-1.0, -2.1]}], baked)


def test_io_uring_switch_makes_io_uring_setup_fail_with_enosys():
    code = ("import ctypes,sys; from fvboot.noiouring import disable_io_uring; disable_io_uring();"
            "libc=ctypes.CDLL(None,use_errno=True); p=ctypes.create_string_buffer(120);"
            "r=libc.syscall(425,8,p); print(r, ctypes.get_errno())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["-1", "38"]


def test_restore_phases_split_criu_memory_from_cuda_resume(tmp_path):
    from fvboot.criu import restore_phases

    log = tmp_path / "criu-restore.log"
    log.write_text("(00.010000) Version: 4.2.1\n(02.500000) cuda_plugin: resuming devices on pid 7\n"
                   "(03.100000) cuda_plugin: resuming devices on pid 8\n"
                   "(04.250000) Restore finished successfully. Tasks resumed.\n")
    assert restore_phases(log) == {"cuda_resume_start": 2.5, "restore_finished": 4.25}
    assert restore_phases(tmp_path / "missing.log") == {}


def test_trim_endpoint_is_admin_only(gate):
    async def run():
        assert (await _call(gate, "/fv/trim"))[0] == 403
        assert (await _call(gate, "/fv/trim", admin=S3CRET))[0] == 200
    asyncio.run(run())


def test_device_map_pairs_baked_gpus_with_this_nodes_by_index():
    from fvboot.restore import gpu_device_map

    def cuda(*uuids):
        return manifest.Device("cuda", tuple(manifest.Gpu("NVIDIA H200", u) for u in uuids), "580")

    baked = cuda("GPU-aaa", "GPU-bbb")
    assert gpu_device_map(baked, cuda("GPU-aaa", "GPU-bbb")) == ""
    assert gpu_device_map(baked, cuda("GPU-xxx", "GPU-bbb")) == "GPU-aaa=GPU-xxx"
    assert gpu_device_map(manifest.Device("cpu"), manifest.Device("cpu")) == ""


def test_cuda_checkpoint_takes_the_restore_map_from_fvboot(monkeypatch):
    from fvboot import cuda_checkpoint as cc

    uuid_a = "GPU-f6a758cf-ca97-d272-4aa0-73cabee40368"
    uuid_b = "GPU-0823a096-b706-01fc-6c68-7a3d14a256ad"
    monkeypatch.setenv("FV_CUDA_DEVICE_MAP", f"{uuid_a}={uuid_b}")
    cmd = cc.parse_args(["--action", "restore", "--pid", "42"])
    assert len(cmd.device_map) == 1
    assert cc.parse_args(["--action", "unlock", "--pid", "42"]).device_map == ()


def test_cuda_checkpoint_answers_at_once_for_a_process_without_cuda():
    """This very process has no libcuda mapped: the real-driver path says so before cuInit."""
    import os
    import types

    from fvboot import cuda_checkpoint as cc

    cmd = cc.parse_args(["--get-restore-tid", "--pid", str(os.getpid())])
    with pytest.raises(cc.OperationError) as e:
        cc._refuse_processes_without_cuda(cmd, types.SimpleNamespace(name=cc.LIBCUDA_DEFAULT))
    assert e.value.exit_code == 3 and "process has not loaded the CUDA driver" in str(e.value)
    cc._refuse_processes_without_cuda(cmd, types.SimpleNamespace(name="fake"))  # other drivers answer


def test_server_errors_become_one_line_fvboot_errors():
    """A worker exception (HTTP 500 from collective_rpc) must reach the operator as one line."""
    import http.server
    import threading

    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error": "WeightCollectionError: layer.cpu_linear captures a Foo"}'
            self.send_response(500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ctl = ServerControl(srv.server_address[1], "token", "m")
        with pytest.raises(ServerError, match="POST /collective_rpc answered 500: .*captures a Foo"):
            ctl.rpc("fv_dump_weights", "/x")
    finally:
        srv.shutdown()


def test_prefetch_reads_the_biggest_memory_image_first_then_the_weights(tmp_path):
    from fvboot import prefetch

    images, weights = tmp_path / "checkpoint" / "images", tmp_path / "weights"
    images.mkdir(parents=True)
    weights.mkdir()
    big = prefetch.PREFETCH_SMALL
    for name, size in (("pages-1.img", big), ("pages-2.img", 3 * big), ("core-1.img", 4096)):
        with (images / name).open("wb") as f:
            f.truncate(size)
    with (weights / "rank0.fvw").open("wb") as f:
        f.truncate(2 * big + 5)
    work = prefetch.plan([images, weights])
    order = list(dict.fromkeys(path.rsplit("/", 1)[1] for path, _, _ in work))
    assert order == ["pages-2.img", "pages-1.img", "rank0.fvw"]  # small images: CRIU reads them
    w = [(off, n) for path, off, n in work if path.endswith("rank0.fvw")]
    assert w[0] == (0, prefetch.PREFETCH_CHUNK) and w[-1][0] + w[-1][1] == 2 * big + 5
    assert all(n <= prefetch.PREFETCH_CHUNK for _, _, n in work)


def _virtio(root, name, device, features):
    d = root / name
    d.mkdir(parents=True)
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features + "\n")


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path):
    from fvboot import criu

    _virtio(tmp_path / "a", "virtio0", "0x0002", "0010011" + "0" * 57)  # a block device
    assert not criu.free_page_reporting(tmp_path / "a")
    _virtio(tmp_path / "b", "virtio0", "0x0005", "0110000" + "0" * 57)  # balloon, no reporting
    assert not criu.free_page_reporting(tmp_path / "b")
    _virtio(tmp_path / "c", "virtio3", "0x0005", "0110010" + "0" * 57)  # bit 5: reporting
    assert criu.free_page_reporting(tmp_path / "c")
    assert not criu.free_page_reporting(tmp_path / "missing")


def test_thp_restore_setting(monkeypatch):
    from fvboot import criu

    monkeypatch.setattr(criu, "free_page_reporting", lambda: True)
    monkeypatch.delenv("FV_RESTORE_THP", raising=False)
    assert criu.restore_env() == {} and "free page reporting" in criu.restore_thp()[1]
    monkeypatch.setenv("FV_RESTORE_THP", "1")
    assert criu.restore_env() == {"CRIU_RESTORE_THP": "1"}
    monkeypatch.setattr(criu, "free_page_reporting", lambda: False)
    monkeypatch.setenv("FV_RESTORE_THP", "auto")
    assert criu.restore_env() == {"CRIU_RESTORE_THP": "1"}
    monkeypatch.setenv("FV_RESTORE_THP", "0")
    assert criu.restore_env() == {}


def test_only_a_server_fvboot_checkpoints_runs_in_dev_mode(monkeypatch, tmp_path):
    from fvboot.launcher import server_env

    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")  # not even when the operator sets it
    assert server_env(tmp_path / "r.json")["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in server_env(tmp_path / "r.json", dev_mode=False)
    assert server_env(tmp_path / "r.json")["FV_RUNTIME_FILE"] == str(tmp_path / "r.json")


@pytest.mark.parametrize("name", [
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
    "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID_SECRET",
    "MY_SECRET", "DB_PASSWORD", "PGPASSWORD", "SMTP_PASSWD", "GCP_CREDENTIALS", "AZURE_CLIENT_SECRET",
    "VLLM_API_KEY", "FV_API_KEY", "FV_ADMIN_TOKEN", "hf_token", "Some_Key", "AWS_SECRET_FILE",
])
def test_env_scrub_drops_credentials(monkeypatch, tmp_path, name):
    from fvboot.launcher import server_env

    monkeypatch.setenv(name, "hunter2")
    assert name not in server_env(tmp_path / "r.json")


@pytest.mark.parametrize("name", [
    "FV_DISABLE_IO_URING", "FV_GATE_WAIT_S", "FV_HOME", "FV_LOAD_BUFFER_MB", "FV_LOAD_THREADS",
    "FV_PREFETCH", "FV_RESTORE_THP", "TOKENIZERS_PARALLELISM", "PATH", "VLLM_CPU_KVCACHE_SPACE",
    "SSL_CERT_FILE", "PIP_CERT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
])
def test_env_scrub_keeps_settings(monkeypatch, tmp_path, name):
    from fvboot.launcher import server_env

    monkeypatch.setenv(name, "1")
    assert server_env(tmp_path / "r.json")[name] == "1"
