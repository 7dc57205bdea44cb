"""The model card (README.md) and recipe.yaml of every export: front matter, numbers from the manifest,
the evaluation (paired comparison or two means), the command and a recipe that runs the same job."""
from __future__ import annotations

import sys
from unittest import mock

import pytest
import yaml

from lowrank_core.cli import build_parser, main
from lowrank_core.commands.compress import job_from_args
from lowrank_core.export import export_student, model_card, read_manifest
from lowrank_core.export.card import CARD, RECIPE, base_model_name, invocation
from lowrank_core.export.manifest import complete_manifest
from lowrank_core.models import tiny_model
from lowrank_core.recipe import load_recipe
from test_export import DENSE_PLAN, FACTORIZED_PLAN, make_student, manifest_for

CLI_MAIN = "/somewhere/lowrank_core/__main__.py"  # sys.argv[0] under `python -m lowrank_core`
COMPARISON = {"examples": 120, "tokens": 9876, "skipped": 2, "teacher_loss": 1.2345, "student_loss": 1.2468,
              "teacher_perplexity": 3.4368, "student_perplexity": 3.4793, "delta": 0.0123,
              "delta_ci": [-0.0021, 0.0267], "ci_level": 0.95, "p_value": 0.094, "margin": 0.0123,
              "margin_arg": "1%", "verdict": "inconclusive",
              "verdict_text": "The interval reaches beyond the margin: more examples are needed.",
              "more_examples": 340, "kl": 0.0312, "top1_agreement": 0.9731,
              "worst": [{"key": "k1", "prompt": "hi", "delta": 0.9, "tokens": 12}]}


def front_matter(card: str) -> tuple[dict, str]:
    """(parsed YAML front matter, Markdown body) of a model card."""
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """A factorized export written by `python -m lowrank_core compress ...` (sys.argv as the CLI sees it),
    with the JobSpec its flags make."""
    target = tmp_path_factory.mktemp("card") / "fac export"
    argv = ["compress", "--model", "tiny", "--plan", FACTORIZED_PLAN, "--method", "svd", "--calib", "4", "--eval",
            "4", "--max-len", "256", "--export", str(target), "--format", "factorized"]
    spec = job_from_args(build_parser().parse_args(argv))
    with mock.patch.object(sys, "argv", [CLI_MAIN] + argv):
        assert main(argv) == 0
    return dict(folder=target, argv=argv, spec=spec, manifest=read_manifest(target),
                card=(target / CARD).read_text())


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    """A dense export through export_student with a hand-built manifest (no job, no accounting), unverified."""
    teacher, tok = tiny_model("llama")
    target = tmp_path_factory.mktemp("card") / "dense"
    export_student(make_student(teacher, DENSE_PLAN), tok, target, "dense", manifest_for(teacher, DENSE_PLAN),
                   verify=False)
    return dict(folder=target, manifest=read_manifest(target), card=(target / CARD).read_text())


def test_front_matter_is_valid_yaml_with_the_source_as_base_model(cli_export):
    meta, body = front_matter(cli_export["card"])
    assert meta == {"base_model": cli_export["manifest"]["source"]["model"], "library_name": "transformers",
                    "tags": ["lowrank", "low-rank", "svd", "compression"], "pipeline_tag": "text-generation"}
    assert body.lstrip().startswith("# tiny, low-rank compressed")
    manifest = dict(cli_export["manifest"], source={"model": "my model: v2 #1"}, method={"name": "whitened"})
    meta, _ = front_matter(model_card(manifest))
    assert meta["base_model"] == "my model: v2 #1" and meta["tags"][-1] == "whitened"  # quoted safely
    assert "base_model" not in front_matter(model_card({}))[0]


@pytest.mark.parametrize("source, name", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"), ("tiny-mistral", "tiny-mistral"),
    ("/data/models/llama-7b/", "llama-7b"), ("./exports/run1", "run1"), ("~/m/config.json", "m"),
    ("/models/mistral/model.Q4.gguf", "mistral"), (None, None)])
def test_base_model_name(source, name):
    assert base_model_name(source) == name


def test_card_shows_parameter_counts_and_ranks_of_the_manifest(cli_export, dense_export):
    m, card = cli_export["manifest"], cli_export["card"]
    acc, params = m["accounting"], m["parameters"]
    kept = acc["compressed"] / acc["original"]
    assert f"Parameters {acc['original']:,} → {acc['compressed']:,} ({kept:.1%} kept)" in card
    for label, value in (("base model", acc["original"]), ("compressed model", params["student"]),
                         ("stored in this factorized export", params["stored"]), ("removed", acc["removed"])):
        assert f"| {label} | {value:,} |" in card
    assert "15 factorised matrices; rank min 4, median 4, max 8." in card
    assert "| `model.layers.*.mlp.down_proj` | 2 | 4 | 4 | 4 |" in card and "| `lm_head` | 1 | 8 | 8 | 8 |" in card
    assert "| all | all | rank 4 | svd |" in card
    dense = dense_export["manifest"]["parameters"]
    assert f"| stored in this dense export | {dense['stored']:,} |" in dense_export["card"]
    assert f"The compressed model has {dense['student']:,} parameters." in dense_export["card"]


