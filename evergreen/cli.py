"""The `evergreen` command: init | demo | run <flow> | deploy | status | history | rollback | report.

Every command takes `--config PATH` (default ./evergreen.yaml) and repeatable `--set key=value`
overrides whose values are parsed as YAML.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from evergreen.cadences import CADENCES, cadence, run_flow
from evergreen.config import load_config

console = Console()
PROJECT_ROOT = Path(__file__).resolve().parent.parent

QUIET_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
# The demo prints its own timeline; flow-run logs stay in the Prefect UI/API.
DEMO_DEFAULTS = {"PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="config file (default: $EVERGREEN_CONFIG or ./evergreen.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; the value is parsed as YAML (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evergreen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a commented evergreen.yaml here")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--path", default="evergreen.yaml")
    demo = sub.add_parser("demo", help="run the embedded demo on scikit-learn digits")
    demo.add_argument("--home", default=".evergreen/demo", help="where the demo keeps its state")
    demo.add_argument("--keep", action="store_true", help="do not wipe an earlier demo home")
    run = sub.add_parser("run", help="run one flow now (ephemeral Prefect unless PREFECT_API_URL)")
    run.add_argument("flow", choices=[c.name for c in CADENCES], help="the flow to run")
    _flow_options(run)
    deploy = sub.add_parser("deploy", help="register the prefect.yaml deployments on the server")
    deploy.add_argument("--prefect-file", default=str(PROJECT_ROOT / "prefect.yaml"))
    deploy.add_argument("--name", action="append", help="only this deployment (repeatable)")
    status = sub.add_parser("status", help="champion, versions, promotions, ledger")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("history", help="promotion and rollback history")
    rollback = sub.add_parser("rollback", help="restore the previous (or a chosen) champion")
    rollback.add_argument("--to", help="version to restore")
    rollback.add_argument("--reason", default="manual rollback (CLI)")
    report = sub.add_parser("report", help="write the Markdown + PNG report")
    report.add_argument("--out", help="output folder (default: <home>/reports/latest)")
    for sub_parser in (init, demo, run, deploy, status, sub.choices["history"], rollback, report):
        if sub_parser is not init:
            _common(sub_parser)
    return parser


def cmd_init(args: argparse.Namespace) -> int:
    from evergreen.template import CONFIG_TEMPLATE

    path = Path(args.path)
    if path.exists() and not args.force:
        console.print(f"[red]{path} exists[/red]; use --force to overwrite")
        return 1
    path.write_text(CONFIG_TEMPLATE)
    console.print(f"wrote {path}: set data.landing, data.features, data.label and data.classes")
    return 0


# CLI spellings of parameter fields that read better than the field name.
_FLAG_NAMES = {"batch_ids": "--batch", "to": "--to"}
_NOT_FLAGS = {"config_path", "overrides"}  # --config and --set


def _flow_options(run: argparse.ArgumentParser) -> None:
    """One option per field of any declared flow's parameter model (derived, not listed)."""
    seen: set[str] = set()
    for item in CADENCES:
        for name, info in item.params_model().model_fields.items():
            if name in _NOT_FLAGS or name in seen:
                continue
            seen.add(name)
            flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            help_text = f"{info.description} ({', '.join(_takers(name))})"
            annotation = str(info.annotation)
            if info.annotation is bool:
                run.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            elif name == "batch_ids":
                run.add_argument(flag, dest=name, action="append", help=help_text)
            elif annotation.startswith("list"):
                run.add_argument(flag, dest=name, nargs="+", help=help_text)
            else:
                kind = int if "int" in annotation else float if "float" in annotation else str
                run.add_argument(flag, dest=name, type=kind, help=help_text)


def _takers(field: str) -> list[str]:
    return [c.name for c in CADENCES if field in c.params_model().model_fields]


def cmd_run(args: argparse.Namespace) -> int:
    item = cadence(args.flow)
    cfg = load_config(args.config, args.overrides)  # fail fast with a clear message
    fields = item.params_model().model_fields
    given = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name not in ("command", "flow", "config", "overrides")
    }
    foreign = sorted(name for name in given if name not in fields)
    if foreign:
        flags = [_FLAG_NAMES.get(n, "--" + n.replace("_", "-")) for n in foreign]
        raise ValueError(f"flow {item.name!r} does not take {', '.join(flags)}")
    if item.consumes_batches:  # no-op fast path: same ledger rule, no flow run (evergreen.pending)
        from evergreen.pending import nothing_pending, skipped_outcome

        if nothing_pending(cfg, item.name, given):
            console.print_json(json.dumps(skipped_outcome(item.name)))
            return 0
    result = run_flow(item.name, config_path=args.config, overrides=args.overrides, **given)
    console.print_json(json.dumps(result, default=str))
    return 0 if result.get("decision") != "failed" else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from evergreen.deploy import deploy_all

    cfg = load_config(args.config, args.overrides)
    return deploy_all(cfg, Path(args.prefect_file), names=args.name, console=console)


def cmd_status(args: argparse.Namespace) -> int:
    from model_registry.ledger import Ledger
    from model_registry.registry import Registry
    from model_registry.status import render_status, status_snapshot

    cfg = load_config(args.config, args.overrides)
    snapshot = status_snapshot(Registry.from_config(cfg), Ledger.from_config(cfg))
    if args.json:
        print(json.dumps(snapshot, indent=2, default=str))
    else:
        render_status(snapshot, console)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from model_registry.registry import Registry
    from model_registry.status import render_history

    cfg = load_config(args.config, args.overrides)
    render_history(Registry.from_config(cfg).history(), console)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    result = run_flow(
        "rollback",
        config_path=args.config,
        overrides=args.overrides,
        to=args.to,
        reason=args.reason,
    )
    console.print_json(json.dumps(result, default=str))
    return 0 if result["decision"] == "rolled-back" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from evergreen.history import write_registry_report

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else cfg.home_path / "reports" / "latest"
    console.print(f"report: {write_registry_report(cfg, out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from demo.run import run_demo

    home = Path(args.home).resolve()
    if home.exists() and not args.keep:
        shutil.rmtree(home)
    return run_demo(home, console=console)


COMMANDS = {
    "init": cmd_init,
    "demo": cmd_demo,
    "run": cmd_run,
    "deploy": cmd_deploy,
    "status": cmd_status,
    "history": cmd_history,
    "rollback": cmd_rollback,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    if args.command == "demo":
        for key, value in DEMO_DEFAULTS.items():
            os.environ.setdefault(key, value)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
