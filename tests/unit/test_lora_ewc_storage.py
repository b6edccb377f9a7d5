"""The EWC state of a daily LoRA version (tasks/train.py `_adapted_ewc`, tasks/state.py,
continual/ewc.py): its own Fisher covers what it changed, its accumulator consolidates only
there, its anchor is its folded weights (not stored), and the accumulator's entries equal to
the parent's are stored by reference to the parent version's EWC file. Loading gives back the
exact state; a changed parent is refused; full (older) files still load; a Fisher merge reads a
missing own-Fisher entry as zero importance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from continual.checkpoint import CheckpointError, reference_model
from continual.ewc import EWC
from continual.ewc_state import FORMAT_WITH_PARENT, EWCStateError, ParentFisher
from continual.lineage import PARENT_FILE
from continual.merging import fisher_merge, zero_filled
from tasks.state import EWC_FILE, ModelState, make_trainable, read_state, write_state
from tasks.train_lora import _adapted_ewc, changed_parameters
from tests.tiny_bert import WORDS, tiny_bert
from tests.unit.test_parent_reference import Local, _daily_lora, _finetuned, _spec

GAMMA = 0.9


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tiny_bert(tmp_path / "base")


def _rows(model: torch.nn.Module, n: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    texts = [
        " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (5,), generator=generator))
        for _ in range(n)
    ]
    return model.tokenize(texts), torch.randint(0, 3, (n,), generator=generator)


def _champion_ewc(model: torch.nn.Module) -> EWC:
    """A weekly/monthly version's state: Fisher, own Fisher and anchor on every trainable."""
    make_trainable(model)
    X, y = _rows(model, seed=1)
    return EWC.from_model(model, X, y, lam=10.0, gamma=GAMMA, kind="sampled")


def _daily(state: ModelState, seed: int) -> ModelState:
    """A daily LoRA update as train_lora_gated leaves it: refitted head, trained adapter."""
    model = state.clone_model()
    peft_model = _daily_lora(model, seed)
    X, y = _rows(model, seed=seed)
    ewc = _adapted_ewc(state, peft_model, X, y)
    return ModelState(model=peft_model.eval(), spec=state.spec, ewc=ewc)


def _chain(base: Path, tmp_path: Path, links: int):
    """v1 (fine-tuned, full EWC state), then `links` daily versions each on the one before."""
    spec = _spec(base)
    local = Local()
    model = _finetuned(spec)
    v1 = write_state(ModelState(model=model, spec=spec, ewc=_champion_ewc(model)), tmp_path / "v1")
    source = local.add("1", v1)
    saved: dict[str, EWC] = {}
    for i in range(2, links + 2):
        parent = read_state(source.directory, parents=local)
        child = _daily(parent, seed=i)
        assert child.ewc is not None
        saved[str(i)] = child.ewc
        path = write_state(child, tmp_path / f"v{i}", parent=source, parents=local)
        source = local.add(str(i), path)
    return spec, local, saved


def _assert_same(loaded: EWC, saved: EWC) -> None:
    for got, want in (
        (loaded.fisher, saved.fisher),
        (loaded.anchor, saved.anchor),
        (loaded.own_fisher, saved.own_fisher),
    ):
        assert got is not None and want is not None
        assert list(got) == list(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert (loaded.lam, loaded.gamma, loaded.kind) == (saved.lam, saved.gamma, saved.kind)


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), list(handle.keys())


def test_own_fisher_and_consolidation_cover_only_what_the_update_changed(base, tmp_path):
    spec = _spec(base)
    model = _finetuned(spec)
    champion = ModelState(model=model, spec=spec, ewc=_champion_ewc(model))
    daily = _daily(champion, seed=2)
    assert daily.ewc is not None and champion.ewc is not None
    own = daily.ewc.own_fisher
    assert own is not None
    changed = {n for n in own}
    assert "classifier.weight" in changed and any(".query." in n for n in changed)
    assert not any(".key." in n or ".dense." in n for n in changed)  # not LoRA targets
    parent = champion.ewc.fisher
    for name, f in daily.ewc.fisher.items():
        if name in changed:
            assert torch.equal(f, torch.add(own[name], parent[name], alpha=GAMMA)), name
        else:
            assert torch.equal(f, parent[name]), name  # not decayed: not consolidated there
    folded = daily.ewc.anchor
    assert changed == changed_parameters(champion.model, _as_module(folded, spec))


def _as_module(parameters: dict[str, torch.Tensor], spec) -> torch.nn.Module:
    model = make_trainable(reference_model(spec))
    model.load_state_dict(parameters, strict=False)
    return model


