"""DockerEngine: the only module that talks to Docker (build, run, commit, tag, inspect).

A seam like repo2docker's ContainerEngine: the rest of the builder sees typed results and typed
errors, never docker-py exceptions. Build output is a generator of events; the CLI shows them.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import docker
import urllib3
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout, RequestException

# CRIU's container rights are fvboot's list (its restore names them when they lack); fvbuild's CLI
# takes docker_run_flags (`fvbuild run-flags`) from here
from fvboot.capabilities import CONTAINER_CAPS, CONTAINER_SECURITY_OPT, CONTAINER_SHM_SIZE, docker_run_flags  # noqa: F401

from .errors import (BaseImageMissingError, BaseImageUnsuitableError, BuildFailedError, ContainerTimeoutError,
                     CriuPrebuiltError, CriuSourceError, DockerUnavailableError, EngineError, PatchError)



_STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_STAGE_RE = re.compile(r"^FROM \S+(?: AS (\S+))?", re.IGNORECASE)


_LAYER_RE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")


class StepImages:
    """The images a legacy-builder build creates, read from its output: the ` ---> ID` after each
    step, except a FROM's (the base, or an earlier stage) and a cache hit's (another build's).
    A failed build leaves them behind as `<none>` images; the build removes them (docker build
    would not)."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._skip_next = False

    def feed(self, line: str) -> None:
        m = _STEP_RE.match(line)
        if m:
            self._skip_next = bool(_STAGE_RE.match(m.group(3)))
        elif line.strip() == "---> Using cache":
            self._skip_next = True
        else:
            m = _LAYER_RE.match(line)
            if m:
                if not self._skip_next:
                    self.created.append(m.group(1))
                self._skip_next = False


@dataclass
class BuildEvent:
    kind: str  # "step" | "log"
    text: str
    step: int = 0
    total: int = 0
    stage: str = ""


@dataclass
class BuildResult:
    image_id: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # the step images this build made (not its cache hits), oldest first: what `remove_build`
    # takes away when what follows the build fails
    created: tuple[str, ...] = ()


def _streamed_response(stream: Iterator) -> Any:
    """The HTTP response behind docker-py's build stream (the argument of its `_stream_helper`
    generator, which has not run yet), or None: closing it is how a client hangs up on the
    daemon, whatever holds the generator's frames (docker-py 7 keeps it nowhere else)."""
    frame = getattr(stream, "gi_frame", None)
    return None if frame is None else frame.f_locals.get("response")


STEP_IMAGES_WAIT_S = 30.0  # how long an interrupted build's step images are tried again while the daemon cancels it


class DockerEngine:
    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, timeout: int = 600) -> "DockerEngine":
        try:
            client = docker.from_env(timeout=timeout)
            client.ping()
        except DockerException as e:
            where = getattr(getattr(e, "request", None), "url", None) or "the default socket"
            if "Permission denied" in str(e):  # the daemon runs; this user may not use its socket
                socket_path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
                raise DockerUnavailableError(
                    f"no permission to use the Docker daemon's socket ({socket_path}): run fvbuild as a member of"
                    " the docker group (sudo usermod -aG docker $USER, then log in again) or as root") from None
            raise DockerUnavailableError(
                f"cannot reach the Docker daemon ({_short(e)}); start dockerd or set DOCKER_HOST"
                + ("" if where == "the default socket" else f" (tried {where})")) from None
        return cls(client)

    # ---- images -----------------------------------------------------------------------------
    def ensure_image(self, name: str) -> None:
        """The base image must be local or pullable; say how to get it if neither. A fast-vllm
        image is no base: its /fv (model, weight dump, checkpoint, manifest) would be merged with
        the new bake's, and an image built --no-bake would restore the old server under the new
        name (found by review, 2026-12-06)."""
        try:
            self._not_fast_vllm(name, self.client.images.get(name).labels or {})
            return
        except ImageNotFound:
            pass
        except (APIError, DockerException) as e:  # "invalid reference format" (found by review)
            raise BaseImageMissingError(f"base image {name}: {_short(e)}") from None
        try:
            pulled = self.client.images.pull(name)
        except (APIError, DockerException) as e:
            raise BaseImageMissingError(
                f"base image {name} is not on this machine and cannot be pulled ({_short(e)}); "
                "load or import it first (README: 'local base image') or pass --base-image") from None
        self._not_fast_vllm(name, getattr(pulled, "labels", None) or {})

    @staticmethod
    def _not_fast_vllm(name: str, labels: dict) -> None:
        from .context import DEVICE_LABEL

        if DEVICE_LABEL in labels:
            raise BaseImageUnsuitableError(
                f"base image {name} is a fast-vllm image (it carries its own bake in /fv, which the new one would be"
                " mixed with): build from the image it was built on, with what you added to it installed there")

    def inspect(self, name: str) -> dict:
        try:
            return self.client.api.inspect_image(name)
        except ImageNotFound:
            raise BaseImageMissingError(f"image {name} does not exist") from None
        except (APIError, DockerException) as e:  # an invalid reference, the daemon gone
            raise BaseImageMissingError(f"image {name}: {_short(e)}") from None

    def image_id(self, ref: str) -> Optional[str]:
        """The ID REF names now, or None."""
        try:
            return self.client.api.inspect_image(ref)["Id"]
        except ImageNotFound:
            return None
        except (APIError, DockerException) as e:
            raise EngineError(f"image {ref}: {_short(e)}") from None

    def remove_if_untagged(self, image_id: str, prune: bool) -> bool:
        """Remove IMAGE_ID only if no tag names it (`docker rmi ID` would untag a single tag and
        delete the image) and nothing uses it; its build cache stays unless PRUNE. True where it
        stays untagged: something still uses it."""
        try:
            if self.client.api.inspect_image(image_id).get("RepoTags"):
                return False
        except ImageNotFound:
            return False
        return not self.remove_image(image_id, prune=prune, force=False)

    def tag(self, image_id: str, ref: str) -> None:
        """Tag IMAGE_ID as REF; the image REF named until then (read right before, not at the
        build's start: another build of the same tag may have moved it since; found by review,
        2026-12-06) is removed where nothing else tags or uses it: it would stay as a <none>
        of full size."""
        previous = self.image_id(ref)
        repo, _, tag = ref.rpartition(":")
        try:
            self.client.api.tag(image_id, repo, tag)
        except (APIError, DockerException) as e:
            raise EngineError(f"docker tag {ref} failed: {_short(e)}") from None
        if previous and previous != image_id:
            self.remove_if_untagged(previous, prune=True)

    def remove_image(self, ref: str, prune: bool = True, force: bool = True) -> bool:
        """Remove REF; PRUNE also removes its untagged parents (prune=False keeps them as the build
        cache: `docker images` does not list them, the next build reuses them). Without FORCE an
        image that something else still tags or uses stays: False then, True where REF is gone."""
        try:
            self.client.api.remove_image(ref, force=force, noprune=not prune)
        except NotFound:
            pass
        except APIError as e:
            if e.status_code != 409:  # still used by a container or a child image: not ours to force
                raise EngineError(f"docker rmi {ref} failed: {_short(e)}") from None
            return False
        return True

    # ---- build ------------------------------------------------------------------------------
    def build(self, context: Path, network_mode: Optional[str] = None,
              dockerfile: str = "Dockerfile", target: Optional[str] = None,
              base_image: str = "the base image") -> Iterator[BuildEvent | BuildResult]:
        """Yield events while building CONTEXT (up to stage TARGET); the last item is the
        BuildResult. Untagged: the caller tags only a finished image, so a failed build leaves no
        half-tagged image. BASE_IMAGE names the base in errors about it."""
        stage, stage_start, seconds = "", time.monotonic(), {}
        image_id, tail, steps = None, deque(maxlen=60), StepImages()
        finished, stream, read_to_end, response = False, None, False, None
        try:
            stream = self.client.api.build(path=str(context), dockerfile=dockerfile, rm=True,
                                           forcerm=True, decode=True, network_mode=network_mode,
                                           pull=False, target=target)
            response = _streamed_response(stream)
            for chunk in stream:
                if "errorDetail" in chunk or "error" in chunk:
                    msg = chunk.get("error") or chunk["errorDetail"].get("message", "")
                    raise _build_error(msg, tail, base_image)
                if "aux" in chunk and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                text = chunk.get("stream", "")
                for line in text.splitlines():
                    line = line.rstrip()
                    if not line:
                        continue
                    steps.feed(line)
                    m = _STEP_RE.match(line)
                    if m:
                        s = _STAGE_RE.match(m.group(3))
                        if s:
                            if stage:
                                seconds[stage] = time.monotonic() - stage_start
                            stage, stage_start = s.group(1) or f"stage{len(seconds)}", time.monotonic()
                        yield BuildEvent("step", m.group(3), int(m.group(1)), int(m.group(2)), stage)
                    else:
                        tail.append(line)
                        yield BuildEvent("log", line, stage=stage)
                m = re.search(r"Successfully built ([0-9a-f]+)", text)
                if m and not image_id:
                    image_id = m.group(1)
            read_to_end = True
            if not image_id:
                raise BuildFailedError("docker build ended without an image id:\n" + "\n".join(list(tail)[-20:]))
            finished = True
        except (APIError, DockerException) as e:
            if isinstance(e, (PatchError, CriuSourceError, BuildFailedError)):
                raise
            raise BuildFailedError(f"docker build failed: {_short(e)}") from None
        except (RequestException, urllib3.exceptions.HTTPError) as e:  # the daemon went away mid-stream
            raise BuildFailedError(f"docker build failed: lost the Docker daemon ({_short(e)}); is dockerd"
                                   " still running? (journalctl -u docker)") from None
        finally:
            if not finished:  # failed, interrupted, or its reader stopped: leave no <none> image
                hung_up = stream is not None and not read_to_end
                if hung_up:
                    # the daemon goes on with a build whose client is still connected, its step's
                    # container holding the newest image: hang up first, then remove, waiting a
                    # little while it lets go (found by review, 2026-12-06). An interrupt in the
                    # stream's read has urllib3 close the connection itself; a reader that just
                    # stops leaves it open, and whatever holds the stream's frames keeps it so.
                    with contextlib.suppress(Exception):
                        stream.close()
                    with contextlib.suppress(Exception):
                        if response is not None:
                            response.close()
                self._remove_step_images(steps.created, wait_s=STEP_IMAGES_WAIT_S if hung_up else 0.0)
        if stage:
            seconds[stage] = time.monotonic() - stage_start
        yield BuildResult(image_id, seconds, tuple(steps.created))

    def remove_build(self, result: BuildResult) -> None:
        """Undo a finished build whose image is not wanted after all (its bake failed or was
        interrupted): the image and every step image the build made, which `docker images`
        would otherwise list as `<none>` (removing only the image leaves its parent, the step
        before, dangling). The cache hits it used stay, for the next build."""
        self._remove_step_images([*result.created, result.image_id])

    def _remove_step_images(self, created: list[str], wait_s: float = 0.0) -> None:
        """Remove the images a failed build created, newest first (each one's parent is then
        free to go); one that is tagged stays. One still in use (a cancelled step's container
        the daemon has not removed yet) is tried again for WAIT_S. Best effort: the build's own
        error is what the user must see."""
        deadline = time.monotonic() + wait_s
        left = list(created)
        while left:
            stays = []
            for image_id in reversed(left):
                try:
                    if self.remove_if_untagged(image_id, prune=False):
                        stays.append(image_id)
                except (EngineError, APIError):  # the daemon refused: tried again
                    stays.append(image_id)
                except (DockerException, RequestException, urllib3.exceptions.HTTPError):  # no daemon to ask
                    return
            left = stays[::-1]
            if not left or time.monotonic() >= deadline:
                return
            time.sleep(0.5)

    # ---- containers -------------------------------------------------------------------------
    def root_dir(self) -> Path:
        """Where the daemon keeps images and containers (`docker info`'s DockerRootDir)."""
        try:
            return Path(self.client.info().get("DockerRootDir") or "/var/lib/docker")
        except (APIError, DockerException) as e:
            raise DockerUnavailableError(f"docker info failed: {_short(e)}") from None

    def runtimes(self) -> set[str]:
        """The runtimes `docker info` lists (\"nvidia\" when the NVIDIA container toolkit is set up)."""
        try:
            return set((self.client.info().get("Runtimes") or {}).keys())
        except (APIError, DockerException) as e:
            raise DockerUnavailableError(f"docker info failed: {_short(e)}") from None

    def run_criu_container(self, image: str, command: list[str], network_mode: Optional[str],
                           volumes: Optional[dict] = None, environment: Optional[dict] = None,
                           name: Optional[str] = None, device_requests: Optional[list] = None,
                           devices: Optional[list] = None) -> "RunningContainer":
        """Start a detached container with the capability set CRIU needs (and GPU access, if given).
        Created, then started: one whose start fails (a GPU runtime's refusal) or is interrupted
        is removed here, as docker run's would not be (found by review, 2026-12-06)."""
        try:
            c = self.client.containers.create(
                image, command, detach=True, name=name, network_mode=network_mode,
                cap_add=list(CONTAINER_CAPS), security_opt=list(CONTAINER_SECURITY_OPT), shm_size=CONTAINER_SHM_SIZE,
                volumes=volumes or {}, environment=environment or {},
                device_requests=device_requests or None, devices=devices or None)
        except (APIError, DockerException) as e:
            raise EngineError(f"docker run of {image} failed: {_short(e)}") from None
        try:
            c.start()
        except BaseException as e:
            with contextlib.suppress(APIError, DockerException):
                c.remove(force=True)
            if isinstance(e, (APIError, DockerException)):
                raise EngineError(f"docker run of {image} failed: {_short(e)}") from None
            raise
        return RunningContainer(c)

    def read_tree(self, image: str, path: str) -> bytes:
        """The tar (Docker's archive API) of PATH in IMAGE, through a created, never started container."""
        c = self.client.containers.create(image, entrypoint=["true"])
        try:
            stream, _ = c.get_archive(path)
            return b"".join(stream)
        except NotFound:
            raise BuildFailedError(f"{path} is missing in the built image") from None
        finally:
            c.remove(force=True)

    def read_file(self, image: str, path: str) -> bytes | None:
        """One file from an image, through a created (never started) container."""
        c = self.client.containers.create(image, entrypoint=["true"])
        try:
            return _file_from_archive(c, path)
        finally:
            c.remove(force=True)


