"""The typed bake manifest (fvboot.manifest): read validates once and names the field it refuses,
write gives the JSON bakes have always written, manifests of earlier bakes still read, keys this
fvboot does not know survive; and the builder reads the same JSON without fvboot."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from fvboot import manifest
from fvboot.errors import CheckpointUnusable, ManifestInvalid
from fvboot.launcher import SERVER_SETTINGS
from fvboot.manifest import Device, FileEntry, Gpu, Manifest, ProbeAnswer

ROOT = Path(__file__).resolve().parents[2]


def _baked_dict(device: dict) -> dict:
    """A manifest as `fvboot bake` wrote it before the typed manifest (the keys of its dict literal,
    values as a real bake gives them)."""
    return {
        "format": 1,
        "fvboot_version": "0.1.0",
        "baked_at": "2026-12-01T10:00:00Z",
        "model": {"source": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "Qwen/Qwen2.5-0.5B-Instruct",
                  "path": "/fv/model", "revision": "7ae557604adf67be50417f59c2c2f167def9a775"},
        "vllm": {"version": "vllm 0.11.0", "args": ["--max-model-len", "512"],
                 "command": ["/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/fv/model",
                             "--served-model-name", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "0.0.0.0", "--port",
                             "8000", "--enable-sleep-mode", "--max-model-len", "512"],
                 "port": 8000},
        "runtime_file": "/run/fv/runtime.json",
        "criu": {"version": "Version: 4.2", "dump_flags": ["--tcp-established", "--link-remap"],
                 "restore_flags": ["--tcp-established", "--root", "/"], "addresses": []},
        "device": device,
        "pipes": {"stdout": "pipe:[1234]", "stderr": "pipe:[1235]"},
        "weights": [{"path": "/fv/weights/rank0.fvw", "bytes": 988, "tensors": 290, "index_sha256": "ab" * 32,
                     "seconds": 0.5, "gb_per_s": 1.9, "coverage": 1.0}],
        "processes": [{"host_pid": 4242, "pid": 1, "name": "python3", "command": "python3 -m fvboot.nsinit",
                       "rss_anon_bytes": 1 << 20, "checkpoint_bytes": 3 << 20}],
        "trim": [{"rss_before": 10, "rss_after": 5}],
        "files": [{"path": "checkpoint/criu/pages-1.img", "size": 100, "sha256": None},
                  {"path": "checkpoint/criu/pstree.img", "size": 4, "sha256": "cd" * 32}],
        "probe": [{"prompt": "The capital of France is", "text": " Paris", "logprobs": [-0.0123, -1.5]}],
        "probe_together": [{"prompt": "The capital of France is", "text": " Paris", "logprobs": [-0.0125, -1.5]}],
        "timeline": {"process start": 0.0, "server healthy": 12.5, "manifest written": 40.25},
    }


CUDA = {"kind": "cuda", "driver": "580.65.06", "cuda": "13.0",
        "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-f6a758cf", "driver": "580.65.06"},
                 {"name": "NVIDIA H200", "uuid": "GPU-0823a096", "driver": "580.65.06"}]}


def _write_json(tmp_path, data) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@pytest.mark.parametrize("device", [{"kind": "cpu"}, CUDA], ids=["cpu", "cuda"])
def test_a_manifest_of_the_current_bake_reads_and_writes_back_the_same_json(tmp_path, device):
    old = _baked_dict(device)
    path = _write_json(tmp_path, old)
    before = path.read_text()
    m = manifest.read(path)
    assert m.vllm.args == ("--max-model-len", "512") and m.vllm.port == 8000
    assert m.model.served_name == "Qwen/Qwen2.5-0.5B-Instruct" and m.runtime_file == "/run/fv/runtime.json"
    assert m.device.is_cuda == (device["kind"] == "cuda")
    assert m.files[0] == FileEntry("checkpoint/criu/pages-1.img", 100, None)
    assert m.probe[0].logprobs == (-0.0123, -1.5) and m.processes[0].checkpoint_bytes == 3 << 20
    assert m.probe_together[0].logprobs == (-0.0125, -1.5)
    if m.device.is_cuda:
        assert m.device.gpus[1] == Gpu("NVIDIA H200", "GPU-0823a096", "580.65.06") and m.device.cuda == "13.0"
    assert m.to_json() == old
    manifest.write(path, m)
    assert path.read_text() == before  # byte for byte what the bake wrote: `inspect` keeps its shape
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_round_trip_of_a_built_manifest(tmp_path):
    m = Manifest(model=manifest.Model("m", source="synthetic:tiny", path="/fv/model"),
                 vllm=manifest.Vllm(("--max-model-len", "64"), ("vllm", "serve", "--max-model-len", "64"), 8001),
                 device=Device("cuda", (Gpu("NVIDIA H200", "GPU-1", "580"),), "580", None),
                 pipes=manifest.Pipes("pipe:[1]", "pipe:[2]"), files=(FileEntry("weights/rank0.fvw", 10),),
                 probe=(ProbeAnswer("p", "t", (-1.0,)),), criu=manifest.Criu("4.2", ("-v",), ()),
                 probe_together=(ProbeAnswer("p", "t", (-1.5,)),),
                 processes=(manifest.Process(1, 1, "init", "fvboot.nsinit", 0, 0),), timeline={"ready": 1.5})
    path = tmp_path / "manifest.json"
    manifest.write(path, m)
    assert manifest.read(path) == m
    assert json.loads(path.read_text())["device"]["cuda"] is None  # as the bake writes an unknown CUDA


def test_write_refuses_a_manifest_that_would_not_read_back(tmp_path):
    m = manifest.read(_write_json(tmp_path, _baked_dict({"kind": "cpu"})))
    bad = dataclasses.replace(m, vllm=dataclasses.replace(m.vllm, args=("--max-model-len", 512)))
    with pytest.raises(ManifestInvalid, match="^manifest: vllm.args must be a list of strings$"):
        manifest.write(tmp_path / "new.json", bad)
    assert not (tmp_path / "new.json").exists()


def test_unknown_keys_are_kept_where_they_were(tmp_path):
    newer = _baked_dict(CUDA)
    newer["signature"] = {"by": "someone"}
    newer["vllm"]["plugins"] = ["lora"]
    newer["device"]["gpus"][0]["memory"] = 141
    newer["files"][1]["mode"] = 0o644
    newer["probe"][0]["tokens"] = [1, 2]
    m = manifest.read(_write_json(tmp_path, newer))
    assert m.extra == {"signature": {"by": "someone"}} and m.vllm.extra == {"plugins": ["lora"]}
    assert m.device.gpus[0].extra == {"memory": 141} and m.files[1].extra == {"mode": 0o644}
    assert m.to_json() == newer


def test_optional_fields_may_be_absent_and_stay_absent(tmp_path):
    old = _baked_dict({"kind": "cpu"})
    for key in ("fvboot_version", "baked_at", "runtime_file", "criu", "weights", "processes", "trim", "timeline",
                "probe_together"):
        del old[key]
    del old["vllm"]["version"], old["model"]["source"], old["model"]["path"]
    del old["files"][1]["sha256"]
    m = manifest.read(_write_json(tmp_path, old))
    assert m.runtime_file is None and m.criu is None and m.processes is None and m.files[1].sha256 is None
    assert m.probe_together is None  # baked before the probe was asked together: restores ask one at a time
    back = m.to_json()
    assert back["files"][1] == {**old["files"][1], "sha256": None}
    back["files"][1].pop("sha256")
    assert back == old


def _broken(edit) -> dict:
    d = copy.deepcopy(_baked_dict(copy.deepcopy(CUDA)))
    edit(d)
    return d


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d["vllm"].update(args="--max-model-len 512"), "manifest: vllm.args must be a list of strings"),
    (lambda d: d["vllm"].update(args=["--max-model-len", 512]), "manifest: vllm.args must be a list of strings"),
    (lambda d: d["vllm"].pop("command"), "manifest: vllm.command is missing"),
    (lambda d: d["vllm"].update(port="8000"), "manifest: vllm.port must be an integer"),
    (lambda d: d["vllm"].update(port=True), "manifest: vllm.port must be an integer"),
    (lambda d: d.pop("model"), "manifest: model is missing"),
    (lambda d: d.update(model=["m"]), "manifest: model must be an object"),
    (lambda d: d["model"].update(served_name=None), "manifest: model.served_name must be a string"),
    (lambda d: d["device"].update(driver=580), "manifest: device.driver must be a string"),
    (lambda d: d["device"].update(gpus="H200"), "manifest: device.gpus must be a list"),
    (lambda d: d["device"]["gpus"].__setitem__(1, "H200"), "manifest: device.gpus[1] must be an object"),
    (lambda d: d["device"]["gpus"][0].pop("uuid"), "manifest: device.gpus[0].uuid is missing"),
    (lambda d: d["pipes"].update(stderr=3), "manifest: pipes.stderr must be a string"),
    (lambda d: d["files"][1].update(size="4"), "manifest: files[1].size must be an integer"),
    (lambda d: d["files"][0].update(pieces=[]), "manifest: files[0].pieces must be an object"),
    (lambda d: d["files"][0].update(pieces={"alg": "crc32", "piece": 0, "digests": []}),
     "manifest: files[0].pieces.piece must be positive"),
    (lambda d: d["files"][0].update(pieces={"alg": "crc32", "piece": 8}),
     "manifest: files[0].pieces.digests is missing"),
    (lambda d: d["probe"][0].update(logprobs=["x"]), "manifest: probe[0].logprobs must be a list of numbers"),
    (lambda d: d.update(probe={}), "manifest: probe must be a list"),
    (lambda d: d["processes"][0].pop("pid"), "manifest: processes[0].pid is missing"),
    (lambda d: d.update(runtime_file=7), "manifest: runtime_file must be a string"),
    (lambda d: d.update(timeline={"ready": "soon"}), "manifest: timeline must be an object of numbers"),
    (lambda d: d.update(format=2), "manifest format 2 is not 1"),
    (lambda d: d.pop("format"), "manifest format None is not 1"),
])
def test_validation_names_the_field_in_one_line(tmp_path, edit, reason):
    path = _write_json(tmp_path, _broken(edit))
    with pytest.raises(ManifestInvalid) as e:
        manifest.read(path)
    assert str(e.value) == reason
    assert isinstance(e.value, CheckpointUnusable)  # the reason leads to the normal start


def test_a_file_that_is_no_manifest_says_so(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"format": 1,')
    with pytest.raises(ManifestInvalid, match=f"^the manifest {path} is not valid JSON \\("):
        manifest.read(path)
    path.write_bytes(b'{"format": "\xff"}')
    with pytest.raises(ManifestInvalid, match="is not valid JSON"):
        manifest.read(path)
    path.write_text("[]")
    with pytest.raises(ManifestInvalid, match=f"^the manifest {path} is not a JSON object$"):
        manifest.read(path)


def test_a_cpu_device_needs_no_gpus_nor_driver():
    assert Device.from_json({"kind": "cpu"}) == Device("cpu")
    assert Device("cpu").to_json() == {"kind": "cpu"}


def test_a_device_that_does_not_fit_is_for_the_compatibility_check_to_refuse(tmp_path, monkeypatch):
    """What tests/e2e does: a CPU bake's manifest edited to say cuda still reads, and the start
    refuses it with the reason it always gave."""
    from fvboot.layout import Layout
    from fvboot.compatibility import check_compatible

    edited = _baked_dict({"kind": "cpu"})
    edited["device"]["kind"] = "cuda"
    m = manifest.read(_write_json(tmp_path, edited))
    assert m.device == Device("cuda")
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: Device("cpu"))
    with pytest.raises(CheckpointUnusable, match="^baked on cuda, running on cpu$"):
        check_compatible(m, Layout(tmp_path), [])


def test_vllms_settings_in_this_start_that_are_not_the_bakes_are_refused_with_each_named(tmp_path, monkeypatch):
    """The restored processes keep the bake's environment: a VLLM_* setting given at run time
    that the bake did not have (or another value, or one the bake had left out) would reach
    only a normal start, so the checkpoint is not used and the log says which and how to bake
    it. What fvboot sets itself and the API key (a runtime setting) are not compared; a
    manifest without the record (an older fvboot) is not checked."""
    baked = _baked_dict({"kind": "cpu"})
    baked["vllm"]["env"] = {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    m = manifest.read(_write_json(tmp_path, baked))
    assert m.vllm.env == baked["vllm"]["env"] and m.to_json()["vllm"]["env"] == baked["vllm"]["env"]
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    for k in [k for k in os.environ if k.startswith("VLLM_") or k in SERVER_SETTINGS]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    monkeypatch.setenv("VLLM_API_KEY", "k")  # a runtime setting
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")  # fvboot's own
    assert _refusal(m, tmp_path) == "stop here"  # the same settings: on to the next check
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert _refusal(m, tmp_path) == (
        "vLLM's settings differ from the bake's: VLLM_CPU_OMP_THREADS_BIND=unset (baked: 0-1), "
        "VLLM_LOGGING_LEVEL=DEBUG (baked: INFO), VLLM_USE_V2_MODEL_RUNNER=1 (baked: unset); a "
        "restored server keeps the bake's environment (bake them into the image: fvbuild image --env NAME=VALUE)")
    del baked["vllm"]["env"]
    assert _refusal(manifest.read(_write_json(tmp_path, baked)), tmp_path) == "stop here"


def test_the_gpus_cuda_shows_and_where_python_finds_code_are_the_bakes_or_no_restore(tmp_path, monkeypatch):
    """`docker run -e CUDA_VISIBLE_DEVICES=1` restored onto GPU 0, and `-e PYTHONPATH=/plugins`
    left a vLLM plugin out, both without a word (found by review, 2026-12-06): they decide which
    server runs, and a restored one keeps the bake's."""
    baked = _baked_dict({"kind": "cpu"})
    baked["vllm"]["env"] = {}
    m = manifest.read(_write_json(tmp_path, baked))
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    for k in [k for k in os.environ if k.startswith("VLLM_") or k in SERVER_SETTINGS]:
        monkeypatch.delenv(k)
    assert _refusal(m, tmp_path) == "stop here"
    for name, value in (("CUDA_VISIBLE_DEVICES", "1"), ("PYTHONPATH", "/plugins"), ("PYTHONUSERBASE", "/plugins"),
                        ("PYTHONNOUSERSITE", "1")):
        monkeypatch.setenv(name, value)
        assert _refusal(m, tmp_path).startswith(f"vLLM's settings differ from the bake's: {name}={value} (baked: unset)")
        monkeypatch.delenv(name)


