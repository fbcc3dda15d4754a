"""BuildOptions: validation at the edge, with messages that say what to change."""

import re

import pytest

from fvbuild.errors import OptionsError
from fvbuild.options import BuildOptions, Device, load_options


def test_defaults_follow_the_device():
    cuda = load_options({"model": "meta-llama/Llama-3.2-3B-Instruct"})
    assert cuda.resolved_base_image == "vllm/vllm-openai:v0.26.0"
    assert cuda.resolved_tag == "fast-vllm/llama-3-2-3b-instruct:cuda"
    cpu = load_options({"model": "synthetic:tiny", "device": "cpu"})
    assert cpu.device is Device.cpu
    assert cpu.resolved_base_image == "debian:bookworm"
    assert cpu.resolved_vllm_version == "0.32.0"
    assert cpu.resolved_tag == "fast-vllm/synthetic-tiny:cpu"


def test_unknown_key_in_config_file_is_rejected(tmp_path):
    cfg = tmp_path / "fv.toml"
    cfg.write_text('model = "synthetic:tiny"\ncriu_reff = "v4.2.1"\n')
    with pytest.raises(OptionsError, match=r"--criu-reff: unknown option"):
        load_options({}, cfg)


def test_cli_overrides_config_file(tmp_path):
    cfg = tmp_path / "fv.toml"
    cfg.write_text('model = "synthetic:tiny"\ndevice = "cpu"\nport = 9000\nvllm-args = ["--max-model-len", "512"]\n')
    opts = load_options({"port": 8123, "tag": None}, cfg)
    assert (opts.port, opts.device, opts.vllm_args) == (8123, Device.cpu, ["--max-model-len", "512"])


def test_a_config_file_takes_the_clis_spelling_of_each_option(tmp_path):
    """README: options "can also come from `--config file.toml` (same names)"; the three whose flag
    is not the field's name (`--vllm-arg`, `--extra-index-url`, `--bake-timeout`) were refused
    as unknown options under the very name --help gives (found by review, 2026-12-06)."""
    cfg = tmp_path / "fv.toml"
    cfg.write_text('model = "synthetic:tiny"\ndevice = "cpu"\nvllm-arg = ["--max-model-len=512"]\nbake-timeout = 900\n'
                   'extra-index-url = ["https://example.org/simple"]\n')
    opts = load_options({}, cfg)
    assert (opts.vllm_args, opts.bake_timeout_s, opts.extra_index_urls) == (
        ["--max-model-len=512"], 900, ["https://example.org/simple"])
    cfg.write_text('model = "synthetic:tiny"\nvllm-arg = ["--max-model-len=512"]\nvllm_args = ["--seed=1"]\n')
    with pytest.raises(OptionsError, match=r"fv.toml: 'vllm_args' gives an option the file already gave \(as '--vllm-arg'\)"):
        load_options({}, cfg)


def test_invalid_toml_names_the_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("model = \n")
    with pytest.raises(OptionsError, match="bad.toml: not valid TOML"):
        load_options({}, cfg)


