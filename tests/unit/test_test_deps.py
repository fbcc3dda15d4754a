"""conftest.need: a package the tests import that is missing, or installed but unloadable (a
library of it cannot be loaded: a partial or damaged install), is one line that says so and what
installs it; under CI (FV_REQUIRE_TEST_DEPS=1) a failure, elsewhere a skip."""

from __future__ import annotations

import pytest

from conftest import need


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """A module whose import fails as torch's does when its shared libraries cannot load."""
    (tmp_path / "fv_broken_dep.py").write_text(
        "raise OSError('/venv/lib/libfake.so: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fv_broken_dep"


@pytest.mark.parametrize("module, words", [
    ("fv_broken_dep", ["fv_broken_dep is installed but cannot be loaded (for a test)",
                       ".ci/setup-cpu-host.sh checks it and reinstalls it", "libfake.so: cannot open"]),
    ("fv_no_such_dep", ["fv_no_such_dep is not installed (for a test)", ".ci/setup-cpu-host.sh installs it"]),
])
def test_ci_fails_on_a_test_dependency_that_does_not_load_saying_why(broken, monkeypatch, module, words):
    monkeypatch.setenv("FV_REQUIRE_TEST_DEPS", "1")
    with pytest.raises(pytest.fail.Exception) as e:
        need(module, "for a test")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_elsewhere_an_unloadable_dependency_skips_with_the_reason(broken, monkeypatch):
    monkeypatch.delenv("FV_REQUIRE_TEST_DEPS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="fv_broken_dep is installed but cannot be loaded"):
        need(broken, "for a test")
