"""The MLflow pyfunc that serves an evergreen checkpoint ("models from code").

MLflow copies this file into every logged model and executes it at load time, so it must stay
importable on its own: no relative imports, no import of `model_registry` or `evergreen`. It
needs `continual` (checkpoint loading, model families), torch, safetensors, pandas and mlflow.
`Registry.log_version` ships a copy of the `continual` package with each model (`code_paths`),
which MLflow puts first on `sys.path` in a fresh process, so a serving host only needs the pip
requirements recorded with the model — and a version keeps loading with the code that wrote it.
Custom families ("package.module:factory") and `hf_path` directories must be importable /
present on the serving host as well, and a version stored as parent + adapter downloads its
parent from the registry when it loads (`continual.lineage`): the serving host must reach the
registry it was resolved from (or hold the parent in its cache).

The second half of the file ("packaging") is what `Registry.log_version` uses to snapshot,
hash, validate and log a checkpoint as such a model; it is inert when the model is served.

Usage (any process that can reach the registry):

    model = mlflow.pyfunc.load_model("models:/<name>@champion")
    model.predict(df)  # DataFrame with the spec's feature columns →
                       # prediction, probability, probability_<class> for every class
    lm.predict(pd.DataFrame({"text": [...]}), params={"max_new_tokens": 20})  # a causal LM →
                       # log_likelihood, perplexity, generated (greedy unless temperature > 0)

`mlflow models serve -m models:/<name>@champion --env-manager local` serves the same on
/invocations: `{"dataframe_split": {...}, "params": {"max_new_tokens": 20}}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext  # where mlflow defines them

if TYPE_CHECKING:  # torch is imported where it is used: registry code that only hashes files
    import torch  # (promotion, download) should not pay for it

CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_NAME = "model"  # the logged model's name inside its run
_TAG_KEY = re.compile(r"^[/\w.\- :]*$")  # what MLflow accepts in a tag key
_FLUENT_LOCK = threading.RLock()
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
CODE_MODEL_PREFIX = "code_model_"  # mlflow.models.utils._load_model_code_path's module names
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*.tmp")
# MLflow's hint when a schema has integer columns (our integer labels): noise, as
# `_lenient_inputs` declares inputs by name and the labels' type is the classes' own.
INTEGER_SCHEMA_HINT = "Hint: Inferred schema contains integer"


class EvergreenPyfunc(PythonModel):
    """Predict labels and their probability from a checkpoint directory (no pickle).

    Output columns: `prediction` (the label from `spec.classes`, logit i ↔ classes[i]),
    `probability` (the probability of that label) and `probability_<class>` for every class in
    `spec.classes` order (they sum to 1), so a caller can rank, threshold or calibrate.
    A causal LM (`hf-causal-lm`) returns `log_likelihood` (mean token log-likelihood per row)
    and `perplexity` (its exp(−·)) for a `text` column instead, plus `generated` (the
    continuation of each row, prompt excluded) when the inference params ask for new tokens:
    `{"max_new_tokens": 1..256, "temperature": 0 (greedy) or > 0, "seed": int}`.
    """

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.spec: Any = None

    def load_context(self, context: PythonModelContext) -> None:
        """Load the checkpoint MLflow downloaded as the `checkpoint` artifact."""
        self.load_checkpoint_dir(Path(context.artifacts[CHECKPOINT_ARTIFACT]))

    def load_checkpoint_dir(self, directory: Path) -> EvergreenPyfunc:
        """Load a checkpoint directory directly (used to validate before logging).

        Raises:
            continual.checkpoint.CheckpointError: missing or invalid spec/weights.
        """
        from continual.checkpoint import load_checkpoint

        self.model, self.spec = load_checkpoint(directory, map_location=_device())
        return self

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Class label and its probability for each row of `model_input`.

        Args:
            context: unused (the checkpoint is loaded in `load_context`).
            model_input: a DataFrame holding every feature column of the spec (extra columns
                are ignored, column order does not matter).
            params: MLflow inference params; read by a causal LM only (`max_new_tokens`,
                `temperature`, `seed`: `continual.causal_lm.generation_settings`).

        Returns:
            DataFrame [prediction, probability, probability_<class>…] with the index of
            `model_input`; for a causal LM [log_likelihood, perplexity(, generated)].

        Raises:
            ValueError: feature columns are missing or not numeric, or hold NaN/±inf (the
                message names them and the rows), a text model's text is null in some rows, or a
                causal LM's generation params are out of bounds.
        """
        if self.model is None or self.spec is None:
            raise RuntimeError("EvergreenPyfunc.predict called before the checkpoint was loaded")
        frame = pd.DataFrame(model_input)
        columns = list(self.spec.feature_columns)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input is missing feature columns {missing}; the model expects {columns}"
            )
        from continual.causal_lm import is_causal_lm
        from continual.inference import predict_proba

        if is_causal_lm(self.model):  # continual pre-training: how well the model knows the text
            return self._language_model_output(self.model, frame[columns], params)
        inputs = self._inputs(frame[columns])
        if len(inputs) == 0:  # an empty request: no rows, the same columns
            proba = np.zeros((0, len(self.spec.classes)))
        else:
            proba = predict_proba(self.model, inputs).numpy()
        best = proba.argmax(axis=1)
        labels = np.asarray(self.spec.classes, dtype=object)[best]
        output: dict[str, Any] = {"prediction": labels.tolist(), "probability": proba.max(axis=1)}
        for i, name in enumerate(probability_columns(self.spec.classes)):
            output[name] = proba[:, i]
        out = pd.DataFrame(output, index=frame.index)
        return out.astype(dict.fromkeys(out.columns[1:], np.float64))

    def _language_model_output(
        self, model: torch.nn.Module, features: pd.DataFrame, params: dict[str, Any] | None
    ) -> pd.DataFrame:
        """Per-row log-likelihood and perplexity, and the generated continuation if asked."""
        from continual.causal_lm import (
            generate_continuations,
            generation_settings,
            token_log_likelihood,
        )

        settings = generation_settings(params)  # refuse a bad request before any compute
        # a row with no token to predict has no score: NaN, not 0.0 (a perfect perplexity 1.0)
        log_likelihood = token_log_likelihood(model, self._inputs(features), empty=np.nan)
        out = pd.DataFrame(
            {"log_likelihood": log_likelihood, "perplexity": np.exp(-log_likelihood)},
            index=features.index,
            dtype=np.float64,
        )
        if settings.max_new_tokens > 0:
            texts = features.iloc[:, 0].astype(str).tolist()
            out["generated"] = generate_continuations(model, texts, settings)
        return out

    def _inputs(self, features: pd.DataFrame) -> torch.Tensor:
        tokenize = getattr(self.model, "tokenize", None)
        if callable(tokenize):  # text family: one text column → token ids
            texts = features.iloc[:, 0]
            null = texts.isna()
            if null.any():  # astype(str) would score the string "None" or "nan"
                rows = list(texts.index[null])
                plural = "s" if len(rows) > 1 else ""
                raise ValueError(
                    f"{texts.name!r} is null in {len(rows)} row{plural} "
                    f"(row{plural} {', '.join(map(str, rows[:5]))}"
                    f"{', …' if len(rows) > 5 else ''}): the model scores strings — drop "
                    "those rows or fill them"
                )
            ids: torch.Tensor = tokenize(texts.astype(str).tolist())
            return ids
        import torch

        if features.empty:  # MLflow's schema enforcement hands an empty request over as object
            return torch.zeros((0, features.shape[1]), dtype=torch.float32)
        bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
        if bad:
            raise ValueError(
                f"feature columns {bad} are not numeric (dtypes "
                f"{[str(features[c].dtype) for c in bad]}); the model expects numbers"
            )
        values = features.to_numpy(dtype=np.float32, copy=True)
        finite = np.isfinite(values)
        if not finite.all():  # NaN logits: argmax would answer the first class, confidently
            whole = finite.all(axis=0)
            columns = [str(c) for c, ok in zip(features.columns, whole, strict=True) if not ok]
            rows = list(features.index[~finite.all(axis=1)])
            plural = "s" if len(rows) > 1 else ""
            raise ValueError(
                f"feature columns {columns} hold NaN or ±inf in {len(rows)} row{plural} "
                f"(row{plural} {', '.join(map(str, rows[:5]))}{', …' if len(rows) > 5 else ''})"
                ": the model scores finite numbers — drop those rows or fill them"
            )
        return torch.from_numpy(values)


