"""Causal language models (`hf-causal-lm`): continual pre-training on text, scored by likelihood.

A causal LM fits the same tensors as every other family: the inputs are right-padded token ids
[N, L] (`continual.text`), the "labels" a flow carries are placeholders (zeros), and the targets
are the ids themselves, shifted by one. Two rules make the rest of the pipeline work unchanged:

- training: a model whose output is 3-D ([N, L, V] logits) is trained on the next-token loss
  with padding masked (labels = ids, pad → -100; `next_token_loss`), in the one training loop;
- scoring: the per-row score is the mean token log-likelihood (`token_log_likelihood`: minus the
  row's NLL per predicted token, higher is better), so the promotion gate compares it with its
  paired bootstrap for continuous scores, and the per-batch "forgetting" of the gate becomes
  reference − current mean log-likelihood = log(perplexity now / perplexity then).

Weights and tokenizer load from a local directory only (never downloaded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CAUSAL_LM_FAMILY = "hf-causal-lm"
IGNORE_INDEX = -100  # the label cross-entropy skips (padding, the last position)
_SCORE_BATCH = 64


class HFCausalLM(nn.Module):
    """A local `AutoModelForCausalLM`; forward(ids) returns logits [N, L, V].

    No dynamic trimming of the padding (unlike the encoder): logits keep the fixed width L so
    that chunks of a prediction stack; `max_length` bounds L, so the waste is bounded too.
    """

    is_causal_lm = True

    def __init__(self, path: str | Path, max_length: int = 128) -> None:
        super().__init__()
        from continual.base_model import local_hf_directory

        directory = local_hf_directory(path)
        from transformers import AutoModelForCausalLM  # heavy import: only for this family

        from continual.text import load_tokenizer

        self.lm = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
        self.tokenizer = load_tokenizer(str(directory))
        self.max_length = max_length
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                f"the tokenizer in {str(directory)!r} has neither a pad nor an eos token: "
                "a causal LM needs one to pad rows to a common length"
            )
        self.pad_token_id = int(pad)
        self.vocab_size = int(self.lm.config.vocab_size)
        self.mask_padding = True  # False only inside `unmasked_right_padding`

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [len(texts), max_length], right-padded and truncated to `max_length`."""
        from continual.text import encode_texts

        return encode_texts(self.tokenizer, texts, self.max_length)

    def forward(self, input_ids: Tensor) -> Tensor:
        input_ids = input_ids.long()
        mask = (input_ids != self.pad_token_id).long() if self.mask_padding else None
        logits: Tensor = self.lm(input_ids=input_ids, attention_mask=mask).logits
        return logits


@contextmanager
def unmasked_right_padding(model: nn.Module, ids: Tensor) -> Iterator[None]:
    """Run `model` without an attention mask for the block, which gives the same logits at every
    real token when the rows are right-padded: causal attention never looks forward, so no real
    token sees the padding after it, and positions count from 0 either way (the logits at pad
    positions differ, and every loss here masks them). Why: transformers decides whether to
    build a padding mask by reading the mask's values, which `torch.func.vmap` (the per-sequence
    gradients of the Fisher) cannot do.

    Raises:
        ValueError: a row has a real token after a pad (left padding, or a pad token used
            inside the text): those need the mask.
    """
    pad = int(model.pad_token_id)  # type: ignore[arg-type]  # an HFCausalLM, maybe under peft
    real = torch.ne(ids, pad).int()
    if bool((real[:, 1:] > real[:, :-1]).any()):
        raise ValueError(
            "the causal-LM Fisher needs right-padded rows (no real token after a pad token); "
            "rows come from HFCausalLM.tokenize, which right-pads"
        )
    cores = [m for m in model.modules() if isinstance(m, HFCausalLM)]
    for core in cores:
        core.mask_padding = False
    try:
        yield
    finally:
        for core in cores:
            core.mask_padding = True


def next_token_labels(ids: Tensor, pad_token_id: int) -> Tensor:
    """Targets [N, L-1] for logits [:, :-1]: the next token of each position, pad → -100."""
    labels = ids[:, 1:].clone()
    labels[labels == pad_token_id] = IGNORE_INDEX
    return labels


