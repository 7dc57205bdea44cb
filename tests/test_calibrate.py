"""Gram collection: padding excluded, shared inputs share one Gram, exact sums, hooks removed."""
import pytest
import torch

from lowrank_core.linears import linear_map
from lowrank_core.calibrate import GramStats, collect_grams, gram_representatives


def _batch(lengths, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(0, 250, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 256  # pad token
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("unpad", [False, True])
def test_padding_is_excluded(tiny_any, unpad):
    model, _ = tiny_any
    linears = linear_map(model)
    padded = _batch([12, 5, 8], width=15)
    together = collect_grams(model, [padded], linears, unpad=unpad)
    one_by_one = [{"input_ids": padded["input_ids"][i:i + 1, :n], "attention_mask": padded["attention_mask"][i:i + 1, :n]}
                  for i, n in enumerate([12, 5, 8])]
    separate = collect_grams(model, one_by_one, linears)
    assert set(together) == set(separate)
    experts = {li.gram_key for li in linears if li.expert is not None}   # MoE: the tokens routed to each expert
    gates = [li for li in linears if li.expert is not None and li.module == "gate_proj"]
    k = getattr(model.config, "num_experts_per_tok", 0)
    assert sum(together[li.gram_key].tokens for li in gates) == 25 * k * len({li.layer for li in gates})
    for key, stats in together.items():
        assert stats.tokens == separate[key].tokens == (separate[key].tokens if key in experts else 25)
        assert stats.gram.dtype == torch.float64
        torch.testing.assert_close(stats.gram, separate[key].gram, rtol=1e-4, atol=1e-4 * float(stats.gram.abs().max()))


def test_left_padded_rows_are_kept_whole_and_masked(tiny):
    model, _ = tiny
    linears = [i for i in linear_map(model) if i.layer == 0]
    batch = _batch([6, 6])
    left = {"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"].clone()}
    left["attention_mask"][1, :2] = 0  # row 1 is left-padded by two positions
    a = collect_grams(model, [left], linears, unpad=True)
    b = collect_grams(model, [left], linears, unpad=False)
    for key in a:
        assert a[key].tokens == b[key].tokens == 10
        torch.testing.assert_close(a[key].gram, b[key].gram, rtol=1e-4, atol=1e-4 * float(b[key].gram.abs().max()))


def test_shared_inputs_share_one_gram_and_match_direct_capture(tiny):
    model, _ = tiny
    linears = linear_map(model)
    grams = collect_grams(model, [_batch([7, 10])], linears)
    keys = {i.gram_key for i in linears}
    assert set(grams) == keys and len(keys) == 2 * 4 + 1  # attn_in, o_in, mlp_in, down_in per layer + head
    reps = gram_representatives(linears)
    assert reps["model.layers.0.attn_in"].module == "q_proj" and reps["model.layers.1.mlp_in"].module == "gate_proj"
    # what k_proj and up_proj see equals the shared Gram
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].clone()))
             for n in ("model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj")]
    batch = _batch([7, 10])
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    mask = batch["attention_mask"].bool()
    for name, key in (("model.layers.1.self_attn.k_proj", "model.layers.1.attn_in"),
                      ("model.layers.1.mlp.up_proj", "model.layers.1.mlp_in")):
        x = seen[name][mask].double()
        torch.testing.assert_close(grams[key].gram, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))


def test_hooks_are_removed_and_teacher_output_unchanged(tiny):
    model, _ = tiny
    batch = _batch([9, 4])
    with torch.no_grad():
        before = model(**batch).logits
    collect_grams(model, [batch], linear_map(model))
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_stops_early_and_reports_progress(tiny):
    model, _ = tiny
    only_first = [i for i in linear_map(model) if i.layer == 0 and i.module == "q_proj"]
    calls = []
    layer1 = model.model.layers[1]
    handle = layer1.register_forward_pre_hook(lambda m, a: calls.append("layer1"))
    progress = []
    try:
        grams = collect_grams(model, [_batch([6]), _batch([3])], only_first,
                              progress=lambda d, t, m: progress.append((d, t)))
    finally:
        handle.remove()
    assert list(grams) == ["model.layers.0.attn_in"] and grams["model.layers.0.attn_in"].tokens == 9
    assert calls == []  # the forward never reached layer 1
    assert progress == [(1, 2), (2, 2)]


def test_gramstats_helpers():
    def stats_of(x, mask=None):
        return GramStats.zeros(int(x.shape[-1])).add_(x, mask)

    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    s = stats_of(x, mask)
    rows = x[mask.bool()].double()
    assert s.tokens == 5
    torch.testing.assert_close(s.gram, rows.T @ rows)
    torch.testing.assert_close(s.mean(), rows.T @ rows / 5)
    both = s.merge(stats_of(x.reshape(-1, 4)))
    assert both.tokens == 15 and s.tokens == 5
    assert s.fingerprint() != both.fingerprint() and s.fingerprint() == stats_of(x, mask).fingerprint()
    assert GramStats.zeros(3).mean().abs().sum() == 0
    wide = torch.randn(50, 900)  # wider than one accumulation block: blocked symmetric product
    torch.testing.assert_close(stats_of(wide).gram, wide.double().T @ wide.double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="mask shape"):
        stats_of(x, mask[:, :3])
    with pytest.raises(ValueError, match="model.layers.7"):
        from lowrank_core.linears import LinearInfo
        collect_grams(torch.nn.Linear(2, 2), [], [LinearInfo("model.layers.7.mlp.up_proj", 7, "mlp", "up_proj", 8, 4)])