def probability_columns(classes: list[Any]) -> list[str]:
    """`probability_<class>` for each class, in logit order (names MLflow columns accept)."""
    return [f"probability_{c}" for c in classes]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- packaging: used by `Registry.log_version` in the training process, never when serving ----


def stage_checkpoint(source: Path, workdir: Path) -> Path:
    """Copy a checkpoint to `<workdir>/checkpoint`: the folder name MLflow stores it under,
    and a snapshot, so the files hashed are exactly the files logged.

    Raises:
        FileNotFoundError: `source` is not a directory.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint directory {source} does not exist")
    return Path(shutil.copytree(source, workdir / CHECKPOINT_ARTIFACT, ignore=_COPY_IGNORE))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_manifest(directory: Path) -> dict[str, str]:
    """relative posix path → sha256 of every file under `directory` (the same digests a child
    version records for its parent: `continual.lineage.directory_manifest`).

    Raises:
        ValueError: a file name cannot be part of an MLflow tag key.
    """
    from continual.lineage import directory_manifest

    manifest = directory_manifest(directory)
    for relative in manifest:
        if not _TAG_KEY.match(relative):
            raise ValueError(
                f"checkpoint file {relative!r}: only letters, digits and _ - . / : space are"
                " allowed in checkpoint file names (they become MLflow tag keys)"
            )
    return manifest


def manifest_problems(directory: Path, expected: dict[str, str]) -> list[str]:
    """Every missing, unexpected or modified file of `directory` versus `expected` hashes."""
    from continual.base_model import hash_differences

    actual = checkpoint_manifest(directory)
    return hash_differences(expected, actual, unexpected="not recorded when logged")


def prepare_checkpoint(source: Path, workdir: Path) -> tuple[Path, dict[str, str], Any, Any]:
    """Snapshot a checkpoint, hash it, and prove it serves (load + predict an example).

    Returns:
        (staged copy, relpath → sha256, input example, signature).
    """
    staged = stage_checkpoint(source, workdir)
    manifest = checkpoint_manifest(staged)
    example, signature = example_and_signature(staged)
    return staged, manifest, example, signature


def example_and_signature(checkpoint: Path) -> tuple[pd.DataFrame, Any]:
    """Load the checkpoint, predict on a few typical rows: the input example and signature.

    This is the real check that a version can be served before it is registered.

    Raises:
        continual.checkpoint.CheckpointError, ValueError: the checkpoint does not load/predict.
    """
    from mlflow.models import infer_signature

    from continual.causal_lm import GENERATION_DEFAULTS, is_causal_lm

    pyfunc = EvergreenPyfunc().load_checkpoint_dir(checkpoint)
    spec = pyfunc.spec
    if callable(getattr(pyfunc.model, "tokenize", None)):
        example = pd.DataFrame({spec.feature_columns[0]: ["an example text", "another one"]})
    else:
        rows = [[0.0] * len(spec.feature_columns)]
        if spec.input_mean:
            rows.append([float(v) for v in spec.input_mean])
        example = pd.DataFrame(rows, columns=list(spec.feature_columns), dtype="float64")
    # A causal LM declares its generation params (with their defaults: no generation), and is
    # proven to generate: the output schema comes from a 2-token generation.
    causal = pyfunc.model is not None and is_causal_lm(pyfunc.model)
    params = dict(GENERATION_DEFAULTS) if causal else None
    asked = {**params, "max_new_tokens": 2} if params else None
    with warnings.catch_warnings():  # integer labels: MLflow's "missing values" hint is noise
        warnings.filterwarnings("ignore", message=INTEGER_SCHEMA_HINT)
        signature = infer_signature(example, pyfunc.predict(None, example, asked), params)
    return example, _lenient_inputs(signature)


def _lenient_inputs(signature: Any) -> Any:
    """Declare numeric feature columns by name but not by dtype; keep every other type.

    MLflow refuses int64 → double ("Can not safely convert"), and integer features are common
    (counts, pixels, JSON numbers in a serving request). Column presence is still enforced by
    MLflow; `predict` checks that every feature is numeric and converts it to float32. A text
    column stays `string`, and the outputs keep their inferred types (`prediction` as the
    classes' type, every `probability*` column `double`); a causal LM's `generated` column is
    optional and its params schema is kept.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, ColSpec, Schema

    any_type = AnyType()  # type: ignore[no-untyped-call]  # mlflow leaves AnyType.__init__ unannotated
    inputs = Schema(
        [
            spec if spec.type == DataType.string else ColSpec(type=any_type, name=spec.name)
            for spec in signature.inputs.inputs
        ]
    )
    outputs = Schema(  # `generated` only comes back when a request asks for new tokens
        [
            ColSpec(type=spec.type, name=spec.name, required=False)
            if spec.name == "generated"
            else spec
            for spec in signature.outputs.inputs
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=signature.params)


def pip_requirements(checkpoint: Path) -> list[str]:
    """Pinned requirements of the serving environment (no slow import-capturing inference)."""
    names = ["mlflow", "torch", "safetensors", "numpy", "pandas"]
    if (checkpoint / "adapter").is_dir():
        names.append("peft")
    spec = json.loads((checkpoint / "spec.json").read_text(encoding="utf-8"))
    if str(spec.get("family", "")).startswith("hf"):
        names.append("transformers")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc(checkpoint: Path, workdir: Path, example: pd.DataFrame, signature: Any) -> Any:
    """Log this file as a "models from code" pyfunc into the active run, shipping `continual`.

    Returns:
        mlflow.models.model.ModelInfo of the logged model.
    """
    import continual

    code = workdir / "code"
    shutil.copytree(Path(continual.__file__).parent, code / "continual", ignore=_COPY_IGNORE)
    with warnings.catch_warnings():  # its serving check re-infers the integer labels' schema
        warnings.filterwarnings("ignore", message=INTEGER_SCHEMA_HINT)
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(__file__).resolve()),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(code / "continual")],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(checkpoint),
        )


