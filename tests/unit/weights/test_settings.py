"""Unit tests for fvboot.weights.settings: FV_LOAD_* parsing and the derived thread counts."""

from __future__ import annotations

import pytest

from conftest import need

torch = need("torch", "the weight path works on torch tensors")

from fvboot.weights import settings
from weights_testdata import MIB


def test_config_from_env_and_errors():
    c = settings.Config.from_env({})
    assert (c.buffers, c.buffer_mb, c.streams, c.odirect) == (settings.DEFAULT_BUFFERS, settings.DEFAULT_BUFFER_MB, settings.DEFAULT_STREAMS, False)
    assert c.buffer_bytes == settings.DEFAULT_BUFFER_MB * MIB and 1 <= c.reader_threads() <= 8
    c = settings.Config.from_env({"FV_LOAD_BUFFERS": "4", "FV_LOAD_BUFFER_MB": "32",
                            "FV_LOAD_THREADS": "16", "FV_LOAD_STREAMS": "3",
                            "FV_LOAD_ODIRECT": "1"})
    assert (c.buffers, c.buffer_mb, c.streams, c.odirect) == (4, 32, 3, True)
    assert c.reader_threads() == 4  # never more readers than buffers
    assert settings.Config.from_env({"FV_LOAD_THREADS": "5"}, threads=None).threads == 5
    assert settings.Config.from_env({"FV_LOAD_THREADS": "5"}, threads=2).threads == 2
    with pytest.raises(settings.GpuLoaderError, match=r"FV_LOAD_BUFFER_MB='lots'"):
        settings.Config.from_env({"FV_LOAD_BUFFER_MB": "lots"})
    with pytest.raises(settings.GpuLoaderError, match=r"FV_LOAD_BUFFERS='0'.*\[1, 256\]"):
        settings.Config.from_env({"FV_LOAD_BUFFERS": "0"})
    with pytest.raises(settings.GpuLoaderError, match="FV_LOAD_ODIRECT"):
        settings.Config.from_env({"FV_LOAD_ODIRECT": "maybe"})
    assert settings.enabled({}) and not settings.enabled({"FV_GPU_LOADER": "0"})


def test_auto_threads():
    assert settings.auto_threads(8, cpus=16) == 6
    assert settings.auto_threads(16, cpus=16) == 8
    assert settings.auto_threads(8, cpus=2) == 2
    assert settings.auto_threads(2, cpus=64) == 1 and settings.auto_threads(1, cpus=64) == 1


def test_verify_threads_leave_cores_for_the_copies():
    assert settings.verify_threads(16) == 12 and settings.verify_threads(8) == 6 and settings.verify_threads(2) == 2
