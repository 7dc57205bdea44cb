"""Answer-loss evaluation: masking, batching invariance, streaming, side-by-side models, CLI."""
from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_core import data
from lowrank_core.arch import ARCHS
from lowrank_core.cli import main
from lowrank_core.data import Example
from lowrank_core.evaluate import EvalResult, evaluate, evaluate_models
from lowrank_core.models import tiny_model


def varied_examples():
    """Prompts and answers from 1 to ~250 characters, so padded batches mix very different lengths."""
    words = "the quick brown fox jumps over a lazy dog while seven zebras quietly eat hay".split()
    out = []
    for i in range(11):
        user = " ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3)
        answer = (" ".join(reversed(words)) * 4)[: 1 + (i * 37) % 250]
        out.append(Example("Be kind." if i % 4 == 0 else "", user, answer))
    return out


def manual_loss(model, tok, examples, max_len=512):
    """Σ CE over answer tokens / answer tokens, one unpadded example at a time through model(...).logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            enc = data.encode_example(tok, ex, max_len)
            ids = torch.tensor([enc.input_ids])
            logits = model(input_ids=ids).logits[0]
            for t in range(1, len(enc.input_ids)):
                if enc.labels[t] != -100:
                    total += F.cross_entropy(logits[t - 1], torch.tensor(enc.labels[t])).item()
                    count += 1
    return total / count, count


def test_matches_manual_answer_only_computation(tiny):
    model, tok = tiny
    examples = varied_examples()[:5]
    expected, count = manual_loss(model, tok, examples)
    result = evaluate(model, tok, examples, batch_size=3)
    answer_tokens = sum(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) + 1 for ex in examples)
    assert result.tokens == count == answer_tokens  # answer ids + one end-of-turn each, no prompt token
    assert result.examples == 5 and result.skipped == 0
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


class PromptSaboteur(nn.Module):
    """Wraps a model (no config: the generic logits path) and wrecks logits at chosen positions."""

    def __init__(self, model, positions):
        super().__init__()
        self.inner, self.positions = model, positions

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits.clone()
        logits[:, self.positions] = torch.randn_like(logits[:, self.positions]) * 50
        return SimpleNamespace(logits=logits)


def test_prompt_logits_do_not_count(tiny):
    model, tok = tiny
    ex = Example("System words.", "A long question with many prompt tokens in it?", "Short answer.")
    n_prompt = len(data.encode_example(tok, ex).input_ids) - data.encode_example(tok, ex).answer_tokens
    clean = evaluate(model, tok, [ex])
    # logits at positions 0..n_prompt-2 predict prompt tokens 1..n_prompt-1: wrecking them changes nothing
    wrecked_prompt = evaluate(PromptSaboteur(model, slice(0, n_prompt - 1)), tok, [ex])
    assert wrecked_prompt.loss == pytest.approx(clean.loss, abs=1e-6)
    # position n_prompt-1 predicts the first answer token: wrecking it must show (the test can fail)
    wrecked_answer = evaluate(PromptSaboteur(model, slice(n_prompt - 1, n_prompt)), tok, [ex])
    assert abs(wrecked_answer.loss - clean.loss) > 0.1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_equals_unbatched(arch):
    model, tok = tiny_model(arch, seed=1)
    examples = varied_examples()
    lengths = [len(data.encode_example(tok, ex).input_ids) for ex in examples]
    assert max(lengths) > 4 * min(lengths)
    one = evaluate(model, tok, examples, batch_size=1)
    for batch_size in (2, 4, len(examples)):
        batched = evaluate(model, tok, examples, batch_size=batch_size)
        assert batched.tokens == one.tokens and batched.examples == one.examples
        assert abs(batched.loss - one.loss) < 1e-4
    generic = evaluate(PromptSaboteur(model, slice(0, 0)), tok, examples, batch_size=4)  # full-logits path
    assert abs(generic.loss - one.loss) < 1e-4


def test_loss_from_final_hidden_states_is_the_one_answer_loss(tiny):
    """``answer_loss_from_hidden`` (head on final-norm hidden states; rank allocation scores with it too)
    is what ``answer_loss_sum`` returns, and equals CE over the full logits at answer positions."""
    from lowrank_core.evaluate import answer_loss_from_hidden, answer_loss_sum

    model, tok = tiny
    batch = next(data.iter_batches(tok, varied_examples()[:4], 4, 512))
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=position_ids).last_hidden_state
        total, n = answer_loss_from_hidden(model, hidden, batch["labels"])
        assert (total, n) == answer_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    assert n == int((targets != -100).sum()) > 0
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    assert total == pytest.approx(float(expected), rel=1e-5)
    assert answer_loss_from_hidden(model, hidden, torch.full_like(batch["labels"], -100)) == (0.0, 0)


def test_streams_a_generator_and_stops_at_n(tiny):
    model, tok = tiny
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield Example("", f"question {i}", f"answer number {i}")

    calls = []
    result = evaluate(model, tok, endless(), n=10, batch_size=4, progress=lambda d, t, m: calls.append((d, t)))
    assert result.examples == 10 and len(pulled) == 10  # consumed lazily, exactly what was needed
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert result.fingerprint == data.keys_fingerprint(Example("", f"question {i}", f"answer number {i}").key()
                                                       for i in range(10))


def test_memory_does_not_grow_with_n(tiny):
    """At any moment only about one batch of examples is alive, however many are scored."""
    import weakref

    model, tok = tiny
    alive = set()

    def examples():
        for i in range(60):
            ex = Example("", f"q{i}", f"a{i}")
            alive.add(id(ex))
            weakref.finalize(ex, alive.discard, id(ex))
            yield ex

    peaks = []
    result = evaluate(model, tok, examples(), batch_size=4, progress=lambda d, t, m: peaks.append(len(alive)))
    assert result.examples == 60 and len(peaks) == 15
    assert max(peaks) <= 4 + 1


def test_progress_total_is_capped_by_a_short_list(tiny):
    model, tok = tiny
    calls = []
    evaluate(model, tok, varied_examples()[:3], n=10, batch_size=2, progress=lambda d, t, m: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]


def test_skips_examples_whose_prompt_fills_max_len(tiny):
    model, tok = tiny
    examples = [Example("", "q" * 200, "a"), Example("", "short", "fits")]
    result = evaluate(model, tok, examples, max_len=64)
    assert result.examples == 1 and result.skipped == 1
    assert result.loss == pytest.approx(evaluate(model, tok, examples[1:], max_len=64).loss)
    with pytest.raises(ValueError, match="no answer tokens.*1 skipped.*max_len=64"):
        evaluate(model, tok, examples[:1], max_len=64)
    with pytest.raises(ValueError, match="n 0"):
        evaluate(model, tok, examples, n=0)


def test_evaluate_models_side_by_side(tiny):
    teacher, tok = tiny
    student, _ = tiny_model("llama", seed=5)
    examples = varied_examples()
    both = evaluate_models({"teacher": teacher, "student": student}, tok, iter(examples), batch_size=4)
    alone = {"teacher": evaluate(teacher, tok, examples), "student": evaluate(student, tok, examples)}
    for name in both:
        # batch 4 (padded, masked attention) vs batch 1: float32 sums in another order, a few ulps of a ~5 nat loss
        assert both[name].loss == pytest.approx(alone[name].loss, rel=1e-5)
        assert both[name].tokens == alone[name].tokens
        assert both[name].fingerprint == alone[name].fingerprint
    assert abs(both["teacher"].loss - both["student"].loss) > 1e-3
    d = both["teacher"].to_dict()
    assert isinstance(both["teacher"], EvalResult) and {"loss", "perplexity", "tokens", "examples", "seconds"} <= set(d)


def test_teacher_is_not_modified(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, tok, varied_examples()[:3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_cli_json(capsys):
    assert main(["evaluate", "--model", "tiny", "--data", "chatterbot", "--n", "8", "--batch-size", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 8 and out["tokens"] > 8 and out["split"] == "eval"
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    eval_side = list(itertools.islice(data.iter_side("chatterbot", "eval", seed=0), 8))
    assert out["split_info"]["fingerprint"] == data.keys_fingerprint(ex.key() for ex in eval_side)
    assert main(["evaluate", "--model", "tiny", "--data", "chatterbot", "--n", "8", "--split", "calib", "--json"]) == 0
    calib = json.loads(capsys.readouterr().out)
    assert calib["split_info"]["fingerprint"] != out["split_info"]["fingerprint"]
    assert out["batch_size"] == 3 and calib["batch_size"] == (8 if torch.cuda.is_available() else 1)


def test_cli_table_and_bad_source(capsys):
    assert main(["evaluate", "--model", "tiny", "--data", "chatterbot", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "chatterbot" in out and "eval" in out
    assert main(["evaluate", "--model", "tiny", "--data", "no-such-data", "--n", "4"]) == 2
    assert "no-such-data" in capsys.readouterr().err


@pytest.mark.integration
def test_embedded_model_on_sharegpt(embedded):
    examples = list(itertools.islice(data.iter_side("default", "eval", seed=0), 8))
    batched = evaluate(embedded.model, embedded.tokenizer, examples, batch_size=8, max_len=128)
    single = evaluate(embedded.model, embedded.tokenizer, examples, batch_size=1, max_len=128)
    assert batched.examples + batched.skipped == 8 and batched.tokens > 100
    assert 0.3 < batched.loss < 5.0  # an instruction-tuned 135M model on chat answers, not a random one (~10.8)
    assert abs(batched.loss - single.loss) < 1e-4
