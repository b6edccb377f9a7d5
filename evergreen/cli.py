"""The `evergreen` command: init | demo | run <flow> | deploy | status | history | rollback | report | ui.

Every command but `init` takes `--config PATH` (default: $EVERGREEN_CONFIG, else the nearest
evergreen.yaml, else the demo's pointer: `evergreen.home`) and repeatable `--set key=value`
overrides whose values are parsed as YAML. Failures print one line on stderr and exit with the
code of their class (`evergreen.errors.ExitCode`); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console

from evergreen.cadences import CADENCES, cadence, flush_run_logs, run_flow
from evergreen.config import EvergreenConfig, load_config
from evergreen.errors import ConfigError, ExitCode, UsageError, classify
from evergreen.home import find_config, write_pointer

if TYPE_CHECKING:
    from model_registry.registry import Registry

PIPED_WIDTH = 200  # rich's 80 columns cut the status tables' headers when piped or redirected


def _console(stderr: bool = False) -> Console:
    """A rich console; when the output is not a terminal (`| less`, `> file`, CI logs) and
    $COLUMNS is unset, `PIPED_WIDTH` columns instead of rich's 80."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None)


console = _console()
err_console = _console(stderr=True)
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
    # our libraries' loggers reach the flow run's logs in the Prefect UI (see prefect.yaml too)
    "PREFECT_LOGGING_EXTRA_LOGGERS": "data_plane,model_registry,continual",
}
# Read-only commands answer within seconds when the tracking server is down (MLflow's own default
# retries for ~4 minutes); flows keep MLflow's backoff, since a run should ride out a restart.
INTERACTIVE_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
INTERACTIVE = {"status", "history", "report", "ui"}
# The demo prints its own timeline; flow-run logs stay in the Prefect UI/API (model loads draw no
# "Loading weights" bars anywhere: `evergreen/__init__.py`).
DEMO_DEFAULTS = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
}


def _package_version() -> str:
    try:
        return version("evergreen")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _output_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--quiet/--verbose/--debug, accepted before or after the command name."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_true", help="only results and errors", **default
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="also flow-run logs at INFO", **default
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of a failure (or set EVERGREEN_DEBUG=1)",
        **default,
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="config file (default: $EVERGREEN_CONFIG, else the nearest evergreen.yaml, else "
        "the last demo's)",
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
    parser = argparse.ArgumentParser(
        prog="evergreen",
        description=__doc__.splitlines()[0],
        epilog="exit codes: "
        + ", ".join(f"{code.value} {code.name.lower().replace('_', '-')}" for code in ExitCode),
    )
    parser.add_argument("--version", action="version", version=f"evergreen {_package_version()}")
    _output_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a commented evergreen.yaml here")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--path", default="evergreen.yaml")
    init.add_argument(
        "--text",
        action="store_true",
        help="text classification on the packaged MiniLM (data.text, model.family hf, "
        "training budgets for a pretrained encoder)",
    )
    demo = sub.add_parser(
        "demo", help="run the embedded demo on scikit-learn digits (--text: real text, MiniLM)"
    )
    demo.add_argument(
        "--text",
        action="store_true",
        help="shifting topics of real text on the packaged pretrained MiniLM encoder "
        "(needs the text extra: pip install 'evergreen[text]')",
    )
    demo.add_argument(
        "--home",
        default=None,
        help=(
            "where the demo keeps its state (default .evergreen/demo, or .evergreen/demo-text); "
            "deleted first unless --keep — an existing folder the demo did not make is refused"
        ),
    )
    demo.add_argument("--keep", action="store_true", help="do not wipe an earlier demo home")
    run = sub.add_parser("run", help="run one flow now (ephemeral Prefect unless PREFECT_API_URL)")
    run.add_argument("flow", choices=[c.name for c in CADENCES], help="the flow to run")
    _flow_options(run)
    deploy = sub.add_parser("deploy", help="register the prefect.yaml deployments on the server")
    deploy.add_argument("--prefect-file", default=str(PROJECT_ROOT / "prefect.yaml"))
    deploy.add_argument("--name", action="append", help="only this deployment (repeatable)")
    deploy.add_argument(
        "--notify",
        metavar="BLOCK_SLUG",
        help="create the failed-run and quarantined-batch automations, notifying this "
        "notification block (e.g. slack-webhook/ops)",
    )
    status = sub.add_parser("status", help="champion, versions, promotions, ledger")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    history = sub.add_parser("history", help="promotion and rollback history")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    history.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    rollback = sub.add_parser("rollback", help="restore the previous (or a chosen) champion")
    rollback.add_argument("--to", help="version to restore")
    rollback.add_argument("--reason", default="manual rollback (CLI)")
    report = sub.add_parser("report", help="write the Markdown + PNG report")
    report.add_argument("--out", help="output folder (default: <home>/reports/latest)")
    ui = sub.add_parser("ui", help="how to open the MLflow and Prefect UIs on this home")
    ui.add_argument("--start", action="store_true", help="start both servers (Ctrl-C stops them)")
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--prefect-port", type=int, default=4200)
    for sub_parser in sub.choices.values():
        _output_flags(sub_parser, top=False)
        if sub_parser not in (init, demo):  # the demo writes its own config
            _common(sub_parser)
    return parser


