"""A low open-files limit is named where CRIU and vLLM fail on it without saying so (found by
hand, 2026-12-05: `docker run --ulimit nofile=64`)."""

from __future__ import annotations

import subprocess
import sys

from fvboot.rlimits import ENOUGH, too_few_open_files


def test_a_limit_below_what_vllm_and_criu_need_is_named_and_a_usual_one_is_not():
    assert "open-files limit is 64" in too_few_open_files((64, 64))
    assert "raise it to 65536 or more" in too_few_open_files((64, 256))
    assert too_few_open_files((1024, ENOUGH)) is None
    assert too_few_open_files((1024, 1048576)) is None


def test_criu_failing_for_room_for_its_own_descriptors_is_explained_under_the_real_limit(tmp_path):
    """CRIU 4.2.1's line under a limit of 64, read by a process whose limit really is 64."""
    log = tmp_path / "restore.log"
    log.write_text("(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
                   "(00.002)      1: Error (criu/servicefd.c:282): sfd: Can't chose service_fd_base: 0 38\n")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64));"
            " from pathlib import Path; from fvboot import criu; print(criu.last_error(Path(sys.argv[1])))")
    said = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, check=True).stdout
    assert said.startswith("1: Error (criu/servicefd.c:282): sfd: Can't chose service_fd_base: 0 38 (this container's"
                           " open-files limit is 64"), said
