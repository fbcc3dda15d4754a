"""The bake manifest (/fv/manifest.json): what was baked, with what, on which device, and the
files with sizes and checksums, so a start can tell in milliseconds whether the checkpoint fits.

One typed shape (frozen dataclasses), read and written here only: `read` validates once (JSON,
format, types, required fields) and raises ManifestInvalid with a one-line reason naming the
field; every reader then uses fields. The JSON keys are the ones bakes have always written, so
images baked before still read; keys this fvboot does not know are kept in each part's `extra`
and written back. Standard library only: `fvboot serve` imports this before anything else.
Over 400 lines on purpose: the whole shape (each part with its reader and writer), the device
probe and the file checks stay in the one module that owns the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .devices import LOOKUP_WAIT_S, DeviceLookup
from .errors import CheckpointUnusable, ManifestInvalid

FORMAT = 1
# CRIU's page images are large and read anyway by the restore: too slow to hash before CRIU starts,
# so they carry a digest per piece, checked while the restore reads them (pagecheck.py). Everything
# else but the weights (checked by their own loader) and the dump's log (which no restore reads:
# hashing its 3-8 MB cost each start 5-15 ms) has a sha256 checked before the restore.
_PIECEWISE_PREFIXES = ("pages-",)


# --- validation: one helper per JSON type, each naming the field it refuses -------------------

_REQUIRED = object()


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_opt_count(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def _opt_str_tuple(v: Optional[list]) -> Optional[tuple[str, ...]]:
    return None if v is None else tuple(v)


def _is_num_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_num(x) for x in v)


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _any(v: Any) -> bool:
    return True


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _get(d: Mapping[str, Any], where: str, key: str, check: Callable[[Any], bool], what: str,
         default: Any = _REQUIRED) -> Any:
    """D[KEY] if it passes CHECK; DEFAULT where it is absent and optional; else ManifestInvalid."""
    if key not in d:
        if default is _REQUIRED:
            raise ManifestInvalid(f"manifest: {_name(where, key)} is missing")
        return default
    v = d[key]
    if not check(v):
        raise ManifestInvalid(f"manifest: {_name(where, key)} must be {what}")
    return v


def _obj(d: Mapping[str, Any], where: str, key: str, default: Any = _REQUIRED) -> Any:
    return _get(d, where, key, _is_obj, "an object", default)


def _items(d: Mapping[str, Any], where: str, key: str, parse: Callable[[Any, str], Any],
           default: Any = _REQUIRED) -> Any:
    """A list of parts: each element an object parsed by PARSE(element, 'key[i]')."""
    v = _get(d, where, key, _is_list, "a list", default)
    if v is default:
        return default
    name = _name(where, key)
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, dict):
            raise ManifestInvalid(f"manifest: {name}[{i}] must be an object")
        out.append(parse(x, f"{name}[{i}]"))
    return tuple(out)


def _extra(d: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


def _some(d: dict[str, Any], **values: Any) -> dict[str, Any]:
    """D with VALUES added where they are not None (optional fields absent from the file stay absent)."""
    d.update({k: v for k, v in values.items() if v is not None})
    return d


# --- the parts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    served_name: str
    source: Optional[str] = None
    path: Optional[str] = None
    revision: Optional[str] = None  # the Hub commit downloaded (a model from the Hub only)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("served_name", "source", "path", "revision")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "model") -> "Model":
        return cls(served_name=_get(d, where, "served_name", _is_str, "a string"),
                   source=_get(d, where, "source", _is_str, "a string", None),
                   path=_get(d, where, "path", _is_str, "a string", None),
                   revision=_get(d, where, "revision", _is_str, "a string", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "served_name": self.served_name}, source=self.source, path=self.path,
                     revision=self.revision)


@dataclass(frozen=True)
class Vllm:
    """How vLLM was started: the user's ARGS, the whole COMMAND (ending with ARGS), its PORT, and
    the ENV of its own settings (VLLM_*, launcher.vllm_settings) the restored server keeps; None
    in a manifest of an fvboot that did not record them."""

    args: tuple[str, ...]
    command: tuple[str, ...]
    port: int
    version: Optional[str] = None
    env: Optional[Mapping[str, str]] = None
    # the thread and allocator settings of the libraries under vLLM (launcher.library_settings)
    # the served processes started with; None where not recorded
    library_env: Optional[Mapping[str, str]] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("args", "command", "port", "version", "env", "library_env")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "vllm") -> "Vllm":
        return cls(args=tuple(_get(d, where, "args", _is_str_list, "a list of strings")),
                   command=tuple(_get(d, where, "command", _is_str_list, "a list of strings")),
                   port=_get(d, where, "port", _is_int, "an integer"),
                   version=_get(d, where, "version", _is_str, "a string", None),
                   env=_get(d, where, "env", _is_str_map, "an object of strings", None),
                   library_env=_get(d, where, "library_env", _is_str_map, "an object of strings", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "args": list(self.args), "command": list(self.command), "port": self.port},
                     version=self.version, env=dict(self.env) if self.env is not None else None,
                     library_env=dict(self.library_env) if self.library_env is not None else None)


@dataclass(frozen=True)
class Criu:
    version: Optional[str] = None
    dump_flags: tuple[str, ...] = ()
    restore_flags: tuple[str, ...] = ()
    # addresses other than loopback and the wildcard the checkpoint's sockets are bound to
    # (sockets.py): a restore needs each of them here
    addresses: tuple[str, ...] = ()
    # the capabilities the checkpoint's processes held (their permitted sets, by name): a restore
    # needs each of them (capabilities.restore_lacks); None: not recorded (an older fvboot)
    capabilities: Optional[tuple[str, ...]] = None
    # how many threads the checkpoint's processes had (a pids limit counts each): None, not recorded
    tasks: Optional[int] = None
    # the paths of the container the checkpoint's mounts are bound from at restore (mounts.py): a
    # restore needs each of them here; None: not recorded (an older fvboot)
    mounts: Optional[tuple[str, ...]] = None
    # the container's mounts on /proc the served tree's own /proc carried at the dump (proc_guard.py;
    # empty where the container had none); None: a checkpoint of an fvboot that carried none over
    proc_guards: Optional[tuple[str, ...]] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("version", "dump_flags", "restore_flags", "addresses", "capabilities", "tasks", "mounts", "proc_guards")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "criu") -> "Criu":
        return cls(version=_get(d, where, "version", _is_opt_str, "a string", None),
                   dump_flags=tuple(_get(d, where, "dump_flags", _is_str_list, "a list of strings", [])),
                   restore_flags=tuple(_get(d, where, "restore_flags", _is_str_list, "a list of strings", [])),
                   addresses=tuple(_get(d, where, "addresses", _is_str_list, "a list of strings", [])),
                   capabilities=_opt_str_tuple(_get(d, where, "capabilities", _is_str_list, "a list of strings",
                                                    None)),
                   tasks=_get(d, where, "tasks", _is_opt_count, "a whole number", None),
                   mounts=_opt_str_tuple(_get(d, where, "mounts", _is_str_list, "a list of strings", None)),
                   proc_guards=_opt_str_tuple(_get(d, where, "proc_guards", _is_str_list, "a list of strings",
                                                   None)),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        out = {**self.extra, "version": self.version, "dump_flags": list(self.dump_flags),
               "restore_flags": list(self.restore_flags), "addresses": list(self.addresses)}
        if self.capabilities is not None:
            out["capabilities"] = list(self.capabilities)
        if self.tasks is not None:
            out["tasks"] = self.tasks
        if self.mounts is not None:
            out["mounts"] = list(self.mounts)
        if self.proc_guards is not None:
            out["proc_guards"] = list(self.proc_guards)
        return out


@dataclass(frozen=True)
class Gpu:
    name: str
    uuid: str
    driver: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("name", "uuid", "driver")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "gpu") -> "Gpu":
        return cls(name=_get(d, where, "name", _is_str, "a string"),
                   uuid=_get(d, where, "uuid", _is_str, "a string"),
                   driver=_get(d, where, "driver", _is_str, "a string", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "name": self.name, "uuid": self.uuid}, driver=self.driver)


@dataclass(frozen=True)
class Device:
    """'cpu', or 'cuda' with the GPUs, the driver and CUDA versions. Not required even for 'cuda':
    a device that does not match this machine is the compatibility check's to refuse, with its
    own reason (a CPU manifest edited to say 'cuda' is refused as "baked on cuda")."""

    kind: str
    gpus: tuple[Gpu, ...] = ()
    driver: Optional[str] = None
    cuda: Optional[str] = None
    cpu_isa: tuple[str, ...] = ()  # the CPU's instruction-set extensions (cpu_isa()); () unknown
    cpus: Optional[int] = None  # the CPUs fvboot's processes may run on (its affinity); None unknown
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("kind", "gpus", "driver", "cuda", "cpu_isa", "cpus")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "device") -> "Device":
        return cls(kind=_get(d, where, "kind", _is_str, "a string"),
                   gpus=_items(d, where, "gpus", Gpu.from_json, ()),
                   driver=_get(d, where, "driver", _is_str, "a string", None),
                   cuda=_get(d, where, "cuda", _is_opt_str, "a string or null", None),
                   cpu_isa=tuple(_get(d, where, "cpu_isa", _is_str_list, "a list of strings", [])),
                   cpus=_get(d, where, "cpus", _is_opt_count, "a whole number or null", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        d = {**self.extra, "kind": self.kind}
        if self.cpu_isa:
            d["cpu_isa"] = list(self.cpu_isa)
        if self.cpus is not None:
            d["cpus"] = self.cpus
        if self.is_cuda:
            return {**d, "gpus": [g.to_json() for g in self.gpus], "driver": self.driver, "cuda": self.cuda}
        if self.gpus:
            d["gpus"] = [g.to_json() for g in self.gpus]
        return _some(d, driver=self.driver, cuda=self.cuda)


@dataclass(frozen=True)
class Pipes:
    """The inode names (`pipe:[N]`) of the server's stdout and stderr at the dump: CRIU plugs this
    start's pipes in for them."""

    stdout: str
    stderr: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("stdout", "stderr")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "pipes") -> "Pipes":
        return cls(stdout=_get(d, where, "stdout", _is_str, "a string"),
                   stderr=_get(d, where, "stderr", _is_str, "a string"), extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "stdout": self.stdout, "stderr": self.stderr}


