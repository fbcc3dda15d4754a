"""The FV_* settings an operator may give fvboot (`docker run -e`), in one table: each is read
through it, and `fvboot serve` checks them all before anything runs. A bad value ends the
start with what each one takes (a typo in FV_WEIGHT_CHECK used to cost the whole restore, and
one in a timeout was ignored); an FV_* name fvboot does not know is said, with the closest one
it does (FV_RESTOR=0 started from the checkpoint). Torch-free: the weight stager reads it too."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import CheckpointUnusable


_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """A setting that takes one of CHOICES (case and blanks aside), a number of seconds above 0
    (SECONDS), a whole number within BOUNDS, or yes/no (SWITCH: "1" or "0"); DEFAULT where
    unset or blank."""

    name: str
    default: str
    choices: tuple[str, ...] = ()
    seconds: bool = False
    bounds: Optional[tuple[int, int]] = None
    switch: bool = False

    def parse(self, raw: Optional[str]) -> str:
        """The value RAW stands for; ValueError saying what the setting takes."""
        value = (raw or "").strip().lower() or self.default
        if self.seconds:
            try:
                ok = 0 < float(value) <= MAX_SECONDS  # not "inf" or 1e999: every wait has a bound
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{self.name}={raw!r} is not a number of seconds above 0 (and at most "
                                 f"{MAX_SECONDS}, a week)")
        elif self.bounds:
            lo, hi = self.bounds
            if not (value.lstrip("-").isdigit() and lo <= int(value) <= hi):
                raise ValueError(f"{self.name}={raw!r}: expected a whole number in [{lo}, {hi}]")
            return str(int(value))
        elif self.switch:
            if value not in _YES + _NO:
                raise ValueError(f"{self.name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
            return "1" if value in _YES else "0"
        elif value not in self.choices:
            words = ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
            raise ValueError(f"{self.name}={raw!r}: expected {words}")
        return value


MAX_SECONDS = 7 * 24 * 3600  # the longest any of fvboot's waits may be set to

_SECONDS = (
    ("FV_GATE_WAIT_S", "600"),  # a request's wait at the closed gate
    ("FV_START_TIMEOUT_S", "3600"),  # a normal start's wait for /health
    ("FV_CRIU_RESTORE_TIMEOUT_S", "600"),
    ("FV_CRIU_DUMP_TIMEOUT_S", "3600"),  # bake
    ("FV_RESTORE_STEP_TIMEOUT_S", "300"),  # each call to the restored server
    ("FV_PAGE_CHECK_TIMEOUT_S", "300"),  # the memory images' check after the probe
    ("FV_CUDA_CHECKPOINT_TIMEOUT_S", "300"),  # each cuda-checkpoint call
)
_CHOICES = (
    ("FV_RESTORE", "1", ("0", "1")),
    ("FV_CRIU_RESTORE_LOG_LEVEL", "3", ("0", "1", "2", "3", "4")),
    ("FV_PREFETCH", "read", ("read", "vmtouch", "off")),
    ("FV_RESTORE_THP", "auto", ("auto", "0", "1")),
    ("FV_RESTORE_MAP_PAGES", "auto", ("auto", "0", "1")),
    ("FV_CUDA_CHECKPOINT_SERVICE", "1", ("0", "1")),
    ("FV_WEIGHT_CHECK", "overlap", ("inline", "overlap")),
    ("FV_WAKE_ORDER", "auto", ("auto", "weights-first", "kv-beside")),
    ("FV_WEIGHT_STAGING", "auto", ("auto", "on", "off")),
    ("FV_WEIGHT_STAGING_COPY", "register", ("register", "ring")),
    ("FV_WEIGHT_STAGING_YIELD", "off", ("off", "resume")),
    ("FV_WAKE_MEMORY", "helper", ("engine", "helper")),
    ("FV_GRAPH_POOL", "vllm", ("vllm", "sleep")),  # bake
    ("FV_DISABLE_IO_URING", "1", ("0", "1")),
)
# the server's port, and the GPU weight loader's (fvboot.weights.settings, handed to the
# restored worker at its load)
_WHOLE_NUMBERS = (
    ("FV_PORT", "8000", (1, 65535)),  # the server's (the image sets it to the baked one)
    ("FV_LOAD_BUFFERS", "16", (1, 256)),  # pinned buffers of the ring (bench/results/gpu_weight_load_h100.json)
    ("FV_LOAD_BUFFER_MB", "32", (1, 4096)),  # MiB each
    ("FV_LOAD_THREADS", "0", (0, 256)),  # 0: from the machine's cores
    ("FV_LOAD_STREAMS", "4", (1, 64)),  # CUDA streams the copies are spread over
)
_SWITCHES = (
    ("FV_LOAD_ODIRECT", "0"),  # O_DIRECT reads, past the page cache
    ("FV_LOAD_REGISTER", "1"),  # a file all in the page cache goes to the GPU with no CPU copy
    ("FV_GPU_LOADER", "1"),  # 0: the simple per-chunk copies
    ("FV_DUMP_WRITEBACK", "1"),  # bake: the weight dump's writeback started behind each chunk
)
SETTINGS: dict[str, Setting] = {
    **{name: Setting(name, default, seconds=True) for name, default in _SECONDS},
    **{name: Setting(name, default, choices) for name, default, choices in _CHOICES},
    **{name: Setting(name, default, bounds=bounds) for name, default, bounds in _WHOLE_NUMBERS},
    **{name: Setting(name, default, switch=True) for name, default in _SWITCHES},
}
# FV_* names fvboot reads that take free text (paths, a key, a map) or are its own between
# processes: never called unknown.
FREE_NAMES = frozenset({
    "FV_API_KEY", "FV_API_KEY_FILE", "FV_HOME", "FV_RUN_DIR", "FV_SERVED_MODEL", "FV_CUDA_DEVICE_MAP",
    "FV_CUDA_CHECKPOINT_LIBCUDA", "FV_CRIU_PLUGIN_DIR", "FV_RUNTIME_FILE", "FV_ADMIN_TOKEN",
    "FV_CUDA_CHECKPOINT_SOCKET", "FV_CUDA_RESUME_MARK", "FV_STAGER_POOL",
    "FV_CRIU_WRAPPED", "FV_CRIU_SAVED_LD_LIBRARY_PATH", "FV_CUDA_CHECKPOINT_FALLBACK",
})


def value(name: str, env: Optional[Mapping[str, str]] = None, error: type[Exception] = CheckpointUnusable) -> str:
    """NAME's value (its default where unset); ERROR (the caller's own kind of failure) for one
    it does not take (`fvboot serve` checked them all first: only a bake or a direct caller meets it)."""
    raw = (os.environ if env is None else env).get(name)
    try:
        return SETTINGS[name].parse(raw)
    except ValueError as e:
        raise error(str(e)) from None


def seconds(name: str, env: Optional[Mapping[str, str]] = None) -> float:
    return float(value(name, env))


def problems(env: Mapping[str, str]) -> list[str]:
    """What is wrong with each setting ENV gives, in the table's order."""
    out = []
    for name, setting in SETTINGS.items():
        try:
            setting.parse(env.get(name))
        except ValueError as e:
            out.append(str(e))
    return out


def unknown(env: Mapping[str, str]) -> list[str]:
    """A line for each FV_* name in ENV that fvboot does not read, with the closest it does."""
    known = set(SETTINGS) | FREE_NAMES
    out = []
    for name in sorted(k for k in env if k.startswith("FV_") and k not in known):
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        out.append(f"{name} is not a setting of fvboot" + (f" (did you mean {near[0]}?)" if near else "")
                   + ": it changes nothing")
    return out