def test_a_lora_version_stores_what_it_changed_and_loads_exactly(base, tmp_path):
    _, local, saved = _chain(base, tmp_path, links=2)
    for version in ("2", "3"):
        folder = local.folders[version]
        meta, keys = _header(folder / EWC_FILE)
        assert meta["format"] == FORMAT_WITH_PARENT and meta["anchor"] == "model"
        assert not [k for k in keys if k.startswith("anchor.")]
        own = saved[version].own_fisher
        assert own is not None
        stored = {k.removeprefix("fisher.") for k in keys if k.startswith("fisher.")}
        taken = set(json.loads(meta["from_parent"])) | set(json.loads(meta["parent_plus_own"]))
        assert stored | taken == set(saved[version].fisher) and not stored & taken
        assert not stored and set(json.loads(meta["parent_plus_own"])) == set(own)
        assert set(json.loads(meta["from_parent"])).isdisjoint(own)  # unchanged: referenced
        parent = json.loads((folder / PARENT_FILE).read_text())
        assert meta["parent_sha256"] == parent["manifest"][EWC_FILE]
        loaded = read_state(folder, parents=local)
        assert loaded.ewc is not None
        _assert_same(loaded.ewc, saved[version])  # v3's entries resolve through v2 to v1


def test_a_changed_parent_is_refused(base, tmp_path):
    _, local, saved = _chain(base, tmp_path, links=1)
    v2 = local.folders["2"]
    parent_ewc = local.folders["1"] / EWC_FILE
    original = parent_ewc.read_bytes()
    other = EWC.load(parent_ewc, model_parameters=read_state(local.folders["1"]).ewc.anchor)
    EWC({n: f * 2 for n, f in other.fisher.items()}, other.anchor, lam=1.0).save(parent_ewc)
    with pytest.raises(CheckpointError, match=r"parent models:/text-model/1 .*ewc\.safetensors"):
        read_state(v2, parents=local)
    # the EWC file on its own: without its parent, or with another parent file
    weights = {n: t for n, t in saved["2"].anchor.items()}
    with pytest.raises(EWCStateError, match="are its parent version's"):
        EWC.load(v2 / EWC_FILE, model_parameters=weights)
    parent_ewc.write_bytes(original)
    meta, _ = _header(v2 / EWC_FILE)
    wrong = ParentFisher(fisher=other.fisher, sha256="0" * 64)
    with pytest.raises(EWCStateError, match="the parent version changed"):
        EWC.load(v2 / EWC_FILE, model_parameters=weights, parent=lambda: wrong)
    from tasks.state import _fisher_file

    reference = _reference(v2)
    parent_ewc.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(EWCStateError, match=r"models:/text-model/1: its ewc\.safetensors is"):
        _fisher_file(local.folders["1"], reference, local)
    assert meta["parent_sha256"] == reference.manifest[EWC_FILE]


def _reference(folder: Path):
    from continual.lineage import read_parent

    reference = read_parent(folder)
    assert reference is not None
    return reference


def test_full_ewc_files_of_lora_versions_still_load(base, tmp_path):
    """A version written before (full accumulator, own Fisher and anchor stored) loads as it
    is, and a LoRA version stored against the base keeps a full accumulator."""
    _, local, saved = _chain(base, tmp_path, links=1)
    v2 = local.folders["2"]
    saved["2"].save(v2 / EWC_FILE)  # the layout of earlier releases: everything stored
    meta, keys = _header(v2 / EWC_FILE)
    assert meta["format"] == "evergreen.ewc/2" and any(k.startswith("anchor.") for k in keys)
    loaded = read_state(v2, parents=local)
    assert loaded.ewc is not None
    _assert_same(loaded.ewc, saved["2"])
    parent = read_state(local.folders["1"], parents=local)
    daily = _daily(parent, seed=5)
    assert daily.ewc is not None
    against_base = write_state(daily, tmp_path / "base-stored")  # no parent given
    meta, keys = _header(against_base / EWC_FILE)
    assert meta["format"] == "evergreen.ewc/2" and "from_parent" not in meta
    assert len([k for k in keys if k.startswith("fisher.")]) == len(daily.ewc.fisher)
    again = read_state(against_base)
    assert again.ewc is not None
    _assert_same(again.ewc, daily.ewc)


