"""Data sources, the honest split, chat rendering with answer-only labels, batching."""
from __future__ import annotations

import hashlib
import itertools
import json
import random

import pytest
import torch

from lowrank_core import data
from lowrank_core.data import Example
from lowrank_core.models import tiny_tokenizer


@pytest.fixture(scope="module")
def chatterbot():
    return list(data.iter_examples("chatterbot"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- examples and sources
def test_example_key_is_stable_content_hash():
    ex = Example("s", "u", "a")
    assert ex.key() == "311c5395027f439295b758a57b39c2db0e5116a486452a48a6a3bc51ef5dcc2a"
    assert ex.key() == Example("s", "u", "a").key()
    assert len({ex.key(), Example("", "u", "a").key(), Example("s", "u", "b").key(), Example("su", "", "a").key()}) == 4


def test_chatterbot_pairs_are_unique_and_nonempty(chatterbot):
    assert len(chatterbot) > 500
    assert len({ex.key() for ex in chatterbot}) == len(chatterbot)
    assert all(ex.user and ex.answer and ex.system == "" for ex in chatterbot)
    assert Example("", "Hello", "Hi") in chatterbot  # first pair of greetings.yml


def _write_sharegpt(path):
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": " Hi there "}, {"from": "gpt", "value": "Hello!"},
                                      {"from": "human", "value": "more"}, {"from": "gpt", "value": "later"}]},
        {"id": "b_1", "conversations": [{"from": "gpt", "value": "continuation"}, {"from": "human", "value": "q"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "empty question"}]},
        {"id": "d", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                      {"from": "gpt", "value": "4"}]},
        {"id": "e", "conversations": []},
        {"id": "f", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "g", "conversations": [{"from": "human", "value": "Quote \"this\" {and} [that]"},
                                      {"from": "gpt", "value": "Done: \u00e9\u4e2d"}]},
    ]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    full = path / "full.json"
    full.write_text(text, encoding="utf-8")
    cut = text.index('"id": "g"') + 40  # the last record is cut in the middle, like the shipped file
    truncated = path / "truncated.json"
    truncated.write_text(text[:cut], encoding="utf-8")
    return full, truncated, records


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_json_records_stream_and_stop_at_truncation(tmp_path, chunk):
    full, truncated, records = _write_sharegpt(tmp_path)
    assert list(data.iter_json_records(full, chunk_chars=chunk)) == records
    assert list(data.iter_json_records(truncated, chunk_chars=chunk)) == records[:-1]


def test_sharegpt_parser_takes_first_human_gpt_turn(tmp_path):
    full, truncated, _ = _write_sharegpt(tmp_path)
    got = list(data.iter_sharegpt(truncated))
    assert got == [Example("", "Hi there", "Hello!"), Example("Be brief.", "2+2?", "4"),
                   Example("", "Hi there", "Hello!")]  # parser keeps duplicates; iter_examples drops them
    assert list(data.iter_sharegpt(full))[-1] == Example("", 'Quote "this" {and} [that]', "Done: \u00e9\u4e2d")
    assert list(data.iter_examples(truncated)) == got[:2]  # a local ShareGPT file is recognised, deduplicated


def test_sharegpt_default_streams_quickly():
    first = list(itertools.islice(data.iter_examples("default"), 50))
    assert len(first) == 50 and len({ex.key() for ex in first}) == 50
    assert all(ex.user and ex.answer for ex in first)


def _orca_rows():
    return [
        {"system_prompt": "You are an AI assistant.", "question": "What is 1+1?", "response": "2"},
        {"system_prompt": None, "question": "Name a colour.", "response": "Blue."},
        {"system_prompt": "", "question": "", "response": "no question: skipped"},
        {"system_prompt": "You are an AI assistant.", "question": "What is 1+1?", "response": "2"},  # duplicate
        {"system_prompt": "", "question": "Say hi", "response": " hi "},
    ]


ORCA_EXPECTED = [Example("You are an AI assistant.", "What is 1+1?", "2"), Example("", "Name a colour.", "Blue."),
                 Example("", "Say hi", "hi")]


def test_openorca_parquet_jsonl_json_and_folder(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(_orca_rows() + [{"system_prompt": "", "question": "x", "response": "y"}])
    frame = frame.assign(id=range(len(frame)))  # extra columns are fine
    parquet = tmp_path / "one.parquet"
    frame.to_parquet(parquet)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _orca_rows()) + "\n")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(_orca_rows()))
    expected_parquet = ORCA_EXPECTED + [Example("", "x", "y")]
    assert list(data.iter_examples(parquet)) == expected_parquet
    assert list(data.iter_examples(str(jsonl))) == ORCA_EXPECTED
    assert list(data.iter_examples(str(array))) == ORCA_EXPECTED
    folder = tmp_path / "shards"
    folder.mkdir()
    frame.iloc[:3].to_parquet(folder / "part-0.parquet")
    frame.iloc[3:].to_parquet(folder / "part-1.parquet")
    assert list(data.iter_examples(folder)) == expected_parquet