@pytest.mark.parametrize("values, message", [
    ({"model": "m", "criu_src": "/nonexistent/criu"}, "--criu-src: /nonexistent/criu does not exist"),
    ({"model": "m", "tag": "Bad Tag"}, "--tag: 'Bad Tag' is not a valid image reference"),
    ({"model": "m", "port": 0}, "--port"),
    ({"model": "m", "wheels": ["/opt"], "device": "cuda"}, "--wheels/--extra-index-url are used by --device cpu"),
    ({"model": "m", "vllm_args": ["--port=9"]}, "--vllm-arg: --port is reserved: use --port"),
    ({"model": "m", "vllm_args": ["--hf-token", "hf_x"]}, "--vllm-arg: --hf-token may hold a secret, which must not be in an image"),
    ({"model": "m", "vllm_args": ["--api-key=k"]}, "--vllm-arg: --api-key is reserved: pass the key at run time"),
    # several API servers: fvboot gates the one its calls reach (found by review, 2026-12-06)
    ({"model": "m", "vllm_args": ["--api-server-count", "2"]}, "--vllm-arg: --api-server-count '2': only 1 is supported"),
    ({"model": "m", "vllm_args": ["-asc=4"]}, "--vllm-arg: -asc '4': only 1 is supported, one API-server process"),
    ({"model": "m", "vllm_args": ["--data-parallel-size=2"]}, "--vllm-arg: --data-parallel-size '2': only 1 is"),
    ({"model": "m", "vllm_args": ["-dp"]}, "--vllm-arg: -dp '': only 1 is supported"),
    # vLLM reads --a_b as --a-b: the underscore spellings are the same options (found by review)
    ({"model": "m", "vllm_args": ["--api_server_count=4"]}, "--vllm-arg: --api-server-count '4': only 1 is"),
    ({"model": "m", "vllm_args": ["--served_model_name=x"]}, "--vllm-arg: --served-model-name is reserved"),
    ({"model": "m", "vllm_args": ["--worker_extension_cls", "x"]}, "--vllm-arg: --worker-extension-cls is reserved"),
    ({"model": "m", "vllm_args": ["--hf_token", "hf_x"]}, "--vllm-arg: --hf-token may hold a secret"),
    # credentials in a URL would be in the image's labels and history (found by review)
    ({"model": "m", "criu_repo": "https://oauth2:glpat-SECRET@gitlab.example.com/criu.git"},
     "https://***@gitlab.example.com/criu.git carries credentials"),
    ({"model": "m", "criu_repo": "https://TOKEN@github.com/me/criu.git"}, "--criu-src"),
    ({"model": "m", "device": "cpu", "extra_index_urls": ["https://__token__:pypi-SECRET@pypi.example.com/simple"]},
     "https://***@pypi.example.com/simple carries credentials"),
    ({"model": "m", "env": ["HTTPS_PROXY=http://me:pa55@proxy:3128"]},
     "--env: the value of HTTPS_PROXY holds a URL with a password"),
    # the image's own environment: moved, the bake's output leaves the layers (found by review)
    ({"model": "m", "env": ["FV_HOME=/data"]}, "--env: FV_HOME is set by the image"),
    ({"model": "m", "env": ["VLLM_CACHE_ROOT=/tmp/c"]}, "--env: VLLM_CACHE_ROOT is set by the image"),
    ({"model": "m", "env": ["FV_PORT=9000"]}, "--env: FV_PORT is set by the image (the bake's output and compile"
                                              " caches live under /fv, in its layers; FV_PORT is --port): use --port"),
    ({"model": "m", "ca_cert": "/etc"}, "--ca-cert: /etc is not a file"),
    ({"device": "cpu"}, "--model: Field required"),
    ({"model": "m", "env": ["VLLM_X"]}, "--env: 'VLLM_X' is not NAME=VALUE"),
    ({"model": "m", "env": ["1X=a"]}, "--env: '1X' is not an environment variable name"),
    ({"model": "m", "env": ["AWS_SECRET_ACCESS_KEY=a"]}, "--env: AWS_SECRET_ACCESS_KEY may hold a secret, which must not be in an image"),
    ({"model": "m", "env": {"VLLM_X": "a\nb"}}, "--env: the value of VLLM_X contains a line break or another control character"),
    ({"model": "m", "env": ["FV_GRAPH_POOL=cumem"]}, "--env: FV_GRAPH_POOL='cumem': expected vllm or sleep"),
])
def test_invalid_values_say_what_to_change(values, message):
    with pytest.raises(OptionsError) as e:
        load_options(values)
    assert message in str(e.value)


def test_urls_without_secrets_are_taken():
    opts = load_options({"model": "m", "criu_repo": "ssh://git@example.com/criu.git",
                         "env": ["HTTPS_PROXY=http://proxy:3128", "NO_PROXY=localhost"]})
    assert opts.criu_repo == "ssh://git@example.com/criu.git"
    assert load_options({"model": "m", "criu_repo": "git@github.com:me/criu.git"})


def test_long_options_are_kept_as_vllm_reads_them():
    """The baked arguments fvboot compares a run's with, in vLLM's own spelling; values as given."""
    opts = load_options({"model": "m", "vllm_args": ["--max_model_len=512", "--tensor_parallel_size", "2",
                                                     "--chat-template", "a_b.jinja", "-O3"]})
    assert opts.vllm_args == ["--max-model-len=512", "--tensor-parallel-size", "2", "--chat-template", "a_b.jinja",
                              "-O3"]


