"""Jinja2 rendering of the Dockerfile templates: one typed context, StrictUndefined."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import jinja2

from .context import RenderContext
from .errors import OptionsError


def docker_quote(value: str) -> str:
    """Quote a value for LABEL/ENV lines, as Docker reads a double-quoted word: `"` and `\\`
    escaped, `$` kept literal (both instructions expand variables), every other character as
    it is (Docker decodes no `\\uXXXX`: `héllo` was stored as `h\\u00e9llo`). Refuses control
    characters, and never echoes the value (it may be a secret)."""
    if "\n" in value or "\r" in value:
        raise ValueError("a value for a Dockerfile LABEL/ENV line contains a newline")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("a value for a Dockerfile LABEL/ENV line contains a control character")
    return json.dumps(value, ensure_ascii=False).replace("$", "\\$")


def env_quote(value: str) -> str:
    """Quote a value for an ENV line (docker_quote)."""
    return docker_quote(value)


def sh_quote(value: object) -> str:
    """Quote a value for a shell word in a RUN line (values are validated too; this is the belt)."""
    import shlex

    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError("a value for a Dockerfile RUN line contains a newline")
    return shlex.quote(text)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(str(files("fvbuild.templates"))))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["docker_quote"] = docker_quote
    env.filters["env_quote"] = env_quote
    env.filters["sh_quote"] = sh_quote
    return env


def render_template(name: str, ctx: object) -> str:
    """NAME rendered with CTX; OptionsError where a value cannot be written into a Dockerfile
    line (the quoting filters refuse it: the options' validators should have said so first)."""
    try:
        return _environment().get_template(name).render(ctx=ctx)
    except ValueError as e:
        raise OptionsError(str(e)) from None


def render_dockerfile(ctx: RenderContext) -> str:
    """The image's Dockerfile, or for target "criu" the criu stage and its export stage only."""
    return render_template("criu.Dockerfile.j2" if ctx.target == "criu" else "Dockerfile.j2", ctx)
