"""BuildOptions: every build option in one validated, typed object.

Filled from CLI flags over an optional config file (TOML or YAML); unknown keys and invalid
combinations are rejected here, at the edge, with a message saying what to change.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CriuPrebuiltError, ModelFolderError, OptionsError
from .model_folder import ModelFolder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UPSTREAM_CRIU_REPO = "https://github.com/checkpoint-restore/criu.git"
DEFAULT_CRIU_REF = "v4.2.1"
CUDA_VLLM_VERSION = "0.26.0"
CPU_VLLM_VERSION = "0.32.0"
# What fvbuild may tag: [registry/]name[:tag] (Docker's grammar; a first component is a registry
# where it has a dot or a port, or is localhost: registry.example.com:5000/team/llama:v1)
_NAME_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG_RE = re.compile(r"^(?:(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*:\d+)"
                     r"(?::\d+)?/)?" + _NAME_PART + r"(?:/" + _NAME_PART + r")*(?::\w[\w.-]{0,127})?$")
# Any local or registry reference: [host[:port]/]name[:tag][@digest], or an image ID.
_IMAGE_RE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                       r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?"
                       r"(?:@sha256:[0-9a-f]{64})?$|^(?:sha256:)?[0-9a-f]{12,64}$")


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class CudaCheckpointTool(str, Enum):
    """Which `cuda-checkpoint` CRIU's cuda plugin runs: ours (ctypes, no download) or NVIDIA's."""

    fast_vllm = "fast-vllm"
    nvidia = "nvidia"


class GpuAccess(str, Enum):
    """How the bake container reaches the GPUs: Docker's NVIDIA runtime (`--gpus`), or device nodes
    plus the driver's folder (hosts without the container toolkit). `auto` picks (builder/gpu.py)."""

    auto = "auto"
    toolkit = "toolkit"
    devices = "devices"


_UNSAFE_CHARS = re.compile(r"[\s'\"`$\\;|&<>(){}]")