def test_card_renders_a_paired_comparison(cli_export):
    card = model_card(dict(cli_export["manifest"], comparison=COMPARISON))
    assert "Paired comparison on 120 held-out examples (2 skipped), 9,876 answer tokens:" in card
    assert "| teacher (base model) | 1.2345 | 3.437 |" in card and "| student (this model) | 1.2468 | 3.479 |" in card
    assert "+0.0123 nats/token, 95% interval [-0.0021, +0.0267], p = 0.094" in card
    assert "equivalence margin: ±0.0123 nats/token (given as 1%)" in card
    assert "verdict: **inconclusive**" in card and f"> {COMPARISON['verdict_text']}" in card
    assert "about 340 more examples" in card
    assert "KL(teacher ‖ student): 0.0312 nats/token; top-1 agreement 97.3%" in card
    assert "No paired comparison" not in card
    sparse = model_card(dict(cli_export["manifest"], comparison={"verdict": "equivalent", "delta": 0.001}))
    assert "[n/a, n/a]" in sparse and "**equivalent**" in sparse  # missing keys do not break the card


def test_card_reports_the_stopping_n_and_procedure(cli_export):
    sequential = dict(COMPARISON, examples=40, delta_ci=None, p_value=None, verdict="equivalent", decided=True,
                      stopping_n=40, interval_note="interval shown from N ≥ 20",
                      procedure="group-sequential TOST, Lan–DeMets O'Brien–Fleming-type alpha spending",
                      sequential={"max_n": 200, "stopping_n": 40, "decided": True})
    card = model_card(dict(cli_export["manifest"], comparison=sequential))
    assert ("procedure: group-sequential TOST, Lan–DeMets O'Brien–Fleming-type alpha spending; decided after 40 "
            "examples") in card
    assert "no interval (interval shown from N ≥ 20)" in card and "p = " not in card
    undecided = dict(sequential, decided=False, stopping_n=200, sequential={"max_n": 200, "decided": False})
    assert "undecided at the maximum of 200 examples" in model_card(dict(cli_export["manifest"], comparison=undecided))
    fixed = model_card(dict(cli_export["manifest"], comparison=dict(COMPARISON, procedure="fixed-N TOST")))
    assert "procedure: fixed-N TOST; fixed N = 120" in fixed


def test_card_falls_back_to_the_two_means_or_says_not_evaluated(cli_export):
    m = {k: v for k, v in cli_export["manifest"].items() if k != "comparison"}  # the metrics only
    card, t, s = model_card(m), m["metrics"]["teacher"], m["metrics"]["student"]
    assert f"| teacher (base model) | {t['loss']:.4f} | {t['perplexity']:.3f} |" in card
    assert f"| student (this model) | {s['loss']:.4f} | {s['perplexity']:.3f} |" in card
    assert f"Loss change (student − teacher): {s['loss'] - t['loss']:+.4f}" in card
    assert "No paired comparison was run" in card
    unscored = model_card(dict(m, metrics={"teacher": None, "student": None}))
    assert "## Evaluation\n\nNot evaluated." in unscored


def test_card_reports_verification_healing_and_the_command(cli_export, dense_export):
    m, card = cli_export["manifest"], cli_export["card"]
    assert f"max |logit difference| {m['verification']['max_logit_diff']:.3g}" in card  # rewritten after verifying
    assert "Not verified" in dense_export["card"] and "## Healing" not in card
    assert m["command"] == invocation_of(cli_export["argv"]) and f"```bash\n{m['command']}\n```" in card
    assert "'all:r4; lm_head:r8'" in m["command"] and "'" + str(cli_export["folder"]) + "'" in m["command"]
    healed = model_card(dict(m, heal={"tokens": 20000, "steps": 10, "initial_valid": 0.5, "best_valid": 0.25,
                                      "best_step": 8, "trained_parameters": 1234, "valid_examples": 4,
                                      "settings": {"loss": "kl"}}))
    assert "## Healing" in healed and "20,000 tokens, 10 steps, 1,234 trained parameters" in healed
    assert "0.5000 → 0.2500 (best at step 8" in healed


def invocation_of(argv: list[str]) -> str:
    with mock.patch.object(sys, "argv", [CLI_MAIN] + argv):
        return invocation()


def test_invocation_only_for_the_cli_and_an_explicit_command_wins():
    assert invocation_of(["run", "my recipe.yaml"]) == "python -m lowrank_core run 'my recipe.yaml'"
    with mock.patch.object(sys, "argv", ["/usr/bin/streamlit", "run", "app.py"]):
        assert invocation() is None
    teacher, _ = tiny_model("llama")
    with mock.patch.object(sys, "argv", [CLI_MAIN, "compress"]):
        assert complete_manifest({}, teacher, "dense")["command"] == "python -m lowrank_core compress"
        assert complete_manifest({"command": None}, teacher, "dense")["command"] is None


def test_recipe_yaml_loads_to_the_original_job(cli_export):
    folder, m = cli_export["folder"], cli_export["manifest"]
    spec = load_recipe(folder / RECIPE)
    assert spec == cli_export["spec"] and spec.to_dict() == m["job"]
    assert (folder / RECIPE).read_text() in cli_export["card"]
    assert "`python -m lowrank_core run recipe.yaml` reproduces the job" in cli_export["card"]


def test_both_formats_hold_a_card(cli_export, dense_export):
    fac, dense = cli_export["card"], dense_export["card"]
    assert (cli_export["folder"] / CARD).is_file() and (dense_export["folder"] / CARD).is_file()
    assert "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in fac
    assert "bundled `modeling_lowrank.py`" in fac and "load_factorized" in fac
    assert "AutoModelForCausalLM.from_pretrained(path)\n" in dense and "trust_remote_code" not in dense
    assert not (dense_export["folder"] / RECIPE).exists()  # no job in its manifest
    assert "No recipe was recorded" in dense
