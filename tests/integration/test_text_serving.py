"""`mlflow models serve` for both text families, as a real process on 127.0.0.1.

Each test makes a pipeline home through the CLI (`evergreen.cli.main run bootstrap`, embedded
Prefect and MLflow), starts `mlflow models serve --env-manager local` on the champion in its own
process group (no PYTHONPATH: the model's shipped `continual` is what serves), POSTs a `text`
column to /invocations and compares the answer with the same version loaded in this process:

- encoder (`hf`, the packaged MiniLM): label + every class probability, from `models:/…@champion`;
- causal LM (`hf-causal-lm`, a tiny Llama built offline): log-likelihood, perplexity and, with
  inference params, the generated continuation (greedy by default, seeded sampling, the 256-token
  bound refused with its message), from the version's `runs:/<run_id>/model`.

Kept small (60 rows of real text, one epoch; 100 tiny-LM sentences) so each test takes well
under 90 s on 2 CPU cores. Run: `pytest -m integration tests/integration/test_text_serving.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml

from demo.text_timeline import TEXT_TOPICS, make_text_frames, text_config_dict
from evergreen.config import load_config
from model_registry.pyfunc_model import fluent_tracking
from model_registry.registry import Registry
from tests.integration.servers import BIN, background, free_port, wait_http
from tests.tiny_llama import DOMAINS, GLUE, sentences, tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = {"epochs": 1, "steps": 1, "batch_size": 16}


def _bootstrap_home(root: Path, tree: dict, batch: pd.DataFrame) -> tuple[Registry, str]:
    """Land one batch under `<root>/landing`, write `tree` (home and landing filled in) and
    run the CLI bootstrap on it: (the pipeline's registry, its tracking URI)."""
    directory = root / "landing" / "2026-12-01"
    directory.mkdir(parents=True)
    batch.to_parquet(directory / "part-0.parquet", index=False)
    (directory / "_SUCCESS").touch()
    tree = {**tree, "home": str(root / "home")}
    tree["data"] = {**tree["data"], "landing": str(root / "landing")}
    config = root / "evergreen.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    from evergreen.cli import main

    command = ["run", "bootstrap", "--batch", "2026-12-01", "--config", str(config)]
    assert main(command) == 0
    cfg = load_config(config)
    registry = Registry.from_config(cfg)
    assert registry.champion() is not None
    return registry, cfg.tracking_uri


@contextmanager
def mlflow_serve(model_uri: str, tracking_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow models serve` on a free loopback port; yields its base URL, kills it on exit."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # uvicorn is started by name: the venv's bin must be on PATH
    env |= {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "serve.log"
    with background(command, env=env, log=log, cwd=workdir) as process:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", 180, process, log)
        yield url


def _invoke(url: str, texts: list[str], params: dict | None = None) -> httpx.Response:
    body: dict = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}
    if params is not None:
        body["params"] = params
    return httpx.post(f"{url}/invocations", json=body, timeout=60)


def _predictions(response: httpx.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[-2000:]
    return pd.DataFrame(response.json()["predictions"])


def _in_process(model_uri: str, tracking_uri: str, texts: list[str], params=None) -> pd.DataFrame:
    with fluent_tracking(tracking_uri):
        model = mlflow.pyfunc.load_model(model_uri)
        return model.predict(pd.DataFrame({"text": texts}), params=params)


@pytest.fixture(scope="module")
def encoder_home(tmp_path_factory) -> tuple[Registry, str]:
    root = tmp_path_factory.mktemp("serve-encoder")
    first = make_text_frames()[0]  # real docstring sentences of pandas and torch
    batch = first.groupby("label").head(30).reset_index(drop=True)
    tree = text_config_dict(str(root / "landing"), str(root / "home"), max_length=32)
    tree["bootstrap"] = {"train": {**TRAIN, "lr": 1e-4}}
    tree["registry"] = {"name": "serve-encoder", "experiment": "serve-encoder"}
    return _bootstrap_home(root, tree, batch)


@pytest.fixture(scope="module")
def lm_home(tmp_path_factory) -> tuple[Registry, str]:
    root = tmp_path_factory.mktemp("serve-lm")
    tree = {
        "data": {"text": "text", "min_rows": 20},
        "model": {
            "family": "hf-causal-lm",
            "hf_path": str(tiny_llama(root / "tiny-llama")),
            "max_length": 32,
        },
        "bootstrap": {"train": {**TRAIN, "epochs": 10, "lr": 3e-3}},
        "registry": {"name": "serve-lm", "experiment": "serve-lm"},
    }
    return _bootstrap_home(root, tree, pd.DataFrame({"text": sentences("kitchen", 100, seed=0)}))


def test_encoder_champion_serves_labels_and_every_class_probability(encoder_home, tmp_path):
    registry, tracking_uri = encoder_home
    uri = f"models:/{registry.model_name}@champion"
    texts = [
        "Return a DataFrame with the rows of the index.",
        "Tensor on the device with the given dtype.",
        "Register the model version in the tracking server.",
    ]
    with mlflow_serve(uri, tracking_uri, tmp_path / "serve") as url:
        served = _predictions(_invoke(url, texts))
        missing = httpx.post(
            f"{url}/invocations",
            json={"dataframe_split": {"columns": ["body"], "data": [["x"]]}},
            timeout=60,
        )
    probabilities = [f"probability_{t}" for t in TEXT_TOPICS]
    assert list(served.columns) == ["prediction", "probability", *probabilities]
    assert set(served["prediction"]) <= set(TEXT_TOPICS)
    assert served[probabilities].sum(axis=1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert served["probability"].tolist() == pytest.approx(served[probabilities].max(axis=1))
    expected = _in_process(uri, tracking_uri, texts)  # the same version, loaded here
    assert served["prediction"].tolist() == expected["prediction"].tolist()
    for column in ["probability", *probabilities]:
        assert served[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-5)
    assert missing.status_code == 400 and "text" in missing.text  # MLflow enforces the schema


def test_causal_lm_serves_likelihood_and_bounded_generation(lm_home, tmp_path):
    registry, tracking_uri = lm_home
    champion = registry.champion()
    assert champion is not None
    uri = f"runs:/{champion.run_id}/model"
    texts = ["bread of the", "salt with a", "boat on the tide"]
    with mlflow_serve(uri, tracking_uri, tmp_path / "serve") as url:
        plain = _predictions(_invoke(url, texts))
        greedy = _predictions(_invoke(url, texts, {"max_new_tokens": 5}))
        sampled = [
            _predictions(_invoke(url, texts, {"max_new_tokens": 5, "temperature": 1.5, "seed": 7}))
            for _ in range(2)
        ]
        too_many = _invoke(url, texts, {"max_new_tokens": 1000})
    assert list(plain.columns) == ["log_likelihood", "perplexity"]
    assert list(greedy.columns) == ["log_likelihood", "perplexity", "generated"]
    pd.testing.assert_frame_equal(greedy[plain.columns], plain)
    expected = _in_process(uri, tracking_uri, texts, {"max_new_tokens": 5})
    for column in plain.columns:
        assert plain[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-6)
    assert greedy["generated"].tolist() == expected["generated"].tolist()
    kitchen = set(DOMAINS["kitchen"]) | set(GLUE)  # what the bootstrap taught it
    for text in greedy["generated"]:
        assert 1 <= len(text.split()) <= 5 and set(text.split()) <= kitchen, text
    assert sampled[0]["generated"].tolist() == sampled[1]["generated"].tolist()  # seeded
    assert too_many.status_code == 400
    assert "max_new_tokens must be an integer from 0 (no generation) to 256" in too_many.text
