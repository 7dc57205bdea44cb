"""``evaluate``: a model's answer loss and perplexity on N examples of one side of the honest split.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu --num_processes N``) the N
processes share the batches and report the one-process numbers; rank 0 alone prints (``distributed.py``).
``--device-map`` spreads one model larger than a GPU over every GPU instead (one process).
"""
from __future__ import annotations

from .. import distributed
from ..cli import CliError, at_least, is_user_error, note_dropped, print_json, warn
from ..data import SIDES, iter_side
from ..evaluate import default_batch_size, evaluate
from ..job import ModelSpec
from ..models import DEVICE_MAPS, check_device_map, load_model
from ..options import add_arguments, from_args
from ..progress import TqdmProgress
from ..table import format_table
from ..threads import runtime_record


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="answer loss / perplexity of a model on held-out instruction data")
    add_arguments(p, ModelSpec, "model")
    p.add_argument("--data", default="default",
                   help="'default' (ShareGPT), 'chatterbot', local .parquet/.jsonl/.json (OpenOrca columns) or hub id")
    p.add_argument("--n", type=int, default=200, help="number of examples to score")
    p.add_argument("--split", default="eval", choices=SIDES + ("all",),
                   help="side of the honest split to score (default eval; 'all' = no split)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per forward pass (default: 8 on CUDA, 1 on CPU, where padding only costs time)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (prompt + answer)")
    add_device_map_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def add_device_map_argument(p) -> None:
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help=f"spread the model over the GPUs, then the CPU, with accelerate ({', '.join(DEVICE_MAPS)}), "
                        "for a model larger than one GPU; --device stays auto; one process only")


def check_device_map_flag(device_map, device: str, size: int = 1) -> None:
    """``CliError`` for a --device-map that is not allowed (checked before anything loads)."""
    try:
        check_device_map(device_map, device, what="--device-map")
    except ValueError as e:
        raise CliError(str(e)) from None
    if device_map is not None and size > 1:
        raise CliError(f"--device-map {device_map} spreads one model over every GPU, but this is a launch of {size} "
                       "processes; use one process with --device-map, or one GPU per process without it")


def in_launch(device: str, work) -> int:
    """``work(rank, size)`` inside the launch's process group when the environment describes one (see
    ``distributed``; joined here, after the cheap checks, before any model loads). A user error raised
    by ``work`` is reported by rank 0 alone: every rank checks the same inputs and fails the same way, so
    the other ranks exit with status 2 in silence. A failure to join the launch is reported by its rank."""
    try:
        rank, size = distributed.init(device)
    except ValueError as e:
        raise CliError(str(e)) from None
    if size == 1 and distributed.one_process_launch():
        warn(distributed.one_process_launch())
    try:
        return work(rank, size)
    except Exception as e:  # noqa: BLE001 - re-raised unless rank 0 reports the same error
        if rank != 0 and is_user_error(e):
            return 2
        raise
    finally:
        distributed.finish()


def run(args) -> int:
    at_least(1, n=args.n, batch_size=args.batch_size)
    at_least(8, max_len=args.max_len)
    at_least(0, seed=args.seed)
    m = from_args(ModelSpec, args, "model")
    check_device_map_flag(args.device_map, m.device)
    dropped: dict = {}  # records of the source that gave no example, by reason (filled while streaming)
    examples = iter_side(args.data, args.split, seed=args.seed, dropped=dropped)  # validates the source now
    return in_launch(m.device, lambda rank, size: _run(args, m, examples, dropped, rank, size))


def _run(args, m: ModelSpec, examples, dropped: dict, rank: int, size: int) -> int:
    check_device_map_flag(args.device_map, m.device, size)
    device = str(distributed.rank_device(m.device)) if size > 1 else m.device
    loaded = load_model(m.source, dtype=m.dtype, device=device, device_map=args.device_map)
    batch_size = default_batch_size(loaded.device) if args.batch_size is None else args.batch_size
    bar = TqdmProgress("evaluate") if rank == 0 else None  # every rank scores; rank 0 alone reports
    try:
        result = evaluate(loaded.model, loaded.tokenizer, examples, n=args.n, batch_size=batch_size,
                          max_len=args.max_len, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return 0
    split = {"side": args.split, "seed": args.seed, "source": args.data, "fingerprint": result.fingerprint,
             "dropped": dict(sorted(dropped.items()))}
    note_dropped({"source": args.data, "dropped": dropped})
    record = {"model": loaded.name, "model_fingerprint": loaded.fingerprint, "data": args.data,
              "split": args.split, **result.to_dict(), "split_info": split, "batch_size": batch_size,
              "max_len": args.max_len, "dtype": m.dtype, "device": loaded.device, **_threads_and_runtime()}
    if args.device_map is not None:
        record["device_map"] = args.device_map
    if size > 1:
        record["processes"] = size
    if args.json:
        print_json(record)
        return 0
    row = {k: record[k] for k in ("model", "data", "split", "examples", "tokens")}
    row.update(loss=f"{result.loss:.4f}", perplexity=f"{result.perplexity:.3f}", seconds=f"{result.seconds:.1f}")
    print(format_table([row], list(row)))
    if result.skipped:
        print(f"{result.skipped} example(s) skipped: the prompt alone filled --max-len {args.max_len}")
    if result.examples < args.n:
        print(f"note: the {args.split} side of {args.data!r} held only {result.examples} usable examples")
    return 0


def _threads_and_runtime() -> dict:
    """``threads`` and ``runtime`` of the record (one reading of ``threads.runtime_record``)."""
    runtime = runtime_record()
    return {"threads": runtime["threads"], "runtime": runtime}
