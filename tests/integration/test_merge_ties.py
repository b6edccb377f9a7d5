"""TIES / DARE merges through the CLI on the tabular MLP: bootstrap → daily-lora → weekly-replay,
then `evergreen run merge --method ties|dare` of the two updates, gated and registered like the
Fisher merge, on their common ancestor (the bootstrap version); a merge of the bootstrap version,
which has no registered ancestor, is refused with the lineage in the message."""

from __future__ import annotations

import json

import pytest
import torch

from continual.checkpoint import load_checkpoint
from continual.standardization import FIRST_WEIGHT
from evergreen.cadences import run_flow
from evergreen.cli import main
from evergreen.config import load_config
from evergreen.errors import ExitCode
from model_registry.registry import Registry
from tests.digits_pipeline import digits_frame, write_batch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FIRST_LAYER = FIRST_WEIGHT.removesuffix("weight")


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """v1 bootstrap; v2 daily LoRA and v3 weekly replay, both trained from a champion that
    descends from v1 (v3 from v2 if v2 was promoted)."""
    root = tmp_path_factory.mktemp("ties")
    landing = root / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 700)))
    write_batch(landing, "2026-01-02", digits_frame(slice(700, 1000)))
    write_batch(landing, "2026-01-05", digits_frame(slice(1000, 1300), shift=1))
    model = {"family": "mlp", "hidden": [32, 16]}
    config = write_config(root, landing, root / "home", model=model)
    versions = []
    for flow, batch in (
        ("bootstrap", "2026-01-01"),
        ("daily-lora", "2026-01-02"),
        ("weekly-replay", "2026-01-05"),
    ):
        result = run_flow(flow, config_path=str(config), batch_ids=[batch])
        assert result.get("version"), result
        versions.append(str(result["version"]))
    cfg = load_config(config)
    return {"config": str(config), "versions": versions, "registry": Registry.from_config(cfg)}


def _cli_merge(lineage, capsys, *flags: str) -> tuple[int, dict]:
    code = main(["run", "merge", "--config", lineage["config"], *flags])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else {}


def _weights(registry: Registry, version: str, tmp_path) -> dict[str, torch.Tensor]:
    target = tmp_path / f"v{version}"
    registry.download(version, target)
    return load_checkpoint(target)[0].state_dict()


def test_ties_merge_of_two_updates_is_gated_and_registered(lineage, capsys, tmp_path):
    v1, v2, v3 = lineage["versions"]
    code, result = _cli_merge(lineage, capsys, "--versions", v2, v3, "--method", "ties")
    assert code == 0 and result["decision"] in ("promoted", "rejected"), result
    metrics = result["metrics"]
    assert metrics["merge.density"] == pytest.approx(0.2)  # the documented default for ties
    assert f"merge.ancestor.v{v1}" in metrics  # measured against the bootstrap version
    assert 0 < metrics["merge.kept_fraction"] < 0.5  # trimmed to ~20 % per version
    registry = lineage["registry"]
    tags = registry.get_version(result["version"]).tags
    assert tags["evergreen.cadence"] == "merge"
    assert tags["evergreen.method"] == f"ties-merge:{v2}+{v3}"
    assert tags["evergreen.gate_decision"] in ("pass", "fail")
    # the registered weights are θ_v1 + TIES(θ_v2 − θ_v1, θ_v3 − θ_v1): where neither update
    # kept an entry the merge equals the ancestor. Layers after the first only: a widened
    # standardisation would rewrite the whole first layer (`align_for_merge`).
    merged = _weights(registry, result["version"], tmp_path)
    ancestor = _weights(registry, v1, tmp_path)
    later = [k for k in ancestor if k.endswith("weight") and not k.startswith(FIRST_LAYER)]
    moved = sum(int((merged[k] != ancestor[k]).sum()) for k in later)
    total = sum(ancestor[k].numel() for k in later)
    assert later and 0 < moved / total < 0.5


def test_dare_merge_is_reproducible_with_its_seed(lineage, capsys, tmp_path):
    _, v2, v3 = lineage["versions"]
    flags = ("--versions", v2, v3, "--method", "dare", "--density", "0.5", "--seed", "3")
    runs = [_cli_merge(lineage, capsys, *flags) for _ in range(2)]
    assert all(code == 0 for code, _ in runs), runs
    first, second = (
        _weights(lineage["registry"], r["version"], tmp_path / str(i))
        for i, (_, r) in enumerate(runs)
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0][1]["metrics"]["merge.seed"] == 3.0


def test_a_version_without_a_registered_ancestor_is_refused(lineage, capsys):
    v1, v2, _ = lineage["versions"]
    before = len(lineage["registry"].versions(limit=100))
    code = main(
        ["run", "merge", "--config", lineage["config"], "--versions", v1, v2, "--method", "ties"]
    )
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE  # another method or other versions, not a bug (was 70)
    assert "share no registered ancestor" in err and "trained from scratch" in err, err
    assert len(lineage["registry"].versions(limit=100)) == before  # nothing registered
