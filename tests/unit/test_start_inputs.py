"""What a start is given (fvboot's settings, the run's arguments), read alike by `fvboot serve`
and `fvboot check`."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

from fvboot import manifest
from fvboot.errors import FvBootError
from fvboot.layout import Layout
from fvboot.start_inputs import check_model_arg, read_start_inputs


def _baked(tmp_path) -> Layout:
    """A home whose manifest serves `llama`, built from meta-llama/Llama-3.2-3B-Instruct."""
    layout = Layout(tmp_path)
    layout.images_dir.mkdir(parents=True)
    m = manifest.Manifest(
        model=manifest.Model("llama", "meta-llama/Llama-3.2-3B-Instruct", "/fv/model"),
        vllm=manifest.Vllm(("--max-model-len", "512"), ("vllm", "--max-model-len", "512"), 8000),
        device=manifest.Device.from_json({"kind": "cpu"}), pipes=manifest.Pipes("pipe:[1]", "pipe:[2]"),
        files=(), probe=())
    layout.manifest.write_text(json.dumps(m.to_json()))
    return layout


def test_a_model_the_run_names_is_the_baked_one_or_the_start_ends_at_once(tmp_path):
    """`docker run IMAGE MODEL` (vLLM's image's convention) with the model the image was built
    from, its served name or its folder goes on; any other, `bash` among them, ends the start
    before anything runs: given to vLLM it was "unrecognized arguments" after a lost restore
    (tried as an operator would, 2026-12-05)."""
    layout = _baked(tmp_path)
    for given in ("llama", "meta-llama/Llama-3.2-3B-Instruct", "/fv/model/", str(layout.model_dir)):
        assert check_model_arg(layout, given) == f"{given!r} names the model this image was baked with: served as baked"
    for given in ("bash", "Qwen/Qwen3-8B"):
        with pytest.raises(FvBootError, match=rf"^'{re.escape(given)}' was given as the model to serve, and this image"
                           r" serves only the one it was baked with \('llama'\): the arguments after the image are"
                           r" vLLM options .*another model needs an image of its own .*docker run --entrypoint PROGRAM"):
            check_model_arg(layout, given)


def test_the_runs_arguments_lose_the_key_and_the_baked_model_and_each_is_said(tmp_path):
    inputs = read_start_inputs(_baked(tmp_path), ["llama", "--api-key", "k", "--max-model-len", "512"],
                               {"FV_RESTOR": "0"})
    assert inputs.run_args == ["--max-model-len", "512"] and inputs.settings["api_key"] == "k"
    assert inputs.notes[0].startswith("FV_RESTOR is not a setting of fvboot (did you mean FV_RESTORE?)")
    assert inputs.notes[1] == "'llama' names the model this image was baked with: served as baked"
    assert "given as --api-key" in inputs.notes[2]


@pytest.mark.parametrize("argv, env, said", [
    ([], {"FV_WEIGHT_CHECK": "bogus"}, "FV_WEIGHT_CHECK='bogus': expected inline or overlap"),
    (["--api-key"], {}, "--api-key needs a value"),
    (["--model"], {}, "--model needs a value"),
    (["bash"], {}, "'bash' was given as the model to serve"),
    # found by review, 2026-12-06: TLS waited an hour for a health answer in plain HTTP, then the
    # serving server was stopped; `--por 9000` had fvboot wait on 8000; a second API server
    (["--ssl-keyfile", "/k.pem", "--ssl-certfile", "/c.pem"], {}, "--ssl-keyfile is not taken: fvboot's checks"),
    (["--por", "9000"], {}, "--por: vLLM's parser reads it as --port (a prefix of it)"),
    (["--api-server-count", "2"], {}, "--api-server-count '2': only 1 is supported"),
    (["-as", "2"], {}, "-as: vLLM's parser reads it as -asc"),
    (["--served-model-name", "x"], {}, "--served-model-name is not taken at a start: fvboot asks the server by its name: docker run -e FV_SERVED_MODEL=NAME"),
    (["--config", "/c.yaml"], {}, "--config is not taken"),
    (["--headless"], {}, "--headless is not taken: the server must serve HTTP on its port"),
])
def test_what_ends_a_start_at_once_is_one_error(tmp_path, argv, env, said):
    with pytest.raises(FvBootError, match=re.escape(said)):
        read_start_inputs(_baked(tmp_path), argv, env)


def test_a_key_file_gives_the_key_and_a_file_that_gives_none_ends_the_start(tmp_path):
    """`-e FV_API_KEY_FILE=/run/secrets/fv_key` (Docker's secrets, a mounted Kubernetes secret;
    tried as an operator would, 2026-12-06: an unknown name, and the server served without a
    key). The file's key, its last newline left out and not said; a file that is missing, empty
    or not text ends the start before anything runs, never an open server."""
    layout = _baked(tmp_path)
    key_file = tmp_path / "fv_key"
    key_file.write_text("s3cret\n")
    inputs = read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(key_file)})
    assert inputs.settings["api_key"] == "s3cret" and not [n for n in inputs.notes if "not a setting" in n]
    assert inputs.notes[-1] == (f"clients must send the API key in the file {key_file} (FV_API_KEY_FILE) as"
                                " `Authorization: Bearer <key>`")
    assert read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(key_file), "FV_API_KEY": "s3cret"}) \
        .settings["api_key"] == "s3cret"  # the same key twice
    with pytest.raises(FvBootError, match=r"^FV_API_KEY and FV_API_KEY_FILE are both set, to different keys"):
        read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(key_file), "FV_API_KEY": "other"})
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    for path, said in ((tmp_path / "missing", "cannot read it (No such file or directory)"),
                       (tmp_path / "empty", "the file is empty"), (tmp_path / "binary", "the file is not text"),
                       (tmp_path, "that is a directory, not a file holding the key")):
        with pytest.raises(FvBootError, match=re.escape(f"FV_API_KEY_FILE={path}: {said}; a start without the key"
                                                        " would serve anyone: mount the file there")):
            read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(path)})


@pytest.mark.parametrize("where, env, argv", [
    ("in the file {file} (FV_API_KEY_FILE)", {"FV_API_KEY_FILE": "{file}"}, []),
    ("in FV_API_KEY", {"FV_API_KEY": "k-first\r\nk-second"}, []),
    ("given as --api-key", {}, ["--api-key", "k-first\tk-second"]),
], ids=["file", "env", "argument"])
def test_a_key_with_a_line_break_inside_ends_the_start_at_once(tmp_path, where, env, argv):
    """A secret file of two lines (a key and a comment; tried as an operator would, 2026-12-06):
    the key held the line break, no client could send it, and every request got 401 with
    nothing said. Now the start ends at once saying why; the file's last newline is still fine."""
    layout = _baked(tmp_path)
    key_file = tmp_path / "fv_key"
    key_file.write_text("k-first\n# rotated 2026-12\n")
    env = {k: v.format(file=key_file) for k, v in env.items()}
    with pytest.raises(FvBootError, match=re.escape(
            f"the API key {where.format(file=key_file)} holds a line break or another control character inside it")):
        read_start_inputs(layout, argv, env)
    key_file.write_text("k-first\n")
    assert read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(key_file)}).notes[-1].startswith(
        "clients must send the API key in the file")


