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