def test_a_fisher_merge_reads_a_missing_own_fisher_entry_as_no_importance():
    """Version A (a daily LoRA) has an own Fisher on `w` only; B on `w` and `v`. On `v` the
    merge takes B's value (A claims nothing there); on `w` both count; on `u`, which no own
    Fisher covers, the plain mean."""
    a = {"w": torch.tensor([0.0, 0.0]), "v": torch.tensor([1.0]), "u": torch.tensor([2.0])}
    b = {"w": torch.tensor([4.0, 4.0]), "v": torch.tensor([3.0]), "u": torch.tensor([4.0])}
    own_a = {"w": torch.tensor([3.0, 1.0])}
    own_b = {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([5.0])}
    fishers = zero_filled([a, b], [own_a, own_b])
    assert [list(f) for f in fishers] == [["w", "v"], ["w", "v"]]
    assert torch.equal(fishers[0]["v"], torch.zeros(1))
    merged = fisher_merge([a, b], fishers, eps=1e-12)
    assert torch.allclose(merged["w"], torch.tensor([1.0, 2.0]))
    assert torch.allclose(merged["v"], torch.tensor([3.0]))
    assert torch.allclose(merged["u"], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="not in the state dicts"):
        zero_filled([a, b], [{"x": torch.ones(1)}, own_b])


def test_the_merge_flow_step_merges_a_lora_version_with_a_partial_own_fisher(base, tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.memory import DataMemory
    from tasks.merge import merge_models

    _, local, _ = _chain(base, tmp_path, links=1)
    v1 = read_state(local.folders["1"], version="1", parents=local)
    v2 = read_state(local.folders["2"], version="2", parents=local)
    assert v2.ewc is not None and v2.ewc.own_fisher is not None and v1.ewc is not None
    assert set(v2.ewc.own_fisher) < set(v1.ewc.fisher)
    with disable_run_logger():
        merged, distances = merge_models.fn(None, [v1, v2], v1, DataMemory(), method="fisher")
    weights = dict(merged.model.named_parameters())
    first, second = dict(v1.model.named_parameters()), dict(v2.model.named_parameters())
    untouched = next(n for n in v1.ewc.fisher if n not in v2.ewc.own_fisher)
    # v2 did not change it (equal to v1's), and claims nothing: v1's value
    assert torch.equal(first[untouched], second[untouched])
    assert torch.allclose(weights[untouched], first[untouched])
    changed = next(n for n in v2.ewc.own_fisher if ".query." in n)
    assert not torch.equal(weights[changed], first[changed])
    assert set(distances) == {"merge.distance.v1", "merge.distance.v2"}


def test_minilm_daily_lora_ewc_state_is_its_own_fisher(tmp_path):
    """docs/TEXT.md's figures: a daily LoRA version on a fine-tuned MiniLM champion, its EWC
    state as earlier releases stored it (accumulator, own Fisher and anchor of every trainable
    parameter) vs now, and the version's whole size; loaded back exactly."""
    from tests.unit.test_parent_reference import MINILM, _size

    spec = _spec(MINILM, n_features=32)
    local = Local()
    model = make_trainable(_finetuned(spec))
    generator = torch.Generator().manual_seed(0)
    fisher = {
        n: torch.rand(p.shape, generator=generator)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    champion_ewc = EWC(fisher, anchor, lam=10.0, gamma=GAMMA, own_fisher=fisher, kind="sampled")
    v1 = write_state(ModelState(model=model, spec=spec, ewc=champion_ewc), tmp_path / "v1")
    source = local.add("1", v1)
    daily = _daily(read_state(v1, parents=local), seed=2)
    assert daily.ewc is not None and daily.ewc.own_fisher is not None
    v2 = write_state(daily, tmp_path / "v2", parent=source, parents=local)
    before = tmp_path / "before.safetensors"  # the same state in the earlier layout
    full_own = {n: daily.ewc.own_fisher.get(n, f) for n, f in daily.ewc.fisher.items()}
    EWC(daily.ewc.fisher, daily.ewc.anchor, lam=10.0, own_fisher=full_own).save(before)
    sizes = {
        "ewc before": before.stat().st_size,
        "ewc now": (v2 / EWC_FILE).stat().st_size,
        "version now": _size(v2),
        "version before": _size(v2) - (v2 / EWC_FILE).stat().st_size + before.stat().st_size,
        "parent ewc": (v1 / EWC_FILE).stat().st_size,
        "parent": _size(v1),
    }
    print("MiniLM daily LoRA sizes (bytes):", sizes, "own Fisher on", len(daily.ewc.own_fisher))
    assert sizes["ewc before"] > 120e6 and sizes["ewc now"] < 10e6, sizes
    loaded = read_state(v2, parents=local)
    assert loaded.ewc is not None
    _assert_same(loaded.ewc, daily.ewc)
