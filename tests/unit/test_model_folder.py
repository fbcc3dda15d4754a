"""A local model folder given to fvbuild: what the bake container gets mounted so that the
folder's links resolve there (a Hugging Face cache snapshot is nothing but links to its blobs),
and the links it could never follow, refused before anything is built."""

from __future__ import annotations

import pytest

from fvbuild.bake import IMPORT_PATH, bake_command
from fvbuild.errors import ModelFolderError, OptionsError
from fvbuild.model_folder import ModelFolder
from fvbuild.options import load_options
from fvboot.models import prepare_model


def _hf_cache(tmp_path):
    """models--org--name/{blobs/HASH, snapshots/REV/FILE -> ../../blobs/HASH}, as huggingface_hub makes it."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    (snap / "original").mkdir(parents=True)
    for i, (name, data) in enumerate((("config.json", "{}"), ("model.safetensors", "w"),
                                      ("original/params.json", "p"))):
        (repo / "blobs" / f"h{i}").write_text(data)
        depth = "../" * (name.count("/") + 2)
        (snap / name).symlink_to(f"{depth}blobs/h{i}")
    return repo, snap


def test_a_hugging_face_cache_snapshot_is_mounted_with_its_blobs(tmp_path):
    repo, snap = _hf_cache(tmp_path)
    folder = ModelFolder.of(snap)
    assert folder == ModelFolder(repo, "snapshots/abc123")
    opts = load_options({"model": str(snap), "device": "cpu"})
    cmd = bake_command(opts)
    assert cmd[cmd.index("--model-dir") + 1] == f"{IMPORT_PATH}/snapshots/abc123"
    # what the bake then does in the container, with REPO at the mount point: links followed
    dest = tmp_path / "dest"
    prepare_model(str(snap), dest, None, model_dir=repo / folder.inside)
    assert (dest / "config.json").read_text() == "{}" and not (dest / "config.json").is_symlink()
    assert (dest / "original" / "params.json").read_text() == "p"


def test_a_plain_folder_is_mounted_as_it_is(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "alias.json").symlink_to("config.json")
    assert ModelFolder.of(tmp_path / "m") == ModelFolder(tmp_path / "m", "")
    assert "--model-dir" not in bake_command(load_options({"model": str(tmp_path / "m"), "device": "cpu"}))


@pytest.mark.parametrize("link, said", [
    ("/etc/hostname", "links to the absolute path /etc/hostname, which the bake container cannot follow"),
    ("../nowhere.json", "which does not exist"),
])
def test_links_the_bake_container_could_not_follow_are_refused_before_the_build(tmp_path, link, said):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").symlink_to(link)
    with pytest.raises(ModelFolderError, match=said):
        ModelFolder.of(tmp_path / "m")
    with pytest.raises(OptionsError, match="--model: .*" + said):
        load_options({"model": str(tmp_path / "m")})


def test_links_that_reach_across_the_file_system_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    up = "../" * (len(tmp_path.parts) + 1)  # to / and down to a file every machine has
    (tmp_path / "m" / "config.json").symlink_to(up + "etc/passwd")
    with pytest.raises(ModelFolderError, match="reach across the whole file system"):
        ModelFolder.of(tmp_path / "m")