class RunningContainer:
    """A container the builder started (the bake): its log, its exit, a file out of it, its commit
    and its removal. docker-py stays behind this class; its failures come out as EngineError."""

    def __init__(self, container) -> None:
        self._c = container

    def log_lines(self) -> Iterator[str]:
        """The container's output, line by line, until it exits; ends quietly if the stream breaks
        (the log is for people; `wait` decides the outcome)."""
        try:
            for chunk in self._c.logs(stream=True, follow=True):
                yield from chunk.decode(errors="replace").splitlines()
        except (APIError, DockerException, RequestsConnectionError, ReadTimeout):
            return

    def wait(self, timeout: float) -> int:
        """The exit code; ContainerTimeoutError if it runs past TIMEOUT seconds."""
        try:
            return self._c.wait(timeout=timeout)["StatusCode"]
        except (ReadTimeout, RequestsConnectionError) as e:
            # docker-py reports its read timeout either way (over a unix socket, as a
            # ConnectionError saying "Read timed out"); any other broken connection is the daemon
            if isinstance(e, ReadTimeout) or "timed out" in str(e).lower():
                raise ContainerTimeoutError(f"the container did not exit within {timeout:.0f} s") from None
            raise EngineError(f"lost the Docker daemon while waiting for the container ({_short(e)}); "
                              "was it stopped or restarted? Run the build again once `docker info` answers") from None
        except (APIError, DockerException) as e:
            raise EngineError(f"waiting for the container failed: {_short(e)}") from None

    def read_file(self, path: str) -> bytes | None:
        try:
            return _file_from_archive(self._c, path)
        except (APIError, DockerException) as e:
            raise EngineError(f"reading {path} from the container failed: {_short(e)}") from None

    def commit(self, ref: str) -> None:
        repo, _, tag = ref.rpartition(":")
        try:
            self._c.commit(repository=repo, tag=tag)
        except (APIError, DockerException) as e:
            raise EngineError(f"docker commit failed: {_short(e)}") from None

    def remove(self) -> None:
        """Remove it (killing it first if it runs); gone already is fine."""
        try:
            self._c.remove(force=True)
        except NotFound:
            pass
        except (APIError, DockerException) as e:
            raise EngineError(f"docker rm failed: {_short(e)}") from None


