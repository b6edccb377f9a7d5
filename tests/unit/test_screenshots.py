"""`make screenshots`' own checks: it says how to install Chromium, and refuses to picture a
page that would not explain a version or a run form an operator could not fill in."""

from __future__ import annotations

import pytest

from benchmarks.screenshots import (
    INSTALL_HINT,
    LINEAGE_TAGS,
    RunForm,
    VersionPage,
    find_chromium,
)


def test_missing_chromium_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    with pytest.raises(SystemExit, match="apt-get install -y chromium") as stopped:
        find_chromium()
    assert str(stopped.value) == INSTALL_HINT
    browser = tmp_path / "my-chrome"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    assert find_chromium("my-chrome") == str(browser)


def _page(**changes) -> VersionPage:
    fields = {
        "name": "m",
        "version": "3",
        "aliases": ["champion"],
        "tags": {f"evergreen.{key}": "x" for key in LINEAGE_TAGS},
        "run_id": "r",
        "experiment_id": "1",
        "model_id": "m-1",
        "datasets": {"train": "train[b1]", "gate": "gate[b1]"},
        "run_metrics": {"time.train_s": 1.0},
        "model_metrics": {"gate.new.lcb": 0.01},
        "params": {"method": "lora"},
    }
    return VersionPage(**(fields | changes))


def test_a_version_page_without_lineage_datasets_or_linked_metrics_is_refused():
    assert _page().problems() == []
    assert _page(tags={}).problems()[0] == "no lineage tag evergreen.parent_version"
    assert "no train dataset" in _page(datasets={"gate": "g"}).problems()[0]
    assert _page(model_metrics={}).problems() == ["no metrics linked to the logged model"]
    assert _page(model_id=None).problems() == ["the version links to no logged model"]


def test_a_run_form_field_without_type_description_or_default_is_refused():
    good = {"type": "boolean", "description": "why", "default": False}
    assert RunForm("d", {"properties": {"force": good}}, {}).problems() == []
    schema = {
        "properties": {
            "a": {"description": "d", "default": 1},
            "b": {"type": "string", "default": ""},
            "c": {"type": "string", "description": "d"},
            "v": {"type": "array", "description": "required"},
        },
        "required": ["v"],
        "definitions": {"Nested": {}},
    }
    assert RunForm("d", schema, {}).problems() == [
        "a nested object in the form",
        "a: untyped",
        "b: no description",
        "c: optional without a visible default",
    ]
