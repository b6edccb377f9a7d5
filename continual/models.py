"""Model families evergreen can keep current, built from a plain, JSON-able `ModelSpec`.

A model version is fully described by its spec (architecture, feature columns, class order,
standardisation) plus a state dict, so a checkpoint can be rebuilt anywhere without pickle.
Families are chosen by name from one registry dict, `MODEL_FAMILIES`; any other
`"package.module:factory"` string is imported and called as `factory(spec) -> nn.Module`.

Built-in families:
- `mlp`: standardise → Linear+ReLU(+dropout) layers → Linear `classifier` (tabular features).
- `transformer`: the features are cut into `n_tokens` tokens, embedded, passed through pre-LN
  self-attention blocks whose projections are Linear `q_proj/k_proj/v_proj/out_proj` (so LoRA
  can target q/v), mean-pooled → LayerNorm → Linear `classifier`. CPU-fast for small inputs.
- `hf`: a local Hugging Face encoder (never downloaded) + mean pooling + Linear `classifier`;
  inputs are token ids from `.tokenize(texts)` (`continual.text`); `feature_columns` is the one
  text column and `n_features` the maximum sequence length.
- `hf-causal-lm`: a local `AutoModelForCausalLM` (`continual.causal_lm`), same inputs; it learns
  the text itself (next-token loss), `n_classes` is its vocabulary size and `classes` is empty.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.base_model import local_hf_directory
from continual.base_model import resolve_hf_path as resolve_hf_path  # re-exported

_STD_FLOOR = 1e-6
CAUSAL_LM = "hf-causal-lm"  # continual.causal_lm: n_classes is the vocabulary size
TEXT_FAMILIES = frozenset({"hf", CAUSAL_LM})  # families whose input is one text column of ids
SPEC_ATTRIBUTE = "evergreen_spec"  # set by build_model on the module it returns


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (besides its weights), JSON-able.

    Attributes:
        family: "mlp", "transformer", "hf", or "package.module:factory".
        n_features: tabular: number of feature columns; hf: maximum token length.
        n_classes: number of output logits.
        feature_columns: column names, in the order the model reads them.
        classes: JSON-able labels; index i is the label of logit i.
        hidden: MLP hidden layer sizes.
        d_model, n_heads, n_layers, n_tokens: transformer sizes.
        dropout: dropout probability inside the network.
        hf_path: local directory of a Hugging Face model (family "hf"), or "package:NAME" for a
            model shipped inside an installed Python package.
        input_mean, input_std: per-feature standardisation, stored in the model as buffers.
    """

    family: str
    n_features: int
    n_classes: int
    feature_columns: list[str] = field(default_factory=list)
    classes: list[Any] = field(default_factory=list)
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    n_tokens: int = 8
    dropout: float = 0.0
    hf_path: str | None = None
    input_mean: list[float] | None = None
    input_std: list[float] | None = None

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("invalid ModelSpec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (the content of a checkpoint's spec.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build a spec from `to_dict()` output.

        Raises:
            ValueError: on unknown keys (a typo must not silently fall back to a default),
                missing required keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelSpec keys {unknown}; expected a subset of {sorted(known)}"
            )
        missing = [k for k in ("family", "n_features", "n_classes") if k not in data]
        if missing:
            raise ValueError(f"ModelSpec is missing required keys {missing}")
        return cls(**data)


def _spec_problems(spec: ModelSpec) -> list[str]:
    """List what is wrong with a spec (empty when valid)."""
    problems = []
    if not spec.family:
        problems.append("family is empty")
    if spec.n_features < 1:
        problems.append(f"n_features must be >= 1, got {spec.n_features}")
    if spec.n_classes < 2:
        problems.append(f"n_classes must be >= 2, got {spec.n_classes}")
    if spec.classes and len(spec.classes) != spec.n_classes:
        problems.append(f"{len(spec.classes)} classes given but n_classes={spec.n_classes}")
    if spec.family in TEXT_FAMILIES and len(spec.feature_columns) > 1:
        problems.append(f"a text model reads one text column, got {spec.feature_columns}")
    elif spec.family not in TEXT_FAMILIES and (
        spec.feature_columns and len(spec.feature_columns) != spec.n_features
    ):
        problems.append(
            f"{len(spec.feature_columns)} feature_columns given but n_features={spec.n_features}"
        )
    for name in ("input_mean", "input_std"):
        values = getattr(spec, name)
        if values is not None and len(values) != spec.n_features:
            problems.append(
                f"{name} has {len(values)} values, expected n_features={spec.n_features}"
            )
    if spec.input_std is not None and min(spec.input_std, default=1.0) <= 0:
        problems.append("input_std must be > 0 everywhere")
    if not 0 <= spec.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {spec.dropout}")
    if spec.family == "transformer" and spec.d_model % max(spec.n_heads, 1) != 0:
        problems.append(f"d_model={spec.d_model} is not divisible by n_heads={spec.n_heads}")
    if spec.family in TEXT_FAMILIES and not spec.hf_path:
        problems.append(
            f"family {spec.family!r} needs hf_path (a local Hugging Face model directory)"
        )
    return problems