def test_one_api_server_and_one_engine_as_vllm_defaults_are_allowed():
    opts = load_options({"model": "m", "vllm_args": ["--api-server-count", "1", "--data-parallel-size=1"]})
    assert opts.vllm_args == ["--api-server-count", "1", "--data-parallel-size=1"]


@pytest.mark.parametrize("tag, resolved", [
    ("localhost:5000/fv/llama", "localhost:5000/fv/llama:latest"),  # a registry's port is not a tag
    ("registry.example.com:5000/team/llama:v1", "registry.example.com:5000/team/llama:v1"),
    ("registry.example.com/team/llama-3__b.x", "registry.example.com/team/llama-3__b.x:latest"),
    ("fv/test:cpu", "fv/test:cpu"),
])
def test_a_tag_may_name_a_registry_to_push_to(tag, resolved):
    """Operators push images to their registry: its host (with a port) leads the tag."""
    assert load_options({"model": "m", "tag": tag}).resolved_tag == resolved


@pytest.mark.parametrize("tag", ["Fv/Test:cpu", "fv/test:", "fv/test:a:b", "fv//x", "myhost:port/x"])
def test_what_docker_would_refuse_to_tag_is_refused_first(tag):
    with pytest.raises(OptionsError, match="is not a valid image reference"):
        load_options({"model": "m", "tag": tag})


def test_the_served_name_is_given_to_the_bake_and_names_the_default_tag(tmp_path):
    """A local folder is served under its path unless --served-model-name says otherwise; a
    Hugging Face snapshot's last part is a revision's hash, no name for an image."""
    from fvbuild.bake import bake_command

    snap = tmp_path / "models--org--llama" / "snapshots" / "0cb88a4f"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    opts = load_options({"model": str(snap), "served_model_name": "org/Llama-3B", "device": "cpu"})
    cmd = bake_command(opts)
    assert cmd[cmd.index("--served-model-name") + 1] == "org/Llama-3B"
    assert opts.resolved_tag == "fast-vllm/llama-3b:cpu"
    assert load_options({"model": str(snap), "device": "cpu"}).resolved_tag == "fast-vllm/0cb88a4f:cpu"
    assert "--served-model-name" not in bake_command(load_options({"model": "synthetic:tiny"}))
    for bad in ("", " padded", "two\nlines"):
        with pytest.raises(OptionsError, match="--served-model-name: .*without blanks at its ends or line breaks"):
            load_options({"model": "m", "served_model_name": bad})


def test_criu_src_excludes_repo_and_ref(tmp_path):
    with pytest.raises(OptionsError, match="either --criu-src or --criu-repo/--criu-ref"):
        load_options({"model": "m", "criu_src": str(tmp_path), "criu_ref": "v4.1"})


def test_ca_cert_must_be_pem(tmp_path):
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with pytest.raises(OptionsError, match="holds no PEM certificate"):
        load_options({"model": "m", "ca_cert": str(bad)})


def test_options_object_rejects_unknown_fields():
    with pytest.raises(Exception):
        BuildOptions(model="m", colour="blue")


