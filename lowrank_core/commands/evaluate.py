"""``evaluate``: a model's answer loss and perplexity on N examples of one side of the honest split."""
from __future__ import annotations

from ..cli import at_least, note_dropped, print_json
from ..data import SIDES, iter_side
from ..evaluate import default_batch_size, evaluate
from ..job import ModelSpec
from ..models import load_model
from ..options import add_arguments, from_args
from ..progress import TqdmProgress
from ..table import format_table


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
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    at_least(1, n=args.n, batch_size=args.batch_size)
    at_least(8, max_len=args.max_len)
    at_least(0, seed=args.seed)
    dropped: dict = {}  # records of the source that gave no example, by reason (filled while streaming)
    examples = iter_side(args.data, args.split, seed=args.seed, dropped=dropped)  # validates the source now
    m = from_args(ModelSpec, args, "model")
    loaded = load_model(m.source, dtype=m.dtype, device=m.device)
    batch_size = default_batch_size(loaded.device) if args.batch_size is None else args.batch_size
    bar = TqdmProgress("evaluate")
    try:
        result = evaluate(loaded.model, loaded.tokenizer, examples, n=args.n, batch_size=batch_size,
                          max_len=args.max_len, progress=bar)
    finally:
        bar.close()
    split = {"side": args.split, "seed": args.seed, "source": args.data, "fingerprint": result.fingerprint,
             "dropped": dict(sorted(dropped.items()))}
    note_dropped({"source": args.data, "dropped": dropped})
    record = {"model": loaded.name, "model_fingerprint": loaded.fingerprint, "data": args.data,
              "split": args.split, **result.to_dict(), "split_info": split, "batch_size": batch_size,
              "max_len": args.max_len, "dtype": m.dtype, "device": loaded.device}
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