def _refusal(m, tmp_path) -> str:
    """check_compatible's reason for refusing M ("stop here": every check before the files passed;
    the callers stub verify_files to say so)."""
    from fvboot.layout import Layout
    from fvboot.compatibility import check_compatible

    with pytest.raises(CheckpointUnusable) as e:
        check_compatible(m, Layout(tmp_path), [])
    return str(e.value)


def test_a_port_or_name_asked_for_at_run_time_is_said_and_left_to_the_normal_start(tmp_path, monkeypatch):
    """FV_PORT at docker run other than the baked port (the image's environment sets the baked
    one), or FV_SERVED_MODEL: the checkpoint listens on its port under its name, so the log says
    what was asked, how to keep the restore (publish the baked port), and the normal start serves it."""
    m = manifest.read(_write_json(tmp_path, _baked_dict({"kind": "cpu"})))
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    monkeypatch.setenv("FV_PORT", "8000")
    monkeypatch.delenv("FV_SERVED_MODEL", raising=False)
    assert _refusal(m, tmp_path) == "stop here"  # the baked port: on to the next check
    monkeypatch.setenv("FV_PORT", "9000")
    monkeypatch.setenv("FV_SERVED_MODEL", "qwen")
    assert _refusal(m, tmp_path) == (
        "FV_PORT=9000 asks for port 9000, and a restored server listens on the baked 8000 (to keep the restore,"
        " publish that one instead: docker run -p 9000:8000); FV_SERVED_MODEL='qwen' asks for that name, and a"
        " restored server keeps the baked 'Qwen/Qwen2.5-0.5B-Instruct'; the normal start serves as asked")


