"""restore.py: the checks before a restore (files, device, GPU model and driver, arguments), the
probe comparison, the GPU UUID map, and the pipeline: its steps in order, each marked on the
timeline, and on a failure the restored tree killed and no later step run (the gate stays shut)."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import pytest

from fvboot import devices, manifest, restore
from fvboot.errors import CheckpointUnusable, ServerError
from fvboot.layout import Layout
from fvboot.compatibility import check_compatible
from fvboot.restore import gpu_device_map, same_answers
from fvboot.timeline import Timeline


def test_the_steps_end_with_every_check_before_the_gate_opens():
    names = [mark for mark, _ in restore.STEPS]
    assert names[-1] == "ready" and restore.STEPS[-1][1] is restore.open_gate
    checks = ("weights loaded", "answers checked", "weights checked", "memory images checked")
    assert all(names.index(c) < names.index("ready") for c in checks)
    assert names.index("restore done") < names.index("weights loaded")


class _Tree:
    terminated = False

    def terminate(self):
        self.terminated = True


def test_a_failing_step_kills_the_restored_tree_and_runs_nothing_after_it(monkeypatch):
    ran, tree = [], _Tree()

    def step(name, fail=False):
        def run(s):
            ran.append(name)
            if name == "criu":
                s.tree = tree
            if fail:
                raise CheckpointUnusable("restored server gives other answers than the baked one")
        return run

    monkeypatch.setattr(restore, "STEPS", (("restore done", step("criu")), ("answers checked", step("probe", True)),
                                           ("ready", step("gate"))))
    state = restore.RestoreState(*([None] * 3), Timeline("serve"), *([None] * 4))
    with pytest.raises(CheckpointUnusable):
        restore.run(state)
    assert ran == ["criu", "probe"] and tree.terminated
    assert [e[0] for e in state.tl.events] == ["process start", "restore done"]


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


def test_a_model_folder_changed_since_the_bake_is_said_and_left_to_the_normal_start(tmp_path):
    """A restored server has the bake's model in memory (its weights come from the dump): an
    image built FROM the baked one with another chat template, tokenizer or fine-tuned weights
    (of the same size), or a mount over the folder, was served as the bake's without a word."""
    layout = _home(tmp_path)
    model = layout.model_dir
    model.mkdir()
    (model / "tokenizer_config.json").write_text('{"chat_template": "A"}')
    big = bytes(range(256)) * ((manifest.SAMPLED_FROM // 256) + 4096)
    (model / "model.safetensors").write_bytes(big)
    files = manifest.describe_files(tmp_path, [layout.checkpoint_dir, model])
    by_path = {f.path: f for f in files}
    assert by_path["model/model.safetensors"].sampled_sha256 and not by_path["model/model.safetensors"].sha256
    assert by_path["model/tokenizer_config.json"].sha256
    assert manifest.verify_files(tmp_path, files) is None
    said = ("the model folder is not the one the server was baked with: {} (an image built FROM this one, or a mount"
            " over it?); the normal start serves it as it is now")
    tuned = bytearray(big)
    tuned[len(big) // 2: len(big) // 2 + 8] = b"finetune"  # same size, other weights
    (model / "model.safetensors").write_bytes(tuned)
    assert manifest.verify_files(tmp_path, files) == said.format("model/model.safetensors has other contents")
    (model / "model.safetensors").write_bytes(big)
    (model / "chat_template.jinja").write_text("B")
    assert manifest.verify_files(tmp_path, files) == said.format("model/chat_template.jinja was not there at the bake")
    (model / "chat_template.jinja").unlink()
    (model / "tokenizer_config.json").write_text('{"chat_template": "B"}')
    assert manifest.verify_files(tmp_path, files) == said.format("model/tokenizer_config.json has other contents")
    # a manifest of an fvboot that did not list the model folder: nothing to compare with
    assert manifest.verify_files(tmp_path, tuple(f for f in files if not f.path.startswith("model/"))) is None


def test_a_file_the_baked_arguments_name_outside_the_home_is_checked_at_a_start(tmp_path):
    """A restored server keeps what it read at the bake: `--chat-template /etc/t.jinja` changed
    or mounted over since (an image built FROM this one) was served as the bake's template,
    while a normal start would read the new one (a known limit until 2026-12-06)."""
    home, outside = tmp_path / "fv", tmp_path / "etc"
    (home / "model").mkdir(parents=True)
    (outside / "adapter").mkdir(parents=True)
    (outside / "tok").mkdir()
    template, weights = outside / "t.jinja", outside / "adapter" / "adapter.safetensors"
    template.write_text("{{ messages }}")
    weights.write_bytes(b"w" * (manifest.SAMPLED_FROM + 10))
    (outside / "tok" / "tokenizer_config.json").write_text("{}")
    lora_json = json.dumps({"name": "sql", "path": str(outside / "tok"), "base_model_name": "m"})
    args = ["--max-model-len", "512", f"--chat-template={template}", "--lora-modules", f"sql={outside / 'adapter'}",
            lora_json, "--model", str(home / "model"), "--download-dir", "/proc/self", "--tokenizer", "relative/name",
            # read at each request, as a normal start reads it (media mounted at run time)
            "--allowed-local-media-path", str(outside), f"--allowed_local_media_path={outside}"]
    assert manifest.named_paths(args, home) == [template, outside / "adapter", outside / "tok"]
    named = manifest.describe_named_files(home, args)
    assert [f.path for f in named.files] == [str(weights), str(template), str(outside / "tok" / "tokenizer_config.json")]
    assert named.folders == (str(outside / "adapter"), str(outside / "tok")) and not named.too_many
    assert named.files[0].sampled_sha256 and named.files[1].sha256
    m = dataclasses.replace(_manifest(tmp_path / "m", {"kind": "cpu"})[1], named_files=named.files,
                            named_folders=named.folders)
    back = manifest.Manifest.from_json(m.to_json())
    assert (back.named_files, back.named_folders) == (named.files, named.folders)
    assert manifest.verify_named_files(named.files, named.folders) is None
    said = ("a file the baked vLLM arguments name is not the one the server was baked with: {} (an image built FROM"
            " this one, or a mount over it?); the normal start reads it as it is now")
    (outside / "tok" / "chat_template.jinja").write_text("B")  # transformers loads it with the tokenizer
    assert manifest.verify_named_files(named.files, named.folders) == said.format(
        f"{outside / 'tok' / 'chat_template.jinja'} was not there at the bake")
    (outside / "tok" / "chat_template.jinja").unlink()
    template.write_text("{{ messages }}!")
    assert manifest.verify_named_files(named.files) == said.format(f"{template} has 15 bytes, expected 14")
    template.write_text("{{ message  }}")
    assert manifest.verify_named_files(named.files) == said.format(f"{template} has other contents")
    template.unlink()
    assert manifest.verify_named_files(named.files) == said.format(f"{template} is missing")


def test_a_start_whose_named_file_changed_gets_the_normal_start_with_the_reason(tmp_path, monkeypatch):
    from fvboot import capabilities

    template = tmp_path / "t.jinja"
    template.write_text("A")
    layout, m = _manifest(tmp_path / "fv", {"kind": "cpu"})
    m = dataclasses.replace(m, named_files=manifest.describe_named_files(layout.home, [f"--chat-template={template}"]).files)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(capabilities, "permitted", lambda pid="self": frozenset(capabilities.CONTAINER_CAPS))
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr("shutil.which", lambda name: None)  # past the file checks: the next check stops it
    with pytest.raises(CheckpointUnusable, match="^criu is not on PATH$"):
        check_compatible(m, layout, [])
    template.write_text("B")
    with pytest.raises(CheckpointUnusable, match=f"^a file the baked vLLM arguments name is not the one the server was"
                                                 f" baked with: {template} has other contents"):
        check_compatible(m, layout, [])


def test_a_folder_the_baked_arguments_name_with_too_many_files_is_said_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "NAMED_FOLDER_MAX_FILES", 2)
    for i in range(3):
        (tmp_path / "many" / f"{i}").mkdir(parents=True)
        (tmp_path / "many" / f"{i}" / "f").write_text("x")
    assert manifest.describe_named_files(tmp_path / "fv", [f"--x={tmp_path / 'many'}"]) == manifest.NamedFiles(
        (), (), (str(tmp_path / "many"),))


def test_a_weight_dump_of_another_bake_is_not_restored_from(tmp_path):
    """A dump checks each tensor against the checksums in its own index, so another bake's dump
    of the same shapes (another rank's, a fine-tune's put in by an image built FROM this one)
    passed them (found by review, 2026-12-06). The manifest binds the file by its header,
    which holds its index's sha256."""
    layout = _home(tmp_path)
    layout.weights_dir.mkdir(parents=True, exist_ok=True)
    dump = layout.weights_dir / "rank0.fvw"
    dump.write_bytes(b"FVWEIGHT" + bytes(range(56)) + b"\0" * 4096)
    files = manifest.describe_files(tmp_path, [layout.weights_dir])
    assert files[0].head_sha256 and not files[0].sha256
    assert manifest.FileEntry.from_json(files[0].to_json()) == files[0]
    assert manifest.verify_files(tmp_path, files) is None
    other = bytearray(dump.read_bytes())
    other[40] ^= 1  # another index's sha256 in the header, the same size
    dump.write_bytes(bytes(other))
    problem = manifest.verify_files(tmp_path, files)
    assert problem == "weights/rank0.fvw is not the weight dump this checkpoint was baked with (its index differs)", problem
    dump.write_bytes(b"FVWEIGHT" + bytes(range(56)) + b"\1" * 4096)  # the tensors' bytes are the load's to check
    assert manifest.verify_files(tmp_path, files) is None


def _manifest(tmp_path, device):
    layout = _home(tmp_path)
    return layout, manifest.Manifest(
        model=manifest.Model("m"),
        vllm=manifest.Vllm(("--max-model-len", "512"), ("vllm", "--max-model-len", "512"), 8000),
        device=manifest.Device.from_json(device), pipes=manifest.Pipes("pipe:[1]", "pipe:[2]"),
        files=manifest.describe_files(tmp_path, [layout.checkpoint_dir]), probe=())


def test_a_user_other_than_root_is_refused_before_criu_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    with pytest.raises(CheckpointUnusable, match=r"fvboot runs as uid 1000 \(docker run --user\?\), and a restore"
                                                 r" needs root with CRIU's capabilities"):
        check_compatible(m, layout, [])


def test_a_container_without_the_capabilities_the_tree_held_is_refused_before_criu_runs(tmp_path, monkeypatch):
    """docker run --cap-drop ALL (Kubernetes' drop: [ALL]) plus CRIU's list: the checkpoint's
    processes held CHOWN (Docker's default), which CRIU cannot give back without holding it; the
    restore's restorer failed on it and hung until CRIU's timeout (found by hand, 2026-12-05)."""
    from fvboot import capabilities

    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    m = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), (), ("CHOWN", "KILL", "SYS_ADMIN")))
    monkeypatch.setattr(capabilities, "permitted", lambda pid="self": frozenset(capabilities.CONTAINER_CAPS))
    with pytest.raises(CheckpointUnusable, match=r"missing capability: CAP_CHOWN, CAP_KILL\).*drop: \[ALL\].*"
                                                 r"add them: --cap-add CHOWN --cap-add KILL$"):
        check_compatible(m, layout, [])
    without_chroot = frozenset(capabilities.CONTAINER_CAPS) - {"SYS_CHROOT"} | {"CHOWN", "KILL"}
    monkeypatch.setattr(capabilities, "permitted", lambda pid="self": without_chroot)
    with pytest.raises(CheckpointUnusable, match=r"missing capability: CAP_SYS_CHROOT\)"):
        check_compatible(m, layout, [])
    old = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), ()))  # an older fvboot's: CRIU's own only
    monkeypatch.setattr(capabilities, "permitted", lambda pid="self": frozenset(capabilities.CONTAINER_CAPS))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    with pytest.raises(CheckpointUnusable, match="^stop here$"):
        check_compatible(old, layout, [])