@dataclass(frozen=True)
class PieceSums:
    """Digests of a file's consecutive PIECE-byte pieces (the last may be shorter), by ALG."""

    alg: str
    piece: int
    digests: tuple[str, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "PieceSums":
        piece = _get(d, where, "piece", _is_int, "an integer")
        if piece <= 0:
            raise ManifestInvalid(f"manifest: {_name(where, 'piece')} must be positive")
        return cls(alg=_get(d, where, "alg", _is_str, "a string"), piece=piece,
                   digests=tuple(_get(d, where, "digests", _is_str_list, "a list of strings")))

    def to_json(self) -> dict[str, Any]:
        return {"alg": self.alg, "piece": self.piece, "digests": list(self.digests)}


@dataclass(frozen=True)
class FileEntry:
    """A file under FV_HOME: its size; its sha256, or digests per piece (a memory image), or
    neither (a weight dump, whose loader checks every tensor)."""

    path: str
    size: int
    sha256: Optional[str] = None
    pieces: Optional[PieceSums] = None
    # a large file of the model folder: the sha256 of samples of it (sampled_sha256), enough to
    # tell another model's file of the same size, read in a few milliseconds at every start
    sampled_sha256: Optional[str] = None
    # a weight dump: the sha256 of its header, which holds its index's sha256 (the index holds
    # every tensor's checksum): binds the file to this bake, as its own checks cannot (another
    # bake's dump of the same shapes passes them; found by review, 2026-12-06)
    head_sha256: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("path", "size", "sha256", "pieces", "sampled_sha256", "head_sha256")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "file") -> "FileEntry":
        pieces = _obj(d, where, "pieces", None)
        return cls(path=_get(d, where, "path", _is_str, "a string"),
                   size=_get(d, where, "size", _is_int, "an integer"),
                   sha256=_get(d, where, "sha256", _is_opt_str, "a string or null", None),
                   pieces=PieceSums.from_json(pieces, _name(where, "pieces")) if pieces is not None else None,
                   sampled_sha256=_get(d, where, "sampled_sha256", _is_opt_str, "a string or null", None),
                   head_sha256=_get(d, where, "head_sha256", _is_opt_str, "a string or null", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "path": self.path, "size": self.size, "sha256": self.sha256},
                     pieces=self.pieces.to_json() if self.pieces else None, sampled_sha256=self.sampled_sha256,
                     head_sha256=self.head_sha256)


