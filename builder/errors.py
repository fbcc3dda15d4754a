"""Typed errors of the builder. Library code raises these; only the CLI turns them into
one-line messages and exit codes. Every message says what was wrong and how to fix it."""

from __future__ import annotations


class FvBuildError(Exception):
    """Base of every error fvbuild reports to a user (never shown as a traceback)."""

    exit_code = 1


class OptionsError(FvBuildError):
    """Invalid build options or config file."""

    exit_code = 2


class ModelFolderError(OptionsError):
    """A local model folder whose files the bake container could not read (links it cannot follow)."""


class DockerUnavailableError(FvBuildError):
    """The Docker daemon does not answer."""


class BaseImageMissingError(FvBuildError):
    """The base image is neither local nor pullable."""


class CriuSourceError(FvBuildError):
    """The CRIU repository, ref or local source cannot be used."""


class PatchError(FvBuildError):
    """A patch of the series does not apply to the CRIU source."""


class BuildFailedError(FvBuildError):
    """docker build failed for another reason; the message carries the failing step's output."""


class BakeError(FvBuildError):
    """The bake container failed; the message carries the reason fvboot gave."""


class ImageNotBakedError(FvBuildError):
    """An image that carries no fast-vllm manifest."""


class CriuPrebuiltError(FvBuildError):
    """A --criu-prebuilt tarball that is not from `fvbuild criu`, or whose CRIU does not run in the base."""


class BaseImageUnsuitableError(FvBuildError):
    """The base image lacks something the runtime needs (vLLM, tar, unshare, python3)."""


class GpuAccessError(FvBuildError):
    """The bake container cannot be given a GPU (no device nodes, no NVIDIA runtime, no driver folder)."""


class BakeTimeoutError(BakeError):
    """The bake container ran longer than --bake-timeout."""


class EngineError(FvBuildError):
    """A Docker operation failed; the message carries Docker's reason."""


class ContainerTimeoutError(EngineError):
    """A container did not exit within the time it was given."""


class BenchError(FvBuildError):
    """`fvbuild bench` could not measure: no answer, a wrong one, or a path it cannot take here."""