def _config(args: argparse.Namespace) -> EvergreenConfig:
    """Find, load and validate the config; say which file was used (stderr, unless --quiet).

    Sets `args.config` to the resolved path so flows started from here read the same file.

    Raises:
        ConfigError: missing, unreadable or invalid, in one line naming the file.
    """
    try:
        found = find_config(args.config)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    if not args.quiet:
        err_console.print(
            f"[dim]config: {found.path} ({found.source})[/dim]", highlight=False, soft_wrap=True
        )
    args.config = str(found.path)
    try:
        return load_config(found.path, args.overrides)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as error:  # pydantic's: ValueError
        raise ConfigError(f"{found.path}: {_one_line_invalid(error)}") from error


def _one_line_invalid(error: BaseException) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic.ValidationError: name every key and what was wrong
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'config'}: {e.get('msg', '')}"
            for e in errors()
        )
    return " ".join(str(error).split())


def cmd_init(args: argparse.Namespace) -> int:
    from evergreen.template import CONFIG_TEMPLATE, text_template

    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists: use --force to overwrite it")
    path.write_text(text_template() if args.text else CONFIG_TEMPLATE)
    columns = "data.text" if args.text else "data.features"
    console.print(f"wrote {path}: set data.landing, {columns}, data.label and data.classes")
    return 0


# CLI spellings of parameter fields that read better than the field name.
_FLAG_NAMES = {"batch_ids": "--batch", "to": "--to"}
_NOT_FLAGS = {"config_path", "overrides"}  # --config and --set
_NOT_PARAMS = {"command", "flow", "config", "overrides", "quiet", "verbose", "debug"}


def _flow_options(run: argparse.ArgumentParser) -> None:
    """One option per field of any declared flow's parameter model (derived, not listed)."""
    seen: set[str] = set()
    for item in CADENCES:
        for name, info in item.params_model().model_fields.items():
            if name in _NOT_FLAGS or name in seen:
                continue
            seen.add(name)
            flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            # argparse %-formats help strings: a literal "%" in a description must be doubled
            help_text = f"{info.description} ({', '.join(_takers(name))})".replace("%", "%%")
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
    cfg = _config(args)  # fail fast with a clear message
    model = item.params_model()
    given = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name not in _NOT_PARAMS
    }
    foreign = sorted(name for name in given if name not in model.model_fields)
    if foreign:
        flags = [_FLAG_NAMES.get(n, "--" + n.replace("_", "-")) for n in foreign]
        raise UsageError(f"flow {item.name!r} does not take {', '.join(flags)}")
    params = {"config_path": args.config, "overrides": args.overrides, **given}
    try:
        model(**params)
    except ValueError as error:  # pydantic.ValidationError
        raise UsageError(f"{item.name}: {_one_line_invalid(error)}") from error
    if item.name == "rollback":
        _refuse_impossible_rollback(cfg, given.get("to"))
    if item.consumes_batches:  # no-op fast path: same ledger rule, no flow run (evergreen.pending)
        from evergreen.pending import nothing_pending, skipped_outcome

        if nothing_pending(cfg, item.name, given):
            console.print_json(json.dumps(skipped_outcome(item.name)))
            return 0
    _console_without_tracebacks(args)
    result = _run_once(item.name, **params)
    console.print_json(json.dumps(result, default=str))
    if result.get("decision") != "failed":
        return 0
    _outcome_line(f"{item.name}: failed", result)
    return 1