@contextlib.contextmanager
def without_mlflow_prints() -> Iterator[None]:
    """Silence MLflow's console prints for the block ("Registered model 'x' already exists.
    Creating a new version of this model...", "Created version '7'"): `register_model` prints
    them to stderr on every registration, bypassing logging levels; the version is in the
    flow's result, the ledger and the MLflow UI. Failures still raise."""
    from mlflow.utils import logging_utils

    was_enabled = logging_utils.MLFLOW_LOGGING_STREAM.enabled
    logging_utils.MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM.enabled = was_enabled


@contextlib.contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's process-global fluent API at `uri` for the block, then restore it.

    `mlflow.pyfunc.log_model` only exists in the fluent API. The lock serialises our own
    logging threads; `sys.path` is restored because loading the model to validate its input
    example prepends the model's code folder, and the `code_model_<uuid>` modules MLflow
    registers each time it executes this file (twice per logged version: saving, validating)
    are dropped, or a long-lived process keeps every copy. MLflow's "View run" lines and
    progress bars are silenced meanwhile: they would corrupt the JSON the CLI prints on stdout.
    """
    quiet = {
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with _FLUENT_LOCK:
        saved_env = {key: os.environ.get(key) for key in (*_URI_ENV, *quiet)}
        saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), list(sys.path))
        modules = set(sys.modules)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        os.environ.update(quiet)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])
            sys.path[:] = saved[2]
            _drop_code_model_modules(modules)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _drop_code_model_modules(before: set[str]) -> None:
    """Forget the modules MLflow's models-from-code loader added (`code_model_<uuid>`)."""
    for name in set(sys.modules) - before:
        if name.startswith(CODE_MODEL_PREFIX):
            sys.modules.pop(name, None)


