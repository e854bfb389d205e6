"""Gradient token attribution: captum's integrated gradients against a slow midpoint Riemann sum written
out here, the records it makes, the attribution form's metrics and its baselines."""
import pytest
import torch

from selfexplain.groundtruth.explanations import format_attribution, parse_attribution
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.token_attribution import (AttributionItem, TokenAttributionConfig, _encode, attribute,
                                                       reference_token, run_attribution, words_of)
from selfexplain.groundtruth.sources.facts import Fact

PREAMBLE = "The capital of Japan is Tokyo."
FACT = Fact("France", "capital", "The capital of {} is", "Paris")


def test_words_are_split_on_spaces_with_punctuation_stripped():
    assert [w for _, _, w in words_of("The capital of (New) Zealand, is")] == ["The", "capital", "of", "New", "Zealand", "is"]
    assert parse_attribution(format_attribution("France")) == "France" and parse_attribution("France.") is None


def _riemann(model, ids, owner, reference, steps=400) -> list[float]:
    """Integrated gradients by hand: the midpoint rule along the straight path, per token."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x = embed(ids[None]).double()
        token = int(model(inputs_embeds=x).logits[0, -1].argmax())
        base = torch.where(torch.tensor([w >= 0 for w in owner])[None, :, None], embed(torch.tensor([[reference]])).double(), x)
    total = torch.zeros_like(x)
    for k in range(steps):
        point = (base + (k + 0.5) / steps * (x - base)).requires_grad_(True)
        model(inputs_embeds=point).logits[0, -1].log_softmax(-1)[token].backward()
        total += point.grad
    return (total / steps * (x - base))[0].sum(-1).tolist()


def _per_word(per_token: list[float], owner: list[int], n_words: int) -> list[float]:
    out = [0.0] * n_words
    for value, w in zip(per_token, owner):
        if w >= 0:
            out[w] += value
    return out


def test_captum_integrated_gradients_match_a_riemann_sum_and_are_complete():
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=2,seed=3"))
    model.double()
    cfg = TokenAttributionConfig(system_prompt=PREAMBLE)
    ids, owner = _encode(tok, cfg, FACT.text)
    words = words_of(FACT.text)
    assert sorted({w for w in owner if w >= 0}) == list(range(len(words))) and owner[0] == -1  # preamble: no word
    _, per_word, change, gap = attribute(model, ids, owner, len(words), 64, reference_token(tok))
    by_hand = _per_word(_riemann(model, ids, owner, reference_token(tok)), owner, len(words))
    assert per_word == pytest.approx(by_hand, abs=2e-3 * max(map(abs, by_hand)))
    assert sum(per_word) == pytest.approx(change, rel=1e-2) and abs(gap) < 1e-2 * abs(change)


@pytest.mark.parametrize("source", ["tiny-llama:hidden=32,layers=2,seed=3,kv_heads=2",
                                    "tiny-gemma:hidden=32,layers=2,seed=3,window=64",
                                    "tiny-gemma:hidden=32,layers=2,seed=3,window=4"])
def test_running_the_preamble_once_changes_no_attribution(source):
    """attribute runs the preamble once and integrates from the text on; the obvious path integrates over
    the whole prompt at every step (Llama and Gemma shapes; a 4-token window keeps only the preamble's
    last positions)."""
    from captum.attr import IntegratedGradients

    model, tok = load_model(ModelSpec(source))
    model.double()
    ids, owner = _encode(tok, TokenAttributionConfig(system_prompt=PREAMBLE), FACT.text)
    n = len(words_of(FACT.text))
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x = embed(ids[None])
        token = int(model(inputs_embeds=x).logits[0, -1].argmax())
        base = torch.where(torch.tensor([w >= 0 for w in owner])[None, :, None], embed(torch.tensor([[reference_token(tok)]])), x)
    whole = IntegratedGradients(lambda e: model(inputs_embeds=e).logits[:, -1].log_softmax(-1)[:, token]).attribute(
        x, baselines=base, n_steps=32, internal_batch_size=32)
    greedy, per_word, _, _ = attribute(model, ids, owner, n, 32, reference_token(tok))
    expected = _per_word(whole[0].sum(-1).tolist(), owner, n)
    assert greedy == token and per_word == pytest.approx(expected, rel=1e-4, abs=1e-7)  # attribute holds v in fp32


def test_the_records_name_the_top_word_and_drop_what_does_not_converge():
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=2,seed=3"))
    items = [AttributionItem(FACT.fact_id, FACT), AttributionItem("s2", Fact("Spain", "capital", "The capital of {} is", "Madrid"))]
    cfg = TokenAttributionConfig(system_prompt=PREAMBLE, top_k=2)
    records = run_attribution(model, tok, items, cfg, "t", lambda s: "train")
    for record in records:
        q = record.query
        order = sorted(range(len(q["words"])), key=lambda w: -q["attributions"][w])
        assert q["top_words"] == [q["words"][w] for w in order[:2]]
        assert record.explanation == format_attribution(q["top_words"][0]) and record.output_after == q["top_words"][0]
        assert record.changed == (q["top_words"][0] in record.query["subject"].split())
        assert q["subject_word"] in ("France", "Spain") and "dropped" not in q
    strict = run_attribution(model, tok, items, TokenAttributionConfig(system_prompt=PREAMBLE, max_completeness_gap=0.0,
                                                                       steps=2), "t", lambda s: "train")
    assert all(r.query["dropped"] == "completeness gap" for r in strict)


def test_the_attribution_form_scores_the_named_word_and_the_baselines_name_theirs():
    from selfexplain.eval.baselines import BASELINES
    from selfexplain.eval.metrics import attribution_from_units, attribution_units
    from selfexplain.groundtruth.records import Record

    def record(top):
        return Record(record_id="r", task="token_attribution", target="t", split="test", source_id="s",
                      prompt="The capital of France is", question="?", explanation=format_attribution(top[0]),
                      changed=False, output_before="", output_after=top[0],
                      query={"top_words": top, "words": ["The", "capital", "of", "France", "is"], "subject_word": "France"})

    records = [record(["France", "capital", "is"]), record(["capital", "France", "The"]), record(["is", "of", "The"])]
    predictions = ["The output depends most on <<<france.>>>", format_attribution("France"), "France"]
    metrics = attribution_from_units(attribution_units(predictions, records))
    assert metrics == {"n": 3, "parse_rate": pytest.approx(2 / 3), "exact_match": pytest.approx(1 / 3),
                       "recall_at_k": pytest.approx(2 / 3)}
    assert BASELINES["last_word"].predict([], records[:1]) == [format_attribution("is")]
    assert BASELINES["subject_word"].predict([], records[:1]) == [format_attribution("France")]
    assert BASELINES["subject_word"].applies_to("token_attribution") and not BASELINES["last_word"].applies_to("input_ablation")


def test_token_attribution_runs_through_the_whole_pipeline(tmp_path):
    """Ground truth on Ray actors, training, eval with the attribution form's rows and baselines, the report."""
    import json

    from conftest import run_one_model_pipeline

    # the tiny random model's integrals converge slowly: the gap tolerance is the test's, not a recipe's
    cfg = run_one_model_pipeline(
        tmp_path, "tokens", "tiny-gemma:hidden=32,layers=2,seed=1",
        {"token_attribution": {"max_facts": 40, "system_prompt": PREAMBLE, "steps": 8, "max_completeness_gap": 1.0,
                               "test_fraction": 0.3}},
        {"max_new_tokens": 12, "baselines": ["majority", "last_word", "subject_word", "gold"]})
    stats = json.loads((cfg.run_dir / "groundtruth" / "token_attribution" / "m" / "label_stats.json").read_text())
    assert stats["raw"]["count"] == 40 and 0 < stats["train"]["changed_rate"] < 1
    table = json.loads((cfg.run_dir / "matrix.json").read_text())["tasks"]["token_attribution"]
    assert table["metrics"] == ["exact_match", "recall_at_k", "parse_rate"]
    assert {"m trained", "m untrained", "majority", "last_word", "subject_word"} <= set(table["rows"])
    assert "m trained, zero v" not in table["rows"], "no vectors: no vector controls"
    cells = {row: r["cells"]["m"] for row, r in table["rows"].items()}
    assert cells["subject_word"]["exact_match"] > 0 and cells["subject_word"]["parse_rate"] == 1.0
    assert "token_attribution" in (cfg.run_dir / "report.md").read_text()
