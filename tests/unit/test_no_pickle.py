"""Nothing in evergreen unpickles bytes: `torch.load` only with `weights_only=True`, no pickle,
cloudpickle, dill, joblib or shelve (imported by name or through importlib), no `torch.save`
(whatever it writes is a pickle someone will load), no `allow_pickle=True`, no `read_pickle`, no
`mlflow.pytorch` model flavour (it pickles the module), and the MLflow pyfunc is logged "from
code" (a file path, never a Python object MLflow would cloudpickle). Tests and benchmarks are
scanned too: a helper that pickles there would be copied into the code base soon enough."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [
    "continual",
    "data_plane",
    "model_registry",
    "tasks",
    "flows",
    "evergreen",
    "demo",
    "tests",
    "benchmarks",
]
PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
TORCH_PICKLING = {"load", "save"}  # `from torch import load` would hide a call from the scan
MLFLOW_PICKLING = ("pytorch.log_model", "pytorch.save_model", "pytorch.load_model")


def sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 100, "the scan must see the code base and its tests"
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(tree: ast.AST) -> list[str]:
    """Findings in one module's syntax tree, as `line: what` strings."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name and name.split(".")[0] in PICKLERS:
                    found.append(f"{node.lineno}: imports {name}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                for alias in node.names:
                    if alias.name in TORCH_PICKLING:
                        found.append(f"{node.lineno}: imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Call):
            continue
        found.extend(_unsafe_call(node))
    return found


def _unsafe_call(node: ast.Call) -> list[str]:
    found = []
    name = _dotted(node.func)
    keywords = {k.arg: k.value for k in node.keywords}
    if name.endswith(("torch.load", "serialization.load")):
        flag = keywords.get("weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            found.append(f"{node.lineno}: {name} without weights_only=True")
    if name.endswith(("torch.save", "serialization.save")):
        found.append(f"{node.lineno}: {name} (writes a pickle)")
    if name.endswith("import_module") or name == "__import__":
        target = node.args[0] if node.args else None
        if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in PICKLERS:
            found.append(f"{node.lineno}: {name}({target.value!r})")
    if name.endswith(MLFLOW_PICKLING):
        found.append(f"{node.lineno}: {name} (the mlflow.pytorch flavour pickles the module)")
    allow = keywords.get("allow_pickle")
    if isinstance(allow, ast.Constant) and allow.value is True:
        found.append(f"{node.lineno}: {name}(allow_pickle=True)")
    if name.endswith(("read_pickle", "to_pickle")):
        found.append(f"{node.lineno}: {name}")
    if name.endswith("pyfunc.log_model") and "python_model" in keywords:
        model = keywords["python_model"]
        if not (isinstance(model, ast.Call) and _dotted(model.func) == "str"):
            found.append(f"{node.lineno}: pyfunc.log_model with a Python object")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from cloudpickle import dumps",
        "import torch\ntorch.load('x')",
        "import torch\ntorch.load('x', weights_only=False)",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x')",
        "import mlflow\nmlflow.pyfunc.log_model('m', python_model=Model())",
        "import torch\ntorch.save(job, 'job.pt')",
        "from torch import load\nload('x')",
        "from torch.serialization import load",
        "import torch\ntorch.serialization.load('x')",
        "import importlib\nimportlib.import_module('cloudpickle')",
        "__import__('pickle')",
        "import mlflow\nmlflow.pytorch.log_model(model, 'm')",
        "import mlflow\nmlflow.pytorch.load_model('models:/m@champion')",
    ],
)
def test_the_scanner_catches_each_unsafe_pattern(snippet):
    assert unsafe_calls(ast.parse(snippet))


def test_the_scanner_accepts_the_safe_forms():
    safe = "import torch\ntorch.load('x', weights_only=True)\nlog_model(python_model=str(p))"
    assert unsafe_calls(ast.parse(safe.replace("log_model", "mlflow.pyfunc.log_model"))) == []


def test_no_module_unpickles_anything():
    """No exceptions: distributed training hands its job and result over as safetensors + JSON
    (`continual.distributed_files`) since the last two pickles were removed."""
    findings = {
        str(path.relative_to(ROOT)): [p.split(": ", 1)[1] for p in problems]
        for path in sources()
        if (problems := unsafe_calls(ast.parse(path.read_text(), str(path))))
    }
    assert findings == {}


def test_the_pyfunc_is_logged_from_code():
    text = (ROOT / "model_registry" / "pyfunc_model.py").read_text()
    assert "python_model=str(Path(__file__).resolve())" in text
