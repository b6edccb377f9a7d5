"""infra/: the compose stack, the Dockerfile and the work-pool templates say what the README says.

Docker cannot run on the development machines, so the stack is checked statically: the YAML
parses, every service is wired to the others as documented, every secret is required from the
environment, and the Docker pool template matches the names compose gives its network and volume.
The templates go through Prefect's own validators (tests/integration/test_work_pools.py creates
them on a real server).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values, find_placeholders

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
POOLS = INFRA / "work-pools"
SERVICES = {"postgres", "minio", "s3-setup", "prefect-server", "mlflow", "worker"}
REQUIRED_SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` interpolation."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(one, value)


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def secrets_env() -> dict[str, str]:
    return {name: f"test-{name.lower()}" for name in REQUIRED_SECRETS}


def _env(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in service.get("environment", {}).items()}


def _command(service: dict[str, Any], env: dict[str, str]) -> list[str]:
    return [interpolate(str(part), env) for part in service["command"]]


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _pool(name: str) -> dict[str, Any]:
    return json.loads((POOLS / f"{name}.json").read_text())


def _defaults(template: dict[str, Any]) -> dict[str, Any]:
    props = template["variables"]["properties"]
    return {k: v["default"] for k, v in props.items() if v.get("default") is not None}


def test_compose_has_every_service_and_they_depend_on_each_other_safely(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
            if rule["condition"] == "service_completed_successfully":
                assert services[dependency]["restart"] == "no", dependency


def test_every_secret_is_required_from_the_environment(compose, secrets_env):
    strings = _strings(compose)
    for name in REQUIRED_SECRETS:
        assert any(f"${{{name}:?" in s for s in strings), name
        partial = {k: v for k, v in secrets_env.items() if k != name}
        with pytest.raises(KeyError, match=name):
            for s in strings:
                interpolate(s, partial)
    for service in compose["services"].values():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (key, value)
    for url in (s for s in strings if "://" in s and "@" in s):
        assert re.search(r"://[^:/]+:\$\{[A-Z_]+(:\?[^}]*)?\}@", url), url


def test_published_ports_bind_to_loopback_only(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published
    assert all(str(p).startswith("127.0.0.1:") for p in published), published


def test_worker_env_points_at_the_servers_of_the_stack(compose, secrets_env):
    services = compose["services"]
    worker = _env(services["worker"], secrets_env)
    prefect_cmd = _command(services["prefect-server"], secrets_env)
    mlflow_cmd = _command(services["mlflow"], secrets_env)
    assert worker["PREFECT_API_URL"] == f"http://prefect-server:{_flag(prefect_cmd, '--port')}/api"
    assert worker["MLFLOW_TRACKING_URI"] == f"http://mlflow:{_flag(mlflow_cmd, '--port')}"
    assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["AWS_ACCESS_KEY_ID"] == secrets_env["MINIO_ROOT_USER"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == secrets_env["MINIO_ROOT_PASSWORD"]
    mounts = [v for v in services["worker"]["volumes"] if isinstance(v, str)]
    assert f"evergreen-home:{worker['EVERGREEN_HOME']}" in mounts
    config = next(v for v in services["worker"]["volumes"] if isinstance(v, dict))
    assert config["target"] == f"{worker['EVERGREEN_WORKDIR']}/evergreen.yaml"
    assert config["read_only"] is True and config["bind"]["create_host_path"] is False


def test_servers_use_postgres_and_minio_as_documented(compose, secrets_env):
    services = compose["services"]
    password = secrets_env["POSTGRES_PASSWORD"]
    postgres = _env(services["postgres"], secrets_env)
    prefect = _env(services["prefect-server"], secrets_env)
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://{postgres['POSTGRES_USER']}:{password}@postgres:5432/"
        f"{postgres['POSTGRES_DB']}"
    )
    mlflow_cmd = _command(services["mlflow"], secrets_env)
    backend = _flag(mlflow_cmd, "--backend-store-uri")
    assert backend == f"postgresql://{postgres['POSTGRES_USER']}:{password}@postgres:5432/mlflow"
    init = compose["configs"][services["postgres"]["configs"][0]["source"]]["content"]
    assert "CREATE DATABASE mlflow" in init
    assert "--serve-artifacts" in mlflow_cmd
    bucket = re.fullmatch(r"s3://([^/]+)/", _flag(mlflow_cmd, "--artifacts-destination"))[1]
    buckets = _env(services["s3-setup"], secrets_env)["EVERGREEN_BUCKETS"].split(",")
    assert bucket in buckets and "evergreen-landing" in buckets
    assert _env(services["mlflow"], secrets_env)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in _flag(mlflow_cmd, "--allowed-hosts").split(",")


def test_docker_pool_matches_the_compose_network_volume_and_image(compose, secrets_env):
    defaults = _defaults(_pool("docker"))
    assert defaults["networks"] == [compose["networks"]["default"]["name"]]
    volume, path = defaults["volumes"][0].split(":")
    assert compose["volumes"][volume]["name"] == volume
    assert defaults["env"]["EVERGREEN_HOME"] == path
    assert defaults["image"] == interpolate(compose["services"]["worker"]["image"], {})
    worker = _env(compose["services"]["worker"], secrets_env)
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "EVERGREEN_HOME"):
        assert defaults["env"][key] == worker[key], key
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert defaults["env"][key].startswith("{{ prefect.blocks.secret."), key


@pytest.mark.parametrize(
    ("name", "pool_type"),
    [("process", "process"), ("docker", "docker"), ("kubernetes-gpu", "kubernetes")],
)
def test_pool_templates_pass_prefect_validation_and_keep_upstream_placeholders(name, pool_type):
    template = _pool(name)
    validate_base_job_template(template)
    validate(_defaults(template), template["variables"], raise_on_error=True, ignore_required=True)
    upstream = _upstream_template(pool_type)
    ours = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    theirs = {p.name for p in find_placeholders(json.dumps(upstream["job_configuration"]))}
    assert theirs <= ours
    assert set(upstream["variables"]["properties"]) <= set(template["variables"]["properties"])


def _upstream_template(pool_type: str) -> dict[str, Any]:
    """The default base job template prefect ships for a worker type (bundled, offline)."""
    import prefect.server.api.collections as collections

    bundled = Path(collections.__file__).parent / "collections_data" / "views"
    metadata = json.loads((bundled / "aggregate-worker-metadata.json").read_text())
    for workers in metadata.values():
        if pool_type in workers:
            return workers[pool_type]["default_base_job_configuration"]
    raise LookupError(pool_type)


def test_kubernetes_pool_renders_a_gpu_job_with_shared_home_and_secret_env():
    template = _pool("kubernetes-gpu")
    rendered = apply_values(template["job_configuration"], _defaults(template))
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    mount = container["volumeMounts"][0]
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert claim["persistentVolumeClaim"]["claimName"] == "evergreen-home"
    # the worker prepends the `env` job variable to the container's own list (torchrun count)
    assert rendered["env"]["EVERGREEN_HOME"] == mount["mountPath"]
    assert rendered["env"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert container["env"] == [{"name": "EVERGREEN_TRAIN_PROCESSES", "value": "1"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["envFrom"] == [
        {"secretRef": {"name": "evergreen-credentials", "optional": True}}
    ]
    assert container["image"] == "evergreen:gpu"
    two = apply_values(template["job_configuration"], {**_defaults(template), "gpu_count": 2})
    limits = two["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2


def test_kubernetes_pool_exposes_node_selector_tolerations_and_torchrun_processes():
    template = _pool("kubernetes-gpu")
    values = {
        **_defaults(template),
        "gpu_count": 4,
        "train_processes": "4",
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
    }
    validate(values, template["variables"], raise_on_error=True, ignore_required=True)
    rendered = apply_values(template["job_configuration"], values)
    manifest = json.loads(json.dumps(rendered["job_manifest"]))  # JSON all the way down
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["node_selector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["containers"][0]["env"] == [{"name": "EVERGREEN_TRAIN_PROCESSES", "value": "4"}]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert not find_placeholders(json.dumps(manifest))  # every placeholder filled
    with pytest.raises(Exception, match=r"train_processes|pattern"):
        validate(
            {**values, "train_processes": "0"},
            template["variables"],
            raise_on_error=True,
            ignore_required=True,
        )


def test_no_pool_template_holds_a_credential():
    for path in POOLS.glob("*.json"):
        for text in _strings(json.loads(path.read_text())):
            assert not re.search(r"(?i)(password|secret_access_key)\s*[=:]\s*\w", text), path


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", "")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_base_torch_and_default_command():
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    torch_arg = next(a for k, a in instructions if k == "ARG" and a.startswith("TORCH_SPEC="))
    assert "torch==2.13.0" in torch_arg and "/whl/cpu" in torch_arg
    command = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert command[:3] == ["prefect", "worker", "start"]
    assert _flag(command, "--pool") == "evergreen-process"
    assert (ROOT / _flag(command, "--base-job-template")).is_file()
    assert any(k == "USER" and a != "root" for k, a in instructions)


def test_dockerfile_copies_every_package_that_exists():
    copied = [a.split()[0].rstrip("/") for k, a in _dockerfile_instructions() if k == "COPY"]
    for source in copied:
        assert (ROOT / source).exists(), source
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    assert set(packages) <= set(copied)


@pytest.mark.parametrize("extras", ["", "text"])
def test_dockerfile_requirements_step_reads_the_real_pyproject(tmp_path, extras):
    run = next(a for k, a in _dockerfile_instructions() if k == "RUN" and "tomllib" in a)
    script = run.split(" > /tmp/requirements.txt")[0].replace(
        "python -c", f"{sys.executable} -c", 1
    )
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    done = subprocess.run(
        ["sh", "-c", script],
        cwd=tmp_path,
        env={"EXTRAS": extras},
        capture_output=True,
        text=True,
        check=True,
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + (
        project["optional-dependencies"]["text"] if extras else []
    )
    assert done.stdout.split("\n")[:-1] == expected


def test_readme_documents_what_exists(compose):
    readme = (INFRA / "README.md").read_text()
    for path in re.findall(r"--base-job-template (infra/work-pools/\S+\.json)", readme):
        assert (ROOT / path).is_file(), path
    assert len(re.findall(r"--base-job-template", readme)) >= 3
    for service in compose["services"]:
        assert f"| `{service}` |" in readme, service
    for name in REQUIRED_SECRETS | {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"}:
        assert name in readme, name
    assert "registry.tracking_uri" in readme and "s3://" in readme
    assert "not been\nstarted here" in readme or "not been started here" in readme


def test_every_named_volume_and_dependency_is_defined_and_servers_are_health_checked(compose):
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in service.get("volumes", []):
            if isinstance(mount, dict) and mount.get("type") != "volume":
                continue  # a bind mount of a host path
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if not source.startswith((".", "/", "$", "~")):  # a named volume, not a host path
                assert source in volumes, f"{name}: volume {source!r} is not declared"
        assert set(service.get("depends_on", {})) <= set(services), name
        one_shot = service.get("restart") == "no" or any(
            d.get("condition") == "service_completed_successfully"
            for other in services.values()
            for dep, d in other.get("depends_on", {}).items()
            if dep == name
        )
        assert one_shot or "healthcheck" in service, f"{name} has no health check"


def test_readme_config_for_the_stack_is_valid_and_shares_gx_through_the_landing_bucket():
    """The example a user copies must load, and every worker of the stack must read one GX
    suite and validation history (a per-pod `<home>/gx` would fork them)."""
    from evergreen.config import EvergreenConfig

    readme = (INFRA / "README.md").read_text()
    block = re.search(r"```yaml\n(home: /var/lib/evergreen\n.*?)```", readme, re.S)
    assert block is not None, "infra/README.md lost its evergreen.yaml example"
    cfg = EvergreenConfig.model_validate(yaml.safe_load(block.group(1)))
    assert cfg.data.gx_store is not None and cfg.data.gx_store.startswith("s3://")
    assert cfg.data.gx_store.split("/")[2] == str(cfg.data.landing).split("/")[2]