@dataclass(frozen=True)
class ProbeAnswer:
    """The baked server's greedy answer to one probe prompt; a restore must give the same."""

    prompt: str
    text: str
    logprobs: tuple[float, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("prompt", "text", "logprobs")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "probe") -> "ProbeAnswer":
        return cls(prompt=_get(d, where, "prompt", _is_str, "a string"),
                   text=_get(d, where, "text", _is_str, "a string"),
                   logprobs=tuple(_get(d, where, "logprobs", _is_num_list, "a list of numbers")),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "prompt": self.prompt, "text": self.text, "logprobs": list(self.logprobs)}


@dataclass(frozen=True)
class Process:
    """A process of the checkpointed tree (for people: what the checkpoint holds)."""

    host_pid: int
    pid: int
    name: str
    command: str
    rss_anon_bytes: int
    checkpoint_bytes: Optional[int] = None
    zero_bytes_left_out: Optional[int] = None  # all-zero pages not stored (zeropages.py)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("host_pid", "pid", "name", "command", "rss_anon_bytes", "checkpoint_bytes", "zero_bytes_left_out")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "process") -> "Process":
        return cls(host_pid=_get(d, where, "host_pid", _is_int, "an integer"),
                   pid=_get(d, where, "pid", _is_int, "an integer"),
                   name=_get(d, where, "name", _is_str, "a string"),
                   command=_get(d, where, "command", _is_str, "a string"),
                   rss_anon_bytes=_get(d, where, "rss_anon_bytes", _is_int, "an integer"),
                   checkpoint_bytes=_get(d, where, "checkpoint_bytes", _is_int, "an integer", None),
                   zero_bytes_left_out=_get(d, where, "zero_bytes_left_out", _is_int, "an integer", None),
                   extra=_extra(d, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "host_pid": self.host_pid, "pid": self.pid, "name": self.name,
                      "command": self.command, "rss_anon_bytes": self.rss_anon_bytes},
                     checkpoint_bytes=self.checkpoint_bytes, zero_bytes_left_out=self.zero_bytes_left_out)


