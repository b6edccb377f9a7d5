"""What a GPU user expects of the training loop (continual/training.py, continual/acceleration.py), checked on CPU:
gradient accumulation, the precision setting, torch.compile, gradient checkpointing of a
Hugging Face model, and losses read back from the device in batches."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from continual.acceleration import _hf_checkpointing, activation_checkpointing, autocast_dtype
from continual.causal_lm import HFCausalLM
from continual.divergence import TrainingDivergedError
from continual.ewc import EWC
from continual.models import CAUSAL_LM, ModelSpec, build_model
from continual.replay import ReservoirBuffer
from continual.resume import Checkpointing
from continual.training import (
    TrainResult,
    TrainSettings,
    train,
)
from evergreen.config import TrainConfig
from tests.digits_tensors import digits_tensors as _digits
from tests.tiny_llama import sentences, tiny_llama

CPU = torch.device("cpu")


def _mlp(dropout: float = 0.0) -> nn.Module:
    spec = _digits()[2]
    spec = ModelSpec.from_dict({**spec.to_dict(), "dropout": dropout})
    torch.manual_seed(0)
    return build_model(spec)


def _max_gap(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> HFCausalLM:
    path = tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    built = build_model(ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path=str(path)))
    assert isinstance(built, HFCausalLM)
    return built


# --- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_make_the_same_update_as_one_batch(k: int) -> None:
    """One optimiser step on 64 rows as k micro-batches of 64/k = the step on the whole batch."""
    X, y, _ = _digits()
    whole, split = _mlp(), _mlp()
    settings = TrainSettings(steps=1, batch_size=64, lr=1e-2, seed=5)
    a = train(whole, X[:500], y[:500], settings, device=CPU)
    b = train(split, X[:500], y[:500], TrainSettings(**{**vars(settings), "grad_accum_steps": k}))
    assert _max_gap(whole, split) < 1e-6
    assert b.losses[0] == pytest.approx(a.losses[0], abs=1e-6)
    assert a.examples_seen == b.examples_seen == 64


def test_accumulation_keeps_replay_and_gradient_mode_ewc_consistent() -> None:
    """Replay is mixed into the whole batch before it is split, and the EWC gradient is added
    once to the accumulated gradient (before clipping): several steps still agree."""
    X, y, _ = _digits()
    runs = []
    for k in (1, 4):
        model = _mlp()
        buffer = ReservoirBuffer(200, 64, seed=0)
        buffer.add(X[1200:1400], y[1200:1400], "old")
        ewc = EWC.from_model(model, X[1200:1400], y[1200:1400], lam=10.0, mode="gradient")
        settings = TrainSettings(steps=5, batch_size=32, lr=3e-3, seed=3, grad_accum_steps=k)
        result = train(
            model, X[:300], y[:300], settings, device=CPU, ewc=ewc, replay=buffer,
            replay_ratio=0.5,
        )  # fmt: skip
        runs.append((model, result))
    (one, r1), (four, r4) = runs
    assert _max_gap(one, four) < 1e-5  # five Adam steps amplify last-bit differences a little
    assert np.allclose(r1.losses, r4.losses, atol=1e-6)


def test_micro_batches_of_a_causal_lm_are_weighted_by_tokens(llama: HFCausalLM) -> None:
    """Rows of different lengths: weighting micro-batches by rows would not give the batch's
    token-mean loss; weighting by predicted tokens does."""
    ids = llama.tokenize(sentences("kitchen", 32, seed=1))
    y = torch.zeros(len(ids), dtype=torch.long)
    whole, split = copy.deepcopy(llama), copy.deepcopy(llama)
    settings = TrainSettings(steps=1, batch_size=16, lr=1e-2, seed=0)
    a = train(whole, ids, y, settings, device=CPU)
    b = train(split, ids, y, TrainSettings(**{**vars(settings), "grad_accum_steps": 4}))
    assert b.losses[0] == pytest.approx(a.losses[0], abs=1e-6)  # row weights would miss this
    # Adam's first step is ≈ lr·sign(g): last-bit noise on gradients near 0 (the pad row of the
    # embedding) moves a weight by up to ~1e-6 of lr=1e-2 apart.
    assert _max_gap(whole, split) < 1e-5


class Interrupted(Exception):
    """Stands for a SIGKILL between two steps."""


def _resumable_run(
    path: Path, *, stop_after: int | None, sync_every: int
) -> tuple[nn.Module, TrainResult | None]:
    X, y, _ = _digits()
    model = _mlp(dropout=0.2)
    buffer = ReservoirBuffer(200, 64, seed=0)
    buffer.add(X[1200:1400], y[1200:1400], "old")
    ewc = EWC.from_model(model, X[1200:1400], y[1200:1400], lam=10.0)
    settings = TrainSettings(
        steps=31, batch_size=32, lr=3e-3, seed=3, grad_accum_steps=4, sync_every=sync_every
    )

    def on_step(step: int, loss: float) -> None:
        if step == stop_after:
            raise Interrupted

    try:
        result = train(
            model, X[:300], y[:300], settings, device=CPU, ewc=ewc, replay=buffer,
            replay_ratio=0.5, on_step=on_step,
            checkpointing=Checkpointing(path, "run", every_steps=10),
        )  # fmt: skip
    except Interrupted:
        return model, None
    return model, result


@pytest.mark.parametrize("sync_every", [1, 4])
def test_resume_with_accumulation_ends_bitwise_identical(tmp_path: Path, sync_every: int) -> None:
    """Steps (and checkpoints) count optimiser steps: a run killed after step 23 resumes at 20
    and ends with the weights and losses of a run never interrupted, bit for bit."""
    reference, expected = _resumable_run(tmp_path / "ref", stop_after=None, sync_every=sync_every)
    state = tmp_path / "state.safetensors"
    _, none = _resumable_run(state, stop_after=23, sync_every=sync_every)
    assert none is None and state.is_file()
    resumed, result = _resumable_run(state, stop_after=None, sync_every=sync_every)
    assert expected is not None and result is not None
    assert result.resumed_at == 20 and result.steps == 31
    sa, sb = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert result.losses == expected.losses and result.examples_seen == expected.examples_seen


def test_accumulation_is_bounded_by_the_batch() -> None:
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainSettings(batch_size=4, grad_accum_steps=5)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig.model_validate({"batch_size": 4, "grad_accum_steps": 5})
    assert TrainConfig().grad_accum_steps == 1


# --- host–device syncs ----------------------------------------------------------------------


def test_losses_read_back_in_batches_are_the_same_losses_in_order() -> None:
    X, y, _ = _digits()
    seen: dict[int, list[tuple[int, float]]] = {}
    results = {}
    for every in (1, 7):
        calls: list[tuple[int, float]] = []
        settings = TrainSettings(steps=20, batch_size=32, seed=1, sync_every=every)
        results[every] = train(
            _mlp(), X[:300], y[:300], settings, device=CPU,
            on_step=lambda s, v, into=calls: into.append((s, v)),  # type: ignore[misc]
        )  # fmt: skip
        seen[every] = calls
    assert [s for s, _ in seen[7]] == list(range(1, 21))
    assert seen[7] == seen[1] and results[7].losses == results[1].losses


def test_a_late_read_back_still_aborts_and_names_the_bad_step() -> None:
    """With sync_every=5 the NaN of step 3 is found at step 5's read-back, reported as step 3."""
    X, y, _ = _digits()
    X = X[:64].clone()
    X[7, 3] = float("nan")
    calls: list[int] = []
    batches = TrainSettings(steps=20, batch_size=32, seed=0, sync_every=5)
    with pytest.raises(TrainingDivergedError, match=r"step \d+: the loss is nan") as caught:
        train(_mlp(), X, y[:64], batches, device=CPU, on_step=lambda s, v: calls.append(s))
    bad = int(str(caught.value).split("step ")[1].split(":")[0])
    assert bad <= 2  # 64 rows = 2 batches per epoch: the NaN row is in step 1 or 2
    assert calls == []  # no step at or after the bad one was reported as a finite loss