def test_checkpoint_from_another_device_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    layout, m = _manifest(tmp_path, {"kind": "cuda", "gpus": [], "driver": "580"})
    with pytest.raises(CheckpointUnusable, match="baked on cuda, running on cpu"):
        check_compatible(m, layout, [])


def test_no_restore_outside_fvboots_own_mounts(tmp_path, monkeypatch):
    """Where fvboot could not make its own /dev/shm, a restored tree's shared-memory files and
    its runtime file would be the ones this container was given (the host's under --ipc=host):
    no restore, said with why."""
    from fvboot import private_mounts

    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    monkeypatch.setattr(private_mounts, "not_isolated", "unshare(CLONE_NEWNS): Operation not permitted")
    with pytest.raises(CheckpointUnusable, match=r"^fvboot could not make its own /dev/shm \(unshare\(CLONE_NEWNS\): "
                                                 r"Operation not permitted\): a restored server's shared-memory"):
        check_compatible(m, layout, [])


def test_other_gpu_model_or_driver_is_refused(tmp_path, monkeypatch):
    here = manifest.Device("cuda", (manifest.Gpu("NVIDIA H200", "GPU-2", "580.1"),), "580.1")
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: here)
    layout, m = _manifest(tmp_path, {"kind": "cuda", "driver": "580.1",
                                     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "driver": "580.1"}]})
    with pytest.raises(CheckpointUnusable, match="this machine has \\['NVIDIA H200'\\]"):
        check_compatible(m, layout, [])
    m = dataclasses.replace(m, device=dataclasses.replace(
        m.device, driver="575.2", gpus=(dataclasses.replace(m.device.gpus[0], name="NVIDIA H200"),)))
    with pytest.raises(CheckpointUnusable, match="baked with driver 575.2"):
        check_compatible(m, layout, [])


