"""fvboot's command line as `docker run IMAGE ...` meets it."""

from __future__ import annotations

from fvboot.cli import main


def test_help_says_what_the_arguments_after_the_image_are_and_where_vllms_own_help_is(capsys):
    """`docker run IMAGE --help` printed fvboot's module docstring; an operator coming from vLLM's
    image wants to know what the arguments are and how to see vLLM's own options."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Options after the image are `vllm serve`'s" in out
    assert "check     would a start here restore the checkpoint" in out
    assert "docker run --rm --entrypoint vllm IMAGE serve --help" in out


def test_a_stop_before_the_start_has_begun_ends_fvboot_at_once_without_a_traceback(tmp_path):
    """docker stop in the first tenths of a second: PID 1 dropped a SIGTERM that came before
    `serve` set its handler (Docker then waited its 10 s), and one that came while the start's
    inputs were read ended in a traceback, exit 1 (found by review, 2026-12-06). Now fvboot's
    first step is the handler, and such a stop ends it with 128 + the signal."""
    import os
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "from fvboot import cli, start_inputs, serve\n"
            "def stopped(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "serve.read_start_inputs = stopped\n"
            "sys.exit(cli.main(['serve']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FV_HOME": str(tmp_path), "FV_RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr and "fvboot: stopped by signal 15" in r.stderr, r.stderr


def test_a_server_killed_by_a_signal_ends_its_init_with_128_plus_the_signal():
    """The served tree's init passed on SIGKILL's -9 as 247 (`& 0xFF`), which restart and alert
    rules looking for 137 miss (found by review, 2026-12-06)."""
    import subprocess
    import sys

    for sig, code in (("KILL", 137), ("SEGV", 139), ("TERM", 143)):
        r = subprocess.run([sys.executable, "-m", "fvboot.nsinit", "sh", "-c", f"kill -{sig} $$"], timeout=60)
        assert r.returncode == code, (sig, r.returncode)
    assert subprocess.run([sys.executable, "-m", "fvboot.nsinit", "sh", "-c", "exit 3"], timeout=60).returncode == 3