def _outcome_line(what: str, result: dict[str, Any]) -> None:
    """The one error line of a command that ran and did not do its job (exit 1): what, and the
    outcome's first reason (every reason is in the JSON on stdout)."""
    reasons = [str(r) for r in result.get("reasons") or [] if str(r).strip()]
    first = reasons[0].strip().splitlines()[0] if reasons else "see the outcome on stdout"
    print(f"evergreen: error: {what}: {first}", file=sys.stderr)


def _run_once(name: str, **params: Any) -> dict[str, Any]:
    """`run_flow`, then the run's log lines sent while the API still runs (this process exits
    after it; a long-lived process must not drain after every run, see `flush_run_logs`)."""
    try:
        return run_flow(name, **params)
    finally:
        flush_run_logs()


class _NoTraceback(logging.Formatter):
    """Formats a record as `inner` would, minus its traceback (the record itself is untouched,
    so the flow run's logs in the Prefect API keep the full traceback)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = logging.makeLogRecord(record.__dict__)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def _console_without_tracebacks(args: argparse.Namespace) -> None:
    """Prefect's console handlers print a failed flow's traceback, and MLflow's own console
    handlers (mlflow, sqlalchemy.engine, alembic) print one when its store fails (a full disk);
    the CLI prints one line instead (`main`), unless --debug. Handlers that do not write to a
    console (the Prefect API's, files) keep the traceback."""
    if args.debug or os.environ.get("EVERGREEN_DEBUG", "") not in ("", "0", "false"):
        return
    import mlflow  # noqa: F401  (configures its loggers on import: wrap them now)
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()  # what Prefect does at its first run; later calls are incremental
    loggers = [logging.getLogger()] + [
        item
        for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _writes_to_console(handler) and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter))


def _writes_to_console(handler: logging.Handler) -> bool:
    if type(handler).__name__ == "PrefectConsoleHandler":
        return True
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    from evergreen.deploy import deploy_all

    cfg = _config(args)
    return deploy_all(
        cfg,
        Path(args.prefect_file),
        names=args.name,
        console=console,
        config_path=Path(args.config),
        notify=args.notify,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from model_registry.ledger import Ledger
    from model_registry.registry import Registry
    from model_registry.status import render_status, status_snapshot

    cfg = _config(args)
    registry = Registry.from_config(cfg)
    _reconcile(registry)
    snapshot = status_snapshot(registry, Ledger.from_config(cfg))
    if args.json:
        print(json.dumps(snapshot, indent=2, default=str))
    else:
        render_status(snapshot, console)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from model_registry.registry import Registry
    from model_registry.status import render_history

    cfg = _config(args)
    registry = Registry.from_config(cfg)
    _reconcile(registry)
    events = registry.history(limit=args.limit)
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in events], indent=2, default=str))
    else:
        render_history(events, console)
    return 0


def _reconcile(registry: Registry) -> None:
    """Record a champion move made by hand (MLflow UI/API) before showing the history, as every
    flow does when it starts, so the move shows without waiting for a flow run; say so on
    stderr (even with --quiet or --json: an UNGATED champion is serving)."""
    from model_registry.reconcile import reconcile_champion

    found = reconcile_champion(registry)
    if found.event is not None:
        colour = "red" if found.ungated else "yellow"
        err_console.print(f"[{colour}]recorded:[/{colour}] {found.event.reason}", highlight=False)