def test_a_cpu_without_an_extension_the_bake_had_is_refused(tmp_path, monkeypatch):
    """Code in the checkpoint chose its kernels on the bake's CPU: a CPU without one of its
    extensions is refused before CRIU runs, naming what it lacks; more extensions, or a CPU
    whose extensions cannot be read, are not refused."""
    layout, m = _manifest(tmp_path, {"kind": "cpu", "cpu_isa": ["avx2", "avx512f", "amx_tile"]})
    for here, refused in ((("avx2",), "amx_tile, avx512f"), (("avx2", "avx512f", "amx_tile", "avx512_fp16"), None),
                          ((), None)):
        monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu", cpu_isa=here))
        if refused:
            with pytest.raises(CheckpointUnusable, match=f"baked on a CPU with {refused}, which this CPU lacks"):
                check_compatible(m, layout, [])
        else:
            check_compatible(m, layout, [])


def test_the_cpu_extensions_recorded_are_the_instruction_sets(tmp_path):
    """From /proc/cpuinfo's flags only what code picks kernels by: not virtualization, power or
    kernel-only flags (which differ between machines that run the same code)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 avx512f avx512_bf16 "
                    "amx_tile hypervisor smep smap xsave xsaves xsaveopt tsc_known_freq fma\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert devices.cpu_isa(str(info)) == ("amx_tile", "avx", "avx2", "avx512_bf16", "avx512f", "fma", "sse",
                                           "sse2", "sse4_1", "sse4_2", "ssse3", "xsave", "xsaveopt")
    assert devices.cpu_isa(str(tmp_path / "none")) == ()
    d = manifest.Device("cpu", cpu_isa=("avx2",))
    assert manifest.Device.from_json(d.to_json()) == d and d.to_json()["cpu_isa"] == ["avx2"]


def test_other_run_arguments_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    with pytest.raises(CheckpointUnusable, match=r"arguments \['--max-model-len', '1024'\] were given, and a restored"
                                                  r" server has only the baked ones \[.*\]; the normal start adds them"):
        check_compatible(m, layout, ["--max-model-len", "1024"])
    with pytest.raises(CheckpointUnusable) as e:
        check_compatible(m, layout, ["--hf-token=hf_s3cret"])
    assert "s3cret" not in str(e.value) and "--hf-token=<hidden>" in str(e.value)


def test_run_arguments_that_change_nothing_keep_the_restore(tmp_path, monkeypatch):
    """`docker run IMAGE --max-model-len 512` with the baked value (vLLM's image is called with its
    arguments; an operator keeps them): the same server, so the restore goes on, not a normal start."""
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: "stop here")
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    for same in (["--max-model-len=512"], ["--max-model-len", "512", "--max-model-len", "512"]):
        with pytest.raises(CheckpointUnusable, match="^stop here$"):  # past the arguments' check
            check_compatible(m, layout, same)
    for other in (["--max-model-len", "1024"], ["--max-model-len"], ["--enforce-eager"], ["512"],
                  ["--max-model-len", "512", "--seed", "1"]):
        with pytest.raises(CheckpointUnusable, match="were given, and a restored server has only the baked ones"):
            check_compatible(m, layout, other)


def test_probe_comparison_catches_text_and_logprob_drift():
    baked = [manifest.ProbeAnswer("p", "abc", (-1.0, -2.0))]
    assert same_answers([{"text": "abc", "logprobs": [-1.0, -2.0004]}], baked) is None
    assert "answered 'abd'" in same_answers([{"text": "abd", "logprobs": [-1.0, -2.0]}], baked)
    assert "logprobs differ" in same_answers([{"text": "abc", "logprobs": [-1.0, -2.1]}], baked)


def test_a_probe_that_compares_nothing_is_no_match():
    """Found by review, 2026-12-06: answers were zipped, so a manifest with no probe answers (or
    fewer than the probe gives) passed without a comparison; and a probe of other prompts than
    the bake's (another fvboot's) is not the bake's answer either."""
    baked = [manifest.ProbeAnswer("p", "abc", (-1.0,)), manifest.ProbeAnswer("q", "de", (-0.5,))]
    answers = [{"prompt": "p", "text": "abc", "logprobs": [-1.0]}, {"prompt": "q", "text": "de", "logprobs": [-0.5]}]
    assert same_answers(answers, baked) is None
    assert same_answers(answers, []) == "the manifest holds no probe answers to compare the restored server's with"
    assert same_answers(answers[:1], baked) == "the probe gave 1 answers for the bake's 2"
    assert same_answers(answers, baked[:1]) == "the probe gave 2 answers for the bake's 1"
    assert same_answers([{**answers[0], "prompt": "other"}, answers[1]], baked) == \
        "the probe asked 'other' where the bake asked 'p'"



