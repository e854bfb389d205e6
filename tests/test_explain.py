"""`selfexplain explain`'s domain pieces in one process: each task's unit questions are its ground-truth
records without the labels, the validation controls, and the work plan's limit. The command itself,
through Ray with a killed actor, is in test_pipeline_e2e."""
import dataclasses
import json

import numpy as np
import pytest

from selfexplain.eval.explain_units import ExplainJob
from selfexplain.eval.explain_validation import sample_rows
from selfexplain.eval.explainer_api import unit_row
from selfexplain.eval.rows import cyclic_derangement
from selfexplain.groundtruth.ablation import AblationConfig, SpanSourceConfig, run_ablation
from selfexplain.groundtruth.ablation import build_items as ablation_items
from selfexplain.groundtruth.fact_pairs import build_items as patching_items
from selfexplain.groundtruth.features.units import LatentRange
from selfexplain.groundtruth.patching_task import PatchingConfig, run_patching
from selfexplain.groundtruth.stages import StageContext
from selfexplain.groundtruth.tasks import TASKS

UNLABELLED = {"explanation", "changed", "output_before", "output_after", "query", "vector"}


def _context(task: str, cfg) -> StageContext:
    return StageContext(task, cfg, "t", None, None, "h", 0, 8, 8)


def _same_questions(queries, records) -> None:
    """The questions are the records' own, field for field, with no label; v equal to the technique's."""
    assert [q.record_id for q in queries] == [r.record_id for r in records] and queries
    for q, r in zip(queries, records):
        assert {k: v for k, v in dataclasses.asdict(q).items() if k not in UNLABELLED} == \
            {k: v for k, v in dataclasses.asdict(r).items() if k not in UNLABELLED}
        assert q.explanation == "" and not q.changed and q.output_before == q.output_after == ""
        assert all(r.query[k] == v for k, v in q.query.items()), "the question's fields are the record's"
        if r.vector is not None:
            np.testing.assert_allclose(q.vector, r.vector, atol=1e-5)


def test_patching_questions_are_the_records_without_labels(tiny):
    model, tok = tiny
    cfg = PatchingConfig(max_facts=3, relations=["capital"], num_blocks=2)
    ctx, units = _context("activation_patching", cfg), TASKS["activation_patching"].explain_units
    chunk = units.chunks(ctx, 2)[0]
    assert len(chunk) == 2
    _same_questions(units.queries(ctx, chunk, model, tok), run_patching(model, tok, chunk, cfg, "t", lambda s: _split(cfg, s)))


def test_head_patching_questions_are_the_records_without_labels(tiny):
    from selfexplain.groundtruth.head_patching_task import HeadPatchingConfig, run_head_patching

    model, tok = tiny
    cfg = HeadPatchingConfig(max_facts=3, relations=["capital"], layers=[0, -1])
    ctx, units = _context("head_patching", cfg), TASKS["head_patching"].explain_units
    chunk = units.chunks(ctx, 2)[0]
    _same_questions(units.queries(ctx, chunk, model, tok), run_head_patching(model, tok, chunk, cfg, "t",
                                                                             lambda s: _split(cfg, s)))


def test_token_attribution_questions_need_no_target_and_are_the_records_without_labels(tiny):
    from selfexplain.groundtruth.token_attribution import TokenAttributionConfig, run_attribution

    model, tok = tiny
    cfg = TokenAttributionConfig(max_facts=3, steps=4)
    ctx, units = _context("token_attribution", cfg), TASKS["token_attribution"].explain_units
    chunk = units.chunks(ctx, 2)[0]
    assert not units.needs_target
    _same_questions(units.queries(ctx, chunk, None, None), run_attribution(model, tok, chunk, cfg, "t",
                                                                           lambda s: _split(cfg, s)))


def test_answer_heads_questions_need_no_target_and_are_the_records_without_labels(tiny):
    from selfexplain.groundtruth.answer_heads_task import AnswerHeadsConfig, run_answer_heads

    model, tok = tiny
    cfg = AnswerHeadsConfig(max_facts=3, relations=["capital"], layers=[0, -1])
    ctx, units = _context("answer_heads", cfg), TASKS["answer_heads"].explain_units
    chunk = units.chunks(ctx, 2)[0]
    assert not units.needs_target
    _same_questions(units.queries(ctx, chunk, None, None), run_answer_heads(model, tok, chunk, cfg, "t",
                                                                            lambda s: _split(cfg, s)))


def _split(cfg, source: str) -> str:
    from selfexplain.groundtruth.dataset import split_of

    return split_of(source, cfg.test_fraction, 0)