@contextlib.contextmanager
def logging_run(
    client: Any, run_id: str | None, run_name: str | None, experiment_id: Callable[[], str]
) -> Iterator[str]:
    """The fluent run to log into: `run_id` (its status kept), or a new run in the experiment."""
    active = mlflow.active_run()
    if run_id and active is not None and active.info.run_id == run_id:
        yield run_id
    elif run_id:
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield run_id
        if status == "RUNNING":  # the caller keeps logging into its run
            client.update_run(run_id, status="RUNNING")
    else:
        with mlflow.start_run(
            experiment_id=experiment_id(), run_name=run_name, nested=active is not None
        ) as run:
            yield run.info.run_id


def log_run_data(
    tags: dict[str, str],
    metrics: dict[str, float] | None,
    params: dict[str, str] | None,
    reports: dict[str, Path] | None,
    workdir: Path,
) -> None:
    """Lineage tags, metrics, params and report files on the active run.

    Tags, params and metrics go in one `log_batch` (the fluent `set_tags`, `log_params` and
    `log_metrics` are a store round trip and commit each, and each reads the run first); no
    model is logged yet, so the metrics are the run's alone, as the fluent calls would log them.
    """
    from mlflow.entities import Metric, Param, RunTag

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_run_data needs an active run (see logging_run)")
    stamp = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    for name, path in (reports or {}).items():
        target = Path("reports") / name
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=target.as_posix())
            continue
        copy = workdir / target  # the artifact takes the report's name, not the file's
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        mlflow.log_artifact(str(copy), artifact_path=target.parent.as_posix())


mlflow.models.set_model(EvergreenPyfunc())
