"""Launch a training job under torchrun and bring its result back into the flow's process.

`train.processes: N > 1` sends a cadence's training here: the job (model, rows, settings, EWC,
replay buffer) is written to a private temporary folder as safetensors + JSON
(`continual.distributed_files`; nothing is pickled, so nothing in the folder can run code), `python -m torch.distributed.run
--standalone --nproc-per-node N -m continual.distributed <folder>` runs it (DDP: gloo on CPU,
NCCL on GPUs; `continual.distributed` says how ranks share the work), every rank's output is
streamed line by line into `log` (the Prefect run logger in a task), and rank 0's weights are
loaded back into the caller's model. If any rank fails, one `DistributedTrainingError` names the
rank and its error; the caller's model is untouched and the folder is removed either way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import continual
from continual.distributed import ERROR_PREFIX, DistributedJob, DistributedResult
from continual.distributed_files import RESULT_FILE, read_result, write_job

# A rank that crashes without a Python error (gloo on CPU sometimes aborts one with
# std::terminate) gets a fresh torchrun, up to 3 more. Not torchrun's own --max-restarts: its
# restarted ranks reconnected to a stale peer address and waited in gloo's connect for its 30
# min timeout, and it restarted deterministic failures (a rank's Python error) too.
ATTEMPTS = 4


class DistributedTrainingError(RuntimeError):
    """A torchrun training job failed; the message names the failing rank(s)."""


def torchrun_command(job_dir: Path, processes: int) -> list[str]:
    """The torchrun command line (standalone rendezvous on a free local port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "continual.distributed",
        str(job_dir),
    ]


def _environment(processes: int) -> dict[str, str]:
    """The ranks import this checkout's `continual`, and share the cores instead of fighting."""
    env = dict(os.environ)
    root = str(Path(continual.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def failure_message(job_dir: Path, exit_code: int, processes: int) -> str:
    """One sentence per failing rank: its rank and the last line of its traceback."""
    reports = sorted(job_dir.glob(f"{ERROR_PREFIX}*.txt"))
    if not reports:
        return (
            f"distributed training ({processes} processes) exited with code {exit_code} and no "
            "rank reported an error (killed, or out of memory?); see the rank logs above"
        )
    parts = []
    for report in reports:
        rank = report.stem.removeprefix(ERROR_PREFIX)
        lines = [line for line in report.read_text().splitlines() if line.strip()]
        parts.append(f"rank {rank} of {processes} failed: {lines[-1] if lines else '?'}")
    return "distributed training failed; " + "; ".join(parts)


def _launch(job_dir: Path, processes: int, log: Callable[[str], None]) -> int:
    """One torchrun of the job, its output streamed into `log`; returns its exit code."""
    proc = subprocess.Popen(
        torchrun_command(job_dir, processes),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_environment(processes),
        start_new_session=True,  # one process group: a cancelled task stops every rank
    )
    try:
        return _stream(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


def _stream(proc: subprocess.Popen[str], log: Callable[[str], None]) -> int:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            log(line.rstrip())
    return proc.wait()


def run_distributed(
    job: DistributedJob, processes: int, log: Callable[[str], None]
) -> DistributedResult:
    """Run `job` on `processes` ranks under torchrun; load rank 0's weights into `job.model`.

    Raises:
        ValueError: fewer than 2 processes.
        DistributedTrainingError: a rank failed (the message names it) or torchrun did.
    """
    if processes < 2:
        raise ValueError(f"run_distributed needs at least 2 processes, got {processes}")
    with tempfile.TemporaryDirectory(prefix="evergreen-torchrun-") as folder:
        job_dir = Path(folder)
        write_job(job, job_dir)
        log(f"torchrun: {processes} processes, job in {job_dir.name}")
        for attempt in range(1, ATTEMPTS + 1):
            code = _launch(job_dir, processes, log)
            result_file = job_dir / RESULT_FILE
            reported = any(job_dir.glob(f"{ERROR_PREFIX}*.txt"))
            if result_file.exists() and not reported:
                if code != 0:
                    # Rank 0 writes the result after the last collective, so the work is
                    # complete; a rank that died afterwards (a gloo abort at teardown) loses
                    # nothing.
                    log(f"torchrun exited with code {code} after rank 0 wrote the result; using it")
                break
            if reported or attempt == ATTEMPTS:
                raise DistributedTrainingError(failure_message(job_dir, code, processes))
            log(
                f"torchrun exited with code {code} and no rank reported an error (a crashed "
                f"rank); fresh start {attempt + 1} of {ATTEMPTS}"
            )
        outcome = read_result(job_dir)
    _load_weights(job.model, outcome.state_dict)
    return outcome


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)
    model.eval()
