"""fv-cuda-checkpoint without a GPU: argument handling, UUIDs, the ctypes ABI, CRIU's contract.

The driver is replaced by FakeLib, a stand-in for libcuda.so.1 that keeps a process state and
records the argument structs it is handed, so the real CudaDriver/ctypes code path runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fvboot import cuda_checkpoint as cc

UUID_A = "GPU-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6"
UUID_B = "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb"
RAW_A = bytes.fromhex("eea0d83febcdac276b3ebec2a19724e6")
RAW_B = bytes.fromhex("8f4022bae0cb1298286e225c953a7feb")


# ---------------------------------------------------------------------------------------------
# A fake libcuda.so.1


class FakeFn:
    """A C function stand-in: accepts argtypes/restype like a ctypes function does."""

    def __init__(self, impl):
        self.impl = impl
        self.argtypes = None
        self.restype = None

    def __call__(self, *args):
        return self.impl(*args)


ERROR_STRINGS = {1: b"invalid argument", 3: b"initialization error", 304: b"OS call failed or operation not supported on this OS"}


class FakeLib:
    """Keeps one process's CUDA state; `results` forces a CUresult per function name."""

    def __init__(self, *, version=13000, state=cc.STATE_RUNNING, tid=4242, results=None, missing=()):
        self.version, self.state, self.tid = version, state, tid
        self.results = dict(results or {})
        self.calls: list[tuple] = []
        impls = {
            "cuInit": self._init,
            "cuDriverGetVersion": self._driver_version,
            "cuGetErrorString": self._error_string,
            "cuCheckpointProcessGetRestoreThreadId": self._get_tid,
            "cuCheckpointProcessGetState": self._get_state,
            "cuCheckpointProcessLock": self._lock,
            "cuCheckpointProcessCheckpoint": self._checkpoint,
            "cuCheckpointProcessRestore": self._restore,
            "cuCheckpointProcessUnlock": self._unlock,
        }
        for name, impl in impls.items():
            if name not in missing:
                setattr(self, name, FakeFn(impl))

    def _result(self, name, *record):
        self.calls.append((name, *record))
        return self.results.get(name, 0)

    def _init(self, flags):
        return self._result("cuInit", flags)

    def _driver_version(self, ref):
        ref._obj.value = self.version
        return 0

    def _error_string(self, code, ref):
        if code not in ERROR_STRINGS:
            return 1
        ref._obj.value = ERROR_STRINGS[code]
        return 0

    def _get_tid(self, pid, ref):
        ref._obj.value = self.tid
        return self._result("tid", pid)

    def _get_state(self, pid, ref):
        ref._obj.value = self.state
        return self._result("state", pid)

    def _move(self, name, pid, new_state):
        result = self._result(name, pid)
        if result == 0:
            self.state = new_state
        return result

    def _lock(self, pid, ref):
        args = ref._obj
        assert isinstance(args, cc.CUcheckpointLockArgs)
        assert args.reserved0 == 0 and not any(args.reserved1)
        self.last_timeout = args.timeoutMs
        return self._move("lock", pid, cc.STATE_LOCKED)

    def _checkpoint(self, pid, ref):
        assert not any(ref._obj.reserved)
        return self._move("checkpoint", pid, cc.STATE_CHECKPOINTED)

    def _restore(self, pid, ref):
        args = ref._obj
        assert isinstance(args, cc.CUcheckpointRestoreArgs)
        assert not any(args.reserved) and args.reserved1 == 0
        self.last_pairs = [
            (bytes(args.gpuPairs[i].oldUuid.bytes), bytes(args.gpuPairs[i].newUuid.bytes))
            for i in range(args.gpuPairsCount)
        ]
        self.last_pairs_null = not bool(args.gpuPairs)
        return self._move("restore", pid, cc.STATE_LOCKED)

    def _unlock(self, pid, ref):
        assert not any(ref._obj.reserved)
        return self._move("unlock", pid, cc.STATE_RUNNING)

    def ops(self):
        return [c[0] for c in self.calls if c[0] != "cuInit"]


@pytest.fixture
def fake(monkeypatch):
    """Route main() to a FakeLib; tests adjust its state/results before calling main()."""
    lib = FakeLib()
    monkeypatch.setattr(cc.CudaDriver, "load", classmethod(lambda cls, path=None: cls(lib, "fake-libcuda")))
    return lib


