"""RenderContext: the one typed object the templates see (rendered with StrictUndefined)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from . import __version__
from .options import BuildOptions, CriuOptions

DEVICE_LABEL = "org.fast-vllm.device"  # the device an image was built for (fvbuild run-flags IMAGE reads it)

PREBUILT_ARCHIVE = "criu-prebuilt.tar.gz"  # build-context path of a --criu-prebuilt tarball
_UNSAFE_IN_TEXT = re.compile(r"[^A-Za-z0-9 ._:/@+=,~()-]")  # what a describing text may show as it is


@dataclass(frozen=True)
class CriuSource:
    """Where the criu stage takes CRIU's source: a git fetch in the build, or an archive in the context."""

    kind: Literal["git", "local", "prebuilt"]
    describe: str  # e.g. "v4.2.1 from https://..." or "criu-4.2.1.tar.xz"
    repo: str = ""
    ref: str = ""
    archive: str = ""  # build-context path of the source tarball (kind == "local")

    def __post_init__(self) -> None:
        # DESCRIBE goes into Dockerfile comments and a RUN line's message: a file name's newline
        # or quote must not become an instruction or shell (found by review, 2026-12-06)
        object.__setattr__(self, "describe", _UNSAFE_IN_TEXT.sub("?", self.describe))


@dataclass(frozen=True)
class RenderContext:
    fvbuild_version: str
    model: str
    device: Literal["cpu", "cuda"]
    base_image: str
    vllm_version: str
    port: int
    criu: CriuSource
    patches: tuple[str, ...]
    ca_cert: bool
    wheel_dirs: tuple[str, ...]
    extra_index_urls: tuple[str, ...]
    cuda_checkpoint: str
    # "image": the runtime image; "criu": only the criu stage plus its export (`fvbuild criu`).
    target: Literal["image", "criu"]
    # Build-context path of a `fvbuild criu` tarball ("" = build CRIU in the criu stage).
    criu_prebuilt: str
    labels: tuple[tuple[str, str], ...] = field(default=())
    env: tuple[tuple[str, str], ...] = field(default=())  # the user's ENV of the image (--env)


def make_context(opts: CriuOptions, criu: CriuSource, patches: tuple[str, ...]) -> RenderContext:
    """Everything the templates need, decided once from validated options. CriuOptions alone
    (`fvbuild criu`) renders the criu target; BuildOptions the image."""
    if not isinstance(opts, BuildOptions):
        return RenderContext(
            fvbuild_version=__version__, model="", device=opts.device.value,
            base_image=opts.resolved_base_image, vllm_version=opts.resolved_vllm_version, port=0,
            criu=criu, patches=patches, ca_cert=opts.ca_cert is not None, wheel_dirs=(),
            extra_index_urls=(), cuda_checkpoint=opts.cuda_checkpoint.value, target="criu",
            criu_prebuilt="")
    labels = (
        ("org.fast-vllm.version", __version__),
        ("org.fast-vllm.model", opts.model),
        (DEVICE_LABEL, opts.device.value),
        ("org.fast-vllm.vllm-version", opts.resolved_vllm_version),
        ("org.fast-vllm.criu", criu.describe),
        ("org.fast-vllm.criu-patches", ",".join(patches)),
    )
    return RenderContext(
        fvbuild_version=__version__,
        model=opts.model,
        device=opts.device.value,
        base_image=opts.resolved_base_image,
        vllm_version=opts.resolved_vllm_version,
        port=opts.port,
        criu=criu,
        patches=patches,
        ca_cert=opts.ca_cert is not None,
        wheel_dirs=tuple(f"wheels/{i}" for i in range(len(opts.wheels))),
        extra_index_urls=tuple(opts.extra_index_urls),
        cuda_checkpoint=opts.cuda_checkpoint.value,
        target="image",
        criu_prebuilt=PREBUILT_ARCHIVE if opts.criu_prebuilt is not None else "",
        labels=labels,
        env=tuple(sorted(opts.env.items())),
    )