def as_logits(output: object) -> Tensor:
    """The logits of a model's output: a tensor, an object with `.logits` (Hugging Face), or
    the first item of a tuple. One rule for every place that calls a user model."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"model returned {type(output).__name__}; expected a logits tensor, an object with "
        "`.logits`, or a tuple whose first item is the logits"
    )


def fit_standardizer(X: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and standard deviation for the model's input standardisation.

    Constant columns get std 1.0 (not ~0) so they map to 0 instead of exploding.

    Args:
        X: array [N, F] of training features.

    Returns:
        (mean, std) as plain float lists of length F, ready for `ModelSpec`.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"fit_standardizer needs a non-empty 2-D array, got shape {X.shape}")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean.tolist(), std.tolist()


class _Standardize(nn.Module):
    """(x - mean) / std with mean/std as buffers: saved in the state dict, never trained."""

    input_mean: Tensor
    input_std: Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        mean = spec.input_mean or [0.0] * spec.n_features
        std = spec.input_std or [1.0] * spec.n_features
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.input_mean) / self.input_std


class MLPClassifier(nn.Module):
    """Standardise → [Linear → ReLU → dropout] per hidden size → Linear `classifier`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.standardize = _Standardize(spec)
        sizes = [spec.n_features, *spec.hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(sizes[-1], spec.n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.standardize(x)
        for layer in self.layers:
            h = self.dropout(F.relu(layer(h)))
        logits: Tensor = self.classifier(h)
        return logits


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Linear q/k/v/out projections (LoRA targets)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape

        def heads(proj: Tensor) -> Tensor:
            return proj.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        projected: Tensor = self.out_proj(out.transpose(1, 2).reshape(n, t, d))
        return projected


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 2 * d_model)
        self.fc2 = nn.Linear(2 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        attended: Tensor = self.dropout(self.attn(self.norm1(x)))
        x = x + attended
        mlp: Tensor = self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
        return x + mlp


class TabularTransformer(nn.Module):
    """Small transformer over tabular features cut into `n_tokens` equal tokens.

    F features are zero-padded to a multiple of `n_tokens` (digits: 64 → 8 tokens of 8).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.standardize = _Standardize(spec)
        self.n_tokens = spec.n_tokens
        self.token_size = math.ceil(spec.n_features / spec.n_tokens)
        self.pad = self.token_size * spec.n_tokens - spec.n_features
        self.embed = nn.Linear(self.token_size, spec.d_model)
        self.position = nn.Parameter(torch.randn(spec.n_tokens, spec.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(spec.d_model, spec.n_heads, spec.dropout) for _ in range(spec.n_layers)
        )
        self.norm = nn.LayerNorm(spec.d_model)
        self.classifier = nn.Linear(spec.d_model, spec.n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.pad(self.standardize(x), (0, self.pad))
        h = self.embed(h.view(h.shape[0], self.n_tokens, self.token_size)) + self.position
        for block in self.blocks:
            h = block(h)
        logits: Tensor = self.classifier(self.norm(h.mean(dim=1)))
        return logits


class HFTextClassifier(nn.Module):
    """A local Hugging Face encoder, mean-pooled over non-pad tokens, + Linear `classifier`.

    Weights and tokenizer come from a local directory only (`local_files_only=True`): nothing
    is ever downloaded. Inputs are LongTensor token ids [N, L], right-padded to a fixed L
    (`max_length`) so they stack, store and replay like any tensor; `forward` cuts each batch
    to its longest row (dynamic padding: compute follows the real lengths, not L), and the
    attention mask is `ids != pad_token_id`.

    The token/position embeddings and LayerNorms are frozen (`restrict_trainable_`): fine-tuning
    adapts the Linear layers (attention, feed-forward, head). Why: the 12M-parameter word
    embedding dominates the parameter count but barely moves with a few hundred sentences, and
    with Linear layers only the per-example Fisher takes the closed-form path
    (`continual.fisher_linear`) — through vmap it took over ten minutes on 200 rows.
    """

    def __init__(self, path: str | Path, n_classes: int, max_length: int = 128) -> None:
        super().__init__()
        directory = local_hf_directory(path)
        from transformers import AutoModel  # heavy import: only for this family

        from continual.text import load_tokenizer

        self.encoder = AutoModel.from_pretrained(str(directory), local_files_only=True)
        self.tokenizer = load_tokenizer(str(directory))
        self.max_length = max_length
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = 0 if pad_id is None else int(pad_id)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, n_classes)
        self.restrict_trainable_()

    def restrict_trainable_(self) -> HFTextClassifier:
        """Freeze everything but Linear layers (see the class docstring); returns self.

        The encoder's pooler is frozen too: mean pooling replaces it, so it never gets a gradient.
        """
        linear = {
            id(p)
            for name, m in self.named_modules()
            if isinstance(m, nn.Linear) and ".pooler." not in f".{name}."
            for p in m.parameters()
        }
        for parameter in self.parameters():
            if id(parameter) not in linear:
                parameter.requires_grad_(False)
        return self

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [len(texts), max_length], right-padded and truncated to `max_length`."""
        from continual.text import encode_texts

        return encode_texts(self.tokenizer, texts, self.max_length)

    def features(self, input_ids: Tensor) -> Tensor:
        """The mean-pooled encoder output [N, hidden] the `classifier` head reads."""
        input_ids = input_ids.long()
        mask = input_ids != self.pad_token_id
        if torch._C._functorch.maybe_current_level() is None:  # not under vmap: trim the padding
            longest = int(mask.sum(dim=1).max()) if len(mask) else 1
            input_ids, mask = input_ids[:, : max(longest, 1)], mask[:, : max(longest, 1)]
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled: Tensor = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return pooled

    def forward(self, input_ids: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.features(input_ids))
        return logits


def _build_hf(spec: ModelSpec) -> nn.Module:
    assert spec.hf_path is not None  # guaranteed by ModelSpec validation
    return HFTextClassifier(spec.hf_path, spec.n_classes, max_length=spec.n_features)


def _build_causal_lm(spec: ModelSpec) -> nn.Module:
    from continual.causal_lm import HFCausalLM

    assert spec.hf_path is not None  # guaranteed by ModelSpec validation
    return HFCausalLM(spec.hf_path, max_length=spec.n_features)


MODEL_FAMILIES: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "mlp": MLPClassifier,
    "transformer": TabularTransformer,
    "hf": _build_hf,
    CAUSAL_LM: _build_causal_lm,
}


def _import_factory(reference: str) -> Callable[[ModelSpec], nn.Module]:
    """Resolve "package.module:factory" to the callable it names."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"unknown model family {reference!r}: expected one of {sorted(MODEL_FAMILIES)} "
            'or "package.module:factory"'
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"model family {reference!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model family {reference!r}: {module_name} has no callable {attr!r}")
    return cast(Callable[[ModelSpec], nn.Module], factory)  # a user's factory: trusted by contract


def build_model(spec: ModelSpec) -> nn.Module:
    """Build a freshly initialised model for `spec` (weights come from a checkpoint, if any).

    Args:
        spec: the model spec; `spec.family` is a key of `MODEL_FAMILIES` or
            "package.module:factory" (called as `factory(spec)`).

    Returns:
        The model, on CPU.

    Raises:
        ValueError: unknown family, unimportable factory, or a factory not returning a module.
    """
    factory = MODEL_FAMILIES.get(spec.family) or _import_factory(spec.family)
    model = factory(spec)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model family {spec.family!r} returned {type(model).__name__}, expected nn.Module"
        )
    # The model carries its spec (copies and peft wrappers keep it) so code that must rebuild it
    # elsewhere, e.g. on every torchrun rank, needs no pickle of the module.
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec `build_model` built `model` (or the base of a peft model) from, else None."""
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, ModelSpec) else None


