"""The served tree's environment (dev mode only for a server fvboot checkpoints, credentials
scrubbed, settings kept) and the event lines fvboot reads from its output."""

from __future__ import annotations

import pytest

from fvboot.launcher import parse_event


def test_only_a_server_fvboot_checkpoints_runs_in_dev_mode(monkeypatch, tmp_path):
    from fvboot.launcher import server_env

    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")  # not even when the operator sets it
    assert server_env(tmp_path / "r.json")["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in server_env(tmp_path / "r.json", dev_mode=False)
    assert server_env(tmp_path / "r.json")["FV_RUNTIME_FILE"] == str(tmp_path / "r.json")


def test_the_served_trees_sockets_stay_on_loopback_unless_the_image_says_otherwise(monkeypatch, tmp_path):
    """vLLM's TCP store, gloo and NCCL bind to loopback (a checkpoint restores only where its
    sockets' addresses exist); a setting of the image's own is kept as it is."""
    from fvboot.launcher import LOOPBACK_SETTINGS, server_env

    for name in LOOPBACK_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    env = server_env(tmp_path / "r.json")
    assert {k: env[k] for k in LOOPBACK_SETTINGS} == {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
                                                      "NCCL_SOCKET_IFNAME": "lo"}
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.2.3")
    assert server_env(tmp_path / "r.json")["VLLM_HOST_IP"] == "10.1.2.3"


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



def test_this_starts_load_settings_replace_the_bakes_in_the_worker():
    """fvboot hands its FV_LOAD_* to the restored worker, whose environment is the bake's: given
    ones win, ones the bake had and this start has not go back to the defaults."""
    from fvboot.launcher import apply_load_settings, load_settings

    here = load_settings({"FV_LOAD_THREADS": "3", "FV_GPU_LOADER": "0", "HF_TOKEN": "x", "PATH": "/bin"})
    assert here == {"FV_LOAD_THREADS": "3", "FV_GPU_LOADER": "0"}
    worker = {"FV_LOAD_THREADS": "8", "FV_LOAD_ODIRECT": "1", "PATH": "/usr/bin"}  # as baked
    apply_load_settings(here, worker)
    assert worker == {"FV_LOAD_THREADS": "3", "FV_GPU_LOADER": "0", "PATH": "/usr/bin"}


@pytest.mark.parametrize("line", [
    b"fvboot-event first_request_served 1796265257.386079\n",
    b"(APIServer pid=2) fvboot-event first_request_served 1796265257.386079\n",  # vLLM on the GPU
    b"\x1b[36m(APIServer pid=2)\x1b[0m fvboot-event first_request_served 1796265257.386079\r\n",  # on a tty
])
def test_event_lines_are_found_with_or_without_vllms_process_prefix(line):
    assert parse_event(line) == ("first_request_served", ["1796265257.386079"])


@pytest.mark.parametrize("line", [
    b"INFO: 127.0.0.1 - \"POST /v1/completions\" 200 OK\n",
    b"(APIServer pid=2) INFO something fvboot-event first_request_served 1\n",  # quoted, not an event
    b"fvboot-event\n",
])
def test_other_lines_are_not_events(line):
    assert parse_event(line) is None


def test_the_server_listens_on_every_ipv4_address_unless_the_bake_asked_for_ipv6_too():
    """`--vllm-arg=--host=::` (an IPv6-only cluster): one --host in the command, the user's; the
    user's arguments still end it, as the manifest reads them back; the port check asks IPv6."""
    from fvboot.launcher import arg_value, vllm_command

    plain = vllm_command("/fv/model", "m", 8000, ["--max-model-len=512"], sleep_mode=False)
    assert plain.count("--host") == 1 and arg_value(plain, "--host") == "0.0.0.0"
    for user in (["--host", "::"], ["--host=::"]):
        cmd = vllm_command("/fv/model", "m", 8000, [*user, "--max-model-len=512"], sleep_mode=True)
        assert [a for a in cmd if a.startswith("--host")] == [user[0]] and arg_value(cmd, "--host") == "::"
        assert cmd[-len(user) - 1:] == [*user, "--max-model-len=512"]


@pytest.mark.parametrize("args, rest, key", [
    (["--api-key", "k1"], [], "k1"),
    (["--port", "9000", "--api-key=k2"], ["--port", "9000"], "k2"),
    (["--api-key", "a", "--api-key", "b"], [], "b"),  # the last, as vLLM's parser takes it
    (["--max-model-len", "512"], ["--max-model-len", "512"], None),
])
def test_the_runs_api_key_is_taken_out_of_the_servers_arguments(args, rest, key):
    from fvboot.launcher import take_api_key_arg

    assert take_api_key_arg(args) == (rest, key)


def test_an_api_key_argument_without_a_value_says_how_to_give_one():
    from fvboot.launcher import take_api_key_arg

    with pytest.raises(ValueError, match="--api-key needs a value: docker run IMAGE --api-key KEY"):
        take_api_key_arg(["--port", "9000", "--api-key"])


@pytest.mark.parametrize("args, rest, model", [
    (["meta-llama/Llama-3.2-3B-Instruct", "--max-model-len", "512"], ["--max-model-len", "512"],
     "meta-llama/Llama-3.2-3B-Instruct"),  # docker run IMAGE MODEL ..., as vLLM's image is called
    (["--port", "9000", "--model", "m"], ["--port", "9000"], "m"),
    (["--model=m", "--max-model-len=512"], ["--max-model-len=512"], "m"),
    (["bash", "-c", "echo hi"], ["-c", "echo hi"], "bash"),
    (["--max-model-len", "512"], ["--max-model-len", "512"], None),  # a value after an option is not one
    ([], [], None),
])
def test_a_model_named_in_the_runs_arguments_is_taken_out_of_them(args, rest, model):
    from fvboot.launcher import take_model_arg

    assert take_model_arg(args) == (rest, model)


def test_a_model_option_without_a_value_is_refused():
    from fvboot.launcher import take_model_arg

    with pytest.raises(ValueError, match="--model needs a value"):
        take_model_arg(["--model", "--port", "9000"])


def test_the_runs_api_key_is_the_key_and_is_said_where_it_came_from():
    from fvboot.api_keys import resolve_api_key
    from fvboot.runtime_file import runtime_settings

    assert runtime_settings({}, "k-9\n")["api_key"] == "k-9"
    assert runtime_settings({"FV_API_KEY": "k-9"}, "k-9")["api_key"] == "k-9"
    assert resolve_api_key({}, "k-9").line == ("clients must send the API key given as --api-key as"
                                               " `Authorization: Bearer <key>`")
    assert resolve_api_key({}, "").line == "--api-key empty: clients need no API key"
    with pytest.raises(ValueError, match="FV_API_KEY and --api-key are both set, to different keys"):
        runtime_settings({"FV_API_KEY": "a"}, "b")
    with pytest.raises(ValueError, match="FV_API_KEY and VLLM_API_KEY and --api-key are all set, to different keys"):
        runtime_settings({"FV_API_KEY": "a", "VLLM_API_KEY": "b"}, "c")


def test_arguments_shown_in_a_log_leave_credentials_out():
    from fvboot.launcher import shown_args

    assert shown_args(["--api-key", "k", "--hf-token=hf_x", "--ssl-keyfile", "/k.pem", "--port", "9000"]) == [
        "--api-key", "<hidden>", "--hf-token=<hidden>", "--ssl-keyfile", "/k.pem", "--port", "9000"]


def test_the_libraries_start_time_settings_are_recorded_and_an_empty_one_is_none():
    """What the bake records and a restore compares (compatibility.check_compatible says a difference):
    the dynamic loader's preloads and glibc's malloc act when a process starts, as the thread
    counts do; `-e LD_PRELOAD=` sets nothing and must not be said as a difference."""
    from fvboot.launcher import library_settings

    env = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "MALLOC_ARENA_MAX": "2",
           "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "CUDA_MODULE_LOADING": "EAGER", "OMP_NUM_THREADS": "",
           "HOME": "/root"}
    assert library_settings(env) == {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "HOME")}
    assert library_settings({"LD_PRELOAD": " "}) == {}