def sequence_nll(pad_token_id: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sequence loss the Fisher of a causal LM is taken of: `loss(logits [B, L, V],
    ids [B, L]) -> [B]`, each row's **summed** next-token NLL over its non-pad targets.

    Summed, not averaged per token: a sequence is one sample of p_θ(x) = Π_t p(x_t | x_<t), and
    EWC's Laplace approximation needs the Fisher of log p_θ(x), which is the sum; a per-token mean
    would divide each row's information by its length squared and under-weight long rows. The
    penalty divides the Fisher by its mean entry anyway, so the overall scale does not change λ.
    Written with `where`/`gather` (no boolean indexing, no ignore_index) so it runs under vmap.
    """

    def loss(logits: Tensor, ids: Tensor) -> Tensor:
        ids = ids.long()
        targets = ids[:, 1:]
        keep = targets != pad_token_id
        log_p = torch.log_softmax(logits[:, : targets.shape[1]].float(), dim=-1)
        picked = log_p.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep.to(picked.dtype)).sum(dim=1)

    return loss


def next_token_loss(logits: Tensor, ids: Tensor, pad_token_id: int) -> Tensor:
    """Mean next-token cross-entropy over the non-pad target tokens of a batch."""
    labels = next_token_labels(ids, pad_token_id)
    width = labels.shape[1]
    return F.cross_entropy(
        logits[:, :width].reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
    )


@torch.no_grad()
def token_log_likelihood(
    model: nn.Module, ids: Tensor, *, batch_size: int = _SCORE_BATCH, empty: float = 0.0
) -> np.ndarray:
    """Per-row mean token log-likelihood [N] (float64; −NLL per predicted token, higher is
    better). A row with a single token (or none) has nothing to predict and scores `empty`
    (0.0 by default); the promotion gate and the daily's keep/discard check leave such rows out
    (`has_next_token`), and the served model passes NaN, as such a row has no log-likelihood or
    perplexity to report.

    This is the one score of a causal LM: the gate, the keep/discard check of a LoRA update,
    the forgetting references and the served model all read it. exp(−score) is the row's
    perplexity.
    """
    pad = int(model.pad_token_id)  # type: ignore[arg-type]  # an HFCausalLM, maybe under peft
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size].long().to(device)
        logits = model(chunk).float()
        labels = next_token_labels(chunk, pad)
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        mean = (-nll.sum(dim=1) / counts.clamp(min=1)).double().cpu().numpy()
        mean[(counts == 0).cpu().numpy()] = empty
        out.append(mean)
    if not out:
        raise ValueError("token_log_likelihood: no rows to score")
    return np.concatenate(out)


def has_next_token(model: nn.Module, ids: Tensor) -> np.ndarray:
    """Whether each row of right-padded token ids [N, L] has a token to predict (two or more
    non-pad tokens) — the rows `token_log_likelihood` gives a score rather than `empty`."""
    pad = int(model.pad_token_id)  # type: ignore[arg-type]  # an HFCausalLM, maybe under peft
    return (next_token_labels(ids, pad) != IGNORE_INDEX).any(dim=1).cpu().numpy()


def beats_uniform(log_likelihood: np.ndarray, vocab_size: int) -> np.ndarray:
    """Whether each row is predicted better than a uniform guess over the vocabulary: the
    accuracy-like [0, 1] score of a first champion's floor (`gate.min_accuracy`)."""
    return np.asarray(log_likelihood) > -math.log(vocab_size)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (or the model a peft wrapper holds) is a causal LM of this module."""
    return bool(getattr(model, "is_causal_lm", False))


# ---- generation (served model): continuations of prompts, bounded and greedy by default ----

MAX_NEW_TOKENS_LIMIT = 256  # a request cannot make the server generate more per row
GENERATION_DEFAULTS: dict[str, int | float] = {"max_new_tokens": 0, "temperature": 0.0, "seed": 0}


@dataclass(frozen=True)
class GenerationSettings:
    """How to continue each prompt: `max_new_tokens` 0 = no generation; temperature 0 = greedy
    (deterministic), > 0 = sampling from softmax(logits / temperature) under `seed`."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    seed: int = 0


def generation_settings(params: Mapping[str, Any] | None) -> GenerationSettings:
    """Validated settings from a request's inference params (missing keys take the defaults).

    Raises:
        ValueError: `max_new_tokens` not an integer in [0, MAX_NEW_TOKENS_LIMIT], `temperature`
            negative or not finite, or `seed` not an integer (the message names the value).
    """
    given = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
    tokens, temperature, seed = given["max_new_tokens"], given["temperature"], given["seed"]
    if not _is_int(tokens) or not 0 <= int(tokens) <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(
            f"max_new_tokens must be an integer from 0 (no generation) to "
            f"{MAX_NEW_TOKENS_LIMIT}, got {tokens!r}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not (math.isfinite(float(temperature)) and float(temperature) >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return GenerationSettings(int(tokens), float(temperature), int(seed))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@torch.no_grad()
def generate_continuations(
    model: nn.Module, texts: Sequence[str], settings: GenerationSettings, *, batch_size: int = 16
) -> list[str]:
    """The text each prompt continues with (the prompt itself excluded), one string per row.

    Prompts keep their last `max_length` tokens (what the continuation follows) and are
    left-padded, so every row's new tokens start in the same column; an empty prompt starts
    from the bos (else eos) token. Generation stops at eos or after `max_new_tokens`.
    """
    if settings.max_new_tokens == 0:
        return ["" for _ in texts]
    # an HFCausalLM, maybe under peft (which forwards attribute access to the wrapped model)
    lm: Any = model.lm
    tokenizer: Any = model.tokenizer
    pad: int = int(model.pad_token_id)  # type: ignore[arg-type]
    max_length: int = int(model.max_length)  # type: ignore[arg-type]
    model.eval()
    device = next(model.parameters()).device
    prompts = [_prompt_ids(tokenizer, str(t), max_length) for t in texts]
    config = _generation_config(settings, pad, tokenizer.eos_token_id)
    out: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling is seeded, the caller's RNG untouched
        torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[start : start + batch_size], pad)
            generated = lm.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            new = generated[:, ids.shape[1] :].cpu()
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [text.strip() for text in out]


def _prompt_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    ids: list[int] = list(tokenizer(text)["input_ids"])[-max_length:]
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(
            f"prompt {text!r} has no tokens and the tokenizer no bos/eos to start from"
        )
    return [int(start)]


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _generation_config(settings: GenerationSettings, pad: int, eos: int | None) -> Any:
    from transformers import GenerationConfig

    sampling = settings.temperature > 0
    return GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        temperature=settings.temperature if sampling else 1.0,
        top_k=0 if sampling else None,  # plain temperature sampling: no top-k / top-p cut
        top_p=1.0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
