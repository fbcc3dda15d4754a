"""fv-cuda-checkpoint: NVIDIA's ``cuda-checkpoint`` command line on the public CUDA driver API.

Why: CRIU's ``cuda_plugin`` runs ``cuda-checkpoint`` from PATH and parses what it prints.
NVIDIA ships that tool as a separate binary download; the driver itself (libcuda.so.1, r570+)
exposes the same operations as public functions. This module drives those functions through
ctypes, so an image needs no extra binary, and it adds nothing the plugin could trip over.

The plugin relies on (checkpoint-restore/criu, plugins/cuda/cuda_plugin.c):
  * ``cuda-checkpoint -h`` exits 0 and its output contains ``--action``;
  * ``--get-restore-tid --pid N`` exits 0 and prints the thread ID first (read with atoi);
    a non-zero exit means "this task has no CUDA" and the task is skipped;
  * ``--get-state --pid N`` prints ``running``, ``locked`` or ``checkpointed`` first;
  * ``--action lock|checkpoint|restore|unlock --pid N [--timeout MS]`` exits 0 on success.
The plugin reads stdout and stderr through one pipe, so on success nothing else is printed.
Failures print one line to stderr in NVIDIA's wording (``Could not restore on process ID 7:
"invalid argument"``) and exit with the CUresult, as NVIDIA's tool does (mod 256, never 0).
Invalid arguments exit 2; a missing or too old driver exits 1.

FV_CUDA_CHECKPOINT_LIBCUDA names another driver library to load (default: libcuda.so.1).

Over 400 lines on purpose: CRIU's plugin starts this file as a program of its own (`python3 -S
-m fvboot.cuda_checkpoint`, standard library only, once per task and action), so its command
line, its driver bindings and its error wording stay in the one module that program loads.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

PROG = "fv-cuda-checkpoint"
LIBCUDA_ENV = "FV_CUDA_CHECKPOINT_LIBCUDA"
DEVICE_MAP_ENV = "FV_CUDA_DEVICE_MAP"  # the --device-map to use for restores that name none
LIBCUDA_DEFAULT = "libcuda.so.1"

ACTIONS = ("lock", "checkpoint", "restore", "unlock")

# CUDA driver API version (cuDriverGetVersion) that brought GPU remapping on restore
# (CUcheckpointRestoreArgs.gpuPairs): 13.0, driver r580. The checkpoint functions themselves
# came with 12.8 (r570); their absence is detected by symbol lookup.
DEVICE_MAP_MIN_VERSION = 13000

# CUprocessState (cuda.h). 4 and 5 only exist in newer headers; named so they print sensibly.
STATE_RUNNING, STATE_LOCKED, STATE_CHECKPOINTED, STATE_FAILED = 0, 1, 2, 3
STATE_NAMES = {
    STATE_RUNNING: "running",
    STATE_LOCKED: "locked",
    STATE_CHECKPOINTED: "checkpointed",
    STATE_FAILED: "failed",
    4: "checkpointing",
    5: "restoring",
}

HELP = f"""\
CUDA checkpoint and restore utility ({PROG}, on the CUDA driver API of libcuda.so.1).
Same operations and output as NVIDIA's cuda-checkpoint; needs driver 570 or newer.

Operations:
--get-state --pid <pid>
\tPrints the checkpoint state of <pid>: running, locked, checkpointed or failed

--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>] [--device-map <uuids>]
\tPerforms one step of the checkpoint sequence on <pid>.
\tlock waits up to <ms> milliseconds for in-flight CUDA work (0 or no --timeout: no limit).
\trestore can move the process onto other GPUs of the same model with --device-map.

--toggle --pid <pid> [--timeout <ms>] [--device-map <uuids>]
\tMoves <pid> between running and checkpointed (lock+checkpoint, or restore+unlock)

--get-restore-tid --pid <pid>
\tPrints the thread ID of the CUDA restore thread of <pid>

Options:
--pid|-p <pid>
\tThe process to act on

--timeout|-t <ms>
\tTimeout of the lock step in milliseconds

--device-map|-d <uuids>
\tGPU remapping for restore (driver 580 or newer): oldUuid=newUuid,oldUuid=newUuid,...
\tMust list every GPU the process had. UUIDs as nvidia-smi prints them
\t(GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx), with or without the GPU- prefix.

--help|-h
\tPrints this help message