def test_openorca_missing_columns_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "output": "a", "system_prompt": ""}) + "\n")
    with pytest.raises(ValueError) as e:
        list(data.iter_examples(bad))
    msg = str(e.value)
    assert "['question', 'response']" in msg and "instruction" in msg and "output" in msg


def test_unknown_and_empty_sources(tmp_path):
    with pytest.raises(ValueError, match="not found.*chatterbot.*parquet.*hub id"):
        data.iter_examples("nonexistent-source")
    with pytest.raises(ValueError, match="not found"):
        data.iter_examples("some/missing.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no .parquet/.jsonl/.json"):
        data.iter_examples(tmp_path)


def test_hub_id_offline_gives_local_file_advice(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as e:
        data.iter_examples("openaccess-ai-collective/oo-gpt4-filtered")  # fails at call time, not at next()
    msg = str(e.value)
    assert "openaccess-ai-collective/oo-gpt4-filtered" in msg and "local .parquet or .jsonl" in msg


# ----------------------------------------------------------------------------- the honest split
def test_split_sides_are_disjoint_and_consistent(chatterbot):
    split = data.make_split(chatterbot, n_calib=120, n_eval=150, n_val=30, seed=3)
    assert split.info.counts == {"calib": 120, "val": 30, "eval": 150}
    keys = {side: {ex.key() for ex in split.side(side)} for side in data.SIDES}
    assert sum(len(k) for k in keys.values()) == 300
    assert not (keys["calib"] & keys["eval"]) and not (keys["val"] & keys["eval"]) and not (keys["calib"] & keys["val"])
    for side in data.SIDES:
        assert all(data.example_side(ex, 3) == side for ex in split.side(side))
    # the first n of iter_side are exactly the split's side
    assert list(itertools.islice(data.iter_side(chatterbot, "eval", seed=3), 150)) == split.eval


def test_split_is_by_content_not_position(chatterbot):
    shuffled = list(chatterbot)
    random.Random(1).shuffle(shuffled)
    for side in data.SIDES:
        in_order = {ex.key() for ex in data.iter_side(chatterbot, side, seed=0)}
        in_shuffle = {ex.key() for ex in data.iter_side(shuffled, side, seed=0)}
        assert in_order == in_shuffle and in_order
    # a subset (another source position) keeps every example on its side
    subset = chatterbot[::7]
    assert [data.example_side(ex, 0) for ex in subset] == [data.example_side(ex, 0) for ex in chatterbot][::7]


def test_split_fractions_and_nested_val(chatterbot):
    sides = [data.example_side(ex, 0) for ex in chatterbot]
    n = len(sides)
    assert 0.44 < sides.count("eval") / n < 0.56
    assert 0.18 < sides.count("val") / (n - sides.count("eval")) < 0.32
    more_val = [data.example_side(ex, 0, val_fraction=0.6) for ex in chatterbot]
    assert [s == "eval" for s in more_val] == [s == "eval" for s in sides]  # val comes only from the non-eval side
    assert more_val.count("val") > sides.count("val")
    other_seed = [data.example_side(ex, 1) for ex in chatterbot]
    assert other_seed != sides


def test_split_fingerprint_stable_and_seed_dependent(chatterbot):
    a = data.make_split("chatterbot", n_calib=20, n_eval=30, seed=0)
    b = data.make_split("chatterbot", n_calib=20, n_eval=30, seed=0)
    c = data.make_split("chatterbot", n_calib=20, n_eval=30, seed=1)
    assert a.info.fingerprint == b.info.fingerprint and a.eval == b.eval
    assert a.info.fingerprint != c.info.fingerprint
    d = a.info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["counts"] == {"calib": 20, "val": 0, "eval": 30} and d["seed"] == 0 and d["source"] == "chatterbot"
    assert d["fingerprints"]["eval"] == data.keys_fingerprint(ex.key() for ex in a.eval)
    manual = hashlib.sha256("".join(ex.key() + "\n" for ex in a.eval).encode()).hexdigest()[:16]
    assert d["fingerprints"]["eval"] == manual


def test_split_runs_out_with_counts(chatterbot):
    with pytest.raises(ValueError, match=r"ran out after 40 examples.*'eval': '\d+/100'"):
        data.make_split(chatterbot[:40], n_calib=5, n_eval=100)


def test_split_bad_arguments(chatterbot):
    with pytest.raises(ValueError, match="unknown split side 'test'"):
        data.iter_side(chatterbot, "test")
    with pytest.raises(ValueError, match="eval_fraction 1.5"):
        data.example_side(chatterbot[0], 0, eval_fraction=1.5)
    with pytest.raises(ValueError, match="n_calib|>= 0"):
        data.make_split(chatterbot, n_calib=-1)


# ----------------------------------------------------------------------------- chat rendering
def test_encode_masks_prompt_and_scores_answer_plus_end_of_turn(tok):
    ex = Example("Be brief.", "What is 2+2?", "It is 4.")
    enc = data.encode_example(tok, ex, max_len=512)
    prompt_text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    prompt = _ids(tok, prompt_text)
    answer = _ids(tok, "It is 4.") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert enc.input_ids == prompt + answer
    assert enc.labels == [-100] * len(prompt) + answer
    assert enc.answer_tokens == len(answer)
    # the ids are a prefix of the full rendered conversation (answer suffix '<|im_end|>\n' minus the newline)
    full = tok.apply_chat_template([{"role": "system", "content": ex.system}, {"role": "user", "content": ex.user},
                                    {"role": "assistant", "content": ex.answer}], tokenize=False)
    assert _ids(tok, full)[: len(enc.input_ids)] == enc.input_ids and full.endswith("<|im_end|>\n")


def test_encode_omits_empty_system(tok):
    enc = data.encode_example(tok, Example("", "Hi", "Yo"), max_len=64)
    assert "system" not in tok.decode(enc.input_ids)
    assert tok.decode(enc.input_ids).startswith("<|im_start|>user\nHi")


def test_end_of_turn_follows_the_template(tok):
    assert data.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    other = tiny_tokenizer()
    other.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                           "{% if add_generation_prompt %}[assistant] {% endif %}")
    eot = data.end_of_turn_id(other)
    assert eot == other.convert_tokens_to_ids("<|endoftext|>") != other.eos_token_id
    enc = data.encode_example(other, Example("", "q", "a"), max_len=64)
    assert enc.labels[-2:] == [_ids(other, "a")[0], eot]


