"""Checkpoint and resume of the training loop (continual/resume.py, continual/training.py).

The contract: a run interrupted after k steps and resumed from its saved state ends with the
same weights, bit for bit, as one never interrupted — with replay sampling, EWC, dropout and
length-grouped text batches — and a state that does not belong to the run, or cannot be read,
is discarded instead of resumed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from continual.ewc import EWC
from continual.models import ModelSpec, build_model
from continual.replay import ReservoirBuffer
from continual.resume import Checkpointing, tensor_digest
from continual.training import TrainResult, TrainSettings, train
from tests.digits_tensors import digits_tensors

CPU = torch.device("cpu")


class Interrupted(Exception):
    """Stands for the SIGKILL: the loop stops between two steps, nothing after runs."""


def _digits() -> tuple[torch.Tensor, torch.Tensor, ModelSpec]:
    return digits_tensors(dropout=0.2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(_digits()[2])


def _methods(model: nn.Module) -> dict:
    """Replay at half of each batch and a real EWC anchored at the starting weights."""
    X, y, _ = _digits()
    buffer = ReservoirBuffer(200, 64, seed=0)
    buffer.add(X[1200:1400], y[1200:1400], "old")
    ewc = EWC.from_model(model, X[1200:1400], y[1200:1400], lam=10.0)
    return {"replay": buffer, "replay_ratio": 0.5, "ewc": ewc}


SETTINGS = TrainSettings(steps=47, batch_size=32, lr=3e-3, seed=3)


def _run(
    path: Path | None, *, stop_after: int | None = None, fingerprint: str = "run", **every
) -> tuple[nn.Module, TrainResult | None]:
    """Train a fresh copy of the same model on the same data; `stop_after` interrupts it."""
    X, y, _ = _digits()
    model = _mlp()
    methods = _methods(model)

    def on_step(step: int, loss: float) -> None:
        if step == stop_after:
            raise Interrupted

    checkpointing = None
    if path is not None:
        checkpointing = Checkpointing(path, fingerprint, **({"every_steps": 10} | every))
    try:
        result = train(
            model, X[:300], y[:300], SETTINGS, device=CPU, checkpointing=checkpointing,
            on_step=on_step, **methods,
        )  # fmt: skip
    except Interrupted:
        return model, None
    return model, result


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_interrupted_run_resumed_ends_bitwise_identical(tmp_path: Path) -> None:
    reference, expected = _run(None)
    state = tmp_path / "state.safetensors"
    _, none = _run(state, stop_after=23)  # saved at 10 and 20; steps 21–23 are lost
    assert none is None and state.is_file()
    resumed_at: list[tuple[int, int]] = []
    X, y, _ = _digits()
    model = _mlp()
    checkpointing = Checkpointing(
        state, "run", every_steps=10, on_resumed=lambda k, n: resumed_at.append((k, n))
    )
    result = train(
        model, X[:300], y[:300], SETTINGS, device=CPU, checkpointing=checkpointing,
        **_methods(model),
    )  # fmt: skip
    assert resumed_at == [(20, 47)] and result.resumed_at == 20
    assert expected is not None
    assert _same_weights(model, reference)
    assert result.losses == expected.losses and result.examples_seen == expected.examples_seen
    assert result.steps == 47


def test_a_finished_run_leaves_its_last_state_and_resuming_it_trains_nothing(tmp_path) -> None:
    state = tmp_path / "state.safetensors"
    first, done = _run(state, every_steps=0)  # no cadence: only the final state is written
    second, again = _run(state, every_steps=0)
    assert done is not None and again is not None
    assert again.resumed_at == 47 and again.losses == done.losses
    assert _same_weights(first, second)


def test_a_time_cadence_saves_without_a_step_cadence(tmp_path: Path) -> None:
    state = tmp_path / "state.safetensors"
    _run(state, stop_after=5, every_steps=0, every_seconds=1e-9)  # due after every step
    reference, _ = _run(None)
    resumed, result = _run(state, every_steps=0, every_seconds=1e-9)
    assert result is not None and result.resumed_at == 5
    assert _same_weights(resumed, reference)


def test_a_state_of_another_run_is_discarded_not_resumed(tmp_path: Path, caplog) -> None:
    state = tmp_path / "state.safetensors"
    _run(state, stop_after=15, fingerprint="other data")
    reference, _ = _run(None)
    with caplog.at_level(logging.WARNING, logger="continual.resume"):
        model, result = _run(state)
    assert result is not None and result.resumed_at == 0
    assert _same_weights(model, reference)
    assert "another run" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_state_is_discarded_and_the_run_starts_over(tmp_path, damage) -> None:
    state = tmp_path / "state.safetensors"
    _run(state, stop_after=15)
    data = state.read_bytes()
    state.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage]
    )
    reference, _ = _run(None)
    model, result = _run(state)
    assert result is not None and result.resumed_at == 0
    assert _same_weights(model, reference)


def test_a_failed_save_keeps_the_previous_state_whole_and_training_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    import continual.files as files

    state = tmp_path / "state.safetensors"
    _run(state, stop_after=12)  # saved at step 10
    saved = state.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    _, result = _run(state, stop_after=25)  # resumes at 10; the save at 20 fails
    assert result is None and state.read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary file


class _TinyText(nn.Module):
    """A token-id classifier with a `pad_token_id`: the loop groups its batches by length."""

    pad_token_id = 0

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8, padding_idx=0)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(self.drop(pooled))


def _text_run(path: Path | None, stop_after: int | None = None) -> tuple[nn.Module, int]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (90, 12), generator=gen)
    lengths = torch.randint(2, 13, (90,), generator=gen)
    ids[torch.arange(12) >= lengths[:, None]] = 0  # right-padded rows of different lengths
    labels = torch.randint(0, 3, (90,), generator=gen)
    torch.manual_seed(0)
    model = _TinyText()

    def on_step(step: int, loss: float) -> None:
        if step == stop_after:
            raise Interrupted

    checkpointing = None if path is None else Checkpointing(path, "text", every_steps=4)
    settings = TrainSettings(steps=30, batch_size=8, seed=2)  # 11 batches per epoch
    try:
        result = train(model, ids, labels, settings, device=CPU, checkpointing=checkpointing,
                       on_step=on_step)  # fmt: skip
    except Interrupted:
        return model, -1
    return model, result.resumed_at


def test_length_grouped_text_batches_resume_mid_epoch(tmp_path: Path) -> None:
    reference, _ = _text_run(None)
    state = tmp_path / "state.safetensors"
    _text_run(state, stop_after=18)  # saved at 16: inside the second epoch
    resumed, at = _text_run(state)
    assert at == 16
    assert _same_weights(resumed, reference)


def test_tensor_digest_sees_values_shapes_and_names() -> None:
    a = torch.arange(6.0)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.reshape(2, 3))
    assert tensor_digest({"x": a}) != tensor_digest({"y": a})
    assert tensor_digest(a) != tensor_digest(a + 1e-7)
