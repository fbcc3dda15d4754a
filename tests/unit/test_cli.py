"""Bad input at the CLI: each case is refused before any Docker call, with one line that says what
to change, exit != 0 and no traceback (issue 12's table, builder side)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest
from click.testing import CliRunner

from fvbuild.cli import main


@pytest.fixture
def files(tmp_path):
    (tmp_path / "unknown-key.toml").write_text('model = "synthetic:tiny"\ncolour = "blue"\n')
    (tmp_path / "bad.toml").write_text("model = \n")
    (tmp_path / "latin1.toml").write_bytes('# café\nmodel = "synthetic:tiny"\n'.encode("latin-1"))
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tf:
        tf.add(__file__, arcname="x.py")
    (tmp_path / "criu").mkdir()
    (tmp_path / "llama:8b").mkdir()
    (tmp_path / "llama:8b" / "config.json").write_text("{}")
    return tmp_path


MODEL = ["--model", "synthetic:tiny"]
CASES = [
    # (argv, words the one line must contain)
    (["image", "--model", "synthetic:nope"], ["unknown synthetic model 'synthetic:nope'", "synthetic:tiny", "synthetic:llama-3.2-3b"]),
    (["image", "--device", "cpu"], ["--model: Field required"]),
    (["image", "--model", ""], ["--model: is empty"]),
    (["image", *MODEL, "--vllm-arg=--served-model-name=x"], ["--served-model-name is reserved"]),
    (["image", *MODEL, "--vllm-arg=--host=10.0.0.5"], ["--host '10.0.0.5'", "0.0.0.0", ":: (IPv6 and IPv4", "tie the checkpoint to one network"]),
    (["image", *MODEL, "--vllm-arg=--host", "--vllm-arg=localhost"], ["--host 'localhost'"]),
    (["image", *MODEL, "--vllm-arg=--api-key=s3cret"], ["--api-key is reserved", "FV_API_KEY"]),
    (["image", *MODEL, "--vllm-arg=--uds=/tmp/s"], ["--uds is reserved"]),
    (["image", *MODEL, "--vllm-arg=--port=9000"], ["--port is reserved: use --port"]),
    (["image", *MODEL, "--vllm-arg", "--max-model-len=512\nRUN evil"], ["--vllm-arg: a --vllm-arg value contains a newline"]),
    (["image", *MODEL, "--criu-ref", ""], ["--criu-ref: is empty"]),
    (["image", *MODEL, "--criu-repo", ""], ["--criu-repo: is empty"]),
    (["image", *MODEL, "--criu-repo", "https://x.org/criu.git\nRUN evil"], ["--criu-repo:", "whitespace"]),
    (["image", *MODEL, "--criu-repo", "https://x.org/c.git;id"], ["--criu-repo:", "shell character"]),
    (["image", *MODEL, "--criu-repo", "criu"], ["--criu-repo: 'criu' is neither a git URL nor a local folder"]),
    (["image", *MODEL, "--criu-ref", "--upload-pack=x"], ["--criu-ref:", "starts with '-'"]),
    (["image", *MODEL, "--device", "cpu", "--extra-index-url", "https://x.org/simple \"; rm"], ["--extra-index-url:", "whitespace"]),
    (["image", *MODEL, "--device", "cpu", "--extra-index-url", "ftp.x.org"], ["--extra-index-url:", "not an http(s)/file URL"]),
    (["image", *MODEL, "--criu-src", "{d}/criu", "--criu-ref", "v4.1"], ["either --criu-src or --criu-repo/--criu-ref"]),
    (["image", *MODEL, "--criu-prebuilt", "{d}/other.tar.gz"], ["--criu-prebuilt:", "not a tarball from `fvbuild criu`"]),
    (["image", *MODEL, "--criu-prebuilt", "{d}/missing.tar.gz"], ["--criu-prebuilt:", "is not a file"]),
    (["image", *MODEL, "--tag", "Bad Tag"], ["--tag: 'Bad Tag' is not a valid image reference"]),
    (["image", *MODEL, "--base-image", "bad image"], ["--base-image: 'bad image' is not an image reference"]),
    # the user's words as given: ":a:" printed as an emoji, "[bold]" taken as markup (2026-12-05)
    (["image", *MODEL, "--tag", "fv/test:a:b"], ["--tag: 'fv/test:a:b' is not a valid image reference"]),
    (["image", *MODEL, "--base-image", "[bold]x:y"], ["--base-image: '[bold]x:y' is not an image reference"]),
    (["image", *MODEL, "--base-image", "x[/]"], ["--base-image: 'x[/]' is not an image reference"]),
    (["image", *MODEL, "--device", "cpu", "--gpu-access", "devices"], ["--gpu-access/--nvidia-driver-dir apply to --device cuda only"]),
    (["image", *MODEL, "--gpu-access", "toolkit", "--nvidia-driver-dir", "{d}"], ["--nvidia-driver-dir is for --gpu-access devices"]),
    (["image", *MODEL, "--nvidia-driver-dir", "{d}/nope"], ["--nvidia-driver-dir:", "is not a folder"]),
    (["image", *MODEL, "--bake-timeout", "5"], ["--bake-timeout:", "greater than or equal to 60"]),
    (["image", *MODEL, "--hf-token-env", "1-BAD"], ["--hf-token-env: '1-BAD' is not an environment variable name"]),
    (["image", *MODEL, "--device", "cuda", "--wheels", "{d}"], ["--wheels/--extra-index-url are used by --device cpu"]),
    (["image", "--config", "{d}/unknown-key.toml"], ["--colour: unknown option"]),
    (["image", "--config", "{d}/bad.toml"], ["bad.toml: not valid TOML"]),
    (["image", "--config", "{d}/missing.toml"], ["cannot read config file", "missing.toml"]),
    (["render", *MODEL, "--port", "0"], ["--port:", "greater than or equal to 1"]),
    (["criu", "--out", "{d}/criu.txt"], ["--out", "name it FILE.tar.gz"]),
    (["criu", "--out", "{d}/c.tar.gz", "--criu-ref", ""], ["--criu-ref: is empty"]),
    # found by review, 2026-12-06: each was a traceback, or passed
    (["render", *MODEL, "--context-dir", "{d}"], ["--context-dir:", "is not empty", "an empty or new folder"]),
    (["image", *MODEL, "--ca-cert", "{d}"], ["--ca-cert:", "is not a file"]),
    (["image", *MODEL, "--vllm-arg=--api_server_count=2"], ["--api-server-count '2': only 1 is supported"]),
    (["image", *MODEL, "--env", "FV_HOME=/data"], ["--env: FV_HOME is set by the image"]),
    (["image", *MODEL, "--criu-repo", "https://u:p@x.org/criu.git"], ["https://***@x.org/criu.git carries credentials"]),
    # found by review, 2026-12-06 (session 23): vLLM's parser takes a unique prefix of an option
    (["image", *MODEL, "--vllm-arg=--api-server-c=2"], ["--api-server-c: vLLM's parser reads it as --api-server-count"]),
    (["image", *MODEL, "--vllm-arg=--por=9000"], ["--por: vLLM's parser reads it as --port", "by its full name"]),
    (["image", *MODEL, "--vllm-arg=--ho", "--vllm-arg=10.0.0.5"], ["--ho: vLLM's parser reads it as --host"]),
    (["image", *MODEL, "--vllm-arg=--tensor-parallel=2"], ["reads it as --tensor-parallel-size"]),
    (["image", "--config", "{d}/latin1.toml"], ["latin1.toml: not valid TOML", "UTF-8"]),
    (["image", *MODEL, "--vllm-arg=-as", "--vllm-arg=2"], ["-as: vLLM's parser reads it as -asc"]),
    (["image", *MODEL, "--vllm-arg=--config", "--vllm-arg=/fv/model/serve.yaml"], ["--config is not taken", "give each option by itself"]),
    (["image", *MODEL, "--vllm-arg=--ssl-certfile=/c.pem"], ["--ssl-certfile is not taken", "terminate TLS in front"]),
    (["bench", "fv/x:cpu", "--env", "FV_WEIGHT_CHECK=bogus"], ["--env: FV_WEIGHT_CHECK='bogus'"]),
    (["bench", "fv/x:cpu", "--env", "NOEQUALS"], ["--env takes KEY=VALUE, not 'NOEQUALS'"]),
    (["render", *MODEL, "--env", "FOO=a\tb"], ["--env: the value of FOO contains a line break or another control character"]),
    (["render", *MODEL, "--env", "FOO\n=1"], ["--env:", "is not an environment variable name"]),
    (["render", *MODEL, "--tag", "fv/x:1\n"], ["--tag:", "is not a valid image reference"]),
    (["render", *MODEL, "--device", "cpu", "--vllm-version", "0.32.0 && touch /pwned"], ["--vllm-version:", "is not a vLLM release number"]),
    (["render", "--model", "{d}/odd\tname"], ["--model:", "control character", "rename the folder"]),
    (["image", "--model", "{d}/llama:8b", "--device", "cpu"], ["--model:", "llama:8b holds ':' or ','", "bind mount"]),
    (["image", *MODEL, "--ca-cert", "/proc/self/mem"], ["--ca-cert: cannot read /proc/", "/mem: Input/output error"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_clear_line(files, argv, words, monkeypatch):
    import fvbuild.engine

    def no_docker(*a, **k):
        raise AssertionError("validation must fail before any Docker call")

    monkeypatch.setattr(fvbuild.engine.DockerEngine, "connect", classmethod(no_docker))
    argv = [a.format(d=files) for a in argv]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code not in (0, None), r.output
    assert not isinstance(r.exception, AssertionError), r.exception
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_synthetic_names_match_fvboot_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        from fvbuild.options import load_options, synthetic_names
        load_options({"model": "synthetic:tiny"})
        from fvboot.synthetic import SPECS
        assert synthetic_names() == tuple(SPECS), synthetic_names()
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "vllm", "transformers")]
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sigterm_runs_finally_blocks_so_no_temp_context_is_left(tmp_path):
    """A terminated fvbuild leaves no temp folder: SIGTERM becomes an exception, cleanups run."""
    code = textwrap.dedent("""
        import os, signal, sys, tempfile, time
        from fvbuild.cli import _stop_on_sigterm
        _stop_on_sigterm()
        with tempfile.TemporaryDirectory(prefix="fvbuild-ctx-", dir=sys.argv[1]) as d:
            open(os.path.join(d, "big"), "w").write("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=20)
    assert r.returncode != 0 and r.returncode != -signal.SIGTERM
    assert not list(tmp_path.iterdir())