class _Prober:
    """A restored server's answers: TOGETHER to one request of all probe prompts, ALONE to one
    prompt at a time; records which way it was asked, and with which bound."""

    def __init__(self, together, alone):
        self.together, self.alone, self.asked, self.bounds = together, alone, [], []

    def probe_together(self, timeout):
        self.asked.append("together")
        self.bounds.append(timeout)
        return [{"text": t, "logprobs": [-1.0]} for t in self.together]

    def probe(self, timeout):
        self.asked.append("alone")
        self.bounds.append(timeout)
        return [{"text": t, "logprobs": [-1.0]} for t in self.alone]


def _probed(tmp_path, ctl, together, step_timeout_s=restore.STEP_TIMEOUT_S):
    _, m = _manifest(tmp_path, {"kind": "cpu"})
    m = dataclasses.replace(m, probe=(manifest.ProbeAnswer("p", "alone", (-1.0,)),),
                            probe_together=together and (manifest.ProbeAnswer("p", "together", (-1.0,)),))
    s = restore.RestoreState(layout=None, manifest=m, here=None, tl=Timeline("serve"), pipes=None, criu_env={},
                             settings={}, check=None, ctl=ctl, step_timeout_s=step_timeout_s)
    restore.check_answers(s)
    return s


@pytest.mark.parametrize("step, bound", [(300.0, 60.0), (20.0, 20.0)])
def test_the_probe_waits_a_minute_at_most_not_the_steps_five(tmp_path, step, bound):
    """A warmed engine answers the probe in under a second; one silent for a minute has lost
    its GPU state, and the normal start should not wait five more behind it. A step bound set
    lower still holds."""
    ctl = _Prober(["other"], ["alone"])
    _probed(tmp_path, ctl, True, step_timeout_s=step)
    assert ctl.bounds == [bound, bound]


@pytest.mark.parametrize("recorded", [True, False])
def test_the_probe_asks_together_where_the_bake_recorded_it_and_answers_that_match_end_it(tmp_path, recorded):
    ctl = _Prober(["together"], ["alone"])
    _probed(tmp_path, ctl, recorded)
    assert ctl.asked == (["together"] if recorded else ["alone"])


def test_answers_together_that_differ_only_send_the_prompts_one_at_a_time(tmp_path, capsys):
    """A batch that formed otherwise than at bake may round otherwise: not a reason to give up
    the checkpoint, but the answers one prompt at a time decide."""
    ctl = _Prober(["other"], ["alone"])
    s = _probed(tmp_path, ctl, True)
    assert ctl.asked == ["together", "alone"]
    assert "asked in one request answered otherwise (probe 'p' answered 'other'" in capsys.readouterr().err
    assert "probe asked together: other answers" in [e[0] for e in s.tl.events]

    with pytest.raises(CheckpointUnusable, match="other answers than the baked one: probe 'p' answered 'wrong'"):
        _probed(tmp_path / "again", _Prober(["other"], ["wrong"]), True)

def test_device_map_pairs_baked_gpus_with_this_nodes_by_index():
    def cuda(*uuids):
        return manifest.Device("cuda", tuple(manifest.Gpu("NVIDIA H200", u) for u in uuids), "580")

    baked = cuda("GPU-aaa", "GPU-bbb")
    assert gpu_device_map(baked, cuda("GPU-aaa", "GPU-bbb")) == ""
    assert gpu_device_map(baked, cuda("GPU-xxx", "GPU-bbb")) == "GPU-aaa=GPU-xxx"
    assert gpu_device_map(manifest.Device("cpu"), manifest.Device("cpu")) == ""