def run_main(capsys, *argv):
    rc = cc.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env(**extra):
    """The child resolves `fvboot` exactly as this test process does."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    return env


# ---------------------------------------------------------------------------------------------
# Argument parsing


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--get-state", "--pid", "12"], cc.Command("get-state", 12)),
        (["--pid=12", "--get-state"], cc.Command("get-state", 12)),
        (["-p", "12", "--get-restore-tid"], cc.Command("get-restore-tid", 12)),
        (["-p12", "--toggle"], cc.Command("toggle", 12)),
        (["--action", "lock", "--pid", "7", "--timeout", "10000"], cc.Command("lock", 7, 10000)),
        (["--action=lock", "-p", "7", "-t", "0"], cc.Command("lock", 7, 0)),
        (["--action", "checkpoint", "--pid", "7"], cc.Command("checkpoint", 7)),
        (["--action", "unlock", "--pid", "7"], cc.Command("unlock", 7)),
        (["--action", "restore", "--pid", "7", "--device-map", f"{UUID_A}={UUID_B}"],
         cc.Command("restore", 7, 0, ((RAW_A, RAW_B),))),
        (["--toggle", "--pid", "7", "-d", f"{UUID_A}={UUID_A}", "-t", "5"],
         cc.Command("toggle", 7, 5, ((RAW_A, RAW_A),))),
        (["-h"], cc.Command("help")),
        (["--action", "bogus", "--help"], cc.Command("help")),
    ],
)
def test_parse_valid(argv, expected):
    assert cc.parse_args(argv) == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no operation given"),
        (["--pid", "5"], "no operation given"),
        (["--action", "bogus", "--pid", "5"], "invalid --action 'bogus'"),
        (["--action", "Lock", "--pid", "5"], "invalid --action 'Lock'"),
        (["--action", "lock"], "--pid is required for --action lock"),
        (["--get-state"], "--pid is required for --get-state"),
        (["--get-state", "--pid"], "option --pid needs a value"),
        (["--get-state", "--pid", "abc"], "invalid --pid 'abc'"),
        (["--get-state", "--pid", "0"], "invalid --pid '0'"),
        (["--get-state", "--pid", "-3"], "invalid --pid '-3'"),
        (["--get-state", "--pid", "4294967296"], "invalid --pid"),
        (["--get-state", "--toggle", "--pid", "5"], "only one of"),
        (["--action", "lock", "--action", "unlock", "--pid", "5"], "given twice"),
        (["--get-state", "--pid", "5", "--pid", "6"], "given twice"),
        (["--get-state=x", "--pid", "5"], "takes no value"),
        (["--get-state", "--pid", "5", "--frobnicate"], "unknown option '--frobnicate'"),
        (["--get-state", "--pid", "5", "extra"], "unexpected argument 'extra'"),
        (["--action", "lock", "--pid", "5", "--timeout", "soon"], "invalid --timeout 'soon'"),
        (["--action", "lock", "--pid", "5", "--timeout", "4294967296"], "invalid --timeout"),
        (["--action", "unlock", "--pid", "5", "--timeout", "10"], "--timeout is only valid"),
        (["--action", "lock", "--pid", "5", "--device-map", f"{UUID_A}={UUID_B}"], "--device-map is only valid"),
        (["--action", "restore", "--pid", "5", "--device-map", UUID_A], "invalid --device-map entry"),
        (["--action", "restore", "--pid", "5", "--device-map", f"{UUID_A}={UUID_B},"], "invalid --device-map entry"),
        (["--action", "restore", "--pid", "5", "--device-map", f"{UUID_A}={UUID_B}={UUID_A}"], "invalid --device-map entry"),
        (["--action", "restore", "--pid", "5", "--device-map", f"{UUID_A}=GPU-123"], "invalid GPU UUID 'GPU-123'"),
        (["--action", "restore", "--pid", "5", "--device-map", f"{UUID_A}={UUID_B},{UUID_A}={UUID_A}"],
         "checkpointed GPU GPU-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6 appears twice"),
        (["--action", "restore", "--pid", "5", "--device-map", f"{UUID_A}={UUID_B},{UUID_B}={UUID_B}"],
         "target GPU GPU-8f4022ba-e0cb-1298-286e-225c953a7feb appears twice"),
    ],
)
def test_parse_invalid(argv, message):
    with pytest.raises(cc.UsageError) as info:
        cc.parse_args(argv)
    assert message in str(info.value)


def test_usage_error_exits_2_with_one_clear_line(capsys, fake):
    rc, out, err = run_main(capsys, "--action", "bogus", "--pid", "5")
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("fv-cuda-checkpoint: invalid --action 'bogus': expected one of lock, checkpoint, restore, unlock")
    assert fake.calls == []  # nothing reached the driver


def test_help_works_without_a_driver(capsys, monkeypatch):
    monkeypatch.setenv(cc.LIBCUDA_ENV, "/nonexistent/libcuda.so.1")
    rc, out, err = run_main(capsys, "-h")
    assert rc == 0 and err == ""
    for flag in ("--get-state", "--action", "--timeout", "--toggle", "--get-restore-tid", "--pid", "--device-map", "--help"):
        assert flag in out


# ---------------------------------------------------------------------------------------------
# UUIDs


@pytest.mark.parametrize(
    "text",
    [
        UUID_A,
        UUID_A[4:],  # bare, as cuDeviceGetUuid users often print it
        UUID_A.upper(),
        "gpu-" + UUID_A[4:],
        UUID_A[4:].replace("-", ""),
        f"  {UUID_A} ",
    ],
)
def test_parse_gpu_uuid_forms(text):
    assert cc.parse_gpu_uuid(text) == RAW_A


@pytest.mark.parametrize(
    "text",
    [
        "",
        "GPU-",
        UUID_A[:-1],
        UUID_A + "0",
        UUID_A.replace("e", "g", 1),
        "MIG-" + UUID_A[4:],
        "GPU-eea0d83febcd-ac27-6b3e-bec2a19724e6",  # dash in the wrong place
        "GPU-" + UUID_A,
    ],
)
def test_parse_gpu_uuid_rejects(text):
    with pytest.raises(cc.UsageError, match="invalid GPU UUID"):
        cc.parse_gpu_uuid(text)


def test_format_gpu_uuid_round_trip():
    assert cc.format_gpu_uuid(RAW_A) == UUID_A
    assert cc.parse_gpu_uuid(cc.format_gpu_uuid(bytes(range(16)))) == bytes(range(16))


def test_parse_device_map_swap():
    assert cc.parse_device_map(f"{UUID_A}={UUID_B}, {UUID_B}={UUID_A}") == [(RAW_A, RAW_B), (RAW_B, RAW_A)]


# ---------------------------------------------------------------------------------------------
# ctypes ABI: sizes and offsets of cuda.h (CUDA 13.0, x86_64 / aarch64 LP64)

EXPECTED_LAYOUT = {
    "CUuuid": (16, {"bytes": 0}),
    "CUcheckpointLockArgs": (64, {"timeoutMs": 0, "reserved0": 4, "reserved1": 8}),
    "CUcheckpointCheckpointArgs": (64, {"reserved": 0}),
    "CUcheckpointGpuPair": (32, {"oldUuid": 0, "newUuid": 16}),
    "CUcheckpointRestoreArgs": (64, {"gpuPairs": 0, "gpuPairsCount": 8, "reserved": 12, "reserved1": 56}),
    "CUcheckpointUnlockArgs": (64, {"reserved": 0}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYOUT))
def test_struct_layout_matches_header(name):
    size, offsets = EXPECTED_LAYOUT[name]
    struct = getattr(cc, name)
    assert ctypes.sizeof(struct) == size
    assert {f[0]: getattr(struct, f[0]).offset for f in struct._fields_} == offsets


def test_restore_reserved_is_44_bytes():
    assert cc.CUcheckpointRestoreArgs.reserved.size == 52 - 8


def _cuda_header():
    """A cuda.h that declares the r580 restore args, if this machine has one."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    for root in roots:
        header = Path(root, "include", "cuda.h")
        if root and header.is_file() and "gpuPairsCount" in header.read_text(errors="replace"):
            return header
    return None


