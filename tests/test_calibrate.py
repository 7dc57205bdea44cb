"""Gram collection: padding excluded, shared inputs share one Gram, exact sums, hooks removed."""
import pytest
import torch

from lowrank_core.archmap import linear_map
from lowrank_core.calibrate import GramStats, collect_grams, gram_representatives, grams_from_inputs


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
    for key, stats in together.items():
        assert stats.tokens == separate[key].tokens == 25
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
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    s = grams_from_inputs(x, mask)
    rows = x[mask.bool()].double()
    assert s.tokens == 5
    torch.testing.assert_close(s.gram, rows.T @ rows)
    torch.testing.assert_close(s.mean(), rows.T @ rows / 5)
    both = s.merge(grams_from_inputs(x.reshape(-1, 4)))
    assert both.tokens == 15 and s.tokens == 5
    assert s.fingerprint() != both.fingerprint() and s.fingerprint() == grams_from_inputs(x, mask).fingerprint()
    assert GramStats.zeros(3).mean().abs().sum() == 0
    wide = torch.randn(50, 900)  # wider than one accumulation block: blocked symmetric product
    torch.testing.assert_close(grams_from_inputs(wide).gram, wide.double().T @ wide.double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="mask shape"):
        grams_from_inputs(x, mask[:, :3])
    with pytest.raises(ValueError, match="model.layers.7"):
        from lowrank_core.archmap import LinearInfo
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
