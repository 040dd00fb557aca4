"""The deployment artifacts, checked offline: Dockerfile, deploy/compose.yaml and deploy/k8s.

Nothing here builds or runs a container. The linters and schema validators (hadolint,
check-jsonschema, kubectl kustomize, kubernetes-validate) check the files' syntax; the rest asserts
what operators rely on: hardened non-root pods, probes on the health names the services serve,
shutdown timing that outlasts BIMIP_SHUTDOWN_GRACE_S, scaling objects, the migration step, and
settings bimip itself accepts (validated with its own settings classes). A missing tool skips its
test, or fails it when CI=true.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from bimip.core.config import CoreSettings, check_unknown_variables, load_settings
from services.awareness.config import AwarenessSettings
from services.messaging.config import MessagingSettings
from services.sync.config import SyncSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "bimip"
UID = 10001

# service -> (gRPC port, full service name: the readiness health name)
SERVICES: dict[str, tuple[int, str]] = {
    "messaging": (50051, "bimip.messaging.v1.MessagingService"),
    "awareness": (50052, "bimip.awareness.v1.AwarenessService"),
    "sync": (50053, "bimip.sync.v1.SyncService"),
}
SETTINGS: dict[str, type[CoreSettings]] = {
    "messaging": MessagingSettings,
    "awareness": AwarenessSettings,
    "sync": SyncSettings,
}
LIVENESS = "liveness"
METRICS_PORT = 9464
SECRET_KEYS = ("BIMIP_JWT_SECRET", "BIMIP_INTERNAL_SECRET", "BIMIP_DATABASE_URL")

Manifest = dict[str, Any]


# --- tools ---------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """The tool's path: the project's virtualenv first, then PATH. Missing: skip, or fail under CI."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    where = (
        "install kubectl (with kustomize)"
        if name == "kubectl"
        else "`make setup` installs the dev dependencies"
    )
    reason = f"{name} is not installed: {where}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