def test_a_gpu_state_criu_could_not_resume_ends_the_restore_naming_it(tmp_path, monkeypatch):
    """CRIU ends a restore successfully even when its cuda plugin could not resume the GPU state
    (the tree would then block on its first CUDA call): the step reads the plugin's error, keeps
    the tree for run() to kill, and says why, with the GPU map it tried."""
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    layout, m = _manifest(tmp_path, {"kind": "cuda", "driver": "580",
                                     "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-1", "driver": "580"}]})
    m = dataclasses.replace(m, runtime_file=str(tmp_path / "run" / "runtime.json"))
    here = manifest.Device("cuda", (manifest.Gpu("NVIDIA H200", "GPU-2", "580"),), "580")

    def criu_restore(images, workdir, inherit, env):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "criu-restore.log").write_text(
            "(01.6) Error (plugins/cuda/cuda_plugin.c:510): cuda_plugin: RESUME_DEVICES RESTORE failed with"
            ' Could not restore on process ID 9: "invalid argument"\n(01.7) Restore finished successfully.\n')
        assert env["FV_CUDA_DEVICE_MAP"] == "GPU-1=GPU-2"
        return 4242

    monkeypatch.setattr(restore.criu, "restore", criu_restore)
    monkeypatch.setattr(restore.criu, "restore_thp", lambda: (True, "auto"))
    state = restore.RestoreState(layout, m, here, Timeline("serve"), types.SimpleNamespace(out_w=1, err_w=2),
                                 {}, {}, None)
    with pytest.raises(CheckpointUnusable, match=r"^the GPU state was not resumed \(onto other GPUs: GPU-1=GPU-2\):"
                                                 r' RESUME_DEVICES RESTORE failed with .*"invalid argument"$'):
        restore.criu_restore(state)
    assert state.tree.pid == 4242


def test_the_bound_of_each_call_to_the_restored_server_is_a_setting(monkeypatch):
    monkeypatch.delenv(restore.STEP_TIMEOUT_ENV, raising=False)
    assert restore.step_timeout() == 300
    monkeypatch.setenv(restore.STEP_TIMEOUT_ENV, "20")
    assert restore.step_timeout() == 20
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(restore.STEP_TIMEOUT_ENV, bad)
        with pytest.raises(CheckpointUnusable, match=f"FV_RESTORE_STEP_TIMEOUT_S='{bad}' is not a number"):
            restore.step_timeout()


class _Ctl:
    """The restored server's control as the weight steps use it, each call recorded. Its wake
    keeps vLLM 0.26's executor's rule: the tags its sleep set are weights and kv_cache, and a
    wake that names another is refused whole (answered 200, nothing woken)."""

    def __init__(self, checking: int = 0, refuses: bool = False):
        self.calls, self.checking, self.refuses = [], checking, refuses
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags, timeout):
        self.calls.append(("wake_up", tags, timeout))
        if self.refuses or any(t not in self.asleep for t in tags or ()):
            return
        self.asleep -= set(tags or self.asleep)

    def is_sleeping(self, timeout):
        return bool(self.asleep)

    def rpc(self, method, *args, timeout):
        self.calls.append((method, args, timeout))
        if method == "fv_take_staged" and len(args) == 5:  # in the background
            return [{"started": True, "kv_room": self.kv_room}]
        return [{"bytes": 1, **({"checking": self.checking} if self.checking else {})}]

    kv_room = {"room": True, "free_bytes": 20, "asleep_bytes": 10}


@pytest.mark.parametrize("cached", [True, False])
def test_the_loader_is_told_what_the_prefetch_found_cached(tmp_path, cached):
    """The weight step passes on the prefetch's finding (a dump found all cached is not checked
    again in the worker), wakes the weights first on a GPU, and bounds the call."""
    ctl = _Ctl()
    calls = ctl.calls

    layout, m = _manifest(tmp_path, {"kind": "cuda", "driver": "580",
                                     "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-1", "driver": "580"}]})
    residency = types.SimpleNamespace(resident=lambda: cached)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, residency=residency)
    restore.load_weights(state)
    assert calls[0] == ("wake_up", ["weights"], 7)
    method, args, timeout = calls[1]
    assert (method, args[0], args[1], args[3], args[4], timeout) == (
        "fv_load_weights", str(layout.weights_dir), True, cached, False, 7)
    restore.check_weights(state)  # nothing was left running: no call
    assert len(calls) == 2


@pytest.mark.parametrize("cached, kv_first, staged, order", [
    (False, True, False, ["weights", "kv_cache", "fv_load_weights"]),  # from the disk: the wake first
    (True, True, False, ["weights", "fv_load_weights", "kv_cache"]),  # from memory: after the load
    (False, False, False, ["weights", "fv_load_weights", "kv_cache"]),  # FV_WAKE_ORDER=weights-first
    (False, True, True, ["weights", "fv_take_staged", "kv_cache"]),  # a staged copy is freed first
])
def test_the_kv_cache_wakes_first_only_while_the_weights_come_from_the_disk(tmp_path, cached, kv_first,
                                                                          staged, order):
    ctl = _Ctl()
    layout, m = _manifest(tmp_path, GPU)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, residency=types.SimpleNamespace(resident=lambda: cached),
                                 kv_first_when_cold=kv_first, stager=_Stager(READY) if staged else None)
    restore.load_weights(state)
    restore.wake_engine(state)  # the step after: it wakes the KV cache only if it is not awake yet
    assert [c[1][0] if c[0] == "wake_up" else c[0] for c in ctl.calls] == order
    assert ("KV cache awake (the weights come from the disk)" in state.tl.as_dict()) == (order[1] == "kv_cache")
    assert [c[1] for c in ctl.calls if c[0] == "wake_up"][-1] == ["kv_cache"]  # vLLM's own tag only


