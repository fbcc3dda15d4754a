"""The served Python's packages as the bake saw them (fvboot.packages): an image built FROM the
baked one that installs, upgrades or removes a package gets the normal start, said."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fvboot import capabilities, manifest, packages
from fvboot.errors import CheckpointUnusable
from fvboot.layout import Layout
from fvboot.compatibility import check_compatible


def _manifest(tmp_path, device):
    layout = Layout(tmp_path)
    layout.images_dir.mkdir(parents=True)
    (layout.images_dir / "pstree.img").write_bytes(b"tree")
    return layout, manifest.Manifest(
        model=manifest.Model("m"),
        vllm=manifest.Vllm(("--max-model-len", "512"), ("vllm", "--max-model-len", "512"), 8000),
        device=manifest.Device.from_json(device), pipes=manifest.Pipes("pipe:[1]", "pipe:[2]"),
        files=manifest.describe_files(tmp_path, [layout.checkpoint_dir]), probe=())


def _site(tmp_path, *entries: str) -> str:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (site / e).mkdir() if not e.endswith(".pth") else (site / e).write_text("")
    (site / "vllm").mkdir(exist_ok=True)  # a package's own folder: not an entry
    (site / "six.py").write_text("")
    return str(site)


def test_the_site_folders_are_those_named_so_on_the_path_once_each(tmp_path):
    site = _site(tmp_path)
    dist = tmp_path / "usr" / "lib" / "python3" / "dist-packages"
    dist.mkdir(parents=True)
    link = tmp_path / "link-to-site-packages"
    link.symlink_to(site)
    path = ["", str(tmp_path / "lib" / "python311.zip"), str(tmp_path / "opt" / "fast-vllm" / "lib"), site,
            str(link / ".." / "site-packages"), str(dist), str(tmp_path / "gone" / "site-packages")]
    assert packages.site_folders(path) == [site, str(dist)]


@pytest.mark.parametrize("user_site_on", [True, False])
def test_the_users_site_folder_is_recorded_though_missing_where_the_served_python_would_add_it(
        tmp_path, monkeypatch, user_site_on):
    """`pip install --user` of a plugin in an image built FROM the baked one makes a site folder
    the bake never saw (Python adds it only once it exists), and the restore went on without it
    (found by review, 2026-12-06). In a virtual environment Python never adds it."""
    import site

    user = tmp_path / "root" / ".local" / "lib" / "python3.12" / "site-packages"
    monkeypatch.setattr(site, "ENABLE_USER_SITE", user_site_on)
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(user))
    folders = packages.served_site_folders()
    assert (str(user) in folders) is user_site_on
    baked = packages.installed(folders)
    assert packages.changed(baked) is None
    user.mkdir(parents=True)
    (user / "vllm_plugin-1.0.dist-info").mkdir()
    said = packages.changed(baked)
    assert said == (f"in {user}, vllm_plugin-1.0.dist-info was not there at the bake" if user_site_on else None), said


def test_the_entries_are_pips_records_sorted_and_nothing_else(tmp_path):
    site = _site(tmp_path, "vllm-0.26.0.dist-info", "distutils-precedence.pth", "old-1.0.egg-info")
    assert packages.installed([site, str(tmp_path / "unreadable")]) == {
        site: ("distutils-precedence.pth", "old-1.0.egg-info", "vllm-0.26.0.dist-info"),
        str(tmp_path / "unreadable"): ()}


def test_a_package_installed_upgraded_or_removed_since_the_bake_is_said(tmp_path):
    site = _site(tmp_path, "vllm-0.26.0.dist-info", "torch-2.8.0.dist-info")
    baked = packages.installed([site])
    assert packages.changed(baked) is None
    os.rename(f"{site}/vllm-0.26.0.dist-info", f"{site}/vllm-0.26.1.dist-info")  # pip install -U vllm
    assert packages.changed(baked) == (f"in {site}, vllm-0.26.1.dist-info was not there at the bake and"
                                       " vllm-0.26.0.dist-info is gone")
    os.rename(f"{site}/vllm-0.26.1.dist-info", f"{site}/vllm-0.26.0.dist-info")
    for n in range(5):  # pip install of a plugin and its dependencies
        os.mkdir(f"{site}/plugin{n}-1.0.dist-info")
    assert packages.changed(baked) == (f"in {site}, plugin0-1.0.dist-info, plugin1-1.0.dist-info,"
                                       " plugin2-1.0.dist-info (and 2 more) were not there at the bake")


def test_the_manifest_keeps_the_packages_and_an_older_one_has_none(tmp_path):
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    m = dataclasses.replace(m, packages={"/opt/venv/lib/python3.11/site-packages": ("a-1.dist-info", "b.pth")})
    back = manifest.Manifest.from_json(m.to_json())
    assert back.packages == m.packages and back == m
    assert manifest.Manifest.from_json({k: v for k, v in m.to_json().items() if k != "packages"}).packages is None
    with pytest.raises(manifest.ManifestInvalid, match="packages"):
        manifest.Manifest.from_json({**m.to_json(), "packages": {"/x": "a-1.dist-info"}})


def test_a_restore_where_the_packages_changed_gets_the_normal_start_with_the_reason(tmp_path, monkeypatch):
    site = _site(tmp_path, "vllm-0.26.0.dist-info")
    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    m = dataclasses.replace(m, packages=packages.installed([site]))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(capabilities, "permitted", lambda pid="self": frozenset(capabilities.CONTAINER_CAPS))
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr("shutil.which", lambda name: None)  # past the packages: the next check stops it
    with pytest.raises(CheckpointUnusable, match="^criu is not on PATH$"):
        check_compatible(m, layout, [])
    os.mkdir(f"{site}/fv_plugin-1.0.dist-info")
    with pytest.raises(CheckpointUnusable, match=(
            r"^the Python packages are not the ones the server was baked with: in .*site-packages, "
            r"fv_plugin-1.0.dist-info was not there at the bake \(an image built FROM this one\?\); the normal"
            r" start imports them as they are now$")):
        check_compatible(m, layout, [])