def char_tokenizer(metaspace: bool, merges=()):
    """A character-level BPE with ChatML specials: Metaspace pre-tokenizer (Llama/Mistral style) or none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowrank_core.models import CHATML_TEMPLATE

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n?.!,") | {"\u2581"})
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def test_answer_ids_as_seen_in_context_for_metaspace_tokenizers():
    tok = char_tokenizer(metaspace=True)
    assert tok.convert_ids_to_tokens(_ids(tok, "Hi"))[0] == "\u2581"  # a lone answer gets a word-boundary piece
    enc = data.encode_example(tok, Example("", "Q", "Hi you"), max_len=64)
    answer = tok.convert_ids_to_tokens([t for t in enc.labels if t != -100])
    assert answer == ["H", "i", "\u2581", "y", "o", "u", "<|im_end|>"]  # ...which never follows the prompt
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert enc.input_ids[:-1] == _ids(tok, prompt_text + "Hi you")


def test_no_token_spans_the_prompt_answer_boundary():
    tok = char_tokenizer(metaspace=False, merges=[("\n", "H")])  # '\nH' would swallow the prompt's last newline
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    prompt = _ids(tok, prompt_text)
    assert _ids(tok, prompt_text + "Hi")[: len(prompt)] != prompt
    enc = data.encode_example(tok, Example("", "Q", "Hi"), max_len=64)
    assert enc.input_ids[: len(prompt)] == prompt and enc.labels[len(prompt):] == _ids(tok, "Hi") + [tok.eos_token_id]


def test_truncation(tok):
    ex = Example("", "question", "x" * 100)
    full = data.encode_example(tok, ex, max_len=512)
    n_prompt = len(full.input_ids) - full.answer_tokens
    cut = data.encode_example(tok, ex, max_len=n_prompt + 5)
    assert len(cut.input_ids) == len(cut.labels) == n_prompt + 5
    assert cut.labels[n_prompt:] == full.labels[n_prompt:n_prompt + 5] and cut.answer_tokens == 5
    assert data.encode_example(tok, ex, max_len=n_prompt + 1).answer_tokens == 1
    assert data.encode_example(tok, ex, max_len=n_prompt) is None


# ----------------------------------------------------------------------------- batching
def test_iter_batches_right_pads(tok):
    examples = [Example("", "q", "a"), Example("", "a much longer question here", "and a longer answer too"),
                Example("", "mid", "answer")]
    encoded = [data.encode_example(tok, ex) for ex in examples]
    (batch,) = list(data.iter_batches(tok, examples, batch_size=4, max_len=512))
    width = max(len(e.input_ids) for e in encoded)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, width) for t in batch.values())
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row, :n].tolist() == e.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()


def test_iter_batches_streams_and_skips_unfit(tok):
    def endless():
        for i in itertools.count():
            yield Example("", "q" * (300 if i % 3 == 0 else 1), f"answer {i}")

    batches = data.iter_batches(tok, endless(), batch_size=4, max_len=64)
    first, second = next(batches), next(batches)  # an endless generator: nothing is materialised
    assert first["input_ids"].shape[0] == second["input_ids"].shape[0] == 4
    assert first["input_ids"].shape[1] <= 64
    with pytest.raises(ValueError, match="batch_size 0"):
        next(data.iter_batches(tok, endless(), batch_size=0))