@pytest.mark.parametrize("refuses", [False, True])
def test_a_wake_vllm_refused_ends_the_restore_at_once_instead_of_a_hung_first_request(tmp_path, refuses):
    """vLLM answers a wake it refused with 200 (a tag its sleep did not set: the restore once
    woke ["kv_cache", "cudagraph"]); the KV cache stayed unmapped and the probe hung until the
    step bound. The engine's own word that it still sleeps ends the restore there."""
    layout, m = _manifest(tmp_path, GPU)
    ctl = _Ctl(refuses=refuses)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, residency=types.SimpleNamespace(resident=lambda: True))
    restore.load_weights(state)
    if refuses:
        with pytest.raises(CheckpointUnusable, match="vLLM did not wake its engine"):
            restore.wake_engine(state)
    else:
        restore.wake_engine(state)
        assert not ctl.asleep


def test_the_wake_order_setting(monkeypatch):
    monkeypatch.delenv(restore.WAKE_ORDER_ENV, raising=False)
    assert restore.kv_first_when_cold() is True
    monkeypatch.setenv(restore.WAKE_ORDER_ENV, "Weights-First")
    assert restore.kv_first_when_cold() is False
    assert restore.kv_beside_staged() is False
    monkeypatch.setenv(restore.WAKE_ORDER_ENV, "kv-beside")
    assert restore.kv_first_when_cold() is True and restore.kv_beside_staged() is True
    monkeypatch.setenv(restore.WAKE_ORDER_ENV, "kv-first")
    with pytest.raises(CheckpointUnusable,
                       match="FV_WAKE_ORDER='kv-first': expected auto, weights-first or kv-beside"):
        restore.kv_first_when_cold()


def test_an_overlapped_weight_check_is_waited_for_before_the_gate(tmp_path):
    """FV_WEIGHT_CHECK=overlap: the load is asked to leave its checks running, and the step
    after the probe waits for them (bounded) before the memory-image check and the gate."""
    ctl = _Ctl(checking=1)
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, overlap_check=True)
    restore.load_weights(state)
    assert ctl.calls[0][1][4] is True and state.checks_left == 1
    restore.check_weights(state)
    assert ctl.calls[-1] == ("fv_weights_checked", (7,), 17)


def test_an_overlapped_load_is_waited_for_whatever_its_answer_says(tmp_path):
    """Found by review, 2026-12-06: whether the gate waited for the load's checks hung on a
    count read from the worker's answer, and an answer of another shape (not a dict) counted 0:
    the gate would have opened with checks still running. A load asked to leave them running is
    always waited for (the wait answers at once where none run)."""
    class Ctl(_Ctl):
        def rpc(self, method, *args, timeout):
            out = super().rpc(method, *args, timeout=timeout)
            return ["loaded; 1 check running"] if method == "fv_load_weights" else out

    ctl = Ctl()
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, overlap_check=True)
    restore.load_weights(state)
    restore.check_weights(state)
    assert state.checks_left == 0 and ctl.calls[-1] == ("fv_weights_checked", (7,), 17)
    inline = _Ctl()
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, inline,
                                 step_timeout_s=7, overlap_check=False)
    restore.load_weights(state)
    restore.check_weights(state)
    assert "fv_weights_checked" not in [c[0] for c in inline.calls]  # checked in the load already


class _Stager:
    """The restore's view of a weight stager (fvboot.weight_stager.Stager), each call recorded;
    test_staging.py runs the real one."""

    def __init__(self, ready, pool=None, makes_pool=False):
        self._ready, self.calls, self.why = ready, [], None
        self._pool, self.makes_pool, self.why_no_pool = pool, makes_pool, None

    def pool(self):
        self.calls.append("pool")
        if self._pool is None:
            self.why_no_pool = "5.0 GB of GPU memory free; a copy of the dump takes 120.8 GB"
        return self._pool

    def ready(self):
        self.calls.append("ready")
        if self._ready is None:
            self.why = "the weight stager could not stage the dump: no CUDA driver here"
        return self._ready

    def release(self, wait=True):
        self.calls.append("release" if wait else "release, not waited for")

    def drop_pool(self):
        self.calls.append("drop-pool")

    def stop(self):
        self.calls.append("stop")

    def verdict(self, timeout):
        self.calls.append(("verdict", timeout))
        return {"ok": True, "seconds": 0.4}


class _RefusingCtl(_Ctl):
    def rpc(self, method, *args, timeout):
        if method == "fv_take_staged":
            self.calls.append((method, args, timeout))
            raise ServerError("cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE (1)")
        return super().rpc(method, *args, timeout=timeout)


GPU = {"kind": "cuda", "driver": "580", "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-1", "driver": "580"}]}
READY = {"event": "ready", "handle": "ab" * 64, "size": 7, "gpu": "GPU-1", "t": 0.5}


def test_the_worker_takes_the_stagers_copy_and_its_verdict_is_waited_for(tmp_path):
    """Staged: the worker copies from the stager's buffer (no load from the page cache), the
    stager frees that buffer before the step ends (the KV cache wakes into it next), and the
    gate's weight check is the stager's verdict."""
    ctl, stager = _Ctl(), _Stager(READY)
    layout, m = _manifest(tmp_path, GPU)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, stager=stager)
    restore.load_weights(state)
    assert [c[0] for c in ctl.calls] == ["wake_up", "fv_take_staged"]
    assert ctl.calls[1][1] == (str(layout.weights_dir), READY["handle"], 7, "GPU-1")
    assert stager.calls == ["ready", "release"] and state.staged
    restore.check_weights(state)
    assert stager.calls[-1] == ("verdict", 7) and len(ctl.calls) == 2