@dataclass(frozen=True)
class Manifest:
    """What `fvboot bake` wrote. Required: what a restore or a normal start needs (model name,
    vLLM's command, arguments and port, the device, the pipes, the files, the probe answers).
    The rest is for people and tools (`fvboot inspect`, the image's labels) and may be absent.
    WEIGHTS and TRIM are the workers' own reports, kept as JSON."""

    model: Model
    vllm: Vllm
    device: Device
    pipes: Pipes
    files: tuple[FileEntry, ...]
    probe: tuple[ProbeAnswer, ...]
    format: int = FORMAT
    fvboot_version: Optional[str] = None
    baked_at: Optional[str] = None
    runtime_file: Optional[str] = None  # where the restored middleware looks for its token
    criu: Optional[Criu] = None
    weights: Any = None
    processes: Optional[tuple[Process, ...]] = None
    trim: Any = None
    timeline: Optional[Mapping[str, float]] = None
    # the probe's answers to one request of all its prompts, where the bake's tries agreed
    # (ServerControl.probe_together): a restore asks that way first
    probe_together: Optional[tuple[ProbeAnswer, ...]] = None
    # each site folder of the served Python -> its package entries (fvboot.packages): a start
    # that finds them otherwise gets the normal start
    packages: Optional[Mapping[str, tuple[str, ...]]] = None
    # the files outside FV_HOME that the baked vLLM arguments name (describe_named_files), by
    # absolute path: the restored server read them at the bake
    named_files: tuple[FileEntry, ...] = ()
    named_folders: tuple[str, ...] = ()  # the folders among them, whose files named_files lists whole
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("format", "fvboot_version", "baked_at", "model", "vllm", "runtime_file", "criu", "device",
             "pipes", "weights", "processes", "trim", "files", "probe", "probe_together", "timeline", "packages",
             "named_files", "named_folders")

    @classmethod
    def from_json(cls, d: Any) -> "Manifest":
        """Validate D (a manifest as JSON data); ManifestInvalid with the first problem."""
        if not isinstance(d, dict):
            raise ManifestInvalid("manifest: not a JSON object")
        if d.get("format") != FORMAT:
            raise ManifestInvalid(f"manifest format {d.get('format')} is not {FORMAT}")
        criu_d = _obj(d, "", "criu", None)
        timeline = _get(d, "", "timeline", lambda v: _is_obj(v) and all(map(_is_num, v.values())),
                        "an object of numbers", None)
        packages = _get(d, "", "packages", lambda v: _is_obj(v) and all(map(_is_str_list, v.values())),
                        "an object of lists of strings", None)
        return cls(format=FORMAT,
                   fvboot_version=_get(d, "", "fvboot_version", _is_str, "a string", None),
                   baked_at=_get(d, "", "baked_at", _is_str, "a string", None),
                   model=Model.from_json(_obj(d, "", "model")),
                   vllm=Vllm.from_json(_obj(d, "", "vllm")),
                   runtime_file=_get(d, "", "runtime_file", _is_opt_str, "a string", None),
                   criu=None if criu_d is None else Criu.from_json(criu_d),
                   device=Device.from_json(_obj(d, "", "device")),
                   pipes=Pipes.from_json(_obj(d, "", "pipes")),
                   weights=d.get("weights"),
                   processes=_items(d, "", "processes", Process.from_json, None),
                   trim=d.get("trim"),
                   files=_items(d, "", "files", FileEntry.from_json),
                   probe=_items(d, "", "probe", ProbeAnswer.from_json),
                   probe_together=_items(d, "", "probe_together", ProbeAnswer.from_json, None),
                   timeline=timeline,
                   packages=None if packages is None else {k: tuple(v) for k, v in packages.items()},
                   named_files=_items(d, "", "named_files", FileEntry.from_json, ()),
                   named_folders=tuple(_get(d, "", "named_folders", _is_str_list, "a list of strings", ())),
                   extra=_extra(d, cls._KEYS))

    def _trim_records(self) -> list[dict]:
        """Each worker's record of the bake's trim (one per worker; a lone record as the list of
        one), what is not a record left out."""
        workers = self.trim if isinstance(self.trim, list) else [self.trim]
        return [w for w in workers if isinstance(w, dict)]

    def zeroing_allocators(self) -> list[str]:
        """The allocators the bake found in the served processes that read memory they gave
        back as zeros (launcher.ZEROS_AFTER_PURGE), by name; [] where none, or not recorded."""
        found = set()
        for p in self.processes or ():
            names = p.extra.get("allocators")
            if isinstance(names, list):
                found |= {n for n in names if isinstance(n, str)}
        return sorted(found)

    def gpu_bytes_at_checkpoint(self) -> int:
        """The most GPU memory one worker's GPU had in use when the workers were checkpointed
        (asleep: no weights, no KV cache; what the CUDA resume allocates again), 0 where the
        bake did not record it."""
        used = [w.get("gpu_used_bytes") for w in self._trim_records()]
        return max((u for u in used if _is_int(u) and u > 0), default=0)

    def sleep_pool(self) -> list[tuple[str, int, int]]:
        """(tag, address, size) of every allocation of vLLM's sleeping pool as the one worker's
        bake recorded it (what a helper must make for the restore to adopt); [] for several
        workers, or where the bake did not record it or recorded something else."""
        workers = self._trim_records()
        if len(workers) != 1:
            return []
        pool = workers[0].get("sleep_pool")
        if not isinstance(pool, list) or not all(
                isinstance(a, list) and len(a) == 3 and isinstance(a[0], str) and _is_int(a[1]) and _is_int(a[2]) and a[1] > 0
                and a[2] > 0 for a in pool):
            return []
        return [(a[0], a[1], a[2]) for a in pool]

    def weights_at(self) -> Optional[dict[str, int]]:
        """Each weight-dump entry's device address in the one worker as its bake recorded it
        (where a helper may put the dump for the worker to adopt); None for several workers, or
        where the bake did not record it or recorded something else."""
        workers = self._trim_records()
        if len(workers) != 1:
            return None
        at = workers[0].get("weights_at")
        if not isinstance(at, dict) or not at or not all(
                isinstance(k, str) and _is_int(v) and v > 0 for k, v in at.items()):
            return None
        return dict(at)

    def to_json(self) -> dict[str, Any]:
        return _some({**self.extra, "format": self.format, "model": self.model.to_json(),
                      "vllm": self.vllm.to_json(), "device": self.device.to_json(),
                      "pipes": self.pipes.to_json(), "files": [f.to_json() for f in self.files],
                      "probe": [p.to_json() for p in self.probe]},
                     fvboot_version=self.fvboot_version, baked_at=self.baked_at, runtime_file=self.runtime_file,
                     criu=self.criu and self.criu.to_json(),
                     weights=self.weights,
                     processes=None if self.processes is None else [p.to_json() for p in self.processes],
                     trim=self.trim, timeline=None if self.timeline is None else dict(self.timeline),
                     packages=None if self.packages is None else {k: list(v) for k, v in self.packages.items()},
                     named_files=[f.to_json() for f in self.named_files] or None,
                     named_folders=list(self.named_folders) or None,
                     probe_together=None if self.probe_together is None else [p.to_json() for p in self.probe_together])


