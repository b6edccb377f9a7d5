"""A tiny Llama-style causal LM and its WordLevel tokenizer, built offline (nothing downloaded),
and short sentences from three word pools ("domains") for continual pre-training tests."""

from __future__ import annotations

import random
from pathlib import Path

DOMAINS = {
    "kitchen": [
        "bread",
        "butter",
        "knife",
        "oven",
        "salt",
        "pepper",
        "bowl",
        "spoon",
        "soup",
        "flour",
    ],
    "harbour": ["boat", "sail", "anchor", "rope", "tide", "wave", "gull", "pier", "net", "fish"],
    "office": [
        "desk",
        "chair",
        "paper",
        "email",
        "meeting",
        "report",
        "printer",
        "stapler",
        "budget",
        "memo",
    ],
}
GLUE = ["the", "a", "of", "and", "with", "on", "in", "is"]


def sentences(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = DOMAINS[domain]
    return [
        " ".join(
            rng.choice(words) if i % 2 == 0 else rng.choice(GLUE) for i in range(rng.randint(4, 12))
        )
        for _ in range(n)
    ]


def tiny_llama(directory: Path) -> Path:
    """A randomly initialised Llama-style LM and its WordLevel tokenizer, saved locally."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[BOS]",
        "[EOS]",
        *sorted({w for words in DOMAINS.values() for w in words} | set(GLUE)),
    ]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
