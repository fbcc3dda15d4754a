"""models.py: the model folder the bake fills is readable by every user of the image (a container
run with --user starts vLLM normally from it), whatever modes the files came with."""

from __future__ import annotations

import stat

from fvboot.models import prepare_model


def _mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_copied_model_folder_is_readable_by_every_user(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w")  # safetensors writes its files 0600
    (src / "sub" / "tokenizer.model").write_bytes(b"t")
    (src / "run.sh").write_text("#!/bin/sh\n")
    for p, mode in ((src / "model.safetensors", 0o600), (src / "sub" / "tokenizer.model", 0o600),
                    (src / "run.sh", 0o700), (src / "sub", 0o700), (src / "config.json", 0o640)):
        p.chmod(mode)
    (src / "link.json").symlink_to("config.json")
    dest = tmp_path / "dest"
    assert prepare_model(str(src), dest, None).name == str(src)
    assert _mode(dest / "model.safetensors") == 0o644
    assert _mode(dest / "sub" / "tokenizer.model") == 0o644
    assert _mode(dest / "config.json") == 0o644
    assert _mode(dest / "run.sh") == 0o744  # read, not run, by others
    assert _mode(dest / "sub") == 0o755 and _mode(dest) & 0o555 == 0o555
    assert (dest / "link.json").read_text() == "{}" and _mode(dest / "link.json") == 0o644
