"""Data-parallel evaluation over N processes: who this process is, its share of the work, and the gather.

A launcher (``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``)
starts N copies of a command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`init` joins them into one ``torch.distributed`` process group (backend
``nccl`` when this rank runs on a GPU, ``gloo`` on CPU) and gives each process its share of the CPU
cores (``threads.configure_threads``). Without those variables (or with ``WORLD_SIZE=1``) everything is
a single process: rank 0 of 1, no process group.

The evaluation and comparison passes (``evaluate.evaluate_models``, ``compare.compare_models``) use it
when a process group is active: every rank reads and encodes the whole example stream, so every rank
builds the same batches the one-process pass builds; batch ``b`` is scored by rank ``b % N``
(:func:`shard`), and the per-batch / per-example results, tagged with their position in the stream, are
gathered on every rank (:func:`gather_objects`) and put back in stream order, so every statistic is
computed from exactly the numbers one process would have computed.

``accelerate launch --cpu --num_processes N`` starts *one* process (without ``--mpirun_hostfile``
accelerate's CPU launcher runs the script once); on a CPU-only machine use
``accelerate launch --multi_gpu --num_processes N`` (it runs torchrun; the ranks find no GPU and join
with gloo) or ``torchrun --nproc_per_node N``.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Any, Iterable, Iterator, Optional

import torch

from .models import resolve_device
from .threads import configure_threads

_owned = False  # this module initialised the process group (so :func:`finish` destroys it)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


# what each launcher sets: torchrun / accelerate's GPU launcher first, then mpirun (accelerate launch --cpu
# --mpirun_hostfile) in its Open MPI, Intel MPI / MPICH and MVAPICH spellings
SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names, default: int) -> int:
    """The first of the environment variables ``names`` that is set, as an integer; ``default`` when none is."""
    for name in (names,) if isinstance(names, str) else names:
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer; it is set by the launcher "
                             "(torchrun, accelerate launch, mpirun)") from None
    return default


def env_world() -> tuple[int, int]:
    """(rank, world size) the launcher put in the environment; (0, 1) outside a launch."""
    size = _env_int(SIZE_VARS, 1)
    rank = _env_int(RANK_VARS, 0) if size > 1 else 0
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={size} from the environment do not describe a process of a "
                         "launch (need 0 <= RANK < WORLD_SIZE)")
    return rank, size


def active_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) when there is none. Never initialises."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; the global rank when unset)."""
    return _env_int(LOCAL_RANK_VARS, env_world()[0])


def local_size() -> int:
    """Processes of the launch on this machine (``LOCAL_WORLD_SIZE``; the world size when unset)."""
    return max(1, _env_int(LOCAL_SIZE_VARS, max(env_world()[1], active_world()[1])))


def rank_device(device: str = "auto") -> torch.device:
    """The device this process scores on. One process: ``models.resolve_device(device)``. In a launch of
    N > 1: ``cuda:LOCAL_RANK`` for 'auto' (when CUDA is available) and 'cuda', the CPU for 'cpu' (and for
    'auto' without CUDA); 'cuda:N' (one GPU for every rank) and a rank without a GPU are refused."""
    size = max(env_world()[1], active_world()[1])
    resolved = resolve_device(device)  # unknown names, CUDA missing: ModelSourceError
    if size <= 1 or resolved.type == "cpu":
        return resolved
    if re.fullmatch(r"cuda:\d+", str(device)):
        raise ValueError(f"--device {device} names one GPU for all {size} processes of the launch; use 'auto' or "
                         "'cuda' (each process takes cuda:LOCAL_RANK) or 'cpu'")
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"process LOCAL_RANK={index} has no GPU: this machine shows {count} CUDA device(s); launch "
                         f"at most {count} processes per machine, or pass --device cpu")
    return torch.device("cuda", index)


def init(device: str = "auto", timeout: Optional[float] = None) -> tuple[int, int]:
    """(rank, world size), joining the launch's process group first when the environment describes one
    (``WORLD_SIZE`` > 1 with ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; or mpirun's variables) and none is
    initialised yet:
    backend nccl when this rank's device (:func:`rank_device`) is a GPU, else gloo. Each process then
    takes its share of the CPU cores (``threads.configure_threads(processes=local_size())``). ``timeout``
    (seconds) bounds every collective (torch's default: 30 minutes)."""
    global _owned
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return active_world()
    rank, size = env_world()
    if size <= 1:
        return 0, 1
    if dist is None:
        raise ValueError(f"WORLD_SIZE={size} asks for a launch of {size} processes but this torch build has no "
                         "torch.distributed; run one process")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name, "").strip()]
    if missing:
        raise ValueError(f"a launch of {size} processes but {', '.join(missing)} not set: start the processes with "
                         "torchrun or accelerate launch (they set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    dev = rank_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    extra = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
    os.environ.setdefault("RANK", str(rank))  # env:// reads them; mpirun spells them its own way
    os.environ.setdefault("WORLD_SIZE", str(size))
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                            world_size=size, **extra)
    _owned = True
    configure_threads(processes=local_size(), device=str(dev))
    return rank, size


def one_process_launch() -> Optional[str]:
    """A warning when ``accelerate launch --cpu --num_processes N`` (N > 1) started this process: without
    ``--mpirun_hostfile`` accelerate's CPU launcher runs the command once, with ``MASTER_ADDR`` set but no
    ``WORLD_SIZE``; None otherwise."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if use_cpu and os.environ.get("MASTER_ADDR") and env_world()[1] == 1:
        return ("accelerate launch --cpu started one process (its CPU launcher needs --mpirun_hostfile for more); "
                "this runs as one process. For N processes on CPU: accelerate launch --multi_gpu --num_processes N "
                "(no GPU: the processes use gloo on the CPU), or torchrun --nproc_per_node N -m -- lowrank_core ...")
    return None


def world(device: str = "auto") -> tuple[int, int]:
    """(rank, world size): :func:`init` (which initialises the launch's process group when needed)."""
    return init(device)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that prints and writes files."""
    rank, size = active_world()
    return (rank if size > 1 else env_world()[0]) == 0


def shard(items: Iterable, rank: int, size: int) -> Iterator[tuple[int, Any]]:
    """(i, item) for the items of position i with ``i % size == rank``, in order: deterministic, and the
    shards of ranks 0..size-1 together hold every item exactly once, each with its original position."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of world size {size}: need 0 <= rank < size")
    for i, item in enumerate(items):
        if i % size == rank:
            yield i, item


def gather(obj: Any) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (``all_gather_object``; [obj] in one process)."""
    rank, size = active_world()
    if size <= 1:
        return [obj]
    out: list = [None] * size
    _dist().all_gather_object(out, obj)
    return out


def gather_objects(rows: list) -> list:
    """The concatenation, in rank order, of every rank's ``rows``, on every rank (``rows`` itself in one
    process). Callers tag rows with their stream position and sort: rank order is not stream order."""
    return [row for part in gather(list(rows)) for row in part]


def finish() -> None:
    """Destroy the process group :func:`init` created (no-op otherwise)."""
    global _owned
    dist = _dist()
    if _owned and dist is not None and dist.is_initialized():
        if dist.get_world_size() > 1:
            # every rank done with the group before any destroys it: a gloo peer torn down while the other
            # still talks aborts the process ("terminate called without an active exception")
            dist.barrier()
        dist.destroy_process_group()
    _owned = False

