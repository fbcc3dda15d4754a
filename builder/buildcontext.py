"""Assembles the build context folder: rendered Dockerfile, CRIU source, patches, wheels,
CA bundle and the fvboot runtime package. `fvbuild render` shows it; `fvbuild image` sends it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from . import criu_prebuilt, criu_source
from .context import PREBUILT_ARCHIVE, CriuSource, RenderContext, make_context
from .options import CriuOptions
from .render import render_dockerfile


@dataclass(frozen=True)
class BuildContext:
    path: Path
    ctx: RenderContext
    dockerfile: str

    def listing(self) -> list[tuple[str, int]]:
        """(relative path, size) of every file, sorted: what the build will see."""
        return sorted(
            (str(p.relative_to(self.path)), p.stat().st_size)
            for p in self.path.rglob("*") if p.is_file()
        )


def _fvboot_source() -> Path:
    import fvboot

    return Path(fvboot.__file__).parent


def assemble(opts: CriuOptions, dest: Path, check_remote: bool = True) -> BuildContext:
    """Write a complete build context into DEST (an empty folder). CriuOptions alone give the
    context of the criu target (`fvbuild criu`); BuildOptions the image's."""
    dest.mkdir(parents=True, exist_ok=True)
    prebuilt = getattr(opts, "criu_prebuilt", None)
    if prebuilt is not None:
        # CRIU comes built: what it was built from is in its manifest (labels show that).
        m = criu_prebuilt.read_manifest(prebuilt)
        patches = tuple(m["patches"])
        src = CriuSource(kind="prebuilt", describe=f"{m['criu']['source']} (prebuilt: {prebuilt.name})")
        shutil.copyfile(prebuilt, dest / PREBUILT_ARCHIVE)
    else:
        patches = criu_source.read_series(opts.patches_dir)
        src = criu_source.materialize(opts, dest, check_remote)
        pdir = dest / "criu-patches"
        pdir.mkdir()
        shutil.copyfile(opts.patches_dir / "series", pdir / "series")
        for name in patches:
            shutil.copyfile(opts.patches_dir / name, pdir / name)
    ctx = make_context(opts, src, patches)

    if opts.ca_cert is not None:
        (dest / "certs").mkdir()
        shutil.copyfile(opts.ca_cert, dest / "certs" / "extra-ca.crt")
    for rel, wheel_dir in zip(ctx.wheel_dirs, getattr(opts, "wheels", [])):
        target = dest / rel
        target.mkdir(parents=True)
        for whl in sorted(wheel_dir.glob("*.whl")):
            shutil.copyfile(whl, target / whl.name)
    shutil.copytree(_fvboot_source(), dest / "fvboot",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dockerfile = render_dockerfile(ctx)
    (dest / "Dockerfile").write_text(dockerfile)
    return BuildContext(dest, ctx, dockerfile)
