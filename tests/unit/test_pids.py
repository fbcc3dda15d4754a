"""fvboot.pids with a pids cgroup's files as the kernel writes them (v2, then v1's hierarchy)."""

from pathlib import Path

from fvboot.pids import lacking_room, room


def _cgroup(tmp_path: Path, limit: str, current: int, name: str = "v2") -> tuple[Path, ...]:
    d = tmp_path / name
    d.mkdir()
    (d / "pids.max").write_text(limit + "\n")
    (d / "pids.current").write_text(f"{current}\n")
    return (tmp_path / "none", d)  # the first place has no such files: the next one is read


def test_a_limit_without_room_for_the_checkpoints_threads_is_said_with_how_much():
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        dirs = _cgroup(Path(t), "60", 2)
        assert room(dirs) == (60, 2)
        problem = lacking_room(81, dirs)
    assert problem.startswith("this container may run 60 processes and threads (docker run --pids-limit")
    assert "2 of them running, and the checkpoint's server has 81: raise the limit to more than 83" in problem


def test_room_enough_no_limit_or_nothing_recorded_is_no_problem(tmp_path):
    assert lacking_room(81, _cgroup(tmp_path, "4096", 5, "a")) is None
    assert lacking_room(81, _cgroup(tmp_path, "max", 5, "b")) is None
    assert room(_cgroup(tmp_path, "max", 5, "c")) is None
    assert lacking_room(None, _cgroup(tmp_path, "60", 2, "d")) is None  # an older fvboot's manifest
    assert lacking_room(81, (tmp_path / "nowhere",)) is None