def _file_from_archive(container, path: str) -> bytes | None:
    """Read one file out of a container (running or not) with the archive API."""
    import io
    import tarfile

    try:
        stream, _ = container.get_archive(path)
    except NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tf:
        member = tf.next()
        f = tf.extractfile(member) if member is not None else None
        return f.read() if f is not None else None


def _short(e: Exception) -> str:
    text = getattr(e, "explanation", None) or str(e)
    text = str(text).strip().splitlines()[-1] if str(text).strip() else type(e).__name__
    return text[:300]


_TOOL_PACKAGES = {"unshare": "util-linux", "tar": "tar", "python3": "python3"}


def _build_error(msg: str, tail: deque, base_image: str = "the base image") -> Exception:
    """Map our markers in the build log to typed errors; otherwise show the failing output."""
    for line in reversed(tail):
        if line.startswith("fvbuild-error: base-tool: "):
            tool = line.removeprefix("fvbuild-error: base-tool: ").strip()
            return BaseImageUnsuitableError(
                f"the base image {base_image} has no `{tool}` (package {_TOOL_PACKAGES.get(tool, tool)}); "
                "add it to the base image or pick another --base-image")
        if line.startswith("fvbuild-error: no-vllm: "):
            why = line.removeprefix("fvbuild-error: no-vllm: ").strip()
            return BaseImageUnsuitableError(
                f"no vLLM in the base image {base_image} (`python3 -c 'import vllm'`: {why or 'failed'}); "
                "use an image that has vLLM (e.g. vllm/vllm-openai) as --base-image")
        if line.startswith("fvbuild-error: criu-prebuilt: "):
            why = line.removeprefix("fvbuild-error: criu-prebuilt: ").strip()
            return CriuPrebuiltError(
                f"the prebuilt CRIU does not run in the base image {base_image}: {why}; "
                "make the tarball with `fvbuild criu --base-image` of a distro with the same or an older glibc")
        if line.startswith("fvbuild-error: patch: "):
            return PatchError(line.removeprefix("fvbuild-error: patch: ")
                              + "; fix or drop it in criu-patches/series")
        if line.startswith("fvbuild-error: criu-ref: "):
            return CriuSourceError(line.removeprefix("fvbuild-error: criu-ref: ")
                                   + "; pick an existing tag or branch (--criu-ref)")
    shown = "\n  ".join(list(tail)[-15:])
    return BuildFailedError(f"docker build failed: {msg.strip()}\n  {shown}")
