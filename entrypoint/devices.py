"""This machine's devices, as the restore's compatibility check compares them with the bake's:
the NVIDIA GPUs through NVML (ctypes: a few milliseconds, where nvidia-smi or importing torch
would cost seconds at every start) and the CPU's instruction-set extensions. `fvboot serve`
starts the lookup in a thread at its first line (``DeviceLookup``), so that NVML's start
overlaps fvboot's own imports instead of preceding the restore; its wait is bounded."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Optional

LOOKUP_WAIT_S = 30.0  # NVML that has not answered by then: the restore is given up, said why


@dataclass(frozen=True)
class NvidiaGpus:
    driver: str
    cuda: Optional[str]  # the CUDA version the driver supports ("12.8")
    gpus: tuple[tuple[str, str], ...]  # (name, UUID) of each, in NVML's order


# Extensions that user-space code selects its kernels by when it starts (numpy's and torch's
# dispatch, oneDNN's JIT, vLLM's CPU kernels): a process restored on a CPU without one of them
# may execute an instruction that CPU does not have. Other /proc/cpuinfo flags (virtualization,
# power management, errata) differ between machines that run the same code.
_ISA_FLAG = re.compile(r"^(sse\w*|ssse3|avx\w*|amx\w*|fma\w*|f16c|bmi\d|adx|sha_ni|aes|vaes|pclmulqdq|"
                       r"vpclmulqdq|gfni|movbe|popcnt|abm|cx16|xsave(c|opt)?|rdrand|rdseed|clflushopt|"
                       r"clwb|serialize|movdir\w*|erms|fsrm|sve\w*|asimd\w*|sme(?!p)\w*|bf16|i8mm)$")


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The instruction-set extensions of this machine's CPU, from the first processor's flags
    (x86: "flags", Arm: "Features"); () where that cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return tuple(sorted(v for v in value.split() if _ISA_FLAG.match(v)))
    except OSError:
        pass
    return ()


def nvidia_gpus() -> NvidiaGpus:
    """The GPUs NVML sees; OSError where there is no NVIDIA driver or GPU."""
    import ctypes

    nvml = ctypes.CDLL("libnvidia-ml.so.1")  # OSError where there is no NVIDIA driver
    if nvml.nvmlInit_v2() != 0:
        raise OSError("nvmlInit failed")
    try:
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buf, 96) != 0:
            raise OSError("nvmlSystemGetDriverVersion failed")
        driver = buf.value.decode()
        cuda = ctypes.c_int()
        nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda))
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            raise OSError("no NVIDIA GPU visible")
        gpus = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle))
            nvml.nvmlDeviceGetName(handle, buf, 96)
            name = buf.value.decode()
            nvml.nvmlDeviceGetUUID(handle, buf, 96)
            gpus.append((name, buf.value.decode()))
    finally:
        nvml.nvmlShutdown()
    return NvidiaGpus(driver, f"{cuda.value // 1000}.{cuda.value % 1000 // 10}" if cuda.value else None, tuple(gpus))


class DeviceLookup:
    """nvidia_gpus() and cpu_isa(), in a thread of its own (BACKGROUND) or at once."""

    def __init__(self, background: bool = True) -> None:
        self._done = threading.Event()
        self._found: tuple[Optional[NvidiaGpus], tuple[str, ...]] = (None, ())
        self._error: Optional[BaseException] = None
        if background:
            threading.Thread(target=self._run, name="fv-devices", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            try:
                gpus: Optional[NvidiaGpus] = nvidia_gpus()
            except OSError:
                gpus = None  # no NVIDIA driver or GPU here: a CPU machine
            self._found = (gpus, cpu_isa())
        except BaseException as e:  # raised again where the answer is asked for
            self._error = e
        finally:
            self._done.set()

    def result(self, timeout: float = LOOKUP_WAIT_S) -> tuple[Optional[NvidiaGpus], tuple[str, ...]]:
        """(the GPUs or None, the CPU's extensions); TimeoutError after TIMEOUT s."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._found
