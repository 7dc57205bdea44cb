"""``spectrum``: singular values of one linear, of the weight and (with calibration) activation-aware."""
from __future__ import annotations

from ..arch import all_head_modules
from ..linears import ALL_MODULES, linear_map
from ..cli import CliError, at_least, print_json
from ..calibrate import collect_grams
from ..data import calibration_batches, calibration_id, make_split
from ..job import ModelSpec
from ..models import cache_dir, factorized_export_config, load_config, load_model
from ..options import add_arguments, from_args
from ..progress import TqdmProgress
from ..spectra import ENERGY_LEVELS, linear_spectrum
from ..table import format_table


def register(sub) -> None:
    p = sub.add_parser("spectrum", help="singular-value spectrum of one linear (weight and activation-aware)")
    add_arguments(p, ModelSpec, "model")
    p.add_argument("--layer", type=int, help="decoder layer index (not needed for lm_head)")
    p.add_argument("--module", required=True, choices=ALL_MODULES, help="which linear of the layer")
    p.add_argument("--expert", type=int, help="expert index, for a linear of a mixture-of-experts layer")
    p.add_argument("--calib", type=int, default=32,
                   help="calibration examples for the activation-aware spectrum (0: weight spectrum only)")
    p.add_argument("--data", default="default", help="data source for calibration (default: ShareGPT)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--max-len", type=int, default=512, help="tokens per calibration example")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--energy", type=float, default=0.9, help="also report the rank keeping this energy fraction")
    p.add_argument("--top", type=int, default=10, help="how many leading singular values to print")
    p.add_argument("--no-cache", action="store_true", help="recompute even if the spectrum is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _find_linear(linears, layer, module, expert=None):
    if module in all_head_modules():   # the architecture table's head names (lm_head)
        found = [i for i in linears if i.group == "head" and i.module == module]
        if not found:
            raise CliError(f"this model has no separate {module} linear")
        return found[0]
    layers = sorted({i.layer for i in linears if i.layer is not None})
    if layer is None:
        raise CliError(f"--layer is required for {module}; allowed: {layers[0]}..{layers[-1]}")
    found = [i for i in linears if i.layer == layer and i.module == module]
    experts = sorted(i.expert for i in found if i.expert is not None)
    if experts and expert is None:
        raise CliError(f"--expert is required for {module} of layer {layer} (a mixture-of-experts layer); "
                       f"allowed: {experts[0]}..{experts[-1]}")
    if experts and expert not in experts:
        raise CliError(f"--expert {expert} is not an expert of layer {layer}; allowed: {experts[0]}..{experts[-1]}")
    if expert is not None and not experts and found:
        raise CliError(f"--expert {expert}: layer {layer} has no experts (its {module} is a dense linear)")
    for info in found:
        if info.expert == expert:
            return info
    raise CliError(f"--layer {layer} is out of range; allowed: {layers[0]}..{layers[-1]}")


def _lazy_gram(loaded, info, examples, args):
    """The input Gram of ``info`` on ``examples``, computed on the first call (a spectrum cache miss).

    Batches come from ``data.calibration_batches`` (whole examples cut to ``--max-len`` tokens), as in
    compress and in the app, so the same calibration gives the same Gram everywhere."""
    def compute():
        batches = calibration_batches(loaded.tokenizer, examples, batch_size=args.batch_size, max_len=args.max_len)
        progress = TqdmProgress("calibration")
        try:
            grams = collect_grams(loaded.model, batches, [info], progress=progress)
        finally:
            progress.close()
        return grams[info.gram_key]
    return compute


def run(args) -> int:
    if args.calib < 0:
        raise CliError(f"--calib {args.calib} is not allowed; use 0 (weight spectrum only) or more examples")
    if not 0 < args.energy <= 1:
        raise CliError(f"--energy {args.energy} is not allowed; use a fraction in (0, 1]")
    at_least(1, batch_size=args.batch_size, top=args.top)
    at_least(8, max_len=args.max_len)
    at_least(0, seed=args.seed)
    m = from_args(ModelSpec, args, "model")
    if not args.no_cache:
        cache_dir(write=True)  # spectra are cached there: a read-only cache is one line before any work
    if factorized_export_config(m.source) is None:  # a bad --layer / --module fails before any weight loads
        _find_linear(linear_map(load_config(m.source), parts=True), args.layer, args.module, args.expert)
    split = make_split(args.data, n_calib=args.calib, n_eval=0, seed=args.seed) if args.calib > 0 else None
    loaded = load_model(m.source, dtype=m.dtype, device=m.device)
    info = _find_linear(linear_map(loaded.model, parts=True), args.layer, args.module, args.expert)
    gram, gram_id, calib_desc = None, None, None
    if split is not None:
        calib_id = calibration_id(split, len(split.calib), args.max_len)
        gram_id = f"{calib_id}-{info.gram_key}"  # the app's Spectra page keys its spectra the same way
        gram = _lazy_gram(loaded, info, split.calib, args)
        calib_desc = {"data": split.info.source, "examples": len(split.calib), "seed": args.seed,
                      "max_len": args.max_len, "split_fingerprint": split.info.fingerprint,
                      "calibration_id": calib_id, "dropped": split.info.dropped}
    spectrum = linear_spectrum(loaded.model, info, gram, fingerprint=loaded.fingerprint,
                               cache=not args.no_cache, gram_id=gram_id)
    levels = sorted(set(ENERGY_LEVELS) | {args.energy})
    ranks = spectrum.energy_ranks(levels)
    if args.json:
        d = spectrum.to_dict()
        d.update(model=m.source, fingerprint=loaded.fingerprint, calibration=calib_desc, energy_ranks=ranks,
                 params=info.params)
        print_json(d)
        return 0
    _print_summary(spectrum, info, ranks, levels, calib_desc, args.top)
    return 0


def _print_summary(spectrum, info, ranks, levels, calib_desc, top) -> None:
    print(f"{info.name}  {info.out_features} x {info.in_features}  ({info.params:,} parameters)")
    print(f"max rank {info.max_rank}; break-even rank {info.break_even_rank} "
          f"(factors save parameters only below it)")
    if calib_desc:
        print(f"activation-aware: {calib_desc['examples']} calibration examples of {calib_desc['data']} "
              f"(seed {calib_desc['seed']}, max_len {calib_desc['max_len']})")
    print()
    rows = []
    for lv in levels:
        row = {"energy": f"{lv:.0%}" if lv * 100 == int(lv * 100) else f"{lv:.2%}"}
        for kind, label in (("weight", "weight rank"), ("aware", "activation-aware rank")):
            if kind in ranks:
                row[label] = ranks[kind][f"{lv:g}"]
        rows.append(row)
    print(format_table(rows))
    print()
    n = min(top, info.max_rank)
    print(f"top {n} singular values")
    print("  weight:           " + " ".join(f"{v:.4g}" for v in spectrum.weight_sv[:n]))
    if spectrum.aware_sv is not None:
        print("  activation-aware: " + " ".join(f"{v:.4g}" for v in spectrum.aware_sv[:n]))