def _refuse_impossible_rollback(cfg: EvergreenConfig, to: str | None) -> None:
    """Refuse a rollback that cannot happen — no champion (exit 4), no earlier champion (1),
    `--to` a version that does not exist (2) — before a flow run starts: the flow refuses them
    too, but as a failed task and flow run whose ERROR log lines reach the console ahead of the
    one error line, even with --quiet. A champion moved by hand is recorded first (as the flow's
    start does), so the walk back reads the history the flow would read.

    Raises:
        RegistryError, NoEarlierChampionError, UnknownVersionError: `Registry.check_rollback`.
    """
    from model_registry.registry import Registry

    registry = Registry.from_config(cfg)
    _reconcile(registry)
    registry.check_rollback(to)


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _refuse_impossible_rollback(cfg, args.to)
    _console_without_tracebacks(args)
    result = _run_once(
        "rollback",
        config_path=args.config,
        overrides=args.overrides,
        to=args.to,
        reason=args.reason,
    )
    console.print_json(json.dumps(result, default=str))
    if result["decision"] == "rolled-back":
        return 0
    _outcome_line("rollback: did not roll back", result)
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from evergreen.history import write_registry_report

    cfg = _config(args)
    out = Path(args.out) if args.out else cfg.home_path / "reports" / "latest"
    console.print(f"report: {write_registry_report(cfg, out)}")
    return 0


DEMO_MARKER = ".evergreen-demo"


def _wipe_demo_home(home: Path, *, ours: bool) -> None:
    """Start the demo afresh, deleting only a folder the demo made: its default home, or one
    holding the demo's marker, or an empty one.

    Raises:
        UsageError: `--home` names an existing folder the demo did not make (a project's home
            given by mistake must not be deleted).
    """
    if not home.is_dir():
        raise UsageError(f"--home {home} exists and is not a folder")
    if ours or (home / DEMO_MARKER).is_file() or not any(home.iterdir()):
        shutil.rmtree(home)
        return
    raise UsageError(
        f"--home {home} exists and was not made by `evergreen demo` (no {DEMO_MARKER} file): "
        "the demo starts by deleting its home, so pick a new folder (or delete this one yourself)"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from demo.run import run_demo

    default = Path(".evergreen/demo-text" if args.text else ".evergreen/demo").resolve()
    home = Path(args.home).resolve() if args.home else default
    if home.exists() and not args.keep:
        _wipe_demo_home(home, ours=home == default)
    home.mkdir(parents=True, exist_ok=True)
    (home / DEMO_MARKER).write_text("written by `evergreen demo`: the demo may wipe this folder\n")
    try:
        code = run_demo(home, console=console, text=args.text)
    finally:
        flush_run_logs()  # once, after all of the demo's flow runs (see `flush_run_logs`)
    # `evergreen status` typed here next finds the demo without --config (evergreen.home).
    pointer = write_pointer(home / "evergreen.yaml")
    if not args.quiet:
        err_console.print(
            f"[dim]{pointer} → {home / 'evergreen.yaml'}[/dim]", highlight=False, soft_wrap=True
        )
    return code


def cmd_ui(args: argparse.Namespace) -> int:
    from evergreen.ui import serve, ui_commands

    cfg = _config(args)
    commands = ui_commands(cfg, mlflow_port=args.mlflow_port, prefect_port=args.prefect_port)
    for item in commands:
        console.print(
            f"[bold]{item.name}[/bold]: {item.url}\n  {item.shell}", highlight=False, soft_wrap=True
        )
    return serve(commands, console) if args.start else 0


COMMANDS = {
    "init": cmd_init,
    "demo": cmd_demo,
    "run": cmd_run,
    "deploy": cmd_deploy,
    "status": cmd_status,
    "history": cmd_history,
    "rollback": cmd_rollback,
    "report": cmd_report,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure becomes one line on stderr and its class's exit code."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("EVERGREEN_DEBUG", "") not in ("", "0", "false")
    _set_verbosity(args)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    extra = DEMO_DEFAULTS if args.command == "demo" else {}
    extra = INTERACTIVE_DEFAULTS if args.command in INTERACTIVE else extra
    for key, value in extra.items():
        os.environ.setdefault(key, value)
    try:
        return COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as error:
        failure = classify(error)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"evergreen: error: {failure.message}", file=sys.stderr)
        return int(failure.code)


def _set_verbosity(args: argparse.Namespace) -> None:
    """--quiet: Prefect's console logs at WARNING; --verbose: INFO (before Prefect is imported)."""
    if args.quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    elif args.verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