def _env_var_name(v: str) -> str:
    """V, where it can name an environment variable."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(f"{v!r} is not an environment variable name")
    return v


def _plain_value(v: str) -> str:
    """A value that reaches a Dockerfile/shell line: non-empty, no whitespace, quotes or shell syntax."""
    if not v:
        raise ValueError("is empty")
    if _UNSAFE_CHARS.search(v):
        raise ValueError(f"{v!r} contains whitespace, a quote or a shell character")
    return v


class CriuOptions(BaseModel):
    """What the `criu` stage needs: `fvbuild criu` uses exactly this, BuildOptions extends it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    device: Device = Device.cuda
    base_image: Optional[str] = Field(None, description="default: vLLM's image (cuda) or debian:bookworm (cpu)")
    vllm_version: Optional[str] = Field(None, description="pinned per device when unset")
    criu_repo: str = UPSTREAM_CRIU_REPO
    criu_ref: str = DEFAULT_CRIU_REF
    criu_src: Optional[Path] = Field(None, description="local CRIU source dir or release tarball")
    criu_patches: Optional[Path] = Field(None, description="folder with a `series` file (default: the bundled one)")
    ca_cert: Optional[Path] = Field(None, description="extra CA bundle (PEM) trusted by every stage")
    network: Optional[str] = Field(None, description="docker network mode for build and bake, e.g. host")
    cuda_checkpoint: CudaCheckpointTool = CudaCheckpointTool.fast_vllm

    @field_validator("vllm_version")
    @classmethod
    def _vllm_version_is_a_version(cls, v: Optional[str]) -> Optional[str]:
        """A release number (PEP 440's characters): it is pip's requirement and the default base
        image's tag (found by review, 2026-12-06: `0.32.0 && touch /x` reached a RUN line)."""
        if v is not None and not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v):
            raise ValueError(f"{v!r} is not a vLLM release number (e.g. {CPU_VLLM_VERSION})")
        return v

    @field_validator("base_image")
    @classmethod
    def _base_is_a_reference(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _IMAGE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an image reference")
        return v

    @field_validator("criu_src", "ca_cert", "criu_patches")
    @classmethod
    def _path_exists(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.exists():
            raise ValueError(f"{v} does not exist")
        return v.resolve() if v is not None else v

    @field_validator("criu_repo")
    @classmethod
    def _repo_is_url_or_path(cls, v: str) -> str:
        _plain_value(v)
        _no_credentials(v, "fetch CRIU yourself and give its folder or tarball: --criu-src")
        if not (re.match(r"^(https?|git|ssh|file)://[^/]", v) or re.match(r"^[\w.-]+@[\w.-]+:", v)
                or v.startswith(("/", "./", "../")) or Path(v).is_dir()):
            raise ValueError(f"{v!r} is neither a git URL nor a local folder")
        return v

    @field_validator("criu_ref")
    @classmethod
    def _ref_is_plain(cls, v: str) -> str:
        _plain_value(v)
        if v.startswith("-"):
            raise ValueError(f"{v!r} starts with '-'")
        return v

    @field_validator("ca_cert")
    @classmethod
    def _pem(cls, v: Optional[Path]) -> Optional[Path]:
        if v is None:
            return v
        if not v.is_file():
            raise ValueError(f"{v} is not a file (a PEM certificate file)")
        try:
            with v.open("rb") as f:
                head = f.read(1 << 20)
        except OSError as e:
            raise ValueError(f"cannot read {v}: {e.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in head:
            raise ValueError(f"{v} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
        return v

    @model_validator(mode="after")
    def _criu_source(self) -> "CriuOptions":
        if self.criu_src is not None and self.model_fields_set & {"criu_repo", "criu_ref"}:
            raise ValueError("give either --criu-src or --criu-repo/--criu-ref, not both")
        if self.device is Device.cpu and self.cuda_checkpoint is not CudaCheckpointTool.fast_vllm \
                and "cuda_checkpoint" in self.model_fields_set:
            raise ValueError("--cuda-checkpoint applies to --device cuda only")
        return self

    # Derived values: one place decides the defaults that depend on the device.
    @property
    def resolved_vllm_version(self) -> str:
        return self.vllm_version or (CUDA_VLLM_VERSION if self.device is Device.cuda else CPU_VLLM_VERSION)

    @property
    def resolved_base_image(self) -> str:
        if self.base_image:
            return self.base_image
        if self.device is Device.cuda:
            return f"vllm/vllm-openai:v{self.resolved_vllm_version}"
        return "debian:bookworm"

    @property
    def patches_dir(self) -> Path:
        if self.criu_patches is not None:
            return self.criu_patches
        from importlib.resources import files

        return Path(str(files("fvbuild.criu_patches")))


# The image's own environment (templates/Dockerfile.j2): an --env of one of these came after it
# and moved the bake's output or its caches out of the layers (found by review, 2026-12-06)
IMAGE_OWNED_ENV = {name: "leave it to the image" for name in (
    "FV_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
    "CUDA_CACHE_PATH", "HF_HOME", "PATH", "VIRTUAL_ENV")}
IMAGE_OWNED_ENV["FV_PORT"] = "use --port"


# Arguments fvboot sets itself (or that would break the restore); the message says what to use.
RESERVED_VLLM_ARGS = {
    "--model": "use --model",
    "--port": "use --port",
    "--worker-extension-cls": "fvboot sets it",
    "--middleware": "fvboot sets it",
    "--enable-sleep-mode": "fvboot sets it",
    "--served-model-name": "use fvbuild's own --served-model-name (fvboot gives vLLM the name)",
    "--revision": "use fvbuild's own --revision (the bake downloads that revision; vLLM serves the folder)",
    "--api-key": "pass the key at run time: docker run -e FV_API_KEY=... (or docker run IMAGE --api-key ...)",
    "--uds": "the restored server listens on --port",
}


# --host values a checkpoint restores with in any network: every IPv4 address, or every IPv6 and
# IPv4 one (a dual-stack socket, what an IPv6-only Kubernetes cluster needs); fvboot's own calls
# go to 127.0.0.1, which either reaches
WILDCARD_HOSTS = ("0.0.0.0", "::")


class BuildOptions(CriuOptions):
    """What to build. Defaults give the CUDA image of the pinned vLLM with upstream CRIU."""

    model: str = Field(description="HF repo id, local model directory, or synthetic:NAME")
    served_model_name: Optional[str] = Field(None, description="the name clients ask for (default: model as given)")
    revision: Optional[str] = Field(None, description="the Hub revision to download: a branch, tag or commit"
                                    " (default: the repo's main branch); the commit it was is in the manifest")
    tag: Optional[str] = Field(None, description="image name:tag (default fast-vllm/<model>:<device>)")
    vllm_args: list[str] = Field(default_factory=list, description="extra `vllm serve` arguments")
    port: int = Field(8000, ge=1, le=65535)
    criu_prebuilt: Optional[Path] = Field(None, description="tarball from `fvbuild criu` (no CRIU build)")
    wheels: list[Path] = Field(default_factory=list, description="local folders of wheels for pip")
    extra_index_urls: list[str] = Field(default_factory=list)
    bake: bool = True
    bake_timeout_s: int = Field(3 * 3600, ge=60, description="longest the bake container may run")
    gpu_access: GpuAccess = GpuAccess.auto
    nvidia_driver_dir: Optional[Path] = Field(None, description="driver folder mounted for --gpu-access devices")
    warmup_requests: int = Field(4, ge=1, le=1000)
    hf_token_env: str = Field("HF_TOKEN", description="env var that holds the model-download token")
    env: dict[str, str] = Field(default_factory=dict,
                                description="the image's environment, NAME=VALUE: the bake's and every start's")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        """A synthetic model fvboot makes, a local folder the bake container can read, or what
        can be a Hugging Face repo id: anything else is refused now, not after the image is built."""
        if not v.strip():
            raise ValueError("is empty")
        if v.startswith(SYNTHETIC_PREFIX):
            names = synthetic_names()
            if v[len(SYNTHETIC_PREFIX):] not in names:
                raise ValueError(f"unknown synthetic model {v!r}; choose one of "
                                 + ", ".join(SYNTHETIC_PREFIX + n for n in names))
            return v
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError(f"{v!r} holds a line break or another control character: rename the folder")
        if v.startswith("~"):
            v = str(Path(v).expanduser())  # a quoted ~ the shell left alone
        path = Path(v)
        if path.is_dir():
            try:
                ModelFolder.of(path)  # its links must be ones the bake container can follow
            except ModelFolderError as e:
                raise ValueError(str(e)) from None
            if not (path / "config.json").is_file():
                raise ValueError(f"{v} holds no config.json: give the folder of a Transformers model (its"
                                 f" config.json, tokenizer and weights; in the Hugging Face cache, snapshots/REV)")
        elif path.exists():
            raise ValueError(f"{v} is a file, not a model folder: give the folder that holds the model's"
                             f" config.json and weights")
        elif v.startswith(("/", ".", "~")):
            raise ValueError(f"no folder {v} on this machine (a local model is given by its folder)")
        elif ".." in v or not HF_REPO_ID.fullmatch(v):
            raise ValueError(f"{v!r} is neither a folder on this machine nor a Hugging Face repo id (ORG/NAME)")
        return v

    @functools.cached_property
    def model_folder(self) -> Optional[ModelFolder]:
        """The local model folder the bake mounts, or None (synthetic, or a repo to download);
        walked once (the validator walked it to check its links)."""
        return ModelFolder.of(Path(self.model)) if model_source(self.model) == "folder" else None

    @field_validator("revision")
    @classmethod
    def _revision_is_plain(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            _plain_value(v)
            if v.startswith("-") or len(v) > 255:
                raise ValueError(f"{v!r} is not a branch, tag or commit")
        return v

    @field_validator("served_model_name")
    @classmethod
    def _served_name_is_one_line(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v.strip() or v != v.strip() or any(c in v for c in "\n\r\0")):
            raise ValueError(f"{v!r}: give a name without blanks at its ends or line breaks")
        return v

    @field_validator("tag")
    @classmethod
    def _tag_is_valid(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _TAG_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a valid image reference ([registry[:port]/]lower-case-name[:tag])")
        return v

    @field_validator("criu_prebuilt")
    @classmethod
    def _prebuilt(cls, v: Optional[Path]) -> Optional[Path]:
        if v is None:
            return v
        if not v.is_file():
            raise ValueError(f"{v} is not a file")
        from .criu_prebuilt import read_manifest

        try:
            read_manifest(v)
        except CriuPrebuiltError as e:
            raise ValueError(str(e)) from None
        return v.resolve()

    @field_validator("nvidia_driver_dir")
    @classmethod
    def _driver_dir(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        if v is not None and (":" in str(v.resolve()) or "," in str(v.resolve())):
            raise ValueError(f"{v} holds ':' or ',', which a Docker bind mount cannot take")
        return v.resolve() if v is not None else v

    @field_validator("hf_token_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        return _env_var_name(v)

    @field_validator("env", mode="before")
    @classmethod
    def _env_pairs(cls, v: Any) -> Any:
        """`--env NAME=VALUE` (repeat) or a table of a config file."""
        if isinstance(v, (list, tuple)):
            out = {}
            for item in v:
                name, sep, value = str(item).partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not NAME=VALUE")
                out[name] = value
            return out
        return v

    @field_validator("env")
    @classmethod
    def _env_is_safe(cls, v: dict[str, str]) -> dict[str, str]:
        from fvboot.launcher import is_secret_name
        from fvboot.runenv import SETTINGS

        for name, value in v.items():
            _env_var_name(name)
            if name in IMAGE_OWNED_ENV:  # set by the image itself: another value moves what the bake writes
                raise ValueError(f"{name} is set by the image (the bake's output and compile caches live under"
                                 f" /fv, in its layers; FV_PORT is --port): {IMAGE_OWNED_ENV[name]}")
            if name in SETTINGS:  # fvboot's own setting: a bad value fails the build now, not the bake
                SETTINGS[name].parse(value)
            if is_secret_name(name):  # an image's ENV is in its config for anyone who pulls it
                raise ValueError(f"{name} may hold a secret, which must not be in an image: pass it at run "
                                 "time (docker run -e), or for the model download as --hf-token-env")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                raise ValueError(f"the value of {name} contains a line break or another control character")
            if _URL_PASSWORD.search(value):  # HTTPS_PROXY=http://user:password@proxy
                raise ValueError(f"the value of {name} holds a URL with a password, which must not be in an image:"
                                 " pass it at run time (docker run -e)")
        return v

    @field_validator("wheels")
    @classmethod
    def _wheel_dirs(cls, v: list[Path]) -> list[Path]:
        for d in v:
            if not d.is_dir():
                raise ValueError(f"{d} is not a folder of wheels")
        return [d.resolve() for d in v]

    @field_validator("extra_index_urls")
    @classmethod
    def _index_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            _plain_value(url)
            _no_credentials(url, "download the wheels yourself and give their folder: --wheels")
            if not re.match(r"^(https?|file)://[^/]", url) and not url.startswith("/"):
                raise ValueError(f"{url!r} is not an http(s)/file URL or an absolute path")
        return v

    @field_validator("vllm_args")
    @classmethod
    def _no_owned_args(cls, v: list[str]) -> list[str]:
        from fvboot.launcher import dashed_option, is_secret_option, refused_vllm_arg

        # vLLM's parser takes `--api_server_count` for `--api-server-count`: every check below,
        # and fvboot's reading of the baked arguments, see the one spelling (found by review,
        # 2026-12-06: the underscore spellings passed every refusal)
        v = [dashed_option(a) for a in v]
        for i, a in enumerate(v):
            if "\n" in a or "\r" in a or "\0" in a:
                raise ValueError("a --vllm-arg value contains a newline")
            name, eq, value = a.partition("=")
            if name in RESERVED_VLLM_ARGS:
                raise ValueError(f"{name} is reserved: {RESERVED_VLLM_ARGS[name]}")
            if is_secret_option(name):
                raise ValueError(f"{name} may hold a secret, which must not be in an image (the manifest and the"
                                 " checkpoint keep the server's arguments): give it at run time (docker run -e),"
                                 " or for the model download as --hf-token-env")
            if name == "--host":
                value = value if eq else (v[i + 1] if i + 1 < len(v) else "")
                if value not in WILDCARD_HOSTS:
                    raise ValueError(f"--host {value!r}: the server listens on every address of its container,"
                                     " 0.0.0.0 (IPv4, the default) or :: (IPv6 and IPv4: an IPv6-only cluster);"
                                     " one address would tie the checkpoint to one network: publish the port with"
                                     " docker run instead")
        # what no server of this image may have (TLS, a config file, several API servers), and an
        # abbreviation of any option refused or read here: vLLM's parser takes a unique prefix
        problem = refused_vllm_arg(v, also=[*RESERVED_VLLM_ARGS, *_PARALLEL_FLAGS, "--host"])
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("vllm_args")
    @classmethod
    def _parallel_sizes_are_counts(cls, v: list[str]) -> list[str]:
        parallel_size(v)
        return v

    @property
    def gpus_used(self) -> int:
        """GPUs the served model takes: the bake container gets exactly these (gpu.plan)."""
        return parallel_size(self.vllm_args)

    @model_validator(mode="after")
    def _combinations(self) -> "BuildOptions":
        set_fields = self.model_fields_set
        if self.criu_prebuilt is not None and set_fields & {"criu_src", "criu_repo", "criu_ref", "criu_patches"}:
            raise ValueError("--criu-prebuilt replaces --criu-src/--criu-repo/--criu-ref/--criu-patches: give one")
        if self.criu_prebuilt is not None:
            from .criu_prebuilt import read_manifest

            built_for = read_manifest(self.criu_prebuilt).get("device")
            if self.device is Device.cuda and built_for != "cuda":
                raise ValueError(f"{self.criu_prebuilt.name} was made with --device {built_for} "
                                 "(no cuda-checkpoint client); remake it with `fvbuild criu --device cuda`")
        if self.device is Device.cuda and (self.wheels or self.extra_index_urls):
            raise ValueError(
                "--wheels/--extra-index-url are used by --device cpu, where pip installs vLLM; "
                "the cuda base image already carries vLLM"
            )
        if self.device is Device.cpu and set_fields & {"gpu_access", "nvidia_driver_dir"}:
            raise ValueError("--gpu-access/--nvidia-driver-dir apply to --device cuda only")
        if self.nvidia_driver_dir is not None and self.gpu_access is GpuAccess.toolkit:
            raise ValueError("--nvidia-driver-dir is for --gpu-access devices (the toolkit mounts the driver itself)")
        source = model_source(self.model)
        if self.revision is not None and source != "hub":
            what = "a synthetic model" if source == "synthetic" else "a folder on this machine"
            raise ValueError(f"--revision applies to a model the bake downloads from the Hugging Face Hub, and"
                             f" {self.model} is {what}")
        if source == "hub" and "hf_token_env" in set_fields and not os.environ.get(self.hf_token_env):
            raise ValueError(f"--hf-token-env {self.hf_token_env}: {self.hf_token_env} is not set in fvbuild's"
                             f" environment: export it, or leave --hf-token-env out for a model that needs no token")
        return self

    @property
    def resolved_tag(self) -> str:
        if self.tag:
            return self.tag if ":" in self.tag.rsplit("/", 1)[-1] else f"{self.tag}:latest"
        named = self.served_model_name or self.model  # a folder's last part may be a revision's hash
        slug = re.sub(r"[^a-z0-9]+", "-", named.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"
        return f"fast-vllm/{slug}:{self.device.value}"


SYNTHETIC_PREFIX = "synthetic:"


def model_source(model: str) -> str:
    """Where the bake gets a valid --model: "synthetic" (fvboot makes it), "folder" (mounted from
    this machine) or "hub" (downloaded in the bake container)."""
    if model.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    return "folder" if Path(model).is_dir() else "hub"
# A Hugging Face repo id as the Hub takes it: NAME or ORG/NAME, letters, digits, '-', '_', '.', not
# starting or ending with '-' or '.', at most 96 characters (huggingface_hub's validate_repo_id)
HF_REPO_ID = re.compile(r"(?=.{1,96}$)(?![-.])[\w.-]*[\w](/(?![-.])[\w.-]*[\w])?")

# a URL's user information: anything before '@' in its authority
_URL_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*)://(?P<info>[^/@]*)@")
_URL_PASSWORD = re.compile(r"[A-Za-z][\w+.-]*://[^/\s@:]*:[^/\s@]+@")


def _no_credentials(url: str, instead: str) -> None:
    """Refuse URL where it carries credentials: a password, or over http(s) any user part (a
    token as the user name). It would be in the image's labels and its build history, which
    anyone who pulls the image reads (found by review, 2026-12-06); an ssh user name is no secret."""
    m = _URL_USERINFO.match(url)
    if m and (":" in m.group("info") or m.group("scheme").lower() in ("http", "https")):
        shown = url[:m.start("info")] + "***" + url[m.end("info"):]
        raise ValueError(f"{shown} carries credentials, which would be in the image's labels and build history"
                         f" for anyone who pulls it: use a source that needs none, or {instead}")


# vLLM's options whose product is the number of GPUs one server takes (long and short spellings)
_PARALLEL_FLAGS = {"--tensor-parallel-size": "tensor", "-tp": "tensor", "--pipeline-parallel-size": "pipeline",
                   "-pp": "pipeline", "--data-parallel-size": "data", "-dp": "data"}


def parallel_size(args: list[str]) -> int:
    """Tensor x pipeline x data parallel size given in vLLM's arguments (each 1 unless given);
    ValueError for a value that is not a whole number from 1 up."""
    sizes = {"tensor": 1, "pipeline": 1, "data": 1}
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if name not in _PARALLEL_FLAGS:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{name} needs a whole number of GPUs from 1 up, not {value!r}")
        sizes[_PARALLEL_FLAGS[name]] = int(value)
    return sizes["tensor"] * sizes["pipeline"] * sizes["data"]


def synthetic_names() -> tuple[str, ...]:
    """The synthetic models fvboot can make (fvboot.synthetic imports no torch at module level)."""
    from fvboot.synthetic import SPECS

    return tuple(SPECS)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OptionsError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "TOML"
        raise OptionsError(f"{path}: not valid {kind}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional: only for YAML config files

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except ImportError:
        raise OptionsError(f"{path}: YAML config files need PyYAML (pip install pyyaml), or use TOML") from None
    except Exception as e:  # parser errors carry line numbers
        raise OptionsError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a table of options at the top level")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = _FIELDS_BY_FLAG.get(name, name)  # the CLI's own spelling (`vllm-arg`) names the field too
        if name in out:
            raise OptionsError(f"{path}: {key!r} gives an option the file already gave (as {_FLAGS.get(name, name)!r})")
        out[name] = value
    return out


# Fields whose CLI flag is not simply the field name with dashes.
_FLAGS = {"vllm_args": "--vllm-arg", "extra_index_urls": "--extra-index-url", "bake_timeout_s": "--bake-timeout"}
_FIELDS_BY_FLAG = {flag[2:].replace("-", "_"): name for name, flag in _FLAGS.items()}


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
        flag = _FLAGS.get(loc) or (f"--{loc.replace('_', '-')}" if loc else "options")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option (see `fvbuild image --help`)"
        parts.append(f"{flag}: {msg}")
    return "; ".join(parts)


def load_options(cli_values: dict[str, Any], config_file: Optional[Path] = None,
                 kind: type[CriuOptions] = BuildOptions) -> Any:
    """CLI values (None = not given) override the config file; the result is validated once."""
    merged: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if v is not None and v != ()})
    try:
        return kind(**merged)
    except ValidationError as e:
        raise OptionsError(_explain(e)) from None


def check_bench_env(env: tuple[str, ...]) -> None:
    """OptionsError for a bench --env that is not KEY=VALUE, or an fvboot setting it does not
    take (its containers would end at once, each start measuring nothing)."""
    from fvboot.runenv import problems

    bad = [kv for kv in env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        raise OptionsError(f"--env takes KEY=VALUE, not {bad[0]!r}")
    wrong = problems(dict(kv.split("=", 1) for kv in env))
    if wrong:
        raise OptionsError(f"--env: {wrong[0]}")
