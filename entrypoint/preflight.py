"""`fvboot check [vLLM args]`: would a start of this image in this container restore its
checkpoint, and if not, why. It runs what a start checks before it restores (fvboot's settings,
the manifest, this machine and container against the bake's, the files, `criu check`) and
restores nothing, so an operator can try a node before a rollout:

    docker run --rm $(fvbuild run-flags IMAGE) [GPU flags] IMAGE check [the arguments the start gets]
"""

from __future__ import annotations

from . import compatibility, errors, runenv
from .bake import criu_check
from .errors import CheckpointUnusable, FvBootError
from .launcher import running_server
from .layout import Layout
from .start_inputs import read_start_inputs


def check(layout: Layout, run_args: list[str]) -> tuple[bool, list[str]]:
    """(whether a start would restore the checkpoint, the lines that say so and why): fvboot's
    settings, then `criu check` (said in any image, a checkpoint in it or not), then the
    checkpoint against this container and machine, as a start meets them."""
    try:
        inputs = read_start_inputs(layout, run_args)
    except FvBootError as e:
        return False, [f"a start would end at once: {e}"]
    run_args, lines = inputs.run_args, list(inputs.notes)
    server = running_server()
    if server is not None:
        lines.append(f"this container serves already (its server's init is pid {server}, `docker exec`?): the"
                     " checks below are for a second start here, less the port, which that server holds; a node is"
                     " best tried in a container of its own (docker run --rm ... IMAGE check)")
    r = criu_check()
    said = (r.stdout + r.stderr).strip().splitlines()
    criu_line = f"`criu check`: {said[0] if said else 'passed'}" if r.returncode == 0 else \
        f"`criu check` failed: {said[-1] if said else 'no output'}"
    lines.append(criu_line)
    try:
        m = compatibility.read_checkpoint_manifest(layout)
        if runenv.value("FV_RESTORE") == "0":
            raise CheckpointUnusable("FV_RESTORE=0 asks for a normal start")
        here = compatibility.check_compatible(m, layout, run_args, port=server is None)
        if r.returncode != 0:
            raise CheckpointUnusable(criu_line)
    except Exception as e:  # noqa: BLE001 - a start ends any failure here in the normal start too
        return False, lines + [f"the checkpoint would not be used here: {errors.reason(e)}; a start would serve"
                               " vLLM started normally (compile caches reused)"]
    gpus = f", {len(here.gpus)} x {here.gpus[0].name}, driver {here.driver}" if here.gpus else ""
    return True, lines + [f"the checkpoint would be restored here (this container: {here.kind}{gpus},"
                          f" {compatibility.cpu_count_text(here.cpus or 0)}; baked: {m.device.kind})"]