Exit status: 0 on success; 2 for invalid arguments; the CUresult (mod 256) when the driver
refuses an operation; 1 when the driver cannot be used.
"""


# ---------------------------------------------------------------------------------------------
# Errors. Library code raises these; only main() turns them into messages and exit codes.


class ToolError(Exception):
    """An error reported as one line on stderr, never as a traceback."""

    exit_code = 1


class UsageError(ToolError):
    """Invalid command line."""

    exit_code = 2


class DriverUnavailableError(ToolError):
    """libcuda.so.1 is missing, or too old for the requested operation."""


class CudaError(ToolError):
    """A driver call returned a CUresult other than CUDA_SUCCESS."""

    def __init__(self, function: str, result: int, text: str) -> None:
        super().__init__(f'{function} failed: "{text}" ({result})')
        self.function = function
        self.result = result
        self.text = text

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        # NVIDIA's tool exits with the CUresult; the OS keeps the low byte, which must not be 0.
        return self.result & 0xFF or 1


class OperationError(ToolError):
    """An operation failed in the driver; the message uses NVIDIA's wording."""

    def __init__(self, context: str, cause: CudaError) -> None:
        super().__init__(f'{context}: "{cause.text}"')
        self.cause = cause
        self.exit_code = cause.exit_code


class StateError(ToolError):
    """The process is in a state the requested operation cannot start from."""


# ---------------------------------------------------------------------------------------------
# Driver ABI. Layouts from cuda.h of CUDA 13.0 (CUDA_VERSION 13000, /usr/local/cuda-13.0),
# checked with offsetof/sizeof against that header and the CUDA 13.1 one (13010): identical.
# Every argument struct is 64 bytes and must be zeroed apart from the fields set below.
#   CUuuid               { char bytes[16]; }                                      16 bytes
#   CUcheckpointLockArgs { unsigned int timeoutMs; unsigned int reserved0;
#                          cuuint64_t reserved1[7]; }                             64 bytes
#   CUcheckpointCheckpointArgs { cuuint64_t reserved[8]; }                        64 bytes
#   CUcheckpointGpuPair  { CUuuid oldUuid; CUuuid newUuid; }                      32 bytes
#   CUcheckpointRestoreArgs { CUcheckpointGpuPair *gpuPairs;          offset 0
#                             unsigned int gpuPairsCount;             offset 8
#                             char reserved[52 - sizeof(void *)];     offset 12, 44 bytes
#                             cuuint64_t reserved1; }                 offset 56   64 bytes
#   CUcheckpointUnlockArgs { cuuint64_t reserved[8]; }                            64 bytes
# CUDA 12.8's restore struct was all reserved; later ones (13.4) add fields after offset 12;
# gpuPairs/gpuPairsCount keep their offsets and the size stays 64 in all of them.


class CUuuid(ctypes.Structure):
    """CUuuid. cuda.h declares char[16]; unsigned bytes keep NUL bytes readable from Python."""

    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_ubyte * (52 - ctypes.sizeof(ctypes.c_void_p))),  # char in cuda.h
        ("reserved1", ctypes.c_uint64),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


_P = ctypes.POINTER
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [_P(ctypes.c_int)],
    "cuGetErrorString": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuCheckpointProcessGetRestoreThreadId": [ctypes.c_int, _P(ctypes.c_int)],
    "cuCheckpointProcessGetState": [ctypes.c_int, _P(ctypes.c_int)],  # CUprocessState: 4-byte enum
    "cuCheckpointProcessLock": [ctypes.c_int, _P(CUcheckpointLockArgs)],
    "cuCheckpointProcessCheckpoint": [ctypes.c_int, _P(CUcheckpointCheckpointArgs)],
    "cuCheckpointProcessRestore": [ctypes.c_int, _P(CUcheckpointRestoreArgs)],
    "cuCheckpointProcessUnlock": [ctypes.c_int, _P(CUcheckpointUnlockArgs)],
}
_BASE_FUNCTIONS = ("cuInit", "cuDriverGetVersion", "cuGetErrorString")


def format_version(version: int) -> str:
    """12080 -> '12.8', as CUDA prints driver API versions."""
    return f"{version // 1000}.{version % 1000 // 10}"