def _prebuilt(tmp_path, device="cuda"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_render import fake_prebuilt

    return fake_prebuilt(tmp_path / f"criu-{device}.tar.gz", device)


def test_criu_prebuilt_is_checked_at_validation(tmp_path):
    opts = load_options({"model": "m", "criu_prebuilt": str(_prebuilt(tmp_path))})
    assert opts.criu_prebuilt.name == "criu-cuda.tar.gz"
    not_ours = tmp_path / "other.tar.gz"
    import tarfile

    with tarfile.open(not_ours, "w:gz") as tf:
        tf.add(__file__, arcname="x.py")
    with pytest.raises(OptionsError, match=r"--criu-prebuilt: .*other.tar.gz has no share/fast-vllm/criu-prebuilt.json"):
        load_options({"model": "m", "criu_prebuilt": str(not_ours)})
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball")
    with pytest.raises(OptionsError, match=r"--criu-prebuilt: .*garbage.tar.gz is not a gzip tarball"):
        load_options({"model": "m", "criu_prebuilt": str(garbage)})
    with pytest.raises(OptionsError, match=r"--criu-prebuilt: .*nope.tar.gz is not a file"):
        load_options({"model": "m", "criu_prebuilt": str(tmp_path / "nope.tar.gz")})


@pytest.mark.parametrize("other", [{"criu_ref": "v4.1"}, {"criu_repo": "https://example.org/criu.git"},
                                   {"criu_src": "."}])
def test_criu_prebuilt_conflicts_with_a_criu_source(tmp_path, other):
    with pytest.raises(OptionsError, match="--criu-prebuilt replaces --criu-src/--criu-repo/--criu-ref"):
        load_options({"model": "m", "criu_prebuilt": str(_prebuilt(tmp_path)), **other})


def test_cpu_prebuilt_cannot_serve_a_cuda_image(tmp_path):
    with pytest.raises(OptionsError, match="made with --device cpu .*fvbuild criu --device cuda"):
        load_options({"model": "m", "criu_prebuilt": str(_prebuilt(tmp_path, "cpu"))})
    assert load_options({"model": "m", "device": "cpu", "criu_prebuilt": str(_prebuilt(tmp_path, "cpu"))})


@pytest.mark.parametrize("args, gpus", [
    ([], 1),
    (["--max-model-len=4096"], 1),
    (["--tensor-parallel-size", "2"], 2),
    (["-tp=2", "--pipeline-parallel-size=2"], 4),
    (["--pipeline-parallel-size", "2", "-tp", "4", "-dp", "1"], 8),
])
def test_the_gpus_a_model_takes_come_from_vllms_parallel_sizes(args, gpus):
    assert load_options({"model": "synthetic:tiny", "vllm_args": args}).gpus_used == gpus


@pytest.mark.parametrize("args, message", [
    (["-tp", "two"], "-tp needs a whole number of GPUs from 1 up, not 'two'"),
    (["--tensor-parallel-size"], "--tensor-parallel-size needs a whole number of GPUs from 1 up, not ''"),
    (["--pipeline-parallel-size=0"], "--pipeline-parallel-size needs a whole number of GPUs from 1 up, not '0'"),
])
def test_a_parallel_size_that_is_not_a_count_is_one_clear_error(args, message):
    with pytest.raises(OptionsError, match=re.escape(message)):
        load_options({"model": "synthetic:tiny", "vllm_args": args})


def test_the_images_environment_comes_as_pairs_or_a_table(tmp_path):
    assert load_options({"model": "m", "env": ("VLLM_LOGGING_LEVEL=INFO", "FV_GRAPH_POOL=sleep", "E=a=b")}).env == {
        "VLLM_LOGGING_LEVEL": "INFO", "FV_GRAPH_POOL": "sleep", "E": "a=b"}
    cfg = tmp_path / "fv.toml"
    cfg.write_text('model = "m"\n[env]\nVLLM_LOGGING_LEVEL = "INFO"\n')
    assert load_options({}, cfg).env == {"VLLM_LOGGING_LEVEL": "INFO"}


@pytest.mark.parametrize("args", [["--host", "::"], ["--host=::"], ["--host=0.0.0.0"]])
def test_host_takes_the_wildcards_a_checkpoint_restores_with_anywhere(args):
    from fvbuild.options import BuildOptions

    assert BuildOptions(model="synthetic:tiny", vllm_args=args).vllm_args == args


@pytest.mark.parametrize("args", [["--host", "10.0.0.5"], ["--host=::1"], ["--host"], ["--host="]])
def test_host_refuses_one_address(args):
    from fvbuild.options import BuildOptions

    with pytest.raises(ValueError, match="one address would tie the checkpoint to one network"):
        BuildOptions(model="synthetic:tiny", vllm_args=args)


def test_arguments_naming_a_key_file_are_not_secrets_and_tls_is_refused_for_what_it_is():
    """A file's name is no secret; TLS is refused (fvboot's checks speak plain HTTP to the server:
    a TLS server waited an hour for its health answer, then was stopped; found by review,
    2026-12-06), and said so, not as a secret."""
    from fvboot.launcher import is_secret_option

    assert not is_secret_option("--ssl-keyfile")
    with pytest.raises(OptionsError, match=r"^--vllm-arg: --ssl-keyfile is not taken: fvboot's checks of the server"
                                           r" speak plain HTTP on 127.0.0.1: terminate TLS in front of the container"):
        load_options({"model": "m", "vllm_args": ["--ssl-keyfile", "/k.pem"]})


@pytest.mark.parametrize("model, message", [
    ("../nope", "--model: no folder ../nope on this machine (a local model is given by its folder)"),
    ("/nope/model", "--model: no folder /nope/model on this machine"),
    ("bad name", "--model: 'bad name' is neither a folder on this machine nor a Hugging Face repo id (ORG/NAME)"),
    ("org/name/extra", "is neither a folder on this machine nor a Hugging Face repo id"),
    ("org/-name", "is neither a folder on this machine nor a Hugging Face repo id"),
])
def test_a_model_that_is_neither_a_folder_nor_a_repo_id_is_refused_before_any_build(model, message):
    """Tried as an operator would (2026-12-05): each of these built the whole image, then the bake
    failed on the Hub client's own validation of what it took for a repo id."""
    with pytest.raises(OptionsError) as e:
        load_options({"model": model})
    assert message in str(e.value)


def test_a_file_given_as_the_model_is_named_a_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OptionsError, match="model.gguf is a file, not a model folder"):
        load_options({"model": str(gguf)})


