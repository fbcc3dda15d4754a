"""ServerControl: fvboot's HTTP client for the vLLM server it runs (stdlib only).

Admin calls carry the admin token so they pass the GateMiddleware; probes use the same
completions API clients use, so a probe that matches proves what clients will get.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Callable, Optional

from . import vllm_log
from .errors import ServerDied, ServerError
from .layout import ADMIN_ANSWER, ADMIN_HEADER, ADMIN_REFUSED

# Fixed prompts whose greedy answers are recorded at bake and compared after restore: 4 tokens
# each, the prefill and 3 decode steps (~6 ms a step on the CPU image; the weights and every
# memory image are checked byte for byte besides). Short prompts, as GPU restores proved them
# over dozens of restores: longer ones of 14-17 tokens (one or more full 16-token KV blocks) gave
# other logprobs than at bake in 2 of 4 warm 3B restores on the H200 (2026-12-05,
# bench/results/gpu_3b_host_h200_2026-12-05/), each then a needless normal start.
PROBE_PROMPTS = ("The capital of France is", "Once upon a time", "1, 2, 3, 4,")
PROBE_MAX_TOKENS = 4


def warm_up() -> None:
    """Import the HTTP client in a thread: ~15 ms of fvboot's start otherwise, spent while CRIU
    restores instead (urllib is imported at the first call, not with this module)."""
    threading.Thread(target=__import__, args=("urllib.request",), name="fv-import-http", daemon=True).start()


class ServerControl:
    def __init__(self, port: int, admin_token: str, served_model: str, host: str = "127.0.0.1") -> None:
        self.base = f"http://{host}:{port}"
        self.token = admin_token
        self.model = served_model

    def _call(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 600,
              admin: bool = True) -> Any:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("content-type", "application/json")
        if admin:
            req.add_header(ADMIN_HEADER.decode(), self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                marked = r.headers.get(ADMIN_ANSWER.decode()) is not None
        except urllib.error.HTTPError as e:  # the server's own answer: say what it was
            detail = e.read().decode(errors="replace").strip().replace("\n", " ")[:400]
            if admin and e.code == 403 and ADMIN_REFUSED in detail:
                # only another start's server refuses this start's token: with the host's network two
                # restored servers can share the port (vLLM's socket has SO_REUSEPORT), and the
                # kernel hands each connection to either
                raise ServerError(f"{method} {path} was refused by a server that does not know this start's admin"
                                  f" token: another server listens on {self.base} beside this start's (with the"
                                  " host's network, a container started at the same time?)") from None
            raise ServerError(f"{method} {path} answered {e.code}: {detail}") from None
        except TimeoutError:  # connected, then silence: a stuck server, not a slow network
            raise ServerError(f"{method} {path} got no answer within {timeout:g} s") from None
        except http.client.HTTPException as e:  # not HTTP on the port, or an answer cut short
            raise ServerError(f"{method} {path} got no HTTP answer: {type(e).__name__}: {e}"[:400]) from None
        if admin and not marked:  # a public route (the probe) answered by a server that took us for a client
            raise ServerError(f"{method} {path} was answered by a server that does not know this start's admin"
                              f" token: another server listens on {self.base} beside this start's (with the"
                              " host's network, a container started at the same time?)")
        return json.loads(raw) if raw.strip() else None

    def healthy(self) -> bool:
        try:
            self._call("GET", "/health", timeout=5, admin=False)  # whose server it is: knows_the_token
            return True
        except (OSError, ValueError, ServerError):  # urllib's URLError is an OSError
            return False

    def knows_the_token(self) -> bool:
        """Whether the server answering is the one this start runs: only its middleware knows
        this start's admin token (another server on the port, on the host's network, does not)."""
        return self._gate_state() is not None

    def wait_healthy(self, timeout: float, alive: Callable[[], bool], poll: float = 0.05) -> None:
        """Until the server answers /health (bounded by TIMEOUT; ServerDied once ALIVE says the
        tree is gone), and then it must be ours: a server that answers without this start's
        token is another one on the same port, and fvboot must not warm, probe or serve it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                if not self.knows_the_token():
                    raise ServerDied(f"another server answers on {self.base}, not the vLLM fvboot started"
                                     " (it does not know this start's admin token): stop what listens on"
                                     " that port (with --network host, on the host) or use another port")
                return
            if not alive():
                raise ServerDied(vllm_log.exited("the vLLM server exited before it became healthy"))
            time.sleep(poll)
        raise ServerDied(f"the vLLM server did not become healthy within {timeout:.0f} s")

    def gate(self, state: str, timeout: float = 600) -> dict:
        """Open or close the gate; the middleware's answer (opening: what it did to the metrics)."""
        answer = self._call("POST", f"/fv/gate/{state}", timeout=timeout)
        return answer if isinstance(answer, dict) else {}

    def gate_is_open(self) -> bool:
        """Whether the gate is open, asked once and briefly: False where nothing answers."""
        answer = self._gate_state()
        return isinstance(answer, dict) and answer.get("gate") == "open"

    def _gate_state(self) -> Any:
        """The middleware's answer to this start's gate-state call (5 s at most), or None where
        no server that knows this start's admin token answers."""
        try:
            return self._call("GET", "/fv/gate/state", timeout=5) or {}
        except (OSError, ValueError, ServerError):
            return None

    def trim(self) -> Any:
        """Shrink the server's processes before the dump (every worker, then the API server);
        returns each worker's figures (memory before/after, GPU memory the checkpoint saves).
        The API server's is last: it forgets this start's token, and any admin call after it
        would read the token back into the memory the checkpoint keeps."""
        figures = self.rpc("fv_trim")
        self._call("POST", "/fv/trim")
        return figures

    def sleep(self, level: int) -> None:
        self._call("POST", f"/sleep?level={level}")

    def wake_up(self, tags: Optional[list[str]] = None, timeout: float = 600) -> None:
        q = "" if not tags else "?" + "&".join(f"tags={t}" for t in tags)
        self._call("POST", "/wake_up" + q, timeout=timeout)

    def is_sleeping(self, timeout: float = 60) -> bool:
        """Whether vLLM still counts its engine asleep (a tag not woken yet). Its wake answers
        200 even where its executor refused the wake (a tag its sleep did not set)."""
        out = self._call("GET", "/is_sleeping", timeout=timeout)
        return bool(out.get("is_sleeping")) if isinstance(out, dict) else True

    def rpc(self, method: str, *args: Any, timeout: float = 1800) -> list:
        """collective_rpc on every worker; returns one result per worker."""
        out = self._call("POST", "/collective_rpc", {"method": method, "args": list(args)}, timeout=timeout)
        return out.get("results", out) if isinstance(out, dict) else out

    def complete(self, prompt: str | list[str], max_tokens: int, admin: bool = True, timeout: float = 600) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "logprobs": 2, "seed": 0}
        return self._call("POST", "/v1/completions", body, admin=admin, timeout=timeout)

    def probe(self, timeout: float = 600) -> list[dict]:
        """Greedy answers (text, token logprobs rounded to 1e-4) to the fixed probe prompts, one
        request after another."""
        return [_answer(prompt, self.complete(prompt, PROBE_MAX_TOKENS, timeout=timeout)["choices"][0])
                for prompt in PROBE_PROMPTS]

    def probe_together(self, timeout: float = 600) -> list[dict]:
        """The same answers from ONE request of all the probe prompts: the server runs them as
        one batch, a third of the steps. Comparable only with answers asked the same way: a batch
        can round differently from a prompt alone (other kernel shapes on a GPU)."""
        choices = self.complete(list(PROBE_PROMPTS), PROBE_MAX_TOKENS, timeout=timeout)["choices"]
        by_index = sorted(choices, key=lambda c: c["index"])
        if len(by_index) != len(PROBE_PROMPTS):
            raise ServerError(f"{len(PROBE_PROMPTS)} probe prompts got {len(by_index)} answers")
        return [_answer(prompt, c) for prompt, c in zip(PROBE_PROMPTS, by_index)]


def _answer(prompt: str, choice: dict) -> dict:
    lp = choice.get("logprobs") or {}
    return {"prompt": prompt, "text": choice["text"],
            "logprobs": [round(x, 4) for x in (lp.get("token_logprobs") or []) if x is not None]}
