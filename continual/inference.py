"""Scoring a trained model: logits, probabilities, the per-row scores the gate compares, and
the per-example loss the drift monitor watches. Plain PyTorch, batched, eval mode, results on
the CPU; token-id inputs of a text model are scored in length order (less padding per pass).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TEXT_BATCH = 128  # most rows per inference pass of a text model


def pad_token_id(model: nn.Module, X: Tensor) -> int | None:
    """The pad id when X holds right-padded token ids [N, L] for a text model, else None."""
    if X.ndim != 2 or X.is_floating_point():
        return None
    pad = getattr(model, "pad_token_id", None)  # peft wrappers forward attribute lookups
    return pad if isinstance(pad, int) else None


def model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, X: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Logits [N, C] as a CPU float tensor; the model is put in eval mode.

    Args:
        model: the model, on any device (inputs are moved to it).
        X: inputs [N, ...].
        batch_size: rows per forward pass.
    """
    model.eval()
    device = model_device(model)
    pad = pad_token_id(model, X)
    order = None
    if pad is not None:  # token ids: forward passes of similar length (continual.text)
        from continual.text import inverse_order, length_order

        order = length_order(X, pad)
        X = X[order]
        batch_size = min(batch_size, _TEXT_BATCH)  # attention memory grows with rows × length²
    chunks = [
        model(X[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)
    ]
    if not chunks:
        raise ValueError("predict_logits: X is empty")
    logits = torch.cat(chunks)
    return logits if order is None else logits[inverse_order(order)]


def predict_proba(model: nn.Module, X: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Class probabilities [N, C] (softmax of the logits), CPU float."""
    return torch.softmax(predict_logits(model, X, batch_size=batch_size), dim=-1)


def correct_mask(model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Boolean array [N]: whether the model's top class is the label (paired gate input)."""
    predicted = predict_logits(model, X, batch_size=batch_size).argmax(dim=-1)
    return (predicted == y.cpu()).numpy()


def row_scores(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """The per-row score the gate and every keep/discard check compare (higher is better):
    correctness (0/1) of a classifier, the mean token log-likelihood of a causal LM."""
    from continual.causal_lm import is_causal_lm, token_log_likelihood

    if is_causal_lm(model):
        return token_log_likelihood(model, X)
    return correct_mask(model, X, y)


def accuracy(model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Share of examples classified correctly."""
    return float(correct_mask(model, X, y, batch_size=batch_size).mean())


def per_example_loss(
    model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024
) -> np.ndarray:
    """Cross-entropy per example [N] as float64 (the drift monitor's input stream).

    For a causal LM (logits [N, L, V]) the row's mean next-token NLL over its non-pad targets,
    −`token_log_likelihood`: the same per-row quantity the gate scores, in nats, so a drift in
    it is a drift in log-perplexity. Cross-entropy of [N, L, V] logits against the flow's [N]
    placeholder labels has no meaning (torch refuses the shapes)."""
    from continual.causal_lm import is_causal_lm, token_log_likelihood

    if is_causal_lm(model):
        return -token_log_likelihood(model, X, batch_size=min(batch_size, 64))
    logits = predict_logits(model, X, batch_size=batch_size)
    return F.cross_entropy(logits, y.cpu().long(), reduction="none").double().numpy()
