"""BuildOptions: every build option in one validated, typed object.

Filled from CLI flags over an optional config file (TOML or YAML); unknown keys and invalid
combinations are rejected here, at the edge, with a message saying what to change.
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import OptionsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UPSTREAM_CRIU_REPO = "https://github.com/checkpoint-restore/criu.git"
DEFAULT_CRIU_REF = "v4.2.1"
CUDA_VLLM_VERSION = "0.26.0"
CPU_VLLM_VERSION = "0.32.0"
_TAG_RE = re.compile(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?$")


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class CudaCheckpointTool(str, Enum):
    """Which `cuda-checkpoint` CRIU's cuda plugin runs: ours (ctypes, no download) or NVIDIA's."""

    fast_vllm = "fast-vllm"
    nvidia = "nvidia"


class BuildOptions(BaseModel):
    """What to build. Defaults give the CUDA image of the pinned vLLM with upstream CRIU."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    model: str = Field(description="HF repo id, local model directory, or synthetic:NAME")
    tag: Optional[str] = Field(None, description="image name:tag (default fast-vllm/<model>:<device>)")
    device: Device = Device.cuda
    base_image: Optional[str] = Field(None, description="default: vLLM's image (cuda) or debian:bookworm (cpu)")
    vllm_version: Optional[str] = Field(None, description="pinned per device when unset")
    vllm_args: list[str] = Field(default_factory=list, description="extra `vllm serve` arguments")
    port: int = Field(8000, ge=1, le=65535)
    criu_repo: str = UPSTREAM_CRIU_REPO
    criu_ref: str = DEFAULT_CRIU_REF
    criu_src: Optional[Path] = Field(None, description="local CRIU source dir or release tarball")
    criu_patches: Optional[Path] = Field(None, description="folder with a `series` file (default: the bundled one)")
    wheels: list[Path] = Field(default_factory=list, description="local folders of wheels for pip")
    extra_index_urls: list[str] = Field(default_factory=list)
    ca_cert: Optional[Path] = Field(None, description="extra CA bundle (PEM) trusted by every stage")
    network: Optional[str] = Field(None, description="docker network mode for build and bake, e.g. host")
    cuda_checkpoint: CudaCheckpointTool = CudaCheckpointTool.fast_vllm
    bake: bool = True
    warmup_requests: int = Field(4, ge=1, le=1000)
    hf_token_env: str = Field("HF_TOKEN", description="env var that holds the model-download token")

    @field_validator("tag")
    @classmethod
    def _tag_is_valid(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _TAG_RE.match(v):
            raise ValueError(f"{v!r} is not a valid image reference (lower-case name[:tag])")
        return v

    @field_validator("criu_src", "ca_cert", "criu_patches")
    @classmethod
    def _path_exists(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not v.exists():
            raise ValueError(f"{v} does not exist")
        return v.resolve() if v is not None else v

    @field_validator("wheels")
    @classmethod
    def _wheel_dirs(cls, v: list[Path]) -> list[Path]:
        for d in v:
            if not d.is_dir():
                raise ValueError(f"{d} is not a folder of wheels")
        return [d.resolve() for d in v]

    @field_validator("ca_cert")
    @classmethod
    def _pem(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and b"-----BEGIN CERTIFICATE-----" not in v.read_bytes()[:1 << 20]:
            raise ValueError(f"{v} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
        return v

    @field_validator("vllm_args")
    @classmethod
    def _no_owned_args(cls, v: list[str]) -> list[str]:
        owned = {"--model", "--port", "--worker-extension-cls", "--middleware", "--enable-sleep-mode"}
        for a in v:
            if a.split("=", 1)[0] in owned:
                raise ValueError(f"{a.split('=', 1)[0]} is set by fvbuild; use the matching fvbuild option instead")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "BuildOptions":
        set_fields = self.model_fields_set
        if self.criu_src is not None and set_fields & {"criu_repo", "criu_ref"}:
            raise ValueError("give either --criu-src or --criu-repo/--criu-ref, not both")
        if self.device is Device.cuda and (self.wheels or self.extra_index_urls):
            raise ValueError(
                "--wheels/--extra-index-url are used by --device cpu, where pip installs vLLM; "
                "the cuda base image already carries vLLM"
            )
        if self.device is Device.cpu and self.cuda_checkpoint is not CudaCheckpointTool.fast_vllm \
                and "cuda_checkpoint" in set_fields:
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
    def resolved_tag(self) -> str:
        if self.tag:
            return self.tag if ":" in self.tag.rsplit("/", 1)[-1] else f"{self.tag}:latest"
        slug = re.sub(r"[^a-z0-9]+", "-", self.model.lower().rsplit("/", 1)[-1]).strip("-") or "model"
        return f"fast-vllm/{slug}:{self.device.value}"

    @property
    def patches_dir(self) -> Path:
        if self.criu_patches is not None:
            return self.criu_patches
        from importlib.resources import files

        return Path(str(files("fvbuild.criu_patches")))


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise OptionsError(f"cannot read config file {path}: {e.strerror}") from None
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
    return {k.replace("-", "_"): v for k, v in data.items()}


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        flag = f"--{loc.replace('_', '-')}" if loc else "options"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option (see `fvbuild image --help`)"
        parts.append(f"{flag}: {msg}")
    return "; ".join(parts)


def load_options(cli_values: dict[str, Any], config_file: Optional[Path] = None) -> BuildOptions:
    """CLI values (None = not given) override the config file; the result is validated once."""
    merged: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if v is not None and v != ()})
    try:
        return BuildOptions(**merged)
    except ValidationError as e:
        raise OptionsError(_explain(e)) from None