class CudaDriver:
    """The few libcuda entry points the tool needs, with CUresults turned into CudaError."""

    def __init__(self, lib: Any, name: str = LIBCUDA_DEFAULT) -> None:
        self.name = name
        self._fn: dict[str, Any] = {}
        missing = []
        for fname, argtypes in _SIGNATURES.items():
            try:
                fn = getattr(lib, fname)
            except AttributeError:
                missing.append(fname)
                continue
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            self._fn[fname] = fn
        missing_base = [f for f in missing if f in _BASE_FUNCTIONS]
        if missing_base:
            raise DriverUnavailableError(f"{name} is not a CUDA driver library (no {missing_base[0]})")
        if missing:
            raise DriverUnavailableError(
                f"{name} has no {missing[0]}: the CUDA checkpoint API needs NVIDIA driver 570 or"
                f" newer (this driver supports CUDA {format_version(self.version())})"
            )

    @classmethod
    def load(cls, path: str | None = None) -> CudaDriver:
        """Open the driver library; FV_CUDA_CHECKPOINT_LIBCUDA overrides the default name."""
        name = path or os.environ.get(LIBCUDA_ENV) or LIBCUDA_DEFAULT
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise DriverUnavailableError(
                f"cannot load {name} ({exc}): the NVIDIA driver is not installed or not visible here"
            ) from exc
        return cls(lib, name)

    def _call(self, fname: str, *args: Any) -> None:
        result = self._fn[fname](*args)
        if result != 0:
            raise CudaError(fname, result, self.error_string(result))

    def error_string(self, result: int) -> str:
        text = ctypes.c_char_p()
        if self._fn["cuGetErrorString"](result, ctypes.byref(text)) != 0 or not text.value:
            return f"unknown CUDA error {result}"
        return text.value.decode(errors="replace")

    def init(self) -> None:
        self._call("cuInit", 0)

    def version(self) -> int:
        version = ctypes.c_int()
        self._call("cuDriverGetVersion", ctypes.byref(version))
        return version.value

    def get_state(self, pid: int) -> int:
        state = ctypes.c_int()
        self._call("cuCheckpointProcessGetState", pid, ctypes.byref(state))
        return state.value

    def get_restore_tid(self, pid: int) -> int:
        tid = ctypes.c_int()
        self._call("cuCheckpointProcessGetRestoreThreadId", pid, ctypes.byref(tid))
        return tid.value

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self._call("cuCheckpointProcessLock", pid, ctypes.byref(args))

    def checkpoint(self, pid: int) -> None:
        args = CUcheckpointCheckpointArgs()
        self._call("cuCheckpointProcessCheckpoint", pid, ctypes.byref(args))

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[bytes, bytes]] = ()) -> None:
        args = CUcheckpointRestoreArgs()
        pairs = None  # referenced here so the array outlives the call
        if gpu_pairs:
            pairs = (CUcheckpointGpuPair * len(gpu_pairs))()
            for slot, (old, new) in zip(pairs, gpu_pairs):
                slot.oldUuid.bytes[:] = old
                slot.newUuid.bytes[:] = new
            args.gpuPairs = ctypes.cast(pairs, ctypes.POINTER(CUcheckpointGpuPair))
            args.gpuPairsCount = len(gpu_pairs)
        self._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))
        del pairs

    def unlock(self, pid: int) -> None:
        args = CUcheckpointUnlockArgs()
        self._call("cuCheckpointProcessUnlock", pid, ctypes.byref(args))


# ---------------------------------------------------------------------------------------------
# GPU UUIDs and the device map.

_UUID_DASHED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UUID_PLAIN = re.compile(r"[0-9a-fA-F]{32}")


def parse_gpu_uuid(text: str) -> bytes:
    """'GPU-8f4022ba-e0cb-1298-286e-225c953a7feb' (nvidia-smi), without 'GPU-', or 32 hex digits."""
    body = text.strip()
    if body[:4].upper() == "GPU-":
        body = body[4:]
    if not (_UUID_DASHED.fullmatch(body) or _UUID_PLAIN.fullmatch(body)):
        raise UsageError(
            f"invalid GPU UUID {text!r}: expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
            " as nvidia-smi -L prints it"
        )
    return bytes.fromhex(body.replace("-", ""))


def format_gpu_uuid(raw: bytes) -> str:
    """16 bytes -> 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx', the nvidia-smi spelling."""
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_device_map(text: str) -> list[tuple[bytes, bytes]]:
    """'OLD=NEW,OLD=NEW' -> [(old, new), ...]; each old and each new GPU at most once."""
    pairs: list[tuple[bytes, bytes]] = []
    for item in text.split(","):
        old_text, sep, new_text = item.partition("=")
        if not sep or "=" in new_text or not old_text.strip() or not new_text.strip():
            raise UsageError(
                f"invalid --device-map entry {item.strip()!r}: expected oldUuid=newUuid,"
                " comma-separated"
            )
        pairs.append((parse_gpu_uuid(old_text), parse_gpu_uuid(new_text)))
    for side, label in ((0, "checkpointed"), (1, "target")):
        seen: set[bytes] = set()
        for pair in pairs:
            if pair[side] in seen:
                raise UsageError(
                    f"invalid --device-map: {label} GPU {format_gpu_uuid(pair[side])} appears twice"
                )
            seen.add(pair[side])
    return pairs