def test_a_line_the_pump_cannot_pass_on_leaves_the_pipe_drained(capfd):
    """An event callback that raises (a malformed event line), or a write that fails, ended the
    pump's thread: nobody read the pipe, and the tree's processes would block in their next
    write once it was full, a silent hang (found by review, 2026-12-06). The pump says so once
    and reads on."""
    import os
    import threading

    from fvboot.launcher import LogPump

    r, w = os.pipe()
    seen = []

    def on_event(name, args):
        seen.append(args)
        float(args[0])  # what serve's callback does with the time it is given

    pump = LogPump(r, True, on_event)
    pump.start()
    writer = threading.Thread(target=lambda: (os.write(w, b"fvboot-event first_request_served x\n"
                                                       + b"y" * 100 + b"\n" * 2000 + b"z" * (256 << 10) + b"\n"),
                                              os.close(w)))
    writer.start()
    writer.join(20)
    assert not writer.is_alive(), "the writer blocked: the pipe was not drained"
    pump.join(20)
    assert seen == [["x"]]
    err = capfd.readouterr().err
    assert err.count("could not be passed on (ValueError: could not convert string to float: 'x')") == 1


def test_the_api_key_in_every_spelling_vllms_parser_takes_is_the_middlewares_and_never_shown():
    """vLLM's parser takes `--api_key` and a unique prefix (`--api-k`) for `--api-key`, and
    several keys after it. fvboot knew only `--api-key KEY`: `--api-k SECRET` was logged as
    given and left to vLLM, and `--api-key K1 K2` left K2 among the arguments, logged, or taken
    for a model (found by review, 2026-12-06)."""
    from fvboot.launcher import shown_args, take_api_key_arg

    for argv in (["--api-k", "s3cret"], ["--api_key=s3cret"], ["--api-ke", "-starts-with-dash"], ["--api-key=s3cret"]):
        rest, key = take_api_key_arg(["--max-model-len", "512", *argv])
        assert rest == ["--max-model-len", "512"] and key == argv[-1].split("=")[-1], argv
    assert take_api_key_arg(["--api", "x"]) == (["--api", "x"], None)  # not unique: vLLM's to refuse
    with pytest.raises(ValueError, match="more than one key") as e:
        take_api_key_arg(["--api-key", "k1", "k2"])
    assert "k1" not in str(e.value) and "k2" not in str(e.value)
    assert shown_args(["--api-k", "k1", "k2", "--max-model-len", "512", "--hf_token=abc", "--hf-t", "-x1"]) == [
        "--api-k", "<hidden>", "<hidden>", "--max-model-len", "512", "--hf_token=<hidden>", "--hf-t", "<hidden>"]


