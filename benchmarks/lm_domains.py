"""The causal-LM benchmark's pure parts: real-text domains, a tiny Llama, perplexity maths.

- Domains: the prose sentences of the module docstrings of installed packages
  (`demo.text_timeline.package_sentences`: read with `ast`, never imported, nothing downloaded),
  one package per domain. Each domain keeps a fixed number of sentences picked by salted hash,
  and a fixed share of those (again by hash) is held out: never landed, never trained on, only
  measured. A sentence found in two packages is dropped from both (licence boilerplate).
- Model: a randomly initialised Llama-style `LlamaForCausalLM` from a `LlamaConfig` and a
  byte-level BPE tokenizer trained with `tokenizers` on the landed text of every domain only
  (the tokenizer is fixed before the sequence starts, as a pretrained LLM's is), saved to a
  local folder that `model.hf_path` points at.
- Perplexity: L[k, j] = log-perplexity of domain j's held-out text after step k (token-weighted:
  total NLL / predicted tokens). Average = mean over domains of the last row (its exp is the
  geometric-mean perplexity); forgetting of j < T = L[T, j] − min over k in [j, T) of L[k, j]
  (the increase since its best after it was learned, as `continual.metrics` defines forgetting
  for accuracy), averaged over the earlier domains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"


@dataclass(frozen=True)
class Domain:
    """One domain of the sequence: the text that lands (`train`) and the held-out text."""

    name: str
    train: list[str]
    held_out: list[str]


@dataclass(frozen=True)
class ModelSize:
    """The tiny Llama: `hidden`-wide, `layers` deep, `vocab` BPE tokens."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    vocab: int = 1024
    max_length: int = 64


def _rank(texts: Sequence[str], salt: str) -> list[str]:
    """`texts` in salted-hash order: deterministic and independent of the input order."""
    return sorted(texts, key=lambda t: hashlib.sha256(f"{salt}|{t}".encode()).digest())


def split_domains(
    pools: dict[str, list[str]],
    per_domain: int,
    held_out_fraction: float,
    salt: str = "evergreen-causal-lm",
) -> list[Domain]:
    """Domains from sentence pools (in the dict's order): `per_domain` sentences each, of which
    round(`held_out_fraction` × `per_domain`) are held out; sentences shared by pools dropped.

    Raises:
        ValueError: a pool has fewer than `per_domain` sentences left, or the fraction leaves
            no held-out or no landed text.
    """
    n_held = round(held_out_fraction * per_domain)
    if not 0 < n_held < per_domain:
        raise ValueError(
            f"held_out_fraction {held_out_fraction} of {per_domain} sentences leaves no "
            "held-out or no landed text"
        )
    counts: dict[str, int] = {}
    for pool in pools.values():
        for sentence in set(pool):
            counts[sentence] = counts.get(sentence, 0) + 1
    domains = []
    for name, pool in pools.items():
        own = [s for s in dict.fromkeys(pool) if counts[s] == 1]
        if len(own) < per_domain:
            raise ValueError(
                f"domain {name!r} has {len(own)} usable sentences, {per_domain} needed"
            )
        picked = _rank(own, salt)[:per_domain]
        domains.append(Domain(name, train=picked[n_held:], held_out=picked[:n_held]))
    return domains


def build_domains(
    packages: Sequence[str], per_domain: int, held_out_fraction: float = 0.2
) -> list[Domain]:
    """The domain sequence from installed packages' module docstrings (see `split_domains`)."""
    from demo.text_timeline import package_sentences

    return split_domains({p: package_sentences(p) for p in packages}, per_domain, held_out_fraction)


def train_tokenizer(texts: Sequence[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (no unknown tokens on any text), adding
    [BOS] … [EOS] around each row so the first word is predicted too; [PAD] pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, core.token_to_id(BOS)), (EOS, core.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )


def build_tiny_llama(directory: Path, texts: Sequence[str], size: ModelSize, seed: int = 0) -> Path:
    """Save a randomly initialised Llama-style LM and its BPE tokenizer (trained on `texts`)
    in `directory`; returns it. Tied input/output embeddings, no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, size.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=2 * size.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pretrain_tiny_llama(
    directory: Path,
    texts: Sequence[str],
    steps: int,
    max_length: int,
    *,
    batch_size: int = 16,
    lr: float = 3e-3,
) -> Path:
    """Pre-train the LM saved in `directory` on `texts` for `steps` steps (warm-up 5 %, cosine to
    0.1 × lr, as the family trains) and save it back: the general-purpose base a continual
    pre-training sequence starts from, instead of random weights."""
    import torch

    from continual.causal_lm import HFCausalLM
    from continual.training import TrainSettings, train

    model = HFCausalLM(directory, max_length=max_length)
    X = model.tokenize(list(texts))
    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=0,
        lr_schedule="cosine",
        warmup_steps=round(0.05 * steps),
        min_lr_ratio=0.1,
    )
    train(model, X, torch.zeros(len(X), dtype=torch.long), settings, device="cpu")
    model.lm.save_pretrained(directory)
    return directory


def corpus_log_perplexity(row_log_likelihood: np.ndarray, predicted_tokens: np.ndarray) -> float:
    """Token-weighted log-perplexity of a text set: total NLL / total predicted tokens, from
    each row's mean token log-likelihood (what the served model returns) and token count.

    Raises:
        ValueError: the arrays differ in length or no token is predicted.
    """
    ll = np.asarray(row_log_likelihood, dtype=float)
    n = np.asarray(predicted_tokens, dtype=float)
    if ll.shape != n.shape or n.sum() <= 0:
        raise ValueError(f"need matching rows with tokens, got {ll.shape} and {n.shape}")
    return float(-(ll * n).sum() / n.sum())


def forgetting(L: np.ndarray) -> float:
    """Mean over earlier domains j < T of L[T, j] − min_{j ≤ k < T} L[k, j] (nats; T = last
    row). NaN with a single row: no evidence is not "no forgetting"."""
    T = len(L) - 1
    if T < 1:
        return float("nan")
    return float(np.mean([L[T, j] - np.min(L[j:T, j]) for j in range(T)]))


def scores(L: np.ndarray) -> dict[str, float]:
    """A method's figures from its log-perplexity matrix (only the last row needs to be set):
    geometric-mean perplexity over all domains, over the earlier ones and on the newest,
    and forgetting (nats). NaN where the last row is unset."""
    last = np.asarray(L, dtype=float)[-1]
    return {
        "average_ppl": float(np.exp(np.mean(last))),
        "old_ppl": float(np.exp(np.mean(last[:-1]))) if len(last) > 1 else math.nan,
        "new_ppl": float(np.exp(last[-1])),
        "forgetting_nats": forgetting(np.asarray(L, dtype=float)),
    }


def target_checks(
    replay: dict[str, float], joint: dict[str, float], naive: dict[str, float], margin: float = 0.05
) -> dict[str, Any]:
    """The issue's targets for replay mixing: earlier-domain perplexity within `margin` of joint
    training, newest-domain perplexity within `margin` of naive fine-tuning (ratios − 1; each
    argument is a `scores` dict)."""
    old = replay["old_ppl"] / joint["old_ppl"] - 1
    new = replay["new_ppl"] / naive["new_ppl"] - 1
    return {
        "replay_old_vs_joint": old,
        "replay_new_vs_naive": new,
        "old_within_margin": bool(old <= margin),
        "new_within_margin": bool(new <= margin),
        "margin": margin,
    }