# --- precision ------------------------------------------------------------------------------


def test_precision_resolution() -> None:
    assert autocast_dtype("auto", CPU) is None  # fp32 on CPU: a no-op
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # an explicit ask: CPU autocast
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.model_validate({"precision": "fp16"})


def test_auto_precision_on_cpu_is_plain_fp32() -> None:
    X, y, _ = _digits()
    a, b = _mlp(), _mlp()
    ra = train(a, X[:300], y[:300], TrainSettings(steps=10, precision="auto"), device=CPU)
    rb = train(b, X[:300], y[:300], TrainSettings(steps=10, precision="fp32"), device=CPU)
    assert ra.losses == rb.losses and _max_gap(a, b) == 0.0


def test_bf16_on_cpu_runs_under_cpu_autocast_with_fp32_weights() -> None:
    X, y, _ = _digits()
    model = _mlp()
    dtypes: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    bf16 = train(model, X[:300], y[:300], TrainSettings(steps=60, precision="bf16"), device=CPU)
    for hook in hooks:
        hook.remove()
    assert dtypes == {torch.bfloat16}  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32
    fp32 = train(_mlp(), X[:300], y[:300], TrainSettings(steps=60, precision="fp32"), device=CPU)
    assert bf16.last_loss < 0.5 * bf16.first_loss
    assert np.allclose(bf16.losses, fp32.losses, rtol=5e-2, atol=5e-2)  # bf16 rounding only


# --- torch.compile --------------------------------------------------------------------------