# ---------------------------------------------------------------------------------------------
# Command line. Hand-written to follow cuda-checkpoint's getopt-style syntax exactly:
# --opt value, --opt=value, -p value and -pVALUE, options in any order.


@dataclass(frozen=True)
class Command:
    op: str  # "help", "get-state", "get-restore-tid", "toggle", or an action
    pid: int = 0
    timeout_ms: int = 0
    device_map: tuple[tuple[bytes, bytes], ...] = ()


_FLAGS = {"--get-state": "get-state", "--get-restore-tid": "get-restore-tid", "--toggle": "toggle"}
_VALUED = {
    "--action": "action",
    "--pid": "pid",
    "-p": "pid",
    "--timeout": "timeout",
    "-t": "timeout",
    "--device-map": "device-map",
    "-d": "device-map",
}
_OPTION_NAMES = {"action": "--action", "pid": "--pid", "timeout": "--timeout", "device-map": "--device-map"}


def _parse_int(option: str, text: str, low: int, high: int, what: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= high:
        raise UsageError(f"invalid {option} {text!r}: expected {what}")
    return int(text)


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Command:
    """Turn argv (without the program name) into a validated Command; UsageError otherwise.
    ENV (default os.environ) supplies FV_CUDA_DEVICE_MAP for restores that name no map."""
    env = os.environ if env is None else env
    if any(arg in ("-h", "--help") for arg in argv):
        return Command("help")
    ops: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        elif len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[:2] in _VALUED:
            name, value = arg[:2], arg[2:]
        if name in _FLAGS:
            if value is not None:
                raise UsageError(f"option {name} takes no value")
            ops.append(_FLAGS[name])
            continue
        if name not in _VALUED:
            if arg.startswith("-"):
                raise UsageError(f"unknown option {arg!r}")
            raise UsageError(f"unexpected argument {arg!r}")
        key = _VALUED[name]
        if value is None:
            if i >= len(argv):
                raise UsageError(f"option {_OPTION_NAMES[key]} needs a value")
            value = argv[i]
            i += 1
        if key in values:
            raise UsageError(f"option {_OPTION_NAMES[key]} given twice")
        values[key] = value
        if key == "action":
            ops.append("action")

    if not ops:
        raise UsageError("no operation given: use --get-state, --action, --toggle or --get-restore-tid")
    if len(ops) > 1:
        raise UsageError("give only one of --get-state, --action, --toggle and --get-restore-tid")
    op = ops[0]
    if op == "action":
        op = values["action"]
        if op not in ACTIONS:
            raise UsageError(f"invalid --action {op!r}: expected one of {', '.join(ACTIONS)}")
    if "pid" not in values:
        raise UsageError(f"--pid is required for {'--action ' + op if op in ACTIONS else '--' + op}")
    pid = _parse_int("--pid", values["pid"], 1, 2**31 - 1, "a process ID (a positive integer)")

    timeout_ms = 0
    if "timeout" in values:
        if op not in ("lock", "toggle"):
            raise UsageError("--timeout is only valid with --action lock or --toggle")
        timeout_ms = _parse_int("--timeout", values["timeout"], 0, 2**32 - 1, "milliseconds (0 to 4294967295)")
    device_map: tuple[tuple[bytes, bytes], ...] = ()
    if "device-map" in values:
        if op not in ("restore", "toggle"):
            raise UsageError("--device-map is only valid with --action restore or --toggle")
        device_map = tuple(parse_device_map(values["device-map"]))
    elif op == "restore" and env.get(DEVICE_MAP_ENV):
        # CRIU's cuda plugin runs us without a map; fvboot serve sets it for the whole restore
        # when this node's GPUs have other UUIDs than the baking node's.
        device_map = tuple(parse_device_map(env[DEVICE_MAP_ENV]))
    return Command(op, pid, timeout_ms, device_map)


# ---------------------------------------------------------------------------------------------
# Operations.

T = TypeVar("T")


def _step(context: str, call: Callable[[], T]) -> T:
    """Run one driver call; a CudaError becomes an OperationError worded like NVIDIA's tool."""
    try:
        return call()
    except CudaError as exc:
        raise OperationError(context, exc) from exc


def execute(cmd: Command, driver: CudaDriver, out: TextIO) -> int:
    """Carry out a parsed command on an opened driver; print results to out. Returns 0."""
    _refuse_processes_without_cuda(cmd, driver)
    _step("Error initializing CUDA", driver.init)
    pid = cmd.pid
    if cmd.device_map:
        version = driver.version()
        if version < DEVICE_MAP_MIN_VERSION:
            raise DriverUnavailableError(
                f"--device-map needs NVIDIA driver 580 or newer (CUDA 13.0 driver API);"
                f" this driver supports CUDA {format_version(version)}"
            )

    if cmd.op == "get-state":
        state = _step(f"Could not get state of process ID {pid}", lambda: driver.get_state(pid))
        out.write(f"{STATE_NAMES.get(state, f'unknown state {state}')}\n")
    elif cmd.op == "get-restore-tid":
        tid = _step(f"Could not get restore thread ID of process ID {pid}", lambda: driver.get_restore_tid(pid))
        out.write(f"{tid}\n")
    elif cmd.op == "toggle":
        _toggle(cmd, driver)
    else:
        run = {
            "lock": lambda: driver.lock(pid, cmd.timeout_ms),
            "checkpoint": lambda: driver.checkpoint(pid),
            "restore": lambda: driver.restore(pid, cmd.device_map),
            "unlock": lambda: driver.unlock(pid),
        }[cmd.op]
        _step(f"Could not {cmd.op} on process ID {pid}", run)
    out.flush()
    return 0


def _toggle(cmd: Command, driver: CudaDriver) -> None:
    """running -> lock + checkpoint; checkpointed -> restore + unlock."""
    pid = cmd.pid
    context = f"Error toggling CUDA in process ID {pid}"
    state = _step(context, lambda: driver.get_state(pid))
    if state == STATE_RUNNING:
        _step(context, lambda: driver.lock(pid, cmd.timeout_ms))
        _step(context, lambda: driver.checkpoint(pid))
    elif state == STATE_CHECKPOINTED:
        _step(context, lambda: driver.restore(pid, cmd.device_map))
        _step(context, lambda: driver.unlock(pid))
    else:
        name = STATE_NAMES.get(state, f"in unknown state {state}")
        raise StateError(f"{context}: the process is {name}; --toggle only moves between running and checkpointed")


def _refuse_processes_without_cuda(cmd: Command, driver: "CudaDriver") -> None:
    """CRIU's cuda plugin asks every process of the tree for its restore thread; most have no
    CUDA at all. A process that has not mapped the driver has no CUDA state, so say so at once
    instead of paying for cuInit (~0.3 s a call, several calls per dump and restore)."""
    if cmd.op not in ("get-restore-tid", "get-state") or driver.name != LIBCUDA_DEFAULT:
        return  # another driver library was named (tests, custom installs): let it answer
    try:
        with open(f"/proc/{cmd.pid}/maps") as f:
            if any("libcuda.so" in line for line in f):
                return
    except OSError:
        return  # cannot tell: ask the driver
    context = ("Could not get restore thread ID" if cmd.op == "get-restore-tid" else "Could not get state")
    raise OperationError(f"{context} of process ID {cmd.pid}",
                         CudaError("cuCheckpointProcessGetState", 3, "process has not loaded the CUDA driver"))


def run(argv: Sequence[str], out: TextIO, err: TextIO, env: Mapping[str, str] | None = None,
        load: Callable[[], CudaDriver] | None = None) -> int:
    """One invocation: parse, act, print; errors become one line on ERR and an exit code.
    LOAD opens the driver (the cuda-checkpoint service passes the one it initialised)."""
    try:
        cmd = parse_args(argv, env)
        if cmd.op == "help":
            out.write(HELP)
            out.flush()
            return 0
        return execute(cmd, (load or CudaDriver.load)(), out)
    except UsageError as exc:
        print(f"{PROG}: {exc} (see {PROG} --help)", file=err)
        return exc.exit_code
    except ToolError as exc:
        # OperationError already carries NVIDIA's wording; the others get the program name.
        message = str(exc) if isinstance(exc, (OperationError, StateError)) else f"{PROG}: {exc}"
        print(message, file=err)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of fv-cuda-checkpoint; the only place errors become messages and exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): nothing left to report to, and no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
