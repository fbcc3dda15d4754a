"""Rendering: golden Dockerfiles for both targets, compared line by line, and the structure that
the rest of the product relies on (stages, patch series, entrypoint, CA before network steps)."""

import os
import re
from pathlib import Path

import jinja2
import pytest

from fvbuild.buildcontext import assemble
from fvbuild.context import CriuSource, make_context
from fvbuild.options import load_options
from fvbuild.render import docker_quote, render_dockerfile, render_template

GOLDEN = Path(__file__).parent.parent / "golden"


def _render(tmp_path, **values):
    opts = load_options({"model": "synthetic:tiny", **values})
    return assemble(opts, tmp_path / "ctx", check_remote=False)


CASES = {
    "cuda": dict(device="cuda"),
    "cpu": dict(device="cpu", base_image="fv-local/debian:bookworm", extra_index_urls=["https://download.pytorch.org/whl/cpu"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_dockerfile(tmp_path, name):
    rendered = _render(tmp_path, **CASES[name]).dockerfile.splitlines()
    golden = GOLDEN / f"{name}.Dockerfile"
    if os.environ.get("FV_REGEN_GOLDEN"):
        golden.write_text("\n".join(rendered) + "\n")
    expected = golden.read_text().splitlines()
    for i, (got, want) in enumerate(zip(rendered, expected), 1):
        assert got == want, f"{golden.name} line {i} differs"
    assert len(rendered) == len(expected)


def test_criu_stage_shows_repo_ref_and_series(tmp_path):
    bc = _render(tmp_path, device="cpu", criu_repo="https://example.org/criu.git", criu_ref="v4.1")
    stage = bc.dockerfile.split("AS criu", 1)[1].split("\nFROM ", 1)[0]
    assert "ARG CRIU_REPO=https://example.org/criu.git" in stage
    assert "ARG CRIU_REF=v4.1" in stage
    assert "0001-version-mark-fast-vllm-builds.patch" in stage
    assert (bc.path / "criu-patches" / "0001-version-mark-fast-vllm-builds.patch").exists()


def test_local_criu_source_goes_into_the_context(tmp_path):
    src = tmp_path / "criu-src"
    (src / "criu").mkdir(parents=True)
    (src / "Makefile").write_text("all:\n")
    bc = _render(tmp_path, device="cpu", criu_src=str(src))
    assert "COPY criu-src.tar /src/criu-src.tar" in bc.dockerfile
    assert "git fetch" not in bc.dockerfile
    assert ("criu-src.tar" in dict(bc.listing()))


def test_ca_cert_is_installed_before_any_network_step_in_every_stage(tmp_path):
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    bc = _render(tmp_path, device="cpu", ca_cert=str(cert), wheels=[str(tmp_path)])
    stages = re.split(r"^FROM ", bc.dockerfile, flags=re.M)[1:]
    assert len(stages) == 3
    for stage in stages:
        ca = stage.index("extra-ca.crt")
        net = min(i for i in (stage.find("apt-get update"), stage.find("pip install")) if i >= 0)
        assert ca < net
    assert (bc.path / "certs" / "extra-ca.crt").read_text() == cert.read_text()


def test_wheels_are_copied_into_a_stage_that_the_runtime_does_not_inherit(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"PK")
    bc = _render(tmp_path, device="cpu", wheels=[str(wheels)])
    runtime = bc.dockerfile.split("AS runtime", 1)[1]
    assert "--find-links /tmp/wheels/0" in bc.dockerfile
    assert "wheels/0" not in runtime
    assert (bc.path / "wheels" / "0" / "demo-1.0-py3-none-any.whl").exists()


def test_runtime_keeps_vllms_calling_convention(tmp_path):
    df = _render(tmp_path, device="cuda").dockerfile
    assert 'ENTRYPOINT ["fvboot"]' in df and "CMD []" in df
    assert "/usr/local/bin/cuda-checkpoint" in df
    assert "cuda_plugin.so" in df.split("AS runtime", 1)[1]
    df2 = _render(tmp_path / "n", device="cuda", cuda_checkpoint="nvidia").dockerfile
    assert "/usr/local/bin/cuda-checkpoint" not in df2


def test_strict_undefined_catches_template_mistakes():
    opts = load_options({"model": "m"})
    ctx = make_context(opts, CriuSource(kind="git", describe="x", repo="r", ref="v"), ())
    with pytest.raises(jinja2.UndefinedError):
        jinja2.Environment(undefined=jinja2.StrictUndefined).from_string("{{ ctx.nope }}").render(ctx=ctx)
    assert "FROM vllm/vllm-openai:v0.26.0 AS runtime" in render_dockerfile(ctx)


def test_label_values_refuse_newlines_without_echoing_them():
    assert docker_quote('a "b"') == '"a \\"b\\""'
    with pytest.raises(ValueError) as e:
        docker_quote("secret\nvalue")
    assert "secret" not in str(e.value)


def test_baked_layers_template_orders_weights_before_checkpoint():
    from fvbuild.bake import BakeLayersContext

    df = render_template("baked.Dockerfile.j2", BakeLayersContext("0", "img", "bake", (("k", "v"),)))
    assert df.index("/fv/weights") < df.index("/fv/checkpoint")
    assert 'LABEL k="v"' in df
