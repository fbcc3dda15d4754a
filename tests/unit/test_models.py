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


def _folder(path, tag):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"tag": "%s"}' % tag)
    (path / "model.safetensors").write_bytes(tag.encode())
    return path


def test_a_bake_keeps_a_model_folder_only_for_the_model_that_filled_it(tmp_path, capsys):
    """A bake into an FV_HOME that an earlier bake filled with model A kept A and served it under
    model B's name (found by review, 2026-12-06: `fvboot bake --home H --model B` after A, or a
    baked image as fvbuild's base). The folder says what filled it; another model replaces it."""
    import json

    from fvboot.models import SOURCE_RECORD, filled_from

    a, b, dest = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B"), tmp_path / "home" / "model"
    prepare_model(str(a), dest, None, model_dir=tmp_path / "none")
    assert filled_from(dest) == {"model": str(a), "revision": None, "commit": None}
    (a / "config.json").write_text('{"tag": "A2"}')  # the same model given again: the folder is kept
    prepare_model(str(a), dest, None, model_dir=tmp_path / "none")
    assert json.loads((dest / "config.json").read_text()) == {"tag": "A"}
    prepare_model(str(b), dest, None, model_dir=tmp_path / "none")
    assert json.loads((dest / "config.json").read_text()) == {"tag": "B"} and filled_from(dest)["model"] == str(b)
    assert f"{dest} holds '{a}', not '{b}': replaced" in capsys.readouterr().err
    (dest / SOURCE_RECORD).unlink()  # put there by hand, or an older fvboot's: not known to be B's
    (dest / "model.safetensors").write_bytes(b"other")
    prepare_model(str(b), dest, None, model_dir=tmp_path / "none")
    assert (dest / "model.safetensors").read_bytes() == b"B"
    assert "holds a model fvboot did not put there" in capsys.readouterr().err


def test_a_synthetic_model_made_beforehand_is_kept_for_its_own_name_only(tmp_path):
    """`fvboot make-model` then `fvboot bake` (host mode, bench/gpu_startup.py): the synthetic
    model's own record says which it is; seed 0 is what a bake makes."""
    from fvboot import synthetic
    from fvboot.models import filled_from

    dest = _folder(tmp_path / "model", "tiny")
    (dest / synthetic.RECORD).write_text('{"name": "tiny", "seed": 0}\n')
    assert filled_from(dest) == {"model": "synthetic:tiny"}
    prepare_model("synthetic:tiny", dest, None)
    assert (dest / "model.safetensors").read_bytes() == b"tiny"  # kept, not made again
    (dest / synthetic.RECORD).write_text('{"name": "tiny", "seed": 3}\n')
    assert filled_from(dest) == {"model": "synthetic:tiny (seed 3)"}