def test_struct_layout_against_installed_header(tmp_path):
    """Compile offsetof/sizeof against a real cuda.h (only needs gcc and the header, no GPU)."""
    header = _cuda_header()
    compiler = shutil.which("gcc") or shutil.which("cc")
    if header is None or compiler is None:
        pytest.skip("needs gcc and a CUDA >= 13.0 cuda.h (CUDA_HOME or /usr/local/cuda*)")
    lines = []
    for name, (_, offsets) in EXPECTED_LAYOUT.items():
        lines.append(f'printf("{name} size %zu\\n", sizeof({name}));')
        for field in offsets:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\nint main(void) {\n"
        + "\n".join(lines)
        + '\nprintf("CUprocessState size %zu\\n", sizeof(CUprocessState));'
        + '\nprintf("CU_PROCESS_STATE_FAILED %d\\n", (int)CU_PROCESS_STATE_FAILED);\nreturn 0;\n}\n'
    )
    binary = tmp_path / "layout"
    subprocess.run([compiler, f"-I{header.parent}", str(source), "-o", str(binary)], check=True, capture_output=True)
    printed = dict(line.rsplit(" ", 1) for line in subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines())
    for name, (_, offsets) in EXPECTED_LAYOUT.items():
        struct = getattr(cc, name)
        assert int(printed[f"{name} size"]) == ctypes.sizeof(struct), name
        for field in offsets:
            assert int(printed[f"{name} {field}"]) == getattr(struct, field).offset, (name, field)
    assert int(printed["CUprocessState size"]) == ctypes.sizeof(ctypes.c_int)
    assert int(printed["CU_PROCESS_STATE_FAILED"]) == cc.STATE_FAILED


