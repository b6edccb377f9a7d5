"""Issue 13: in one long-lived process, pyarrow's bundled mimalloc kept ≈ 2.8 MB a daily-lora
run it had freed; flows allocate Arrow buffers with the C library's malloc instead."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

from data_plane.readers import ARROW_POOL_ENV, use_system_arrow_pool


@pytest.fixture
def restore_pool():
    before = pa.default_memory_pool()
    yield
    pa.set_memory_pool(before)


def test_flows_allocate_arrow_buffers_with_the_system_pool(monkeypatch, restore_pool):
    monkeypatch.delenv(ARROW_POOL_ENV, raising=False)
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    use_system_arrow_pool()
    assert pa.default_memory_pool().backend_name == "system"
    table = pa.Table.from_pandas(pd.DataFrame({"x": ["a", "b"] * 1000}))
    assert pa.default_memory_pool().bytes_allocated() > 0  # the table's buffers came from it
    del table


def test_an_explicit_pool_choice_is_kept(monkeypatch, restore_pool):
    monkeypatch.setenv(ARROW_POOL_ENV, "mimalloc")
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    use_system_arrow_pool()
    assert pa.default_memory_pool().backend_name == "mimalloc"


def test_importing_the_flows_chooses_the_system_pool_before_pyarrow_loads():
    env = {k: v for k, v in os.environ.items() if k != ARROW_POOL_ENV}
    code = "import flows, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "system", done.stderr