def test_library_settings_given_at_run_time_are_said_and_the_restore_goes_on(tmp_path, monkeypatch, capsys):
    """OMP_NUM_THREADS or PYTORCH_CUDA_ALLOC_CONF at docker run acts only when processes start:
    a restored server keeps the bake's, silently until now. Said, not refused (Ray sets
    OMP_NUM_THREADS on every worker: a refusal would make each of its starts a normal one)."""
    baked = _baked_dict({"kind": "cpu"})
    baked["vllm"]["library_env"] = {"OMP_NUM_THREADS": "2"}
    m = manifest.read(_write_json(tmp_path, baked))
    assert m.to_json()["vllm"]["library_env"] == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _refusal(m, tmp_path) == "stop here" and "keeps the bake's" not in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert _refusal(m, tmp_path) == "stop here"  # on to the next check: the restore goes on
    assert ("OMP_NUM_THREADS=1 (baked: 2), PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (baked: unset): a"
            " restored server keeps the bake's (they act when its processes start); FV_RESTORE=0 gives a normal"
            " start that has them") in capsys.readouterr().err
    del baked["vllm"]["library_env"]  # an fvboot that did not record them: nothing to say
    assert _refusal(manifest.read(_write_json(tmp_path, baked)), tmp_path) == "stop here"
    assert "keeps the bake's" not in capsys.readouterr().err