@pytest.mark.parametrize("baked, run, same", [
    (["--max-model-len", "512"], ["--max-model-len=512"], True),
    (["--port", "8000", "--enable-prefix-caching"], ["--port", "8000", "--enable-prefix-caching"], True),
    (["--max_model_len", "512"], ["--max-model-len", "512"], True),  # one option to vLLM's parser
    # found by review, 2026-12-06: each restored a server other than the one asked for
    (["--lora-modules", "a=/l/a", "b=/l/b"], ["--lora-modules", "a=/l/a"], False),  # a normal start has a only
    (["--enable-prefix-caching", "--no-enable-prefix-caching"], ["--enable-prefix-caching"], False),
    (["--no-enable-prefix-caching"], ["--enable-prefix-caching"], False),
    (["--enable-prefix-caching"], ["--no-enable-prefix-caching"], False),
    (["--max-model-len", "512"], ["--max-model-len", "512", "extra"], False),
    (["--max-model-len", "512"], ["512"], False),
    (["--max-model-len", "512"], ["--seed", "1"], False),
])
def test_run_arguments_change_the_server_as_vllms_parser_reads_them(baked, run, same):
    from fvboot.launcher import adds_nothing

    assert adds_nothing(["vllm", "serve", "/fv/model", *baked], run) is same