def _has_c_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_c_compiler(), reason="no C compiler: inductor cannot build on CPU")
def test_compiled_training_matches_the_plain_loop() -> None:
    X, y, _ = _digits()
    settings = TrainSettings(steps=20, batch_size=32, seed=2, compile=True)
    torch._dynamo.reset()
    started = time.perf_counter()
    compiled = train(_mlp(), X[:320], y[:320], settings, device=CPU)
    took = time.perf_counter() - started
    plain = train(_mlp(), X[:320], y[:320], TrainSettings(**{**vars(settings), "compile": False}))
    logging.getLogger(__name__).info("compiled run: %.1fs (with compilation)", took)
    assert np.allclose(compiled.losses, plain.losses, atol=1e-4)


def test_a_failed_compilation_falls_back_to_the_plain_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real backend failure (inductor pointed at a compiler that does not exist, its caches
    off): the run trains uncompiled, says so, and matches the plain loop."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/evergreen-cc",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    monkeypatch.setattr(inductor, "force_disable_caches", True)
    torch._dynamo.reset()
    X, y, _ = _digits()
    settings = TrainSettings(steps=5, batch_size=32, seed=2, compile=True)
    with caplog.at_level(logging.WARNING, logger="continual.acceleration"):
        fell_back = train(_mlp(), X[:320], y[:320], settings, device=CPU)
    torch._dynamo.reset()
    plain = train(_mlp(), X[:320], y[:320], TrainSettings(**{**vars(settings), "compile": False}))
    assert "torch.compile failed" in caplog.text
    assert fell_back.losses == plain.losses


# --- gradient checkpointing -----------------------------------------------------------------


def _grads(model: nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    from continual.causal_lm import next_token_loss

    model.train()
    model.zero_grad()
    loss = next_token_loss(model(ids), ids, int(model.pad_token_id))  # type: ignore[arg-type]
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(
    llama: HFCausalLM, lora: bool
) -> None:
    from continual.lora import LoraSettings, attach_lora

    ids = llama.tokenize(sentences("harbour", 16, seed=4))
    base = copy.deepcopy(llama)
    model: nn.Module = attach_lora(base, LoraSettings(r=4)) if lora else base
    hf = base.lm  # peft wraps `base` in place: the same Hugging Face module
    loss, grads = _grads(model, ids)
    with activation_checkpointing(model, True):
        assert _hf_checkpointing(hf, "is")
        loss_ckpt, grads_ckpt = _grads(model, ids)
    assert not _hf_checkpointing(hf, "is")  # switched off after the run
    assert loss_ckpt == pytest.approx(loss, abs=1e-5)
    assert grads.keys() == grads_ckpt.keys() and grads  # LoRA gets gradients (non-reentrant)
    for name, g in grads.items():
        assert torch.allclose(grads_ckpt[name], g, atol=1e-5), name


def test_training_with_gradient_checkpointing_matches(llama: HFCausalLM) -> None:
    ids = llama.tokenize(sentences("office", 48, seed=2))
    y = torch.zeros(len(ids), dtype=torch.long)
    plain, ckpt = copy.deepcopy(llama), copy.deepcopy(llama)
    settings = TrainSettings(steps=3, batch_size=16, lr=1e-2, seed=0)
    a = train(plain, ids, y, settings, device=CPU)
    b = train(ckpt, ids, y, TrainSettings(**{**vars(settings), "gradient_checkpointing": True}))
    assert np.allclose(a.losses, b.losses, atol=1e-5)
    assert _max_gap(plain, ckpt) < 1e-5
    assert not _hf_checkpointing(ckpt.lm, "is")


def test_gradient_checkpointing_on_a_model_without_it_warns_and_trains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    X, y, _ = _digits()
    settings = TrainSettings(steps=3, gradient_checkpointing=True)
    with caplog.at_level(logging.WARNING, logger="continual.acceleration"):
        result = train(_mlp(), X[:300], y[:300], settings, device=CPU)
    assert result.steps == 3 and "gradient_checkpointing" in caplog.text


def test_the_config_knobs_reach_the_loop_and_each_rank() -> None:
    from continual.distributed import rank_settings
    from tasks.train import settings_from

    config = TrainConfig.model_validate(
        {"batch_size": 8, "grad_accum_steps": 4, "precision": "bf16", "compile": True,
         "gradient_checkpointing": True, "sync_every": 3}
    )  # fmt: skip
    settings = settings_from(config, n_rows=100)
    assert (settings.grad_accum_steps, settings.precision, settings.sync_every) == (4, "bf16", 3)
    assert settings.compile and settings.gradient_checkpointing
    rank = rank_settings(settings, rank=1, world_size=4)  # 2 rows per rank: 2 micro-batches
    assert (rank.batch_size, rank.grad_accum_steps) == (2, 2)