def test_a_start_reads_the_key_file_once_and_a_named_pipe_is_refused_without_waiting(tmp_path, monkeypatch):
    """The key file is read once a start, for the key and its log line both (twice until
    2026-12-06). A named pipe there is refused at once: opened for reading, one nobody writes
    to would have held the start for ever (Docker's and Kubernetes' secrets are files)."""
    from fvboot import api_keys

    layout = _baked(tmp_path)
    key_file = tmp_path / "fv_key"
    key_file.write_text("s3cret\n")
    reads = []
    read_key_file = api_keys._read_key_file
    monkeypatch.setattr(api_keys, "_read_key_file", lambda path: reads.append(path) or read_key_file(path))
    inputs = read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(key_file)})
    assert inputs.settings["api_key"] == "s3cret" and reads == [str(key_file)]
    fifo = tmp_path / "fv_pipe"
    os.mkfifo(fifo)
    got: dict = {}

    def start() -> None:
        try:
            read_start_inputs(layout, [], {"FV_API_KEY_FILE": str(fifo)})
        except FvBootError as e:
            got["error"] = str(e)

    reader = threading.Thread(target=start, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # held at open(): a writer lets the thread end
        with open(fifo, "w"):
            pass
    assert got.get("error", "").startswith(f"FV_API_KEY_FILE={fifo}: that is a named pipe, not a file holding the key;")