# ---------------------------------------------------------------------------------------------
# Without libcuda


def test_without_libcuda_one_line_error_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "fvboot.cuda_checkpoint", "--get-state", "--pid", "1"],
        env=subprocess_env(**{cc.LIBCUDA_ENV: "/nonexistent/libcuda.so.1"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("fv-cuda-checkpoint: cannot load /nonexistent/libcuda.so.1")
    assert "NVIDIA driver is not installed" in proc.stderr


def test_non_cuda_library_is_refused(capsys, monkeypatch):
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no libc to stand in for a wrong library")
    monkeypatch.setenv(cc.LIBCUDA_ENV, libc)
    rc, out, err = run_main(capsys, "--get-state", "--pid", "1")
    assert rc == 1 and out == ""
    assert err == f"fv-cuda-checkpoint: {libc} is not a CUDA driver library (no cuInit)\n"


def test_driver_without_checkpoint_api_names_r570(capsys, monkeypatch):
    lib = FakeLib(version=12040, missing=("cuCheckpointProcessLock",))
    monkeypatch.setattr(cc.CudaDriver, "load", classmethod(lambda cls, path=None: cls(lib, "libcuda.so.1")))
    rc, out, err = run_main(capsys, "--action", "lock", "--pid", "9")
    assert rc == 1 and out == ""
    assert err == (
        "fv-cuda-checkpoint: libcuda.so.1 has no cuCheckpointProcessLock: the CUDA checkpoint API"
        " needs NVIDIA driver 570 or newer (this driver supports CUDA 12.4)\n"
    )


# ---------------------------------------------------------------------------------------------
# Behaviour CRIU's cuda_plugin relies on (plugins/cuda/cuda_plugin.c)


def test_criu_help_probe_finds_action_flag():
    """cuda_checkpoint_supports_flag(): runs `cuda-checkpoint -h`, needs exit 0 and '--action'."""
    proc = subprocess.run(
        [sys.executable, "-m", "fvboot.cuda_checkpoint", "-h"],
        env=subprocess_env(**{cc.LIBCUDA_ENV: "/nonexistent/libcuda.so.1"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--action" in (proc.stdout + proc.stderr)[:2047]  # the plugin reads 2048 bytes


@pytest.mark.parametrize(
    "state, printed",
    [(cc.STATE_RUNNING, "running\n"), (cc.STATE_LOCKED, "locked\n"), (cc.STATE_CHECKPOINTED, "checkpointed\n"),
     (cc.STATE_FAILED, "failed\n")],
)
def test_get_state_prints_the_state_word_only(capsys, fake, state, printed):
    fake.state = state
    rc, out, err = run_main(capsys, "--get-state", "--pid", "77")
    assert (rc, out, err) == (0, printed, "")
    assert fake.calls == [("cuInit", 0), ("state", 77)]


def test_get_restore_tid_prints_an_atoi_number(capsys, fake):
    rc, out, err = run_main(capsys, "--get-restore-tid", "--pid", "77")
    assert (rc, out, err) == (0, "4242\n", "")
    assert int(out) == fake.tid


def test_get_restore_tid_fails_for_a_process_without_cuda(capsys, fake):
    """The plugin treats a non-zero exit as 'no CUDA in this task' and skips it."""
    fake.results["tid"] = 3
    rc, out, err = run_main(capsys, "--get-restore-tid", "--pid", "77")
    assert rc == 3 and out == ""
    assert err == 'Could not get restore thread ID of process ID 77: "initialization error"\n'


def test_criu_dump_and_restore_sequence(capsys, fake):
    """PAUSE_DEVICES: lock with the timeout; CHECKPOINT_DEVICES: checkpoint;
    RESUME_DEVICES_LATE: restore, unlock. Every step silent, exit 0."""
    for argv, state in [
        (["--action", "lock", "--pid", "77", "--timeout", "10000"], "locked"),
        (["--action", "checkpoint", "--pid", "77"], "checkpointed"),
        (["--action", "restore", "--pid", "77"], "locked"),
        (["--action", "unlock", "--pid", "77"], "running"),
    ]:
        assert run_main(capsys, *argv) == (0, "", "")
        assert cc.STATE_NAMES[fake.state] == state
    assert fake.ops() == ["lock", "checkpoint", "restore", "unlock"]
    assert fake.last_timeout == 10000
    assert fake.last_pairs == [] and fake.last_pairs_null


def test_lock_without_timeout_passes_zero(capsys, fake):
    assert run_main(capsys, "--action", "lock", "--pid", "77") == (0, "", "")
    assert fake.last_timeout == 0


def test_restore_passes_the_device_map(capsys, fake):
    fake.state = cc.STATE_CHECKPOINTED
    rc, out, err = run_main(capsys, "--action", "restore", "--pid", "77", "-d", f"{UUID_A}={UUID_B},{UUID_B[4:]}={UUID_A}")
    assert (rc, out, err) == (0, "", "")
    assert fake.last_pairs == [(RAW_A, RAW_B), (RAW_B, RAW_A)]


def test_device_map_needs_r580(capsys, fake):
    fake.version = 12090
    fake.state = cc.STATE_CHECKPOINTED
    rc, out, err = run_main(capsys, "--action", "restore", "--pid", "77", "-d", f"{UUID_A}={UUID_B}")
    assert rc == 1 and out == ""
    assert "needs NVIDIA driver 580 or newer" in err and "CUDA 12.9" in err
    assert "restore" not in fake.ops()


@pytest.mark.parametrize(
    "result, exit_code, text",
    [
        (1, 1, "invalid argument"),
        (304, 304 & 0xFF, "OS call failed or operation not supported on this OS"),
        (512, 1, "unknown CUDA error 512"),  # low byte 0 would read as success
    ],
)
def test_action_failure_uses_nvidia_wording_and_cuda_exit_code(capsys, fake, result, exit_code, text):
    fake.state = cc.STATE_CHECKPOINTED
    fake.results["restore"] = result
    rc, out, err = run_main(capsys, "--action", "restore", "--pid", "3406143")
    assert rc == exit_code and out == ""
    assert err == f'Could not restore on process ID 3406143: "{text}"\n'


def test_cuinit_failure(capsys, fake):
    fake.results["cuInit"] = 304
    rc, out, err = run_main(capsys, "--get-restore-tid", "--pid", "5")
    assert rc == 48 and out == ""
    assert err == 'Error initializing CUDA: "OS call failed or operation not supported on this OS"\n'


def test_toggle_round_trip(capsys, fake):
    assert run_main(capsys, "--toggle", "--pid", "5", "--timeout", "250") == (0, "", "")
    assert fake.state == cc.STATE_CHECKPOINTED and fake.last_timeout == 250
    assert run_main(capsys, "--toggle", "--pid", "5", "-d", f"{UUID_A}={UUID_A}") == (0, "", "")
    assert fake.state == cc.STATE_RUNNING
    assert fake.ops() == ["state", "lock", "checkpoint", "state", "restore", "unlock"]
    assert fake.last_pairs == [(RAW_A, RAW_A)]


def test_toggle_refuses_a_locked_process(capsys, fake):
    fake.state = cc.STATE_LOCKED
    rc, out, err = run_main(capsys, "--toggle", "--pid", "5")
    assert rc == 1 and out == ""
    assert err == (
        "Error toggling CUDA in process ID 5: the process is locked; --toggle only moves between"
        " running and checkpointed\n"
    )


def test_toggle_failure_wording(capsys, fake):
    fake.results["checkpoint"] = 1
    rc, out, err = run_main(capsys, "--toggle", "--pid", "19897")
    assert rc == 1
    assert err == 'Error toggling CUDA in process ID 19897: "invalid argument"\n'


# ---------------------------------------------------------------------------------------------
# The real ctypes path against a C stand-in for libcuda.so.1 built from the genuine cuda.h

FAKE_LIBCUDA_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cuda.h>

static void note(const char *fmt, ...)
{
    FILE *f = fopen(getenv("FAKE_CUDA_LOG"), "a");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}
static int zero(const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++) if (((const unsigned char *)p)[i]) return 0;
    return 1;
}
static CUresult forced(void) { const char *r = getenv("FAKE_CUDA_RESULT"); return r ? (CUresult)atoi(r) : CUDA_SUCCESS; }

CUresult cuInit(unsigned int flags) { note("init %u", flags); return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = e == 401 ? "operation not permitted when stream is capturing" : "fake error"; return CUDA_SUCCESS; }
CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) { *tid = pid + 1; return forced(); }
CUresult cuCheckpointProcessGetState(int pid, CUprocessState *st) { *st = CU_PROCESS_STATE_CHECKPOINTED; return forced(); }
CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *a)
{
    note("lock %d timeout=%u zero=%s", pid, a->timeoutMs, a->reserved0 == 0 && zero(a->reserved1, sizeof a->reserved1) ? "yes" : "no");
    return forced();
}
CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *a) { note("checkpoint %d zero=%s", pid, zero(a, sizeof *a) ? "yes" : "no"); return forced(); }
CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *a)
{
    char hex[1024] = "";
    for (unsigned i = 0; i < a->gpuPairsCount; i++) {
        for (int j = 0; j < 16; j++) sprintf(hex + strlen(hex), "%02x", (unsigned char)a->gpuPairs[i].oldUuid.bytes[j]);
        strcat(hex, "=");
        for (int j = 0; j < 16; j++) sprintf(hex + strlen(hex), "%02x", (unsigned char)a->gpuPairs[i].newUuid.bytes[j]);
        strcat(hex, ",");
    }
    strcat(hex, zero(a->reserved, sizeof a->reserved) && a->reserved1 == 0 ? " zero=yes" : " zero=no");
    note("restore %d count=%u %s", pid, a->gpuPairsCount, hex);
    return forced();
}
CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *a) { note("unlock %d zero=%s", pid, zero(a, sizeof *a) ? "yes" : "no"); return forced(); }
"""


@pytest.fixture(scope="module")
def c_libcuda(tmp_path_factory):
    header = _cuda_header()
    compiler = shutil.which("gcc") or shutil.which("cc")
    if header is None or compiler is None:
        pytest.skip("needs gcc and a CUDA >= 13.0 cuda.h (CUDA_HOME or /usr/local/cuda*)")
    work = tmp_path_factory.mktemp("fake-libcuda")
    source = work / "fake_libcuda.c"
    source.write_text(FAKE_LIBCUDA_C)
    library = work / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", f"-I{header.parent}", str(source), "-o", str(library)],
                   check=True, capture_output=True)
    return library


def run_cli(library, log, *argv, result=None):
    env = subprocess_env(**{cc.LIBCUDA_ENV: str(library), "FAKE_CUDA_LOG": str(log)})
    if result is not None:
        env["FAKE_CUDA_RESULT"] = str(result)
    return subprocess.run([sys.executable, "-m", "fvboot.cuda_checkpoint", *argv], env=env,
                          capture_output=True, text=True, timeout=60)


def test_c_driver_receives_the_header_layout(c_libcuda, tmp_path):
    log = tmp_path / "calls.log"
    for argv in (
        ["--action", "lock", "--pid", "77", "--timeout", "10000"],
        ["--action", "checkpoint", "--pid", "77"],
        ["--action", "restore", "--pid", "77", "--device-map", f"{UUID_A}={UUID_B},{UUID_B}={UUID_A}"],
        ["--action", "restore", "--pid", "77"],
        ["--action", "unlock", "--pid", "77"],
    ):
        proc = run_cli(c_libcuda, log, *argv)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), argv
    calls = [line for line in log.read_text().splitlines() if not line.startswith("init")]
    assert calls == [
        "lock 77 timeout=10000 zero=yes",
        "checkpoint 77 zero=yes",
        f"restore 77 count=2 {RAW_A.hex()}={RAW_B.hex()},{RAW_B.hex()}={RAW_A.hex()}, zero=yes",
        "restore 77 count=0  zero=yes",
        "unlock 77 zero=yes",
    ]


def test_c_driver_outputs_and_errors(c_libcuda, tmp_path):
    log = tmp_path / "calls.log"
    proc = run_cli(c_libcuda, log, "--get-state", "--pid", "5")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "checkpointed\n", "")
    proc = run_cli(c_libcuda, log, "--get-restore-tid", "--pid", "5")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "6\n", "")
    proc = run_cli(c_libcuda, log, "--action", "unlock", "--pid", "5", result=401)
    assert proc.returncode == 401 & 0xFF and proc.stdout == ""
    assert proc.stderr == 'Could not unlock on process ID 5: "operation not permitted when stream is capturing"\n'


# ---------------------------------------------------------------------------------------------
# The cuda-checkpoint service and its client (what CRIU's plugin runs during fvboot's restores)

from fvboot import cuda_checkpoint_client as client  # noqa: E402
from fvboot import cuda_checkpoint_service as service_mod  # noqa: E402


@pytest.fixture
def service(tmp_path):
    """A real service on a Unix socket, driving a FakeLib, answering in a thread."""
    lib = FakeLib()
    lib.loads = 0
    path = str(tmp_path / "cc.sock")

    def load():
        lib.loads += 1
        return cc.CudaDriver(lib, "fake-libcuda")

    svc = service_mod.Service(path, load=load)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                svc.answer_one()
            except OSError:
                return

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield path, lib
    stop.set()
    svc.close()


def test_service_answers_exactly_as_the_tool(service, monkeypatch):
    path, lib = service
    lib.state = cc.STATE_LOCKED
    assert client.forward(["--get-state", "--pid", "12"], path) == (0, "locked\n", "")
    assert client.forward(["--action", "unlock", "--pid", "12"], path) == (0, "", "")
    rc, out, err = client.forward(["--action", "bogus", "--pid", "1"], path)
    assert (rc, out) == (2, "") and "invalid --action 'bogus'" in err
    rc, out, _ = client.forward(["-h"], path)
    assert rc == 0 and "--action" in out
    # the driver was opened and initialised once, when the service started, not per call
    assert lib.loads == 1 and lib.calls[0][0] == "cuInit"


def test_service_uses_the_callers_device_map(service, monkeypatch):
    path, lib = service
    lib.state = cc.STATE_CHECKPOINTED
    monkeypatch.setenv("FV_CUDA_DEVICE_MAP", f"{UUID_A}={UUID_B}")
    assert client.forward(["--action", "restore", "--pid", "9"], path) == (0, "", "")
    assert lib.last_pairs == [(RAW_A, RAW_B)]


def test_the_service_keeps_its_mark_while_a_restore_runs_and_only_then(service, tmp_path):
    """The weight stager may yield to the CUDA restore: the mark beside the socket exists while
    a `--action restore` call runs, is gone when it has answered, and other calls never make it."""
    path, lib = service
    mark = tmp_path / service_mod.RESUME_MARK
    seen = {}
    real_restore = lib.cuCheckpointProcessRestore.impl

    def restore(*args):
        seen["during"] = mark.exists()
        return real_restore(*args)

    lib.cuCheckpointProcessRestore.impl = restore
    lib.state = cc.STATE_CHECKPOINTED
    assert client.forward(["--action", "restore", "--pid", "9"], path) == (0, "", "")
    assert seen == {"during": True} and not mark.exists()
    lib.state = cc.STATE_LOCKED
    seen.clear()
    assert client.forward(["--action", "unlock", "--pid", "9"], path) == (0, "", "")
    assert client.forward(["--get-state", "--pid", "9"], path)[0] == 0
    assert not mark.exists() and seen == {}
    assert service_mod.is_restore(b"garbage") is False


def test_service_driver_failure_is_reported_per_call(tmp_path):
    def broken():
        raise cc.DriverUnavailableError("cannot load libcuda.so.1 (gone)")

    svc = service_mod.Service(str(tmp_path / "cc.sock"), load=broken)
    t = threading.Thread(target=svc.answer_one, daemon=True)
    t.start()
    rc, out, err = client.forward(["--get-state", "--pid", "3"], str(tmp_path / "cc.sock"))
    t.join(5)
    svc.close()
    assert (rc, out) == (1, "") and err == "fv-cuda-checkpoint: cannot load libcuda.so.1 (gone)\n"


def test_client_without_service_runs_the_tool_itself(tmp_path):
    """As the image's cuda-checkpoint wrapper runs it: python -S, fvboot on PYTHONPATH."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fvboot").symlink_to(Path(cc.__file__).parent)
    env = dict(os.environ, PYTHONPATH=str(lib),
               FV_CUDA_CHECKPOINT_SOCKET=str(tmp_path / "nobody-listens.sock"))
    run = lambda *argv: subprocess.run(  # noqa: E731
        [sys.executable, "-S", "-m", "fvboot.cuda_checkpoint_client", *argv],
        env=env, capture_output=True, text=True, timeout=60)
    proc = run("--help")
    assert proc.returncode == 0 and "--action" in proc.stdout
    proc = run("--get-state", "--pid", "x")
    assert proc.returncode == 2 and "invalid --pid 'x'" in proc.stderr