@pytest.mark.parametrize("ready, ctl_type", [(None, _Ctl), (READY, _RefusingCtl)])
def test_a_stager_not_ready_or_refused_is_stopped_and_the_worker_loads_the_weights(tmp_path, capsys,
                                                                                  ready, ctl_type):
    """A stager that failed (or whose copy the worker cannot open) is stopped before the worker
    loads the weights itself, with the reason in the log; its verdict is not the check then."""
    ctl, stager = ctl_type(), _Stager(ready)
    layout, m = _manifest(tmp_path, GPU)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, stager=stager)
    restore.load_weights(state)
    assert stager.calls == ["ready", "stop"] and not state.staged
    assert ctl.calls[-1][0] == "fv_load_weights"
    err = capsys.readouterr().err
    reason = "no CUDA driver here" if ready is None else "the worker could not take the stager's copy: cuIpcOpenMemHandle"
    assert "weights not staged: " in err and reason in err
    restore.check_weights(state)
    assert stager.calls == ["ready", "stop"]


def test_the_weight_check_setting(monkeypatch):
    monkeypatch.delenv(restore.WEIGHT_CHECK_ENV, raising=False)
    assert restore.weight_check_overlaps() is True
    monkeypatch.setenv(restore.WEIGHT_CHECK_ENV, "inline")
    assert restore.weight_check_overlaps() is False
    monkeypatch.setenv(restore.WEIGHT_CHECK_ENV, " Overlap ")
    assert restore.weight_check_overlaps() is True
    monkeypatch.setenv(restore.WEIGHT_CHECK_ENV, "later")
    with pytest.raises(CheckpointUnusable, match="FV_WEIGHT_CHECK='later': expected inline or overlap"):
        restore.weight_check_overlaps()


def _failing(method, error):
    """A _Ctl whose METHOD raises ServerError(ERROR), the call recorded."""
    class Ctl(_Ctl):
        def rpc(self, name, *args, timeout):
            if name == method:
                self.calls.append((name, args, timeout))
                raise ServerError(error)
            return super().rpc(name, *args, timeout=timeout)
    return Ctl


_TakeFailsCtl = _failing("fv_staged_taken", "cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE (1)")


def _weights_then_wake(tmp_path, ctl, stager, **settings):
    """The weight step and the wake after it (a no-op where the KV cache woke already), the dump
    found cached, with SETTINGS on the state."""
    layout, m = _manifest(tmp_path, GPU)
    state = restore.RestoreState(layout, m, None, Timeline("serve"), None, {}, {}, None, ctl,
                                 step_timeout_s=7, stager=stager,
                                 residency=types.SimpleNamespace(resident=lambda: True), **settings)
    restore.load_weights(state)
    restore.wake_engine(state)
    return layout, state


def _beside(tmp_path, ctl, stager):
    return _weights_then_wake(tmp_path, ctl, stager, kv_beside_staged=True)


def _order(ctl):
    return [c[1][0] if c[0] == "wake_up" else c[0] for c in ctl.calls]


def test_kv_beside_the_engine_wakes_the_kv_cache_while_the_worker_takes_the_staged_copy(tmp_path):
    """FV_WAKE_ORDER=kv-beside with room on the GPU: the take starts in the worker's background,
    the KV cache wakes meanwhile, then the take is waited for (bounded); the stager is told to
    free its buffer without being waited for, and its verdict is still the weights' check."""
    ctl, stager = _Ctl(), _Stager(READY)
    layout, state = _beside(tmp_path, ctl, stager)
    assert _order(ctl) == ["weights", "fv_take_staged", "kv_cache", "fv_staged_taken"]
    assert ctl.calls[1][1] == (str(layout.weights_dir), READY["handle"], 7, "GPU-1", True)
    assert ctl.calls[3][1:] == ((7,), 17)
    assert stager.calls == ["ready", "release, not waited for"] and state.staged and state.kv_awake
    marks = list(state.tl.as_dict())
    assert marks.index("KV cache awake (beside the staged copy)") < marks.index("staged copy taken")
    restore.check_weights(state)
    assert stager.calls[-1] == ("verdict", 7)


def test_kv_beside_without_room_frees_the_stagers_buffer_before_the_kv_cache_wakes(tmp_path, capsys):
    ctl, stager = _Ctl(), _Stager(READY)
    why = "5.0 GB of GPU memory free, the KV cache takes 120.8 GB and 1.1 GB beside it"
    ctl.kv_room = {"room": False, "why": why}
    _, state = _beside(tmp_path, ctl, stager)
    assert _order(ctl) == ["weights", "fv_take_staged", "fv_staged_taken", "kv_cache"]
    assert stager.calls == ["ready", "release"] and state.staged
    assert f"the KV cache wakes after the stager's buffer is freed: {why}" in capsys.readouterr().err


def test_kv_beside_a_take_that_fails_ends_in_the_workers_own_load(tmp_path, capsys):
    """The background take fails: the stager is stopped and the worker loads the weights from
    the page cache; the KV cache, awake already, is not woken again."""
    ctl, stager = _TakeFailsCtl(), _Stager(READY)
    _, state = _beside(tmp_path, ctl, stager)
    assert _order(ctl) == ["weights", "fv_take_staged", "kv_cache", "fv_staged_taken", "fv_load_weights"]
    assert stager.calls == ["ready", "stop"] and not state.staged
    assert "the worker could not take the stager's copy: cuIpcOpenMemHandle" in capsys.readouterr().err


POOL = {"event": "pool", "socket": "/tmp/fvboot/stager-pool.sock", "pool": [[4096, 8192]], "seconds": 0.31}