def test_a_manifests_vllm_settings_must_be_strings(tmp_path):
    bad = _baked_dict({"kind": "cpu"})
    bad["vllm"]["env"] = {"VLLM_X": 1}
    with pytest.raises(ManifestInvalid, match="^manifest: vllm.env must be an object of strings$"):
        manifest.read(_write_json(tmp_path, bad))


# --- the builder's side: the same JSON, read by name, without importing fvboot --------------------


def test_the_builders_manifest_readers_do_not_import_fvboot():
    """(buildcontext.py imports the package only to copy its files into the image.)"""
    for path in (ROOT / "builder" / "bake.py", ROOT / "builder" / "cli.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+fvboot\b", text, re.M), path


@pytest.mark.parametrize("device, summary", [
    ({"kind": "cpu"}, "cpu"),
    (CUDA, "NVIDIA H200 x2, driver 580.65.06, CUDA 13.0"),
])
def test_labels_of_a_baked_image_come_from_the_manifest_fields(device, summary):
    from fvbuild.bake import baked_labels

    assert dict(baked_labels(_baked_dict(device))) == {
        "org.fast-vllm.baked": "true", "org.fast-vllm.baked-at": "2026-12-01T10:00:00Z",
        "org.fast-vllm.baked-device": summary, "org.fast-vllm.baked-vllm": "vllm 0.11.0",
        "org.fast-vllm.baked-criu": "Version: 4.2"}