@pytest.mark.parametrize("model", ["gpt2", "meta-llama/Llama-3.2-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
                                   "TheBloke/Llama-2-7B-GPTQ", "org_x/model.v1"])
def test_repo_ids_the_hub_takes_are_taken(model):
    assert load_options({"model": model}).model == model


def test_a_quoted_tilde_is_the_home_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_options({"model": "~/models/m"}).model == str(tmp_path / "models" / "m")


def test_a_folder_without_config_json_is_refused_before_any_build(tmp_path):
    """The folder above the model's, or a Hugging Face cache folder above snapshots/REV: it built
    the image, then the bake said it holds no config.json."""
    (tmp_path / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "snapshots" / "abc" / "config.json").write_text("{}")
    with pytest.raises(OptionsError, match="holds no config.json: give the folder of a Transformers model"):
        load_options({"model": str(tmp_path)})
    assert load_options({"model": str(tmp_path / "snapshots" / "abc")}).model.endswith("abc")


def test_a_token_variable_named_but_not_set_is_refused_where_the_model_is_downloaded(monkeypatch, tmp_path):
    """--hf-token-env MY_TOKEN with MY_TOKEN unset downloaded without a token, and a gated model
    then failed in the bake with advice about HF_TOKEN."""
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(OptionsError, match="--hf-token-env MY_TOKEN: MY_TOKEN is not set in fvbuild's environment"):
        load_options({"model": "org/gated", "hf_token_env": "MY_TOKEN"})
    monkeypatch.setenv("MY_TOKEN", "hf_x")
    assert load_options({"model": "org/gated", "hf_token_env": "MY_TOKEN"}).hf_token_env == "MY_TOKEN"
    monkeypatch.delenv("MY_TOKEN")
    (tmp_path / "config.json").write_text("{}")  # a local folder or a synthetic model needs none
    assert load_options({"model": str(tmp_path), "hf_token_env": "MY_TOKEN"}).model == str(tmp_path)
    assert load_options({"model": "synthetic:tiny", "hf_token_env": "MY_TOKEN"}).model == "synthetic:tiny"


def test_a_revision_is_given_to_the_bake_of_a_hub_model_and_refused_for_any_other(tmp_path):
    """`--revision` pins what the bake downloads (the manifest records the commit it was); for a
    synthetic model or a folder it could only be ignored, so it is refused, as is a value that
    cannot be a branch, tag or commit, and `--vllm-arg=--revision` (vLLM serves the folder)."""
    from fvbuild.bake import bake_command

    cmd = bake_command(load_options({"model": "org/model", "revision": "v1.0", "device": "cpu"}))
    assert cmd[cmd.index("--revision") + 1] == "v1.0"
    assert "--revision" not in bake_command(load_options({"model": "org/model", "device": "cpu"}))
    (tmp_path / "config.json").write_text("{}")
    for model, what in (("synthetic:tiny", "a synthetic model"), (str(tmp_path), "a folder on this machine")):
        with pytest.raises(OptionsError, match=f"--revision applies to a model the bake downloads from the Hugging"
                                               f" Face Hub, and .* is {what}"):
            load_options({"model": model, "revision": "main"})
    for bad in ("v1 beta", "-x", "a;b"):
        with pytest.raises(OptionsError, match="revision"):
            load_options({"model": "org/model", "revision": bad})
    with pytest.raises(OptionsError, match="--revision.*use fvbuild's own --revision"):
        load_options({"model": "org/model", "vllm_args": ["--revision=v2"]})
