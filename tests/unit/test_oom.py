"""The container's OOM kills, read from its memory cgroup (v2's memory.events, v1's
memory.oom_control) and said with its limit."""

from __future__ import annotations

from fvboot import oom


def _v2(tmp_path, kills: int, limit: str = "134217728"):
    d = tmp_path / "v2"
    d.mkdir(exist_ok=True)
    (d / "memory.events").write_text(f"low 0\nhigh 0\nmax 12\noom 2\noom_kill {kills}\noom_group_kill 0\n")
    (d / "memory.max").write_text(limit + "\n")
    return d, tmp_path / "no-v1"


def _v1(tmp_path, kills: int, limit: str):
    d = tmp_path / "v1"
    d.mkdir(exist_ok=True)
    (d / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n")
    (d / "memory.limit_in_bytes").write_text(limit + "\n")
    return tmp_path / "no-v2", d


def test_kills_and_limit_are_read_from_either_cgroup_version(tmp_path):
    v2 = _v2(tmp_path, 3)
    assert oom.kills(*v2) == 3 and oom.limit(*v2) == 128 << 20
    v1 = _v1(tmp_path, 5, "314572800")
    assert oom.kills(*v1) == 5 and oom.limit(*v1) == 300 << 20


def test_no_limit_and_no_cgroup_read_as_none(tmp_path):
    assert oom.limit(*_v2(tmp_path, 0, "max")) is None
    assert oom.limit(*_v1(tmp_path, 0, "9223372036854771712")) is None  # v1's "unlimited"
    nowhere = (tmp_path / "a", tmp_path / "b")
    assert oom.kills(*nowhere) is None and oom.limit(*nowhere) is None
    assert oom.OomWatch(*nowhere).since() is None


def test_the_watch_names_the_kills_since_it_began_and_the_limit(tmp_path):
    v2 = _v2(tmp_path, 1)
    watch = oom.OomWatch(*v2)
    assert watch.since() is None  # an earlier container start's kill is not this one's
    _v2(tmp_path, 3)
    assert watch.since() == ("the kernel's OOM killer ended 2 of this container's processes: its memory limit,"
                             " 128 MiB, is too small for the server; raise it (docker run --memory, or the pod's"
                             " resources.limits.memory)")


def test_a_kill_without_a_limit_on_the_container_says_what_ran_out(tmp_path):
    watch = oom.OomWatch(*_v2(tmp_path, 0, "max"))
    _v2(tmp_path, 1, "max")
    assert "no memory limit is set on it: the machine, or a limit above the container, ran out" in watch.since()


def test_gib_limits_read_as_gib(tmp_path):
    watch = oom.OomWatch(*_v2(tmp_path, 0, str(6 << 30)))
    _v2(tmp_path, 1, str(6 << 30))
    assert "its memory limit, 6.0 GiB," in watch.since()