@pytest.mark.parametrize("data", [
    {"format": 1}, {"format": 1, "vllm": None, "criu": {"version": None}, "device": {"kind": "cuda"}},
    {"device": {"kind": "cuda", "gpus": []}}, {"device": {"kind": "cuda", "gpus": ["x"]}}, [], None,
])
def test_labels_do_not_fail_on_a_manifest_missing_optional_fields(data):
    from fvbuild.bake import baked_labels

    labels = dict(baked_labels(data))
    assert labels["org.fast-vllm.baked"] == "true" and labels["org.fast-vllm.baked-vllm"] == ""


def test_the_capabilities_the_tree_held_are_kept_and_an_older_manifest_has_none():
    c = manifest.Criu.from_json({"version": "4.2", "capabilities": ["CHOWN", "KILL"]})
    assert c.capabilities == ("CHOWN", "KILL") and c.to_json()["capabilities"] == ["CHOWN", "KILL"]
    old = manifest.Criu.from_json({"version": "4.2"})
    assert old.capabilities is None and "capabilities" not in old.to_json()
    with pytest.raises(manifest.ManifestInvalid, match="criu.capabilities must be a list of strings"):
        manifest.Criu.from_json({"capabilities": "CHOWN"})


def test_the_trees_thread_count_is_kept_and_checked():
    c = manifest.Criu.from_json({"tasks": 81})
    assert c.tasks == 81 and c.to_json()["tasks"] == 81
    assert manifest.Criu.from_json({}).tasks is None
    with pytest.raises(manifest.ManifestInvalid, match="criu.tasks must be a whole number"):
        manifest.Criu.from_json({"tasks": -1})


def test_another_number_of_cpus_than_the_bakes_is_said_and_the_restore_goes_on(tmp_path, monkeypatch, capsys):
    """vLLM's CPU engine sized its OpenMP threads and bound them to CPUs when its worker started,
    at the bake: a restore on a bigger machine leaves CPUs idle, on a smaller one oversubscribes
    them (found by reading vLLM's CPU worker, 2026-12-05: a CI machine's bake of 1 thread served
    on a 64-core node without a word). Said, not refused: the answers are the same."""
    baked = _baked_dict({"kind": "cpu", "cpus": 2})
    m = manifest.read(_write_json(tmp_path, baked))
    assert m.device.cpus == 2 and m.to_json()["device"]["cpus"] == 2
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    for here, said in ((2, None), (64, "62 of this container's CPUs stay idle"),
                       (1, "more of its threads than this container has CPUs: slower, not other answers")):
        monkeypatch.setattr(manifest, "device_info", lambda lookup=None, n=here: Device("cpu", cpus=n))
        assert _refusal(m, tmp_path) == "stop here"  # on to the next check: the restore goes on
        err = capsys.readouterr().err
        if said is None:
            assert "may run on" not in err
        else:
            assert f"this container may run on {here} CPU{'s' if here > 1 else ''}, the bake's on 2: the restored" \
                " engine keeps" in err
            assert said in err and "FV_RESTORE=0 gives a normal start sized for this container" in err
    del baked["device"]["cpus"]  # an fvboot that did not record them: nothing to say
    assert _refusal(manifest.read(_write_json(tmp_path, baked)), tmp_path) == "stop here"
    assert "may run on" not in capsys.readouterr().err
    bad = _baked_dict({"kind": "cpu", "cpus": "two"})
    with pytest.raises(ManifestInvalid, match="device.cpus must be a whole number or null"):
        manifest.read(_write_json(tmp_path, bad))
