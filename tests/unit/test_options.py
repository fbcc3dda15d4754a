"""BuildOptions: validation at the edge, with messages that say what to change."""

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
    ({"model": "m", "vllm_args": ["--port=9"]}, "--port is set by fvbuild"),
    ({"device": "cpu"}, "--model: Field required"),
])
def test_invalid_values_say_what_to_change(values, message):
    with pytest.raises(OptionsError) as e:
        load_options(values)
    assert message in str(e.value)


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
