"""The operator examples in examples/ against what fvboot needs: the capability set CRIU needs
(fvboot.capabilities' CONTAINER_CAPS / CONTAINER_SECURITY_OPT, the one list `docker run` flags, tests and
benchmarks use), /dev/shm, and a health check that follows the gate (/health: 503 while the
restored server is not yet checked). They fail if an example drifts from those."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, need
from fvboot.capabilities import CONTAINER_CAPS, CONTAINER_SECURITY_OPT, docker_run_flags

yaml = need("yaml", "PyYAML parses the example compose, Kubernetes and workflow files")

EXAMPLES = REPO / "examples"
COMPOSE = EXAMPLES / "compose" / "compose.yaml"
COMPOSE_GPU = EXAMPLES / "compose" / "compose.gpu.yaml"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _service(path: Path) -> dict:
    services = _load(path)["services"]
    assert list(services) == ["vllm"], f"{path.name}: one service, named vllm"
    return services["vllm"]


# --- compose --------------------------------------------------------------------------------

def test_compose_has_exactly_the_documented_capability_set():
    svc = _service(COMPOSE)
    assert sorted(svc["cap_add"]) == sorted(CONTAINER_CAPS)
    assert sorted(svc["security_opt"]) == sorted(CONTAINER_SECURITY_OPT)
    assert str(svc["shm_size"]) == docker_run_flags()[docker_run_flags().index("--shm-size") + 1]
    assert not svc.get("privileged"), "--privileged is not needed (README, Capabilities)"


def test_compose_image_is_a_variable_with_a_default_and_the_baked_port_is_published():
    svc = _service(COMPOSE)
    assert svc["image"].startswith("${FV_IMAGE:-") and svc["image"].endswith("}")
    assert "network_mode" not in svc, "Docker's own networks are the general case"
    assert [p.split(":")[-1] for p in svc["ports"]] == ["8000"], "the baked port is the container side"


def test_compose_health_check_asks_health_without_curl():
    check = _service(COMPOSE)["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD" and test[1] == "python3", "curl may be missing; python3 is in every image"
    assert "http://127.0.0.1:8000/health" in " ".join(test)
    assert _seconds(check["start_period"]) >= 300, "a fallback normal start takes minutes"
    assert _seconds(check["interval"]) <= 5, "a restore takes seconds"


def _seconds(s: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(s[:-1]) * units[s[-1]]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status,healthy", [(503, False), (200, True)])
def test_compose_health_check_is_green_only_when_the_gate_is_open(status, healthy):
    """Run the health check's own command against a server answering /health like the gate:
    503 while restoring (must fail the check), 200 once open (must pass)."""
    test = _service(COMPOSE)["healthcheck"]["test"]
    handler = type("H", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        argv = [sys.executable if a == "python3" else a.replace(":8000/", f":{port}/") for a in test[1:]]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert (r.returncode == 0) == healthy, r.stderr[-2000:]


def test_compose_keeps_a_volume_for_the_hf_cache():
    doc = _load(COMPOSE)
    mounts = [v.split(":") for v in doc["services"]["vllm"]["volumes"]]
    assert ["hf-cache", "/fv/cache/hf"] in [m[:2] for m in mounts]  # the image's HF_HOME
    assert "hf-cache" in doc["volumes"]


def test_compose_gpu_override_reserves_an_nvidia_gpu_and_keeps_the_rest():
    svc = _service(COMPOSE_GPU)
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert set(svc) <= {"image", "deploy"}, "the override adds the GPU only; the base keeps the rest"


def test_compose_files_are_accepted_by_docker_compose(tmp_path):
    """docker-compose 1.29 (Debian 12) parses and merges them (Compose v2 takes the same files)."""
    import shutil

    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        argv = ["docker-compose", "--project-directory", str(tmp_path)]
        for f in files:
            argv += ["-f", str(f)]
        r = subprocess.run(argv + ["config"], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "FV_IMAGE": "x/y:z"})
        assert r.returncode == 0, r.stderr
        svc = yaml.safe_load(r.stdout)["services"]["vllm"]
        assert svc["image"] == "x/y:z"
        assert sorted(svc["cap_add"]) == sorted(CONTAINER_CAPS)


# --- Kubernetes -----------------------------------------------------------------------------

K8S = EXAMPLES / "kubernetes" / "deployment.yaml"
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # appArmorProfile in securityContext: 1.30 and later


def _k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def _k8s(kind: str) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} in {K8S.name}"
    return found[0]


def _vllm_container() -> dict:
    (c,) = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schema(version):
    kv = need("kubernetes_validate.utils", "validates examples/kubernetes against Kubernetes' schema")
    docs = _k8s_docs()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']} is not valid Kubernetes {version}: {e.message} at {list(e.path)}")


def test_kubernetes_validation_can_fail():
    """The validator rejects what the API server would (so the test above means something)."""
    kv = need("kubernetes_validate.utils", "validates examples/kubernetes against Kubernetes' schema")
    doc = _k8s("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_has_exactly_the_documented_capability_set_and_shm():
    sc = _vllm_container()["securityContext"]
    assert sorted(sc["capabilities"]["add"]) == sorted(CONTAINER_CAPS)
    want = {o.split("=")[0]: o.split("=")[1] for o in CONTAINER_SECURITY_OPT}
    assert want == {"seccomp": "unconfined", "apparmor": "unconfined"}, "update the manifest's profiles"
    assert sc["seccompProfile"] == {"type": "Unconfined"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    assert not sc.get("privileged")
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    shm = [m for m in _vllm_container()["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1
    (vol,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
    shm_size = docker_run_flags()[docker_run_flags().index("--shm-size") + 1]
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": shm_size.upper() + "i"}


def test_kubernetes_requests_a_gpu_on_the_baked_gpu_model_and_driver():
    c = _vllm_container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    terms = _k8s("Deployment")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for term in terms:  # every alternative pins the GPU model and the full driver version
        keys = {e["key"] for e in term["matchExpressions"]}
        assert {"nvidia.com/gpu.product", "nvidia.com/cuda.driver.major", "nvidia.com/cuda.driver.minor",
                "nvidia.com/cuda.driver.rev"} <= keys
    assert "fvbuild inspect" in K8S.read_text()


def test_kubernetes_probes_ask_health_and_fit_restore_times():
    c = _vllm_container()
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
    start, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert start["periodSeconds"] <= 2, "a restore takes seconds"
    # the fallback comes after the restore's own bounds (found by review, 2026-12-06: a probe of
    # 600 s against a CRIU bound of 600 s killed each container before its normal start)
    from fvboot import runenv

    env = {e["name"]: e.get("value") for e in c["env"] if "value" in e}
    worst = (runenv.seconds("FV_CRIU_RESTORE_TIMEOUT_S", env) + runenv.seconds("FV_RESTORE_STEP_TIMEOUT_S", env)
             + max(0.0, runenv.seconds("FV_PAGE_CHECK_TIMEOUT_S", env) - runenv.seconds("FV_RESTORE_STEP_TIMEOUT_S", env))
             + 30 + 600)  # what a failed restore leaves is killed within 30 s; a normal start, 10 min at most
    assert start["periodSeconds"] * start["failureThreshold"] >= worst, (worst, "the fallback must come in time")
    assert ready["periodSeconds"] <= 10
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, "liveness: conservative"
    svc = _k8s("Service")
    assert svc["spec"]["selector"] == _k8s("Deployment")["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


# --- GitHub Actions -------------------------------------------------------------------------

WORKFLOW = EXAMPLES / "github-actions" / "gpu-ci.yml"


def _workflow() -> dict:
    return _load(WORKFLOW)


def _job() -> dict:
    (job,) = _workflow()["jobs"].values()
    return job


def test_workflow_runs_on_a_self_hosted_gpu_runner_on_prs_and_by_hand():
    doc = _workflow()
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert set(on) == {"pull_request", "workflow_dispatch"}
    assert _job()["runs-on"] == ["self-hosted", "linux", "gpu"]
    assert "head.repo.full_name == github.repository" in _job()["if"], "no fork PRs on a self-hosted runner"


def test_workflow_runs_the_repos_gpu_script_which_exists_and_is_executable():
    runs = [s["run"] for s in _job()["steps"] if "run" in s]
    commands = [line.strip() for r in runs for line in r.splitlines()]
    assert ".ci/gpu-run all" in commands
    script = REPO / ".ci" / "gpu-run"
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script} must exist and be executable"
    assert any("pip" in c and "install" in c and "'.[test]'" in c for c in commands), "installs the package"
    for r in runs:  # every step's shell script at least parses
        check = subprocess.run(["bash", "-n"], input=r, capture_output=True, text=True)
        assert check.returncode == 0, f"{r}\n{check.stderr}"


def test_workflow_uploads_the_junit_xml_and_logs_the_script_writes_to_out():
    steps = _job()["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()", "failed runs need their logs most"
    paths = upload["with"]["path"].splitlines()
    assert "${{ env.OUT }}/*.xml" in paths and "${{ env.OUT }}/*.log" in paths
    sets_out = [s for s in steps if "OUT=" in s.get("run", "") and "GITHUB_ENV" in s.get("run", "")]
    assert sets_out and steps.index(sets_out[0]) < steps.index(upload)
    script = (REPO / ".ci" / "gpu-run").read_text()
    assert "OUT=${OUT:-" in script and "--junitxml" in script, ".ci/gpu-run: JUnit XML and logs end up in $OUT"