def test_ablation_questions_need_no_target_and_are_the_records_without_labels(tiny):
    model, tok = tiny
    cfg = AblationConfig(max_sources=2, max_new_tokens=2, span=SpanSourceConfig(answer_pattern=r"\S+"))
    ctx, units = _context("input_ablation", cfg), TASKS["input_ablation"].explain_units
    assert not units.needs_target
    chunk = units.chunks(ctx, 4)[0]
    queries = units.queries(ctx, chunk, None, None)
    _same_questions(queries, run_ablation(model, tok, chunk, cfg, "t", lambda s: _split(cfg, s)))
    # the technique on a sample: exactly the sampled units, labelled as the ground truth labels them
    truth = units.truth(ctx, queries[1:3], model, tok)
    assert [r.record_id for r in truth] == [q.record_id for q in queries[1:3]]
    assert all(r.explanation for r in truth)


PERSONS_PROMPTS = ["Paris is lovely in spring. Rome is old. The capital of France is",
                   {"prompt": "Q: What is the capital of beautiful Peru?\nA: The capital of Peru is", "spans": ["beautiful"],
                    "id": "peru"}]


def test_a_persons_prompts_make_the_units_the_technique_labels(tiny, tmp_path):
    """Input ablation of a person's own prompts: each listed span (or each sentence but the last) removed in
    turn; the questions are those of the technique's records of the same items; a prompts file gives the
    same items; a span not in its prompt is refused naming the input."""
    from selfexplain.groundtruth.ablation import PromptsFileConfig, items_of_inputs
    from selfexplain.groundtruth.errors import DataSourceError

    model, tok = tiny
    cfg = AblationConfig(max_new_tokens=2)
    items = items_of_inputs(cfg, PERSONS_PROMPTS)
    assert [(i.source_id, i.span, i.ablated) for i in items] == [
        ("input0", "Paris is lovely in spring.", "Rome is old. The capital of France is"),
        ("input0", "Rome is old.", "Paris is lovely in spring. The capital of France is"),
        ("peru", "beautiful", "Q: What is the capital of Peru?\nA: The capital of Peru is")]
    queries = TASKS["input_ablation"].explain_units.of_inputs(cfg, PERSONS_PROMPTS, None, None, "t")
    _same_questions(queries, run_ablation(model, tok, items, cfg, "t", lambda source: "test"))
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": p} if isinstance(p, str) else p) for p in PERSONS_PROMPTS) + "\n\n")
    from_file = ablation_items(AblationConfig(source="prompts_file", prompts=PromptsFileConfig(path=str(lines))), 0)
    assert [dataclasses.replace(i, answer_pattern="") for i in from_file] == \
        [dataclasses.replace(i, answer_pattern="") for i in items]
    with pytest.raises(DataSourceError, match=r"inputs: input 0: span 'Lima' is not in the prompt"):
        items_of_inputs(cfg, [{"prompt": "The capital of Peru is", "spans": ["Lima"]}])
    with pytest.raises(DataSourceError, match=r"inputs: input 1: id 'a' names an earlier input too"):
        items_of_inputs(cfg, [{"prompt": "A. B", "id": "a"}, {"prompt": "C. D", "id": "a"}])
    with pytest.raises(ValueError, match="prompts.path: required"):
        AblationConfig(source="prompts_file").check()


def test_a_persons_counterfactual_facts_make_the_patching_units(tiny, tmp_path):
    from selfexplain.groundtruth.fact_pairs import items_of_inputs

    model, tok = tiny
    cfg = PatchingConfig(num_blocks=2)
    facts = [{"requested_rewrite": {"prompt": "The capital of {} is", "subject": s, "relation_id": "capital",
                                    "target_true": {"str": a}}} for s, a in [("France", "Paris"), ("Peru", "Lima")]]
    items = items_of_inputs(cfg, facts)
    assert sorted((i.pair.x.subject, i.pair.x_prime.subject) for i in items) == [("France", "Peru"), ("Peru", "France")]
    units = TASKS["activation_patching"].explain_units
    queries = units.of_inputs(cfg, facts, model, tok, "t")
    _same_questions(queries, run_patching(model, tok, items, cfg, "t", lambda source: "test"))
    # --source: a CounterFact file's facts, paired within each split as the task pairs its own
    file = tmp_path / "counterfact.json"
    file.write_text(json.dumps(facts))
    from_file = patching_items(units.with_source(PatchingConfig(max_facts=1, test_fraction=0.01), str(file), None), 0)
    assert sorted(i.pair.pair_id for i in from_file) == sorted(i.pair.pair_id for i in items)


