"""Puts the model to serve into FV_HOME/model: a synthetic one made here, a local folder given to
the bake container, or a Hugging Face repo downloaded with a token read from a file.

The token is read from a file (mounted only into the bake container) and only in this short
download step; it never enters the server's environment, so no checkpoint page holds it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import mountinfo, synthetic
from .errors import BakeFailed

IMPORT_DIR = Path("/fv-import/model")
TOKEN_MOUNT_ROOT = "/run/fv-secrets"


def detach_build_inputs() -> list[str]:
    """Unmount what the builder bind-mounted for the download (token file, local model folder)
    before the server starts: the served tree's mount namespace must not contain them, or CRIU
    would need them again at every restore; and the token is then gone from the container."""
    gone = []
    for mp in reversed([m.point for m in mountinfo.read()]):
        if mp.startswith((TOKEN_MOUNT_ROOT, str(IMPORT_DIR.parent))):
            r = subprocess.run(["umount", mp], capture_output=True, text=True)
            if r.returncode != 0:
                raise BakeFailed(f"cannot unmount {mp} before the checkpoint: {r.stderr.strip()}")
            gone.append(mp)
    return gone


@dataclass(frozen=True)
class PreparedModel:
    name: str  # what clients ask for unless --served-model-name says otherwise: the model as given
    commit: Optional[str] = None  # the Hub commit downloaded (a model from the Hub only)


def prepare_model(model: str, dest: Path, token_file: Optional[Path], model_dir: Optional[Path] = None,
                  revision: Optional[str] = None) -> PreparedModel:
    """Fill DEST, readable by every user (a container run with --user must be able to start
    vLLM normally from it). MODEL_DIR: where fvbuild mounted a local model folder, when not at
    IMPORT_DIR itself. REVISION: a Hub model's branch, tag or commit (default: its main branch)."""
    commit = _fill(model, dest, token_file, model_dir or IMPORT_DIR, revision)
    readable_by_all(dest)
    return PreparedModel(model, commit)


def readable_by_all(root: Path) -> None:
    """Give everyone read access to ROOT's files and the way into its folders (safetensors writes
    its files 0600, a copied folder keeps its owner's modes); nothing gets write access."""
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def _fill(model: str, dest: Path, token_file: Optional[Path], imported: Path = IMPORT_DIR,
          revision: Optional[str] = None) -> Optional[str]:
    """Fill DEST with MODEL; the Hub commit downloaded, or None (not from the Hub). A DEST that
    holds a model is kept only where its source record says MODEL (and REVISION) filled it:
    another model there (an earlier bake's in the same FV_HOME) was served under MODEL's name
    (found by review, 2026-12-06)."""
    name = synthetic.parse_name(model)
    local = Path(model)
    if (dest / "config.json").exists():
        if local.is_absolute() and local.resolve() == dest.resolve():  # the folder is the model given
            return None
        recorded = filled_from(dest)
        if recorded is not None and (recorded.get("model"), recorded.get("revision")) == (model, revision):
            commit = recorded.get("commit")
            return commit if isinstance(commit, str) else None
        said = f"{recorded.get('model')!r}" if recorded else "a model fvboot did not put there"
        print(f"fvboot bake: {dest} holds {said}, not {model!r}{f' at {revision}' if revision else ''}: replaced",
              file=sys.stderr, flush=True)
        shutil.rmtree(dest)
    if name is not None:
        synthetic.make_model(name, dest)  # its own record says what it is
        return None
    for candidate in (imported, local):
        if (candidate / "config.json").exists():
            shutil.copytree(candidate, dest, dirs_exist_ok=True)  # links followed: their files copied
            record_source(dest, model, revision)
            return None
    if local.is_absolute() or local.exists():  # a folder, not a repo id: say so, not a hub error
        raise BakeFailed(f"the model folder {model} holds no config.json that can be read here"
                         f" ({imported} is what fvbuild mounted; a link in it leads nowhere?)")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise BakeFailed("huggingface_hub is not installed; cannot download " + model) from None
    token = token_file.read_text().strip() if token_file and token_file.exists() else None
    try:
        # the commit REVISION (or main) is now, downloaded as such: the manifest says which one it was
        commit = HfApi().model_info(model, revision=revision, token=token).sha or revision
        snapshot_download(model, revision=commit, local_dir=str(dest), token=token, allow_patterns=DOWNLOADED)
        if not any(dest.glob("*.safetensors")):  # an older repo: PyTorch's files, which vLLM also loads
            snapshot_download(model, revision=commit, local_dir=str(dest), token=token, allow_patterns=["*.bin"])
    except Exception as e:  # noqa: BLE001 - the Hub's errors, whatever their class, end in one message
        raise BakeFailed(download_problem(model, e, token_given=token is not None, revision=revision)) from None
    finally:
        token = None
    shutil.rmtree(dest / ".cache" / "huggingface", ignore_errors=True)  # the client's notes on the download
    with contextlib.suppress(OSError):
        (dest / ".cache").rmdir()  # left only where it is now empty
    if not (dest / "config.json").exists():
        raise BakeFailed(f"{model} on the Hugging Face Hub has no config.json: not a model vLLM serves from its"
                         f" Transformers files (a GGUF-only repo?); give a folder that has them:"
                         f" --model /path/to/model")
    if not any(dest.glob("*.safetensors")) and not any(dest.glob("*.bin")):
        raise BakeFailed(f"{model} on the Hugging Face Hub has no weights in *.safetensors or *.bin files;"
                         f" give a folder that has them: --model /path/to/model")
    record_source(dest, model, revision, commit)
    return commit


