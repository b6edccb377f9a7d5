"""infra/work-pools/*.json on a real Prefect server, created exactly as infra/README.md says.

`prefect work-pool create NAME --type T --base-job-template infra/work-pools/T.json` for the
process, docker and kubernetes pools; then the job configuration a worker would build for a
flow run is resolved against the server, so the Docker pool's Secret-block references must turn
into the stored values and a deployment's env must merge with the pool's defaults.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.integration.servers import BIN, prefect_env, prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
POOLS = {
    "evergreen-process": ("process", "infra/work-pools/process.json"),
    "evergreen-docker": ("docker", "infra/work-pools/docker.json"),
    "evergreen-gpu": ("kubernetes", "infra/work-pools/kubernetes-gpu.json"),
}


def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


async def _resolve(pool_name: str, values: dict) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.workers.base import BaseJobConfiguration

    async with get_client() as client:
        pool = await client.read_work_pool(pool_name)
        config = await BaseJobConfiguration.from_template_and_values(
            pool.base_job_template, values, client=client
        )
        return {"type": pool.type, "template": pool.base_job_template, "env": config.env}


def test_readme_commands_create_all_three_pools(tmp_path):
    with prefect_server(tmp_path / "prefect") as api:
        env = prefect_env(tmp_path / "prefect", api)
        env.update(AWS_ACCESS_KEY_ID="key-id-from-env", AWS_SECRET_ACCESS_KEY="secret-from-env")
        _run(
            [
                str(BIN / "python"),
                "-c",
                "import os; from prefect.blocks.system import Secret; "
                "Secret(value=os.environ['AWS_ACCESS_KEY_ID'])"
                ".save('evergreen-s3-access-key-id', overwrite=True); "
                "Secret(value=os.environ['AWS_SECRET_ACCESS_KEY'])"
                ".save('evergreen-s3-secret-access-key', overwrite=True)",
            ],
            env,
        )
        for name, (pool_type, path) in POOLS.items():
            _run(
                [
                    str(BIN / "prefect"),
                    "work-pool",
                    "create",
                    name,
                    "--type",
                    pool_type,
                    "--base-job-template",
                    path,
                ],
                env,
            )
        # settings context, not env: an earlier test may already have loaded Prefect's settings
        with temporary_settings(updates={PREFECT_API_URL: api}):
            resolved = {name: asyncio.run(_resolve(name, {})) for name in POOLS}
            docker = asyncio.run(_resolve("evergreen-docker", {"env": {"EXTRA": "1"}}))

    for name, (pool_type, path) in POOLS.items():
        assert resolved[name]["type"] == pool_type
        assert resolved[name]["template"] == json.loads((ROOT / path).read_text())
    assert resolved["evergreen-process"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert docker["env"]["AWS_ACCESS_KEY_ID"] == "key-id-from-env"
    assert docker["env"]["AWS_SECRET_ACCESS_KEY"] == "secret-from-env"
    assert docker["env"]["EXTRA"] == "1" and docker["env"]["EVERGREEN_HOME"] == "/var/lib/evergreen"
    assert resolved["evergreen-gpu"]["env"]["EVERGREEN_HOME"] == "/var/lib/evergreen"