# --- this machine and the files ------------------------------------------------------------


def device_info(lookup: Optional[DeviceLookup] = None, timeout: float = LOOKUP_WAIT_S) -> Device:
    """'cpu', or the GPUs with name, UUID, driver and CUDA versions; either with the CPU's
    instruction-set extensions. NVML through ctypes: a few milliseconds, where nvidia-smi or
    importing torch would cost seconds at every start. LOOKUP: one started earlier (fvboot
    serve starts it at its first line), waited for at most TIMEOUT s."""
    if lookup is None:
        lookup = DeviceLookup(background=False)
    try:
        gpus, isa = lookup.result(timeout)
    except TimeoutError:
        raise CheckpointUnusable(f"this machine's GPUs were not listed within {timeout:g} s (NVML did not answer)") from None
    cpus = len(os.sched_getaffinity(0))
    if gpus is None:
        return Device("cpu", cpu_isa=isa, cpus=cpus)
    return Device("cuda", tuple(Gpu(name, uuid, gpus.driver) for name, uuid in gpus.gpus), gpus.driver,
                  gpus.cuda, cpu_isa=isa, cpus=cpus)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MODEL_DIR = "model/"  # the served model's files under FV_HOME (layout.model_dir)
SAMPLED_FROM = 4 << 20  # a model file this large is checked by samples, not read whole
_SAMPLE = 64 << 10