# --- Dockerfile ----------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_hadolint_finds_nothing() -> None:
    hadolint = _tool("hadolint")
    # --failure-threshold style: any finding at all, even a style one, fails.
    result = _run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    instructions = _instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    final = _final_stage()
    assert final[0][1].split()[0] == "python:3.11-slim"
    users = [args for op, args in final if op == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == UID, "a numeric UID, so runAsNonRoot can verify it"
    # Only the virtualenv is taken from the builder.
    copies_from = [args for op, args in final if op == "COPY" and "--from=" in args]
    assert copies_from and all(args.split()[-2:] == ["/app/.venv", "/app/.venv"] for args in copies_from)


def test_dockerfile_entrypoint_ports_and_environment() -> None:
    final = dict(_final_stage())  # the last of each instruction
    assert final["ENTRYPOINT"] == '["bimip"]'
    assert final["CMD"] == '["run"]'
    exposed = {
        int(port.split("/")[0]) for op, args in _final_stage() if op == "EXPOSE" for port in args.split()
    }
    assert exposed >= {port for port, _ in SERVICES.values()} | {METRICS_PORT}
    env = " ".join(args for op, args in _final_stage() if op == "ENV")
    for pair in ("BIMIP_HOST=0.0.0.0", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert pair in env
    assert "/app/.venv/bin" in env, "bimip must be on PATH"
    assert "bimip health" in final["HEALTHCHECK"]


def test_dockerfile_installs_the_locked_environment_with_the_pinned_uv() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^UV_VERSION\s*:=\s*(\S+)", makefile, re.MULTILINE)
    assert pinned is not None
    runs = [args for op, args in _instructions() if op == "RUN"]
    assert any(f"uv=={pinned.group(1)}" in args for args in runs), "the uv version the Makefile pins"
    syncs = [args for args in runs if "uv sync" in args]
    assert syncs and all("--frozen" in args and "--no-dev" in args for args in syncs)
    assert "--no-editable" in syncs[-1], "the project must be installed into the venv, not linked to /src"


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert patterns[0] == "*", "everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for op, args in _instructions()
        if op == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
        if not source.startswith("--")
    }
    assert copied == allowed, "each COPY source must be let back in, and nothing else"
    for source in copied:
        assert (ROOT / source).exists(), source
    assert "README.md" in copied, "hatchling reads the readme while building the wheel"
    for kept_out in (".git", ".venv", ".tools", "var", "tests", "bench"):
        assert not any(a == kept_out or a.startswith(kept_out + "/") for a in allowed), kept_out
    # Alembic's migrations ship inside the bimip package.
    assert any((ROOT / "bimip" / "migrations" / "versions").glob("*.py"))


# --- Compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_matches_the_compose_spec() -> None:
    checker = _tool("check-jsonschema")
    result = _run(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_two_messaging_replicas(compose: dict[str, Any]) -> None:
    messaging = compose["services"]["messaging"]
    assert messaging["deploy"]["replicas"] == 2
    assert "container_name" not in messaging
    for port in messaging.get("ports", []):
        published = port.get("published") if isinstance(port, dict) else str(port).rsplit(":", 1)[0]
        assert not published, "two replicas cannot publish one fixed host port"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_waits_for_migration_and_backends(compose: dict[str, Any], name: str) -> None:
    services = compose["services"]
    service = services[name]
    assert service["command"] == ["run", name]
    depends = service["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    port, full_name = SERVICES[name]
    check = service["healthcheck"]["test"]
    assert check[:3] == ["CMD", "bimip", "health"]
    assert check[check.index("--address") + 1] == f"127.0.0.1:{port}"
    assert check[check.index("--service") + 1] == full_name
    assert service["image"] == "bimip:dev"
    assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
    assert service["build"]["dockerfile"] == "Dockerfile"
    env = _compose_env(service)
    assert env["BIMIP_MIGRATE_ON_START"] == "false"
    assert _seconds(service["stop_grace_period"]) > float(env["BIMIP_SHUTDOWN_GRACE_S"])


def test_compose_migrates_once_before_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["image"] == services["messaging"]["image"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_compose_traces_go_to_jaeger(compose: dict[str, Any]) -> None:
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert str(_compose_env(jaeger)["COLLECTOR_OTLP_ENABLED"]).lower() == "true"
    published = {str(p).rsplit(":", 1)[-1] for p in jaeger["ports"]}
    assert {"16686", "4317"} <= published
    for name in [*SERVICES, "migrate"]:
        assert _compose_env(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_environment_is_accepted_by_bimip(compose: dict[str, Any], name: str) -> None:
    services = compose["services"]
    env = _compose_env(services[name])
    check_unknown_variables(SETTINGS.values(), env)
    settings = load_settings(SETTINGS[name], env)
    assert settings.host == "0.0.0.0"
    assert (
        settings.database_url.startswith("postgresql+asyncpg://")
        and "@postgres:5432/" in settings.database_url
    )
    assert settings.redis_url is not None and settings.redis_url.startswith("redis://redis:6379")
    assert settings.messaging_address == f"messaging:{SERVICES['messaging'][0]}"
    assert settings.jwt_secret and settings.internal_secret  # ≥32 characters, checked by the model
    assert settings.var_dir.startswith("/tmp/") and "/tmp" in services[name]["tmpfs"]
    assert services[name]["read_only"] is True
    # The services reach one another only if they agree on the internal secret.
    assert env["BIMIP_INTERNAL_SECRET"] == _compose_env(services["messaging"])["BIMIP_INTERNAL_SECRET"]


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kubectl = _tool("kubectl")
    result = _run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(result.stdout)
    return path


@pytest.fixture(scope="module")
def manifests(rendered: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]


def _of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def _one(manifests: list[Manifest], kind: str) -> Manifest:
    found = list(_of_kind(manifests, kind).values())
    assert len(found) == 1, f"one {kind}, found {len(found)}"
    return found[0]


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_env(manifests: list[Manifest]) -> dict[str, str]:
    """What envFrom gives every container: the ConfigMap, then the Secret."""
    env = dict(_one(manifests, "ConfigMap")["data"])
    secret = _one(manifests, "Secret")
    env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    env.update(secret.get("stringData", {}))
    return env


def _pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for kind in ("Deployment", "Job"):
        for name, m in _of_kind(manifests, kind).items():
            yield f"{kind}/{name}", m["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", ["1.37.0", "1.27.0"])
def test_kustomize_render_passes_strict_validation(rendered: Path, version: str) -> None:
    """The current schemas, and 1.27: the oldest Kubernetes with GA native gRPC probes."""
    validator = _tool("kubernetes-validate")
    result = _run(validator, "--strict", "--quiet", "--kubernetes-version", version, str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_everything_lives_in_the_bimip_namespace(manifests: list[Manifest]) -> None:
    assert _one(manifests, "Namespace")["metadata"]["name"] == NAMESPACE
    for m in manifests:
        if m["kind"] != "Namespace":
            assert m["metadata"].get("namespace") == NAMESPACE, f"{m['kind']}/{m['metadata']['name']}"


def test_one_deployment_per_service(manifests: list[Manifest]) -> None:
    assert set(_of_kind(manifests, "Deployment")) == set(SERVICES)


def test_pods_are_hardened(manifests: list[Manifest]) -> None:
    specs = dict(_pod_specs(manifests))
    assert len(specs) == len(SERVICES) + 1  # and the migration Job
    for where, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] == UID, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        # Service links would inject <SERVICE>_PORT=tcp://… variables; a Service named bimip-messaging
        # would set BIMIP_MESSAGING_PORT and stop bimip at start-up.
        assert spec["enableServiceLinks"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", UID) == UID, where
            assert sc.get("privileged", False) is False, where
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: an emptyDir at /tmp"
            names = {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e}
            names |= {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
            assert names == {_one(manifests, "ConfigMap")["metadata"]["name"]} | {
                _one(manifests, "Secret")["metadata"]["name"]
            }, where


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_runs_its_service_with_grpc_probes(manifests: list[Manifest], name: str) -> None:
    port, full_name = SERVICES[name]
    deployment = _of_kind(manifests, "Deployment")[name]
    template = deployment["spec"]["template"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    for label in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
        assert label in template["metadata"]["labels"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == name
    (container,) = template["spec"]["containers"]
    assert container["args"] == ["run", name]
    assert container["image"].split("/")[-1].split(":")[0] == "bimip"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": METRICS_PORT}
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": full_name}
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS}
    assert container["startupProbe"]["grpc"]["port"] == port
    assert container["startupProbe"]["grpc"].get("service", "") in (LIVENESS, full_name, "")
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_termination_outlasts_the_shutdown_grace(manifests: list[Manifest], name: str) -> None:
    grace = float(_one(manifests, "ConfigMap")["data"]["BIMIP_SHUTDOWN_GRACE_S"])
    spec = _of_kind(manifests, "Deployment")[name]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre_stop:  # the image's /bin/sleep (python:3.11-slim has coreutils)
        program, seconds = pre_stop["exec"]["command"]
        assert program == "sleep"
        sleep = float(seconds)
    elif "sleep" in pre_stop:  # the kubelet's own sleep action
        sleep = float(pre_stop["sleep"]["seconds"])
    # The preStop runs first, inside the same period; leave time to flush spans and close connections.
    assert spec["terminationGracePeriodSeconds"] >= sleep + grace + 5


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_deployment_has_an_hpa_a_pdb_and_a_service(manifests: list[Manifest], name: str) -> None:
    deployment = _of_kind(manifests, "Deployment")[name]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpas = [
        h
        for h in _of_kind(manifests, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    ]
    assert len(hpas) == 1
    assert hpas[0]["apiVersion"] == "autoscaling/v2"
    assert (
        hpas[0]["spec"]["minReplicas"] >= 2
        and hpas[0]["spec"]["maxReplicas"] > hpas[0]["spec"]["minReplicas"]
    )
    assert any(
        m["type"] == "Resource"
        and m["resource"]["name"] == "cpu"
        and m["resource"]["target"]["type"] == "Utilization"
        for m in hpas[0]["spec"]["metrics"]
    )
    pdbs = [
        p
        for p in _of_kind(manifests, "PodDisruptionBudget").values()
        if _selects(p["spec"]["selector"]["matchLabels"], pod_labels)
    ]
    assert len(pdbs) == 1 and pdbs[0]["apiVersion"] == "policy/v1"
    assert "minAvailable" in pdbs[0]["spec"] or "maxUnavailable" in pdbs[0]["spec"]
    services = [
        s
        for s in _of_kind(manifests, "Service").values()
        if _selects(s["spec"]["selector"], pod_labels) and s["spec"].get("clusterIP") != "None"
    ]
    assert len(services) == 1
    assert services[0]["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    assert ports["grpc"]["port"] == SERVICES[name][0] and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == METRICS_PORT and ports["metrics"]["targetPort"] == "metrics"


def test_messaging_runs_replicas_and_a_headless_service_for_the_internal_links(
    manifests: list[Manifest],
) -> None:
    deployment = _of_kind(manifests, "Deployment")["messaging"]
    assert deployment["spec"]["replicas"] >= 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = [
        s
        for s in _of_kind(manifests, "Service").values()
        if s["spec"].get("clusterIP") == "None" and _selects(s["spec"]["selector"], pod_labels)
    ]
    assert len(headless) == 1
    service = headless[0]
    port = SERVICES["messaging"][0]
    assert any(p["port"] == port for p in service["spec"]["ports"])
    # awareness and sync resolve that Service's pods through gRPC's DNS resolver.
    address = _one(manifests, "ConfigMap")["data"]["BIMIP_MESSAGING_ADDRESS"]
    meta = service["metadata"]
    assert address == f"dns:///{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


def test_migration_job(manifests: list[Manifest]) -> None:
    job = _one(manifests, "Job")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert "ttlSecondsAfterFinished" in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"]
    images = {
        c["image"]
        for d in _of_kind(manifests, "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {container["image"]}, "the Job migrates with the image the services run"


def test_settings_are_accepted_by_bimip(manifests: list[Manifest]) -> None:
    env = _pod_env(manifests)
    assert set(SECRET_KEYS) <= set(_one(manifests, "Secret").get("data", {})), "secrets stay in the Secret"
    assert not set(SECRET_KEYS) & set(_one(manifests, "ConfigMap")["data"])
    check_unknown_variables(SETTINGS.values(), env)
    for name, cls in SETTINGS.items():
        settings = load_settings(cls, env)
        assert settings.host == "0.0.0.0", name
        assert settings.migrate_on_start == "false", name
        assert settings.database_url.startswith("postgresql+asyncpg://"), name
        assert settings.redis_url is not None, name
        assert settings.jwt_secret and settings.internal_secret, name
        assert settings.var_dir.startswith("/tmp/"), f"{name}: VAR_DIR on the /tmp emptyDir"
        assert getattr(settings, f"{name}_port") == SERVICES[name][0], name


def test_ingress_proxies_grpc_to_the_public_services_only(manifests: list[Manifest]) -> None:
    ingress = _one(manifests, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["tls"], "gRPC through ingress-nginx needs HTTP/2, so TLS"
    services = _of_kind(manifests, "Service")
    routed: dict[str, str] = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] in services and backend["port"] == {"name": "grpc"}
            routed[path["path"]] = backend["name"]
    assert routed == {f"/{full_name}/": name for name, (_, full_name) in SERVICES.items()}
