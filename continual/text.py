"""Text as model input: the model's own tokenizer, a bounded length, batching by length.

Text rows become LongTensor token ids [N, max_length], right-padded with the tokenizer's pad id.
A fixed width lets token ids flow through everything built for tensors — mini-batches, the
replay buffer, the Fisher, the paired gate — with no second code path; the model cuts every
batch to its longest row (`HFTextClassifier.forward`), so compute follows the real lengths.
`length_order` sorts rows by length for inference, so one forward pass holds rows of similar
length and little padding.

Tokenizers load from a local directory only (never downloaded) and are cached per directory:
loading one takes ~0.1 s and every frame of every flow goes through here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


@functools.lru_cache(maxsize=8)
def load_tokenizer(directory: str) -> Any:
    """The tokenizer saved in a local Hugging Face model directory (cached per directory).

    Raises:
        OSError: the directory holds no tokenizer (transformers' own message names the files).
    """
    from transformers import AutoTokenizer  # heavy import: only for text models

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenizer_for(hf_path: str) -> Any:
    """The tokenizer of `hf_path` (a directory or "package:NAME", see `resolve_hf_path`).

    Raises:
        continual.base_model.ModelPathError: `hf_path` is no local model directory (checked
            first: transformers would try the Hub and say it could not connect).
    """
    from continual.base_model import local_hf_directory

    return load_tokenizer(str(local_hf_directory(hf_path)))


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """Token ids [len(texts), max_length], right-padded and truncated to `max_length`.

    Right padding is forced (whatever the tokenizer's default) because models trim batches to
    their longest row by cutting trailing columns.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    encoded = tokenizer(
        [str(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        padding_side="right",
        return_tensors="pt",
    )
    ids: Tensor = encoded["input_ids"].long()
    return ids


def sequence_lengths(ids: Tensor, pad_token_id: int) -> Tensor:
    """Non-pad tokens per row [N] of right-padded token ids [N, L]."""
    return (ids != pad_token_id).sum(dim=1)


def length_order(ids: Tensor, pad_token_id: int) -> Tensor:
    """Row order [N] that sorts right-padded token ids by length (stable, longest first).

    Inference in this order puts rows of similar length in one forward pass, so dynamic padding
    removes nearly all padding; undo it with `inverse_order`.
    """
    return torch.argsort(sequence_lengths(ids, pad_token_id), descending=True, stable=True)


def inverse_order(order: Tensor) -> Tensor:
    """The permutation that undoes `order` (rows[order][inverse_order(order)] == rows)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse
