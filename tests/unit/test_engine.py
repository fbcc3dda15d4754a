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