def default_lora_targets(model: nn.Module) -> list[str]:
    """The Linear layers LoRA should adapt by default.

    Pretrained language models: their attention q/v projections, `q_proj`/`v_proj` (Llama-style)
    or `query`/`value` (BERT-style) — the usual choice, where the frozen layers already encode
    what the input means. Our small tabular models (MLP, TabularTransformer): every Linear
    except the `classifier` head, because drift in tabular data is drift of the *inputs*, which
    the input embedding and MLP layers must absorb; measured on rotated digits through four
    daily LoRA updates of the TabularTransformer: average accuracy 0.557 with q/v only (three of
    four updates rejected), 0.851 with every Linear (all four promoted).

    Returns:
        Target names as peft understands them (suffixes or full module names).

    Raises:
        ValueError: when the model has no Linear layer besides the classifier.
    """
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not isinstance(model, MLPClassifier | TabularTransformer):
        leaf_names = {name.rsplit(".", 1)[-1] for name in linear}
        for pair in (["q_proj", "v_proj"], ["query", "value"]):
            if set(pair) <= leaf_names:
                return pair
    targets = [name for name in linear if name.rsplit(".", 1)[-1] != "classifier"]
    if not targets:
        raise ValueError(
            f"no Linear layer to adapt besides the classifier; Linear layers: {linear}"
        )
    return targets