_AdoptRefusedCtl = _failing("fv_adopt_memory", "[Errno 111] Connection refused")


def _adopting(tmp_path, ctl, stager):
    return _weights_then_wake(tmp_path, ctl, stager, adopt=True)[1]


def test_with_wake_memory_helper_the_worker_adopts_the_stagers_memory_before_the_wakes(tmp_path):
    """The worker takes the stager's allocations before the weights' wake (which then maps them,
    as the KV cache's does after); then the staged copy is taken as always."""
    ctl, stager = _Ctl(), _Stager(READY, pool=POOL, makes_pool=True)
    state = _adopting(tmp_path, ctl, stager)
    assert _order(ctl) == ["fv_adopt_memory", "weights", "fv_take_staged", "kv_cache"]
    assert ctl.calls[0][1:] == (("/tmp/fvboot/stager-pool.sock", [[4096, 8192]]), 7)
    assert "memory adopted" in state.tl.as_dict() and state.staged and "drop-pool" not in stager.calls


@pytest.mark.parametrize("stager, ctl_type, said", [
    (_Stager(READY, pool=None, makes_pool=True), _Ctl, "5.0 GB of GPU memory free"),
    (_Stager(READY, pool=POOL, makes_pool=True), _AdoptRefusedCtl, "the worker could not adopt the stager's: [Errno 111]"),
    (_Stager(READY, makes_pool=False), _Ctl, "this image's bake did not record its sleeping memory"),
])
def test_memory_not_made_or_not_adopted_leaves_the_wakes_to_vllm(tmp_path, capsys, stager, ctl_type, said):
    ctl = ctl_type()
    state = _adopting(tmp_path, ctl, stager)
    assert _order(ctl)[-3:] == ["weights", "fv_take_staged", "kv_cache"]
    assert "memory adopted" not in state.tl.as_dict() and state.staged
    assert f"the engine allocates its memory itself: {said}" in capsys.readouterr().err
    assert ("pool" in stager.calls) == stager.makes_pool  # not waited for where nothing is made
    # what it made (or may still be making) is given back before the wakes, which need the room
    assert ("drop-pool" in stager.calls) == stager.makes_pool
    if stager.makes_pool:
        assert stager.calls.index("drop-pool") < stager.calls.index("ready")


IN_PLACE = {"event": "ready", "in_place": True, "size": 7, "gpu": "GPU-1", "t": 0.6, "copy": "in-place",
            "register_s": 0.2, "bytes": 7, "entries": 1}


def test_weights_the_stager_put_into_the_adopted_memory_are_taken_as_they_are(tmp_path, capsys):
    """FV_WAKE_MEMORY=helper on an image whose bake recorded the weights' addresses: the stager
    fills the weights memory it made, the worker adopts it, the weights' wake maps it, and the
    worker takes the weights in place (no copy, no page cache); the stager's verdict is still
    the weights' check."""
    ctl, stager = _Ctl(), _Stager(IN_PLACE, pool=POOL, makes_pool=True)
    state = _adopting(tmp_path, ctl, stager)
    assert _order(ctl) == ["fv_adopt_memory", "weights", "fv_weights_in_place", "kv_cache"]
    assert state.staged and "weights in place" in state.tl.as_dict() and stager.calls[-1] == "release"
    assert "weights: put in place by the stager" in capsys.readouterr().err
    restore.check_weights(state)
    assert stager.calls[-1] == ("verdict", 7)


@pytest.mark.parametrize("stager, ctl_type, said", [
    (_Stager(IN_PLACE, pool=POOL, makes_pool=True), _AdoptRefusedCtl,
     "the stager put the dump into memory the worker did not adopt"),
    (_Stager(IN_PLACE, pool=POOL, makes_pool=True),
     _failing("fv_weights_in_place", "1 of the 120 allocations of the weights pool were not mapped"),
     "the weights the worker adopted are not all the stager's: 1 of the 120"),
])
def test_weights_not_in_place_are_loaded_by_the_worker(tmp_path, capsys, stager, ctl_type, said):
    """A fill the worker cannot trust (its memory not adopted, or an allocation of the weights
    pool vLLM made itself) is never taken: the stager is stopped and the worker loads the
    weights from the page cache, checked."""
    ctl = ctl_type()
    state = _adopting(tmp_path, ctl, stager)
    assert _order(ctl)[-2:] == ["fv_load_weights", "kv_cache"] and not state.staged
    assert "stop" in stager.calls
    assert f"weights not staged: {said}" in capsys.readouterr().err


def test_a_stop_once_the_gate_is_open_reaches_the_serving_tree_not_a_kill(tmp_path):
    """The gate open, fvboot still tidies up (the stager, the cuda-checkpoint service) before its
    supervision: a docker stop there had the serving tree killed at once, its requests in flight
    cut (found by review, 2026-12-06). From the gate's opening on, a stop is passed to the tree."""
    import signal
    import subprocess
    import sys

    from fvboot import exitnoise

    class Ctl:
        def gate(self, state, timeout):
            return {"gate": "open", "metrics": {}}

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    try:
        s = restore.RestoreState(layout=None, manifest=None, here=None, tl=Timeline("serve"), pipes=None,
                                 criu_env={}, settings={}, check=None, ctl=Ctl(), tree=restore.RestoredTree(child.pid))
        restore.open_gate(s)
        os.kill(os.getpid(), signal.SIGTERM)  # docker stop
        assert child.wait(timeout=30) == -signal.SIGTERM and exitnoise.stopping.is_set()
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
        exitnoise.stopping.clear()
        child.kill()
