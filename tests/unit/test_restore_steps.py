"""The restore's pipeline: its steps in order, each marked on the timeline, and on a failure the
restored tree killed and no later step run (the gate never opens)."""

from __future__ import annotations

import pytest

from fvboot import restore
from fvboot.errors import CheckpointUnusable
from fvboot.timeline import Timeline


def test_the_steps_end_with_every_check_before_the_gate_opens():
    names = [mark for mark, _ in restore.STEPS]
    assert names[-1] == "ready" and restore.STEPS[-1][1] is restore.open_gate
    checks = ("weights loaded", "answers checked", "memory images checked")
    assert all(names.index(c) < names.index("ready") for c in checks)
    assert names.index("restore done") < names.index("weights loaded")


class _Tree:
    terminated = False

    def terminate(self):
        self.terminated = True


def test_a_failing_step_kills_the_restored_tree_and_runs_nothing_after_it(monkeypatch):
    ran, tree = [], _Tree()

    def step(name, fail=False):
        def run(s):
            ran.append(name)
            if name == "criu":
                s.tree = tree
            if fail:
                raise CheckpointUnusable("restored server gives other answers than the baked one")
        return run

    monkeypatch.setattr(restore, "STEPS", (("restore done", step("criu")), ("answers checked", step("probe", True)),
                                           ("ready", step("gate"))))
    state = restore.RestoreState(*([None] * 3), Timeline("serve"), *([None] * 4))
    with pytest.raises(CheckpointUnusable):
        restore.run(state)
    assert ran == ["criu", "probe"] and tree.terminated
    assert [e[0] for e in state.tl.events] == ["process start", "restore done"]