SOURCE_RECORD = ".fv-source.json"  # in a model folder fvboot filled: what filled it


def record_source(dest: Path, model: str, revision: Optional[str] = None, commit: Optional[str] = None) -> None:
    """Say in DEST what filled it (MODEL as given, REVISION asked, COMMIT downloaded): a later
    bake into the same folder keeps it only for the same model."""
    (dest / SOURCE_RECORD).write_text(json.dumps({"model": model, "revision": revision, "commit": commit}) + "\n")


def filled_from(dest: Path) -> Optional[dict]:
    """What DEST's source record says filled it (a synthetic model's own record, from `fvboot
    make-model`, says so too: its seed 0 is the bake's), or None (no record, or one that
    cannot be read)."""
    for name, read in ((SOURCE_RECORD, lambda r: r),
                       (synthetic.RECORD, lambda r: {"model": synthetic.PREFIX + str(r.get("name"))
                                                     + ("" if r.get("seed") == 0 else f" (seed {r.get('seed')})")})):
        try:
            recorded = json.loads((dest / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict):
            return read(recorded)
    return None


# What a download takes of a repo: configuration, tokenizer, chat template and the safetensors
# weights (not the PyTorch copies many repos carry beside them, fetched only where nothing else is)
DOWNLOADED = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


# What says the bake could not reach the Hub at all (class names of the errors under the client's)
UNREACHABLE = {"ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "TimeoutException",
               "OfflineModeIsEnabled", "LocalEntryNotFoundError", "gaierror"}


def download_problem(model: str, error: BaseException, token_given: bool, revision: Optional[str] = None) -> str:
    """What went wrong with the Hugging Face download of MODEL, and what to do, from ERROR and the
    errors under it (huggingface_hub wraps a failed request in LocalEntryNotFoundError). Read by
    class name and HTTP status: the client's classes have moved between its versions."""
    chain, seen = [], error
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    codes = (getattr(getattr(e, "response", None), "status_code", None) for e in chain)
    status = next((code for code in codes if isinstance(code, int)), None)
    token = "the token given" if token_given else "no token (none was given: set HF_TOKEN, or --hf-token-env NAME)"
    if "GatedRepoError" in names:
        return (f"{model} is gated on the Hugging Face Hub: accept its terms on https://huggingface.co/{model}"
                f" with the account whose token the build gets; it got {token}")
    if "RepositoryNotFoundError" in names:
        return (f"{model} is not a model on the Hugging Face Hub that {token} can read: check its name"
                f" (ORG/NAME), give a token that can read a private one, or give a local folder:"
                f" --model /path/to/model")
    if "RevisionNotFoundError" in names:
        return (f"{model} on the Hugging Face Hub has no revision {revision!r}: give a branch, tag or commit it"
                f" has (--revision), or leave --revision out for its main branch")
    if status == 401:
        return (f"the Hugging Face Hub refused {token} for {model} (401 Unauthorized): an invalid or expired"
                f" token; make one at https://huggingface.co/settings/tokens")
    if status is not None:
        return (f"the Hugging Face Hub answered {status} for {model}: {_first_line(error)}; try again, or give"
                " a local folder")
    if names & UNREACHABLE:
        return (f"the bake cannot reach the Hugging Face Hub to download {model} ({_first_line(chain[-1])}): build"
                f" where the bake container has a network (fvbuild image --network host, where Docker's bridge has"
                f" none), or download the model and give its folder: --model /path/to/model")
    return f"cannot download {model}: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
