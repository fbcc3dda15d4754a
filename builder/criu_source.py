"""Where CRIU's source comes from: a git repo/ref fetched by the build, a local git repo, or a
local source folder/tarball copied into the build context (offline builds). Checked up front so a
wrong ref fails in a second with a clear message, not minutes into a build."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from .context import CriuSource
from .errors import CriuSourceError, OptionsError
from .options import BuildOptions

ARCHIVE = "criu-src.tar"


def _is_local_repo(repo: str) -> bool:
    return Path(repo).is_dir()


def describe(opts: BuildOptions) -> CriuSource:
    """The CRIU source as the templates show it; no I/O beyond looking at paths."""
    if opts.criu_src is not None:
        return CriuSource(kind="local", describe=f"from {opts.criu_src.name}", archive=ARCHIVE)
    if _is_local_repo(opts.criu_repo):
        return CriuSource(kind="local", describe=f"{opts.criu_ref} from {opts.criu_repo}", archive=ARCHIVE,
                          repo=opts.criu_repo, ref=opts.criu_ref)
    return CriuSource(kind="git", describe=f"{opts.criu_ref} from {opts.criu_repo}",
                      repo=opts.criu_repo, ref=opts.criu_ref)


def _git(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CriuSourceError("git is not installed; install git or pass --criu-src") from None
    except subprocess.TimeoutExpired:
        raise CriuSourceError(f"git {args[0]} timed out; for offline builds pass --criu-src") from None


def check_remote_ref(repo: str, ref: str) -> None:
    r = _git(["ls-remote", "--exit-code", repo, ref, f"{ref}^{{}}"], timeout=30)
    if r.returncode == 2:
        raise CriuSourceError(f"CRIU ref {ref!r} not found in {repo}; pick an existing tag or branch (--criu-ref)")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no answer"])[-1]
        raise CriuSourceError(f"cannot reach CRIU repo {repo} ({last}); for offline builds pass --criu-src DIR|TARBALL")


def _check_tarball(path: Path) -> None:
    try:
        with tarfile.open(path) as tf:
            names = [m.name for m in tf.getmembers()[:2000]]
    except (tarfile.TarError, OSError) as e:
        raise CriuSourceError(f"--criu-src {path} is not a readable tarball: {e}") from None
    if not any(n.count("/") == 1 and n.endswith("/Makefile") for n in names):
        raise CriuSourceError(f"--criu-src {path}: expected one top folder with CRIU's Makefile (a release tarball)")


def materialize(opts: BuildOptions, context_dir: Path, check_remote: bool = True) -> CriuSource:
    """Check the source and, for local ones, write it into the build context as one tarball."""
    src = describe(opts)
    dest = context_dir / ARCHIVE
    if opts.criu_src is not None:
        if opts.criu_src.is_dir():
            if not (opts.criu_src / "Makefile").exists() or not (opts.criu_src / "criu").is_dir():
                raise CriuSourceError(f"--criu-src {opts.criu_src} does not look like CRIU's source (no Makefile/criu/)")
            with tarfile.open(dest, "w") as tf:
                tf.add(opts.criu_src, arcname="criu", filter=_normalise)
        else:
            _check_tarball(opts.criu_src)
            shutil.copyfile(opts.criu_src, dest)
    elif src.kind == "local":
        r = _git(["-C", opts.criu_repo, "rev-parse", "--verify", "--quiet", f"{opts.criu_ref}^{{commit}}"])
        if r.returncode != 0:
            raise CriuSourceError(
                f"CRIU ref {opts.criu_ref!r} not found in {opts.criu_repo}; "
                f"list refs with `git -C {opts.criu_repo} tag` (--criu-ref)"
            )
        with dest.open("wb") as out:
            r = subprocess.run(["git", "-C", opts.criu_repo, "archive", "--format=tar", "--prefix=criu/",
                                opts.criu_ref], stdout=out, stderr=subprocess.PIPE, text=False)
        if r.returncode != 0:
            raise CriuSourceError(f"git archive of {opts.criu_ref} failed: {r.stderr.decode().strip()}")
    elif check_remote:
        check_remote_ref(opts.criu_repo, opts.criu_ref)
    return src


def _normalise(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    """Stable owners and times, so an unchanged source hits Docker's layer cache."""
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


_PATCH_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")


def read_series(patches_dir: Path) -> tuple[str, ...]:
    """Patch names from `series` (comments and blanks skipped); each must exist."""
    series = patches_dir / "series"
    if not series.exists():
        raise OptionsError(f"{patches_dir} has no `series` file (one patch file name per line)")
    names = []
    for line in series.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # a plain file name: the name goes into the build context and a RUN line of its stage
        # (found by review, 2026-12-06: `../x.patch` copied a file from outside the folder, and
        # `x;touch${IFS}y` would have run as shell)
        if not _PATCH_NAME.fullmatch(line):
            raise OptionsError(f"{series} names {line!r}: a patch file name is letters, digits and . _ + - only,"
                               " no folder")
        if not (patches_dir / line).is_file():
            raise OptionsError(f"{series} names {line!r}, which is not in {patches_dir}")
        names.append(line)
    return tuple(names)