def test_service_runs_as_a_process_and_goes_with_its_context(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    with service_mod.running(tmp_path, enabled=True) as env:
        sock = env[client.SOCKET_ENV]
        deadline = time.monotonic() + 30
        answer = None
        while answer is None and time.monotonic() < deadline:
            answer = client.forward(["-h"], sock)
            time.sleep(0.05)
        assert answer is not None and answer[0] == 0 and "--action" in answer[1]
    assert not os.path.exists(sock)
    with service_mod.running(tmp_path, enabled=False) as env:
        assert env == {}


def test_service_from_a_folder_of_its_own_starts_without_site_and_answers(tmp_path):
    """As in the image (/opt/fast-vllm/lib/fvboot): -S, the folder on PYTHONPATH, and it serves."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fvboot").symlink_to(Path(cc.__file__).parent)
    sock = tmp_path / "svc.sock"
    argv, env = service_mod.service_command(sock, str(lib / "fvboot"))
    assert argv[1] == "-S" and env["PYTHONPATH"].split(os.pathsep)[0] == str(lib)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline, answer = time.monotonic() + 30, None
        while answer is None and time.monotonic() < deadline:
            answer = client.forward(["-h"], str(sock))
            time.sleep(0.05)
        assert answer is not None and answer[0] == 0 and "--action" in answer[1]
    finally:
        proc.terminate()
        proc.wait(10)
    argv, env = service_mod.service_command(sock, "/src/entrypoint")  # an editable install: site finds it
    assert "-S" not in argv and env is None


@pytest.mark.parametrize("argv", [
    ["--get-state", "--pid", "12"],
    ["--action", "unlock", "--pid", "12"],
    ["--action", "bogus", "--pid", "1"],
    ["-h"],
    ["--action", "restore", "--pid", "9"],
])
def test_c_client_answers_like_the_python_client(service, c_client, argv):
    path, lib = service
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=path, FV_CUDA_DEVICE_MAP=f"{UUID_A}={UUID_B}")
    lib.state = cc.STATE_CHECKPOINTED if "restore" in argv else cc.STATE_LOCKED
    proc = subprocess.run([str(c_client), *argv], env=env, capture_output=True, text=True, timeout=30)
    lib.state = cc.STATE_CHECKPOINTED if "restore" in argv else cc.STATE_LOCKED
    os.environ["FV_CUDA_DEVICE_MAP"] = f"{UUID_A}={UUID_B}"
    try:
        expected = client.forward(argv, path)
    finally:
        del os.environ["FV_CUDA_DEVICE_MAP"]
    assert (proc.returncode, proc.stdout, proc.stderr) == expected
    if "restore" in argv:
        assert lib.last_pairs == [(RAW_A, RAW_B)]  # the C client forwarded the device map


def test_c_client_without_service_runs_the_fallback(c_client, tmp_path):
    fallback = tmp_path / "tool"
    fallback.write_text('#!/bin/sh\necho "fallback ran with: $*"\nexit 7\n')
    fallback.chmod(0o755)
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=str(tmp_path / "nobody.sock"),
               FV_CUDA_CHECKPOINT_FALLBACK=str(fallback))
    proc = subprocess.run([str(c_client), "--get-state", "--pid", "3"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (7, "fallback ran with: --get-state --pid 3\n")


def test_c_client_reports_a_service_that_dies_mid_call(c_client, tmp_path):
    """Connected, then no reply: one clear line, exit 1, and the call is not run again."""
    import socket as socket_mod

    path = str(tmp_path / "dying.sock")
    srv = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def accept_and_drop():
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=accept_and_drop, daemon=True)
    t.start()
    fallback = tmp_path / "tool"
    fallback.write_text("#!/bin/sh\necho must-not-run\n")
    fallback.chmod(0o755)
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=path, FV_CUDA_CHECKPOINT_FALLBACK=str(fallback))
    proc = subprocess.run([str(c_client), "--action", "restore", "--pid", "3"], env=env,
                          capture_output=True, text=True, timeout=30)
    t.join(5)
    srv.close()
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"fv-cuda-checkpoint: the cuda-checkpoint service at {path} failed")


def test_service_answers_help_while_the_driver_still_initialises(tmp_path):
    """CRIU asks `-h` as it starts, before cuInit is done: that must not wait for the driver."""
    release = threading.Event()
    lib = FakeLib()

    def slow_load():
        release.wait(30)
        return cc.CudaDriver(lib, "fake-libcuda")

    path = str(tmp_path / "cc.sock")
    svc = service_mod.Service(path, load=slow_load)
    t = threading.Thread(target=lambda: [svc.answer_one() for _ in range(2)], daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        rc, out, _ = client.forward(["-h"], path)
        assert rc == 0 and "--action" in out and time.monotonic() - t0 < 10
        assert not release.is_set() and lib.calls == []
        release.set()  # the next call needs the driver: it gets it once initialised
        assert client.forward(["--get-state", "--pid", "4"], path) == (0, "running\n", "")
    finally:
        release.set()
        t.join(10)
        svc.close()


def test_cuda_checkpoint_takes_the_restore_map_from_fvboot(monkeypatch):
    from fvboot import cuda_checkpoint as cc

    uuid_a = "GPU-f6a758cf-ca97-d272-4aa0-73cabee40368"
    uuid_b = "GPU-0823a096-b706-01fc-6c68-7a3d14a256ad"
    monkeypatch.setenv("FV_CUDA_DEVICE_MAP", f"{uuid_a}={uuid_b}")
    cmd = cc.parse_args(["--action", "restore", "--pid", "42"])
    assert len(cmd.device_map) == 1
    assert cc.parse_args(["--action", "unlock", "--pid", "42"]).device_map == ()


def test_cuda_checkpoint_answers_at_once_for_a_process_without_cuda():
    """This very process has no libcuda mapped: the real-driver path says so before cuInit."""
    import os
    import types

    from fvboot import cuda_checkpoint as cc

    cmd = cc.parse_args(["--get-restore-tid", "--pid", str(os.getpid())])
    with pytest.raises(cc.OperationError) as e:
        cc._refuse_processes_without_cuda(cmd, types.SimpleNamespace(name=cc.LIBCUDA_DEFAULT))
    assert e.value.exit_code == 3 and "process has not loaded the CUDA driver" in str(e.value)
    cc._refuse_processes_without_cuda(cmd, types.SimpleNamespace(name="fake"))  # other drivers answer