@pytest.mark.integration
def test_embedded_layer17_whitened_far_better_than_svd(embedded):
    """Real activations are very anisotropic: on them plain SVD loses far more output than `whitened`."""
    from lowrank_core.data import iter_batches, make_split
    from lowrank_core.decompose import relative_output_error, svd_factors, whitened_factors

    model, tok = embedded.model, embedded.tokenizer
    infos = [i for i in linear_map(model) if i.layer == 17]
    batches = iter_batches(tok, make_split("default", n_calib=4, n_eval=0).calib, batch_size=2, max_len=128)
    grams = collect_grams(model, batches, infos)
    assert set(grams) == {i.gram_key for i in infos} and all(g.tokens > 100 for g in grams.values())
    for info in infos:
        if info.module not in ("q_proj", "down_proj"):
            continue
        W, G = model.get_submodule(info.name).weight, grams[info.gram_key]
        rank = info.break_even_rank // 2
        e_svd = relative_output_error(W, svd_factors(W, rank).merged(), G)
        e_wh = relative_output_error(W, whitened_factors(W, G, rank).merged(), G)
        assert e_wh < 0.5 * e_svd, (info.name, e_wh, e_svd)


# ----------------------------------------------------------------------------- precision and output covariances
def _random_batches(seed=0, n=3, length=48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (n, length), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


# stated tolerances of reduced-precision products against the float64 reference: relative Frobenius error of
# each Gram; each matrix's whitened truncation error (measured on the float64 Gram, as a share of its output
# energy ‖WX‖²) may grow by at most rel·error + abs
GRAM_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
TRUNCATION_TOLERANCE = {"float32": (1e-5, 1e-9), "bfloat16": (2e-2, 5e-4)}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_reduced_precision_grams_are_within_the_stated_tolerance_of_float64(tiny, precision):
    from lowrank_core.decompose import relative_output_error, whitened_factors
    model, _ = tiny
    linears = [i for i in linear_map(model) if i.layer is not None]
    batches = _random_batches()
    ref = collect_grams(model, batches, linears, precision="float64")
    got = collect_grams(model, batches, linears, precision=precision)
    assert set(got) == set(ref)
    for key, stats in got.items():
        assert stats.gram.dtype == torch.float64 and stats.tokens == ref[key].tokens
        rel = float((stats.gram - ref[key].gram).norm() / ref[key].gram.norm())
        assert rel < GRAM_TOLERANCE[precision], (key, rel)
    for info in linears:
        W = model.get_submodule(info.name).weight.detach()
        rank = max(1, min(W.shape) // 2)
        exact = relative_output_error(W, whitened_factors(W, ref[info.gram_key], rank).merged(), ref[info.gram_key])
        approx = relative_output_error(W, whitened_factors(W, got[info.gram_key], rank).merged(), ref[info.gram_key])
        assert approx >= exact * (1 - 1e-5) - 1e-9  # the float64 optimum is optimal on its own Gram
        rel, absolute = TRUNCATION_TOLERANCE[precision]
        assert approx <= exact * (1 + rel) + absolute, (info.name, exact, approx)


def test_unknown_precision_is_refused_before_any_forward(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown Gram precision 'half'.*allowed: auto, float32, bfloat16, float64"):
        collect_grams(model, _random_batches(), linear_map(model), precision="half")


def test_output_covariance_equals_w_g_wt(tiny):
    from lowrank_core.calibrate import output_key
    model, _ = tiny
    linears = [i for i in linear_map(model) if i.layer is not None]
    downs = [i for i in linears if i.module == "down_proj"]
    stats = collect_grams(model, _random_batches(), linears, outputs=downs, precision="float64")
    for info in downs:
        W = model.get_submodule(info.name).weight.detach().double()
        G = stats[info.gram_key].gram
        C = stats[output_key(info)]
        assert C.tokens == stats[info.gram_key].tokens and C.gram.shape == (info.out_features,) * 2
        # y = W x is rounded to float32 by the forward: agreement to float32 precision
        torch.testing.assert_close(C.gram, W @ G @ W.T, rtol=1e-5, atol=1e-6 * float(C.gram.abs().max()))


def test_fast_path_measures_down_proj_by_its_outputs_with_the_same_factors(tiny, monkeypatch):
    """whitened down_proj (out < in) is calibrated from its output covariance (fewer products), and gives the
    factors and the errors of the input-Gram route."""
    from lowrank_core import compress as compress_mod
    from lowrank_core.compress import CompressSettings, compress, statistics_plan
    from lowrank_core.plan import resolve_plan, load_plan
    from lowrank_core.data import Example
    model, tok = tiny
    assignments = resolve_plan(load_plan("all:k0.5"), linear_map(model), "whitened")
    inputs, outputs = statistics_plan(assignments)
    assert outputs == {n for n, a in assignments.items() if a.info.module == "down_proj"}
    assert not any(i.module == "down_proj" for i in inputs)
    assert statistics_plan(resolve_plan(load_plan("all:k0.5"), linear_map(model), "svd"))[1] == set()
    examples = [Example(system="", user=f"question {i} " * 3, answer=f"answer {i} " * 6) for i in range(10)]
    settings = CompressSettings(calib=10, max_len=64, valid_fraction=0.3, gram_precision="float64")
    via_outputs = compress(model, tok, "all:k0.5", examples, settings)
    monkeypatch.setattr(compress_mod, "statistics_plan", lambda a: ([x.info for x in a.values()], set()))
    via_inputs = compress(model, tok, "all:k0.5", examples, settings)
    for a, b in zip(via_outputs.layers, via_inputs.layers):
        assert a["name"] == b["name"]
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-6, abs=1e-9)
    sa, sb = dict(via_outputs.student.named_parameters()), dict(via_inputs.student.named_parameters())
    for name, p in sa.items():
        torch.testing.assert_close(p, sb[name], rtol=1e-5, atol=1e-6)
