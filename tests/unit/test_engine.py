"""engine.py's RunningContainer.wait: docker-py's ways of failing become the builder's errors.
The Docker daemon stopping or restarting mid-bake cannot be done to the engine the other tests
share, so docker-py's container object is stood in for here: it raises what docker-py raises."""

from __future__ import annotations

import http.client

import pytest
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout
from urllib3.exceptions import ProtocolError

from fvbuild.engine import RunningContainer
from fvbuild.errors import ContainerTimeoutError, EngineError


class _Container:
    def __init__(self, error):
        self.error = error

    def wait(self, timeout):
        raise self.error


@pytest.mark.parametrize("error", [
    ReadTimeout("read timeout"),
    RequestsConnectionError("UnixHTTPConnectionPool(host='localhost', port=None): Read timed out. (read timeout=60)"),
])
def test_a_wait_past_its_bound_is_a_timeout(error):
    with pytest.raises(ContainerTimeoutError, match="did not exit within 60 s"):
        RunningContainer(_Container(error)).wait(60)


def test_a_daemon_that_goes_away_mid_wait_is_named_not_called_a_timeout():
    aborted = RequestsConnectionError(ProtocolError("Connection aborted.",
                                                    http.client.RemoteDisconnected("closed without response")))
    with pytest.raises(EngineError) as e:
        RunningContainer(_Container(aborted)).wait(60)
    assert not isinstance(e.value, ContainerTimeoutError)
    assert str(e.value).startswith("lost the Docker daemon while waiting for the container (")
    assert "stopped or restarted? Run the build again once `docker info` answers" in str(e.value)


def test_the_images_a_build_created_are_told_from_its_base_and_cache_hits():
    """What a failed build removes: only the images its own steps made, never the base, an
    earlier stage it builds on, or a cache hit that another build's image is made of."""
    from fvbuild.engine import StepImages

    output = """Step 1/6 : FROM fv-local/debian:bookworm AS criu
 ---> d47b91d953c5
Step 2/6 : COPY criu.tar.gz /tmp/
 ---> Using cache
 ---> 0a1b2c3d4e5f
Step 3/6 : RUN make -j2
 ---> Running in 9f8e7d6c5b4a
make: Entering directory
Removing intermediate container 9f8e7d6c5b4a
 ---> 111111111111
Step 4/6 : FROM criu AS image
 ---> 111111111111
Step 5/6 : COPY fvboot /opt/fast-vllm/lib/fvboot
 ---> 222222222222
Step 6/6 : RUN python3 -c 'import vllm'
 ---> Running in 333333333333
ModuleNotFoundError: No module named 'vllm'"""
    steps = StepImages()
    for line in output.splitlines():
        steps.feed(line)
    assert steps.created == ["111111111111", "222222222222"]


def test_a_bake_container_whose_start_fails_is_removed():
    """docker run creates, then starts; a start the daemon refuses (a GPU runtime's error) or an
    interrupt then left the created container behind (found by review, 2026-12-06)."""
    from docker.errors import APIError

    from fvbuild.engine import DockerEngine
    from fvbuild.errors import EngineError

    class Container:
        removed = False

        def start(self):
            raise self.fail

        def remove(self, force=False):
            Container.removed = force

    class Containers:
        def create(self, image, command, **kw):
            self.kw = kw
            return made

    class Client:
        containers = Containers()

    for fail, raised in ((APIError("nvidia-container-cli: initialization error"), EngineError),
                         (KeyboardInterrupt(), KeyboardInterrupt)):
        made = Container()
        made.fail, Container.removed = fail, False
        with pytest.raises(raised):
            DockerEngine(Client()).run_criu_container("img", ["fvboot", "bake"], "host")
        assert Container.removed, fail


def test_an_image_reference_the_daemon_refuses_is_one_line():
    """`--base-image Foo/bar` passes the tag pattern, and the daemon answers 400 "invalid
    reference format": that came out as a traceback (found by review, 2026-12-06)."""
    from docker.errors import APIError

    from fvbuild.engine import DockerEngine
    from fvbuild.errors import BaseImageMissingError, EngineError

    refused = APIError("400 Client Error: Bad Request (\"invalid reference format: repository name must be lowercase\")")

    class Images:
        def get(self, name):
            raise refused

    class Api:
        def inspect_image(self, name):
            raise refused

    class Client:
        images, api = Images(), Api()

    engine = DockerEngine(Client())
    for call, error in ((engine.ensure_image, BaseImageMissingError), (engine.inspect, BaseImageMissingError),
                        (engine.image_id, EngineError)):
        with pytest.raises(error, match="Foo/bar: .*invalid reference format"):
            call("Foo/bar")


def test_a_daemon_that_goes_away_mid_build_is_one_line_not_a_traceback(tmp_path):
    """docker-py's build stream raises urllib3's ProtocolError when the daemon closes the
    connection mid-chunk (a daemon restart): it escaped as a traceback (found by review,
    2026-12-06)."""
    from fvbuild.engine import DockerEngine
    from fvbuild.errors import BuildFailedError

    def stream():
        yield {"stream": "Step 1/3 : FROM debian:bookworm\n"}
        raise ProtocolError("Connection broken: IncompleteRead(0 bytes read)")

    class Api:
        def build(self, **kw):
            return stream()

        def inspect_image(self, ref):
            raise RequestsConnectionError("connection refused")

    class Client:
        api = Api()

    with pytest.raises(BuildFailedError, match=r"^docker build failed: lost the Docker daemon \(.*IncompleteRead"):
        list(DockerEngine(Client()).build(tmp_path))


def test_a_tag_moves_from_the_image_it_named_right_before_and_that_one_goes():
    """Two builds of one tag: the second removed only the image the tag named when it began, so
    the first build's whole image stayed as a <none> (found by review, 2026-12-06)."""
    from docker.errors import ImageNotFound

    from fvbuild.engine import DockerEngine

    class Api:
        tags = {"fv/x:cpu": "sha256:first"}
        images = {"sha256:first", "sha256:second"}
        removed: list = []

        def inspect_image(self, ref):
            if ref in self.tags:
                return {"Id": self.tags[ref], "RepoTags": [ref]}
            if ref in self.images:
                return {"Id": ref, "RepoTags": [t for t, i in self.tags.items() if i == ref]}
            raise ImageNotFound(ref)

        def tag(self, image_id, repo, tag):
            self.tags[f"{repo}:{tag}"] = image_id

        def remove_image(self, ref, force, noprune):
            self.removed.append(ref)

    class Client:
        api = Api()

    DockerEngine(Client()).tag("sha256:second", "fv/x:cpu")
    assert Client.api.tags == {"fv/x:cpu": "sha256:second"} and Client.api.removed == ["sha256:first"]
    DockerEngine(Client()).tag("sha256:second", "fv/x:cpu")  # the same image again: nothing to remove
    assert Client.api.removed == ["sha256:first"]
