"""models.py's download from the Hugging Face Hub, with the real huggingface_hub client talking to a
stand-in for the Hub on this machine (HF_ENDPOINT; the real Hub cannot be reached here): what it
takes of a repo, and what each way a download fails tells the operator to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stand_in_hub import SHA, FakeHub

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub():
    made = []

    def make(**kw) -> FakeHub:
        made.append(FakeHub(**kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _prepare(endpoint: str, tmp_path: Path, token: str | None = None, revision: str | None = None
             ) -> subprocess.CompletedProcess:
    """prepare_model("org/model") in a process of its own, as the bake runs it (the client reads
    HF_ENDPOINT when it is imported)."""
    token_file = None
    if token:
        token_file = tmp_path / "token"
        token_file.write_text(token)
    code = ("import sys; from pathlib import Path; from fvboot.models import prepare_model; from fvboot.errors import BakeFailed\n"
            "try: print(prepare_model('org/model', Path(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None,"
            " revision=sys.argv[3] or None))\n"
            "except BakeFailed as e: print('BakeFailed:', e); sys.exit(3)\n")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "dest"), str(token_file or ""), revision or ""],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_repo_is_downloaded_without_the_pytorch_copies_of_its_safetensors(hub, tmp_path):
    h = hub(files={"config.json": b"{}", "model.safetensors": b"s", "pytorch_model.bin": b"b", "README.md": b"r",
                   "tokenizer.json": b"{}", "chat_template.jinja": b"{{ x }}"})
    r = _prepare(h.url, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [
        ".fv-source.json", "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]


def test_a_repo_with_only_pytorch_weights_gets_them(hub, tmp_path):
    h = hub(files={"config.json": b"{}", "pytorch_model.bin": b"b"})
    r = _prepare(h.url, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [".fv-source.json", "config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("files, said", [
    ({"model.gguf": b"g", "README.md": b"r"}, "org/model on the Hugging Face Hub has no config.json"),
    ({"config.json": b"{}", "model.gguf": b"g"}, "has no weights in *.safetensors or *.bin files"),
])
def test_a_repo_vllm_cannot_serve_from_its_files_is_named(hub, tmp_path, files, said):
    r = _prepare(hub(files=files).url, tmp_path)
    assert r.returncode == 3 and said in r.stdout and "--model /path/to/model" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("error, token, said", [
    ((401, "GatedRepo"), None, ["org/model is gated on the Hugging Face Hub: accept its terms on "
                                "https://huggingface.co/org/model", "no token (none was given: set HF_TOKEN"]),
    ((401, "RepoNotFound"), "hf_abc", ["not a model on the Hugging Face Hub that the token given can read",
                                       "check its name (ORG/NAME)"]),
    ((404, "RepoNotFound"), None, ["that no token (none was given"]),
    ((401, None), "hf_abc", ["refused the token given for org/model (401 Unauthorized): an invalid or expired token"]),
    ((500, None), None, ["the Hugging Face Hub answered 500 for org/model"]),
])
def test_each_way_the_hub_refuses_says_what_to_do(hub, tmp_path, error, token, said):
    r = _prepare(hub(error=error).url, tmp_path, token)
    assert r.returncode == 3, r.stdout + r.stderr
    for s in said:
        assert s in r.stdout, r.stdout
    assert "hf_abc" not in r.stdout + r.stderr  # the token itself is never said
    assert "Traceback" not in r.stderr


def test_a_bake_without_a_network_says_how_to_give_it_one_or_a_folder(hub, tmp_path):
    h = hub(files={})
    url = h.url
    h.close()  # nothing listens there now: the connection is refused, as with no network
    r = _prepare(url, tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "the bake cannot reach the Hugging Face Hub to download org/model" in r.stdout
    assert "fvbuild image --network host" in r.stdout and "--model /path/to/model" in r.stdout


def test_the_commit_downloaded_is_the_one_a_revision_names_and_is_returned(hub, tmp_path):
    """`fvbuild image --revision v1`: the tag's commit is downloaded, every file from it, and the
    manifest records that commit (main's without --revision)."""
    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    h = hub(files={"config.json": b"{}", "model.safetensors": b"s"}, revisions={"v1": tagged})
    r = _prepare(h.url, tmp_path, revision="v1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"PreparedModel(name='org/model', commit='{tagged}')" in r.stdout, r.stdout
    resolved = [p for p in h.seen if "/resolve/" in p]
    assert resolved and all(f"/resolve/{tagged}/" in p for p in resolved), h.seen
    r = _prepare(h.url, tmp_path / "again")
    assert f"commit='{SHA}'" in r.stdout, r.stdout + r.stderr


def test_a_revision_the_repo_lacks_is_named(hub, tmp_path):
    r = _prepare(hub(files={"config.json": b"{}"}).url, tmp_path, revision="v9")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "org/model on the Hugging Face Hub has no revision 'v9': give a branch, tag or commit it has" in r.stdout