def test_the_notebook_explainer_explains_a_persons_prompts_as_rows(tiny):
    """Explainer.explain(prompts): one row per unit, its answer the one explain(records) gives for the
    unit's question; a task that runs the target to ask refuses without it."""
    from selfexplain.eval.explainer_api import Explainer

    model, tok = tiny
    meta = {"task": "input_ablation", "target": "t", "train": {"prompt_format": "plain"}}
    explainer = Explainer(model, tok, None, meta)
    rows = explainer.explain(PERSONS_PROMPTS, max_new_tokens=3)
    records = explainer.units_of(PERSONS_PROMPTS)
    assert [r["unit"] for r in rows] == [r.record_id for r in records] and len(rows) == 3
    assert [r["explanation"] for r in rows] == [a.strip() for a in explainer.explain(records, max_new_tokens=3)]
    assert rows[2]["query"]["span"] == "beautiful" and not rows[2]["trained_on"]
    patching = Explainer(model, tok, None, {**meta, "task": "activation_patching"})
    with pytest.raises(ValueError, match=r"pass target=\(model, tokenizer\)"):
        patching.explain([{"requested_rewrite": {}}])


def test_a_limit_cuts_the_work_at_that_many_items():
    cfg = AblationConfig(max_sources=3)
    n = len(ablation_items(cfg, 0))
    job = ExplainJob(_context("input_ablation", cfg), "e", "o", "x", 4, 6, None, 8, 8, frozenset())
    assert sum(len(c) for c in job.chunks()) == min(6, n) and [len(c) for c in job.chunks()][0] == 4
    latents = LatentRange(3, 512, 1024)
    assert len(latents) == 512 and latents[:6] == LatentRange(3, 512, 518) and latents[:600] == latents


def test_controls_never_keep_a_unit_in_place_and_the_sample_skips_trained_units():
    for n in (2, 3, 10, 57):
        takes = cyclic_derangement(range(n), "derange:1")
        order = [takes[i] for i in range(n)]
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
    rows = [{"unit": f"u{i}", "trained_on": i % 3 == 0} for i in range(30)]
    sample = sample_rows(rows, 8, seed=0)
    assert len(sample) == 8 and not any(r["trained_on"] for r in sample)
    assert sample == sample_rows(rows, 8, seed=0) and sample != sample_rows(rows, 8, seed=1)
    assert len(sample_rows(rows, 100, seed=0)) == 20


def test_unit_rows_leave_bulky_query_fields_out():
    from conftest import make_records

    record = make_records(1)[0]
    record.query["exemplars"] = {"top": []}
    row = unit_row(record, " an answer ", frozenset({record.source_id}))
    assert row["explanation"] == "an answer" and row["trained_on"] and "exemplars" not in row["query"]


def test_every_built_in_task_declares_its_units():
    for spec in (s for s in TASKS.values() if s.config.__module__.startswith("selfexplain.")):  # not a test's own
        assert spec.explain_units is not None, f"{spec.name}: explain needs its units"
    with pytest.raises(Exception):
        TASKS["input_ablation"].explain_units.chunks(_context("input_ablation", AblationConfig(source="nope")), 4)


def test_the_browser_lists_every_unit_and_finds_one_in_headless_chromium(tmp_path):
    from selfexplain.eval.explain_outputs import listed_units, render_page, write_browser

    rows = [{"unit": f"L3-F{i}", "source_id": f"L3-F{i}", "layers": [3], "prompt": "", "question": "",
             "query": {"layer": 3, "feature": i}, "explanation": f"words about topic {i}", "trained_on": i < 4}
            for i in range(12)]
    rows[5]["explanation"] = "a </script> tag & <b>markup</b> stay text"
    validation = {"units": {"L3-F7": {"gold": "topic seven", "answer": "words about topic 7",
                                      "scores": {"simulation": 0.5, "judge": 0.7},
                                      "exemplars": [{"tokens": ["the", " cat", " sat"], "acts": [0.0, 2.0, 0.5]}]}}}
    page = write_browser(tmp_path / "index.html", rows, validation, "a explains a", ["validation: 1 unit"])
    shot = tmp_path / "browser.png"
    dom, console = render_page(page, screenshot=shot)
    assert console == [], "the page loads without console messages"
    assert listed_units(dom) == [r["unit"] for r in rows], "every unit is listed, in order"
    assert "12 of 12 units" in dom and "gold: topic seven" in dom and "<mark" in dom
    assert "a &lt;/script&gt; tag &amp; &lt;b&gt;markup&lt;/b&gt; stay text" in dom, "explanations are text, not markup"
    dom, console = render_page(page, search="topic 7")
    assert listed_units(dom) == ["L3-F7"] and console == [], "search finds the one unit"
    assert listed_units(render_page(page, search="topic seven")[0]) == ["L3-F7"], "and its gold label finds it"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000, "a screenshot is kept"
    # the console check can fail: a page whose script breaks reports it
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("JSON.parse(", "JSON.parsed("))
    assert any("Uncaught" in line for line in render_page(broken)[1])
