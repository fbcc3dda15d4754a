"""fvboot.devices: this machine's GPUs and CPU extensions, looked up in a thread from fvboot's
first line (NVML's start beside the imports), waited for with a bound, as the compatibility
check sees them (manifest.device_info)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from fvboot import devices, manifest
from fvboot.errors import CheckpointUnusable


def test_a_lookup_in_the_background_answers_as_one_made_at_once():
    assert manifest.device_info(devices.DeviceLookup()) == manifest.device_info()


def test_the_gpus_nvml_lists_become_the_manifests_device(monkeypatch):
    found = devices.NvidiaGpus("580.159.04", "13.0", (("NVIDIA H200", "GPU-1"), ("NVIDIA H200", "GPU-2")))
    monkeypatch.setattr(devices, "nvidia_gpus", lambda: found)
    monkeypatch.setattr(devices, "cpu_isa", lambda: ("avx2",))
    d = manifest.device_info(devices.DeviceLookup())
    assert d == manifest.Device("cuda", (manifest.Gpu("NVIDIA H200", "GPU-1", "580.159.04"),
                                         manifest.Gpu("NVIDIA H200", "GPU-2", "580.159.04")),
                                "580.159.04", "13.0", cpu_isa=("avx2",), cpus=len(os.sched_getaffinity(0)))


def test_nvml_that_does_not_answer_gives_up_the_restore_in_time_and_says_why(monkeypatch):
    stuck = threading.Event()
    monkeypatch.setattr(devices, "nvidia_gpus", lambda: stuck.wait(30))
    t0 = time.monotonic()
    with pytest.raises(CheckpointUnusable, match="GPUs were not listed within 0.2 s .NVML did not answer"):
        manifest.device_info(devices.DeviceLookup(), timeout=0.2)
    assert time.monotonic() - t0 < 5
    stuck.set()


def test_an_error_in_the_lookup_reaches_the_check(monkeypatch):
    def broken():
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(devices, "nvidia_gpus", broken)
    with pytest.raises(UnicodeDecodeError):
        manifest.device_info(devices.DeviceLookup())
