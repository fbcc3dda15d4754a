"""PID 1 of the served tree's own PID namespace: drops the capabilities only CRIU needs (and
Docker's defaults vLLM never uses), starts vLLM, reaps orphans, forwards signals.

The tree gets its own PID and mount namespace so that CRIU restores it with its original PIDs in
any fresh container (PIDs in a namespace start at 1, whatever runs beside it). This init is the
root of the checkpoint; it must be a session leader inside the namespace (CRIU refuses a session
leader outside it), hence setsid() here.
"""

from __future__ import annotations

import os
import signal
import sys

from . import runenv
from .capabilities import give_up_unneeded
from .noiouring import disable_io_uring
from .proc_guard import OWN_PROC, ProcGuardError, fresh_guarded_proc


def main(argv: list[str]) -> int:
    if argv[:1] == [OWN_PROC]:  # PID 1 of a PID and mount namespace of its own (launcher.ServedTree)
        argv = argv[1:]
        try:  # first, while this process still holds CAP_SYS_ADMIN and nothing else runs here
            fresh_guarded_proc()
        except ProcGuardError as e:
            os.write(2, f"fvboot.nsinit: {e}; the server is not started with a /proc that would let it "
                        "change the host's kernel settings\n".encode())
            return 1
    if os.getsid(0) != os.getpid():  # already a session leader when started without unshare
        os.setsid()
    # stdin from this mount namespace: an fd opened outside it points at a mount CRIU cannot
    # find in the dumped namespace ("Can't lookup mount=N for fd=0").
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if runenv.value("FV_DISABLE_IO_URING") == "1":
        disable_io_uring()
    try:  # after the seccomp filter: the server needs none of what only CRIU needs, nor Docker's unused ones
        give_up_unneeded()
    except OSError as e:
        os.write(2, f"fvboot.nsinit: the server keeps CRIU's capabilities: {e}\n".encode())
    # Handlers before the fork: a signal that arrives before (or during) the fork is passed on
    # once the server exists, never lost (docker stop right after the start).
    child, pending = 0, []

    def forward(sig, _frame):
        if not child:
            pending.append(sig)
            return
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)  # exec resets the handlers to their defaults
        except OSError as e:
            os.write(2, f"fvboot.nsinit: cannot run {argv[0]}: {e}\n".encode())
        os._exit(127)
    child = pid
    for sig in pending:
        os.kill(pid, sig)
    while True:
        try:
            died, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if died == pid:
            code = os.waitstatus_to_exitcode(status)
            # killed by a signal: 128 + its number, as a shell says it (137 for SIGKILL, the OOM
            # killer's): `& 0xFF` of -9 made 247, which restart and alert rules miss (found by
            # review, 2026-12-06)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
