"""Data-parallel training and the distributed per-example Fisher, on torch.distributed.

A cadence with `train.processes: N > 1` trains under torchrun (`tasks/distributed.py` launches
`python -m torch.distributed.run --standalone --nproc-per-node N -m continual.distributed DIR`).
Every rank loads the same job from DIR (safetensors + JSON, no pickle:
`continual.distributed_files`), takes its strided shard of the rows, and trains the
model wrapped in `DistributedDataParallel` (gloo on CPU, NCCL on GPUs) — torch's own gradient
all-reduce, nothing home-made. The choices that keep N processes equivalent to one:

- the global batch stays `batch_size`: each rank takes ⌈batch_size / N⌉ rows per step and DDP
  averages the gradients; the step count is the same on every rank (DDP needs it);
- randomness is per rank: batch order, dropout and replay sampling use `rank_seed(seed, rank)`,
  distinct per rank (rank 0 keeps the single-process seed), so ranks replay different rows;
- the Fisher is computed on each rank's shard as Σ_n grad_n² (never a per-shard mean),
  all-reduced in one flat tensor, then divided once by the global N: it equals the
  single-process Fisher up to float rounding (tests check 1e-6 relative);
- only rank 0 writes the result (weights, the step losses averaged over ranks, the Fisher).

A rank that fails writes its traceback to `error-rank<r>.txt` in DIR before exiting, so the
launcher can name the failing rank; torchrun then stops the other ranks.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from continual.distributed_files import DistributedJob as DistributedJob  # re-exported
from continual.distributed_files import DistributedResult as DistributedResult
from continual.distributed_files import read_job, write_result
from continual.fisher import squared_gradient_sums
from continual.fisher_kinds import FisherKind, label_draws, resolve_kind
from continual.fisher_kinds import cross_entropy as _cross_entropy
from continual.training import TrainResult, TrainSettings, train

ERROR_PREFIX = "error-rank"
RANK_SEED_STRIDE = 1_000_003  # a prime: rank seeds never collide for any realistic seed

log = logging.getLogger("evergreen.distributed")


def shard_rows(n: int, rank: int, world_size: int) -> Tensor:
    """Row indices of `rank`'s shard: strided, so shard sizes differ by at most one row.

    Raises:
        ValueError: fewer rows than ranks, or a rank outside [0, world_size).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    if n < world_size:
        raise ValueError(
            f"{n} rows cannot be shared by {world_size} processes: lower train.processes"
        )
    return torch.arange(rank, n, world_size)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct seed per rank; rank 0 keeps `seed` (one process = the single-process run)."""
    return seed + RANK_SEED_STRIDE * rank


def rank_settings(settings: TrainSettings, rank: int, world_size: int) -> TrainSettings:
    """One rank's settings: ⌈batch_size / N⌉ rows per step (same global batch), its own seed;
    at most that many micro-batches (`grad_accum_steps`), each needing a row."""
    batch_size = max(1, math.ceil(settings.batch_size / world_size))
    return replace(
        settings,
        batch_size=batch_size,
        seed=rank_seed(settings.seed, rank),
        grad_accum_steps=min(settings.grad_accum_steps, batch_size),
    )


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def all_reduce_sum(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each tensor over the ranks of the default group, in one flat all-reduce."""
    if not tensors:
        return {}
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = {}, 0
    for name in names:
        size = tensors[name].numel()
        out[name] = flat[start : start + size].view_as(tensors[name])
        start += size
    return out


def distributed_fisher(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    kind: FisherKind = "auto",
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """The per-example diagonal Fisher of (X, y), each rank computing its shard's sums.

    Same result as `continual.fisher.diagonal_fisher(model, X, y, ...)` in one process: Σ grad²
    per shard, summed over ranks, divided once by len(X). Every rank passes the full X, y (the
    label draws of kind "sampled" are drawn for all rows, then sliced, so they match too).
    Without an initialised process group it is the single-process Fisher.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = shard_rows(len(X), rank, world)
    device = next(model.parameters()).device
    resolved, _ = resolve_kind(kind, model, X[:1].to(device), n_samples, _cross_entropy)
    draws = label_draws(len(X), resolved, n_samples, seed)[rows]
    sums = squared_gradient_sums(
        model,
        X[rows],
        y[rows],
        kind=resolved,
        n_samples=n_samples,
        batch_size=batch_size,
        draws=draws,
    )
    if world > 1:
        sums = all_reduce_sum(sums)
    return {name: total / len(X) for name, total in sums.items()}


def train_data_parallel(job: DistributedJob, device: torch.device) -> TrainResult:
    """Train `job.model` in place with DDP on this rank's shard; returns the averaged record."""
    assert job.settings is not None
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = shard_rows(len(job.X), rank, world)
    job.model.to(device)
    ids = [device.index or 0] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(job.model, device_ids=ids)
    ewc = job.ewc.to(device) if job.ewc is not None else None
    steps = job.settings.steps
    every = max(1, steps // 10)

    def on_step(step: int, loss: float) -> None:
        if rank == 0 and (step % every == 0 or step == steps):
            log.info("step %d/%d loss %.4f", step, steps, loss)

    result = train(
        wrapped,
        job.X[rows],
        job.y[rows],
        rank_settings(job.settings, rank, world),
        ewc=ewc,
        replay=job.replay,
        replay_ratio=job.replay_ratio,
        on_step=on_step,
        device=device,
    )
    losses = torch.tensor(result.losses, dtype=torch.float64)
    seen = torch.tensor([float(result.examples_seen)], dtype=torch.float64)
    reduced = all_reduce_sum({"losses": losses.to(device), "seen": seen.to(device)})
    result.losses = (reduced["losses"] / world).tolist()
    result.examples_seen = int(reduced["seen"].item())
    return result


def run_job(job: DistributedJob, device: torch.device) -> DistributedResult:
    """This rank's share of the job; every rank returns the same result."""
    result = train_data_parallel(job, device) if job.settings is not None else None
    job.model.to(device).eval()
    fisher = None
    if job.fisher_kind is not None:
        fisher = distributed_fisher(job.model, job.X, job.y, kind=job.fisher_kind)
        fisher = {name: value.cpu() for name, value in fisher.items()}
    state = {name: value.detach().cpu() for name, value in job.model.state_dict().items()}
    return DistributedResult(state, result, fisher, dist.get_world_size())


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    """One rank under torchrun: `python -m continual.distributed JOB_DIR`."""
    job_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format=f"[rank {rank}] %(message)s", force=True
    )
    try:
        device = _device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device))
        log.info("%s on %s, world size %d", backend_for(device), device, dist.get_world_size())
        outcome = run_job(read_job(job_dir), device)
        if rank == 0:
            write_result(outcome, job_dir)
        dist.barrier()
    except BaseException:
        (job_dir / f"{ERROR_PREFIX}{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        # No gloo teardown: with a peer gone mid-collective, destroy_process_group (or the
        # interpreter's exit) waits for ever on the dead connection; torchrun needs the exit code.
        os._exit(1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Run the importable twin, so the job's classes and these functions are one module's.
    from continual import distributed

    raise SystemExit(distributed.main())