def sampled_sha256(path: Path, size: int) -> str:
    """The sha256 of PATH's size, its first MiB (a safetensors header and its first tensors),
    its last 64 KiB and 64 KiB at each eighth of it: another checkpoint of the same model (a
    fine-tune, the same size) differs in every one of them."""
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        for k in range(1, 8):
            f.seek(size * k // 8)
            h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return h.hexdigest()


def head_sha256(path: Path) -> str:
    """The sha256 of a weight dump's header (its first HEADER_SIZE bytes)."""
    from .weightfile import HEADER_SIZE

    with path.open("rb") as f:
        return hashlib.sha256(f.read(HEADER_SIZE)).hexdigest()


def _describe(home: Path, path: Path) -> FileEntry:
    rel, size = str(path.relative_to(home)), path.stat().st_size
    if rel.startswith(MODEL_DIR) and size >= SAMPLED_FROM:
        return FileEntry(rel, size, sampled_sha256=sampled_sha256(path, size))
    if path.name.startswith(_PIECEWISE_PREFIXES):
        from .pagecheck import piece_sums  # its checksums import blake3: only the bake needs it here

        return FileEntry(rel, size, pieces=piece_sums(path))
    if path.suffix == ".fvw":
        return FileEntry(rel, size, head_sha256=head_sha256(path))
    if path.suffix == ".log":
        return FileEntry(rel, size)
    return FileEntry(rel, size, _sha256(path))


def describe_files(home: Path, roots: list[Path]) -> tuple[FileEntry, ...]:
    files = sorted(p for r in roots if r.exists() for p in r.rglob("*") if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        return tuple(pool.map(lambda p: _describe(home, p), files))


# a folder the baked arguments name with more files than this is not recorded (the bake says so)
NAMED_FOLDER_MAX_FILES = 1000
_NOT_FILES = ("/proc/", "/sys/", "/dev/")
# options whose folder vLLM reads at each request, not at its start: a restored server reads it
# as a normal start does (found by review, 2026-12-06: media mounted there at run time cost the restore)
_READ_PER_REQUEST = ("--allowed-local-media-path",)


def named_paths(args: Sequence[str], home: Path) -> list[Path]:
    """The existing files and folders outside HOME that ARGS name by absolute path: an option's
    value (`--chat-template /etc/t.jinja`, `--chat-template=/etc/t.jinja`) or the part after `=`
    of one (`--lora-modules sql=/adapters/sql`); nothing under /proc, /sys or /dev."""
    found: list[Path] = []
    for i, arg in enumerate(args):
        option = arg.partition("=")[0] if arg.startswith("-") else (args[i - 1] if i else "")
        if option.replace("_", "-") in _READ_PER_REQUEST:
            continue
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        candidates = {value, value.rsplit("=", 1)[-1]}
        if value.lstrip().startswith("{"):  # vLLM's JSON form: --lora-modules '{"name": ..., "path": ...}'
            try:
                given = json.loads(value)
            except ValueError:
                given = None
            if isinstance(given, dict):
                candidates |= {v for v in given.values() if isinstance(v, str)}
        for candidate in sorted(candidates):
            if not candidate.startswith("/"):
                continue
            path = Path(os.path.normpath(candidate))
            if str(path).startswith(_NOT_FILES) or path == home or home in path.parents:
                continue
            if (path.is_file() or path.is_dir()) and path not in found:
                found.append(path)
    return found


@dataclass(frozen=True)
class NamedFiles:
    """What describe_named_files found: the files (a folder's too), the folders recorded whole,
    and the folders left out for holding more than NAMED_FOLDER_MAX_FILES files."""

    files: tuple[FileEntry, ...]
    folders: tuple[str, ...]
    too_many: tuple[str, ...]


def describe_named_files(home: Path, args: Sequence[str]) -> NamedFiles:
    """The files outside HOME that ARGS name (named_paths; a folder's files), each with its
    size and sha256 (a large one: sampled_sha256), by absolute path."""
    files: list[Path] = []
    folders: list[str] = []
    too_many: list[str] = []
    for path in named_paths(args, home):
        if path.is_file():
            files.append(path)
            continue
        inside = sorted(p for p in path.rglob("*") if p.is_file())
        if len(inside) > NAMED_FOLDER_MAX_FILES:
            too_many.append(str(path))
        else:
            files.extend(inside)
            folders.append(str(path))

    def entry(path: Path) -> FileEntry:
        size = path.stat().st_size
        if size >= SAMPLED_FROM:
            return FileEntry(str(path), size, sampled_sha256=sampled_sha256(path, size))
        return FileEntry(str(path), size, _sha256(path))

    with ThreadPoolExecutor(8) as pool:
        return NamedFiles(tuple(pool.map(entry, sorted(set(files)))), tuple(folders), tuple(too_many))


def _first_added(folder: Path, listed: set[str]) -> Optional[str]:
    """A file under FOLDER that LISTED lacks, or None; the walk stops there, or once it has seen
    more files than a recorded folder may hold (a mount of millions must not hold up a start)."""
    seen = 0
    for path in folder.rglob("*"):
        if path.is_file():
            if str(path) not in listed:
                return str(path)
            seen += 1
            if seen > NAMED_FOLDER_MAX_FILES:
                return None
    return None


def verify_named_files(files: tuple[FileEntry, ...], folders: Sequence[str] = ()) -> str | None:
    """None if every file the baked arguments name is as the bake read it, and each folder they
    name (FOLDERS) holds no file the bake's did not, else why not."""
    found = _first_problem(Path("/"), files)
    if found is None:
        listed = {f.path for f in files}
        for folder in folders:
            added = _first_added(Path(folder), listed)
            if added:
                found = (added, f"{added} was not there at the bake")
                break
    if found is None:
        return None
    return (f"a file the baked vLLM arguments name is not the one the server was baked with: {found[1]}"
            " (an image built FROM this one, or a mount over it?); the normal start reads it as it is now")


def verify_files(home: Path, files: tuple[FileEntry, ...]) -> str | None:
    """None if every file is present with its size and checksum, and the model folder holds no
    file the bake's did not (where the manifest lists it), else the first problem."""
    found = _first_problem(home, files)
    if found is None:
        return None
    path, problem = found
    if _in_model_folder(path):  # not damage: a model the server was not baked with
        return (f"the model folder is not the one the server was baked with: {problem} (an image built FROM"
                " this one, or a mount over it?); the normal start serves it as it is now")
    return problem


def _in_model_folder(path: str) -> bool:
    return path.startswith(MODEL_DIR)


def _first_problem(home: Path, files: tuple[FileEntry, ...]) -> tuple[str, str] | None:
    """(the file's path, what is wrong with it) for the first file that is not as the bake left it."""
    for f in files:
        try:
            size = (home / f.path).stat().st_size
        except OSError:
            return f.path, f"{f.path} is missing"
        if size != f.size:
            return f.path, f"{f.path} has {size} bytes, expected {f.size}"
    listed = {f.path for f in files if _in_model_folder(f.path)}
    if listed:  # a manifest of an fvboot that listed the model folder
        here = sorted(str(p.relative_to(home)) for p in (home / MODEL_DIR).rglob("*") if p.is_file())
        added = [p for p in here if p not in listed]
        if added:
            return added[0], f"{added[0]} was not there at the bake"
    hashed = [f for f in files if f.sha256 or f.sampled_sha256 or f.head_sha256]
    with ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(lambda f: _sha256(home / f.path) if f.sha256 else
                             sampled_sha256(home / f.path, f.size) if f.sampled_sha256 else
                             head_sha256(home / f.path), hashed))
    for f, s in zip(hashed, sums):
        if s != (f.sha256 or f.sampled_sha256 or f.head_sha256):
            if f.head_sha256:
                return f.path, f"{f.path} is not the weight dump this checkpoint was baked with (its index differs)"
            return f.path, (f"{f.path} has other contents" if _in_model_folder(f.path) or f.path.startswith("/") else
                            f"{f.path} is corrupt (sha256 mismatch)")
    return None


def read(path: Path) -> Manifest:
    """The manifest at PATH, validated; ManifestInvalid (a CheckpointUnusable) with a one-line
    reason when it is not JSON or not a manifest this fvboot can restore from. OSError as is."""
    try:
        data = json.loads(path.read_text())  # OSError: the caller says so
    except ValueError as e:  # UnicodeDecodeError too
        raise ManifestInvalid(f"the manifest {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ManifestInvalid(f"the manifest {path} is not a JSON object")
    return Manifest.from_json(data)


def write(path: Path, m: Manifest) -> None:
    """M at PATH (atomically); ManifestInvalid, writing nothing, if it would not read back."""
    data = m.to_json()
    Manifest.from_json(data)  # a bake must not leave a manifest every start would refuse
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
