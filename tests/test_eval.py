import json

import pytest

from conftest import make_records
from selfexplain.eval.baselines import majority_class
from selfexplain.eval.matrix import Cell, build_matrix, cells_of
from selfexplain.eval.metrics import score
from selfexplain.eval.report import write_report
from selfexplain.groundtruth.layout import RunLayout
from selfexplain.groundtruth.explanations import format_explanation, parse_explanation


def test_parse_round_trips_and_rejects_other_text():
    assert parse_explanation(format_explanation(True, "Rome")) == (True, "Rome")
    assert parse_explanation(format_explanation(False, "Answer: B")) == (False, "Answer: B")
    assert parse_explanation("Rome, probably") is None


def test_metrics_on_hand_made_cases():
    records = make_records(4)  # changed: r0, r2
    gold = [r.explanation for r in records]
    perfect = score(gold, records)
    assert {k: perfect[k] for k in ("n", "exact_match", "changed_macro_f1", "content_match", "parse_rate")} == \
        {"n": 4, "exact_match": 1.0, "changed_macro_f1": 1.0, "content_match": 1.0, "parse_rate": 1.0}
    assert perfect["n_changed"] == 2 and perfect["content_match_changed"] == perfect["exact_match_unchanged"] == 1.0
    assert perfect["exact_match_lo"] == perfect["exact_match_hi"] == 1.0, "no spread where every record is right"
    flipped = [format_explanation(not r.changed, r.output_after) for r in records]
    s = score(flipped, records)
    assert s["exact_match"] == 0.0 and s["content_match"] == 1.0 and s["changed_macro_f1"] == 0.0
    garbage = ["no idea"] * 4
    s = score(garbage, records)
    assert s["exact_match"] == 0.0 and s["parse_rate"] == 0.0 and s["changed_macro_f1"] == 0.0
    half = gold[:2] + ["no idea"] * 2
    assert score(half, records)["exact_match"] == 0.5
    with pytest.raises(ValueError):
        score(gold[:3], records)


def test_bootstrap_intervals_match_the_binomial_and_split_by_gold_class():
    """200 records, the first 100 predicted right: exact match 0.5 with a 95% interval of about
    +-1.96 sqrt(0.25 / 200) = +-0.069; on changed records (every other one) 0.5 of 100: +-0.098."""
    records = make_records(200)
    predictions = [r.explanation if i < 100 else "no idea" for i, r in enumerate(records)]
    s = score(predictions, records)
    assert s["exact_match"] == 0.5 and abs(s["exact_match_lo"] - 0.431) < 0.02 and abs(s["exact_match_hi"] - 0.569) < 0.02
    assert s["n_changed"] == 100 and s["content_match_changed"] == 0.5
    assert abs(s["content_match_changed_hi"] - s["content_match_changed_lo"] - 2 * 0.098) < 0.03
    assert score(predictions, records) == s, "seeded"


def test_majority_baseline_predicts_the_most_common_training_explanation():
    train = make_records(5)
    train[1].explanation = train[3].explanation = train[4].explanation = "X"
    assert majority_class(train, make_records(3)) == ["X"] * 3


def test_matrix_and_report(tmp_path):
    cells = [Cell("input_ablation", "a trained", "trained", "a", "a", {"n": 4, "exact_match": 0.5, "changed_macro_f1": 0.4,
                                                                       "content_match": 0.7, "parse_rate": 1.0}),
             Cell("input_ablation", "b trained", "trained", "b", "a", {"n": 4, "exact_match": 0.25, "changed_macro_f1": 0.3,
                                                                       "content_match": 0.5, "parse_rate": 1.0})]
    matrix = build_matrix(cells, {})
    table = matrix["tasks"]["input_ablation"]
    assert table["rows"]["a trained"]["cells"]["a"]["self"] and not table["rows"]["b trained"]["cells"]["a"]["self"]
    assert {(c.row, c.target) for c in cells_of(json.loads(json.dumps(matrix)))} == {("a trained", "a"), ("b trained", "a")}
    report = write_report(RunLayout(tmp_path), matrix, "unit")
    text = report.read_text()
    assert "| a trained | 0.500 (self) |" in text and "| b trained | 0.250 |" in text
    png = tmp_path / "heatmap_input_ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_are_planned_from_the_row_registry_by_capability(monkeypatch):
    from types import SimpleNamespace

    from selfexplain.eval.rows import ROW_KINDS, RowKind, plan_rows
    from selfexplain.groundtruth.tasks import TASKS

    settings = SimpleNamespace(no_vector=True, vector_controls=True, untrained=True, selfie_scales=[1.0])
    vectors = next(s for s in TASKS.values() if s.has_vectors and not s.selfie)
    text_only = next(s for s in TASKS.values() if not s.has_vectors)
    subsets = [SimpleNamespace(max_records_per_layer=8)]
    # each point of the data-efficiency curve gets the controls that read its own export
    assert [r.label for r in plan_rows(vectors, "test", settings, "e", "job", subsets)] == \
        ["e trained", "e trained, 8 per layer", "e trained, no vector", "e trained, 8 per layer, no vector",
         "e trained, zero v", "e trained, 8 per layer, zero v", "e trained, shuffled v",
         "e trained, 8 per layer, shuffled v", "e untrained"]
    assert [r.job for r in plan_rows(vectors, "test", settings, "e", "job", subsets)].count(subsets[0]) == 4
    assert [r.label for r in plan_rows(text_only, "test", settings, "e", "job")] == ["e trained", "e untrained"]
    assert [r.label for r in plan_rows(vectors, "act", settings, "e", "job", subsets)] == ["e trained"]
    # a new control row is one entry, and applies where its capability says
    monkeypatch.setitem(ROW_KINDS, "probe", RowKind("probe", "{explainer} probe", lambda spec, split, ec: spec.has_vectors))
    assert "e probe" in [r.label for r in plan_rows(vectors, "act", settings, "e", "job")]
    assert "e probe" not in [r.label for r in plan_rows(text_only, "test", settings, "e", "job")]


def test_a_control_row_sees_the_records_its_kind_rewrites(tmp_path, monkeypatch):
    """A control row (e.g. v zeroed or shuffled) is one RowKind whose `rewrite` the evaluator applies
    before generating; the cell is still scored against the records' own labels."""
    import dataclasses

    import selfexplain.eval.generate as generate_mod
    from conftest import make_records, make_train_job
    from selfexplain.distributed.eval_pool import EvalUnit, Evaluator
    from selfexplain.eval.rows import ROW_KINDS, RowKind

    reversed_kind = RowKind("reversed", "{explainer} reversed", lambda spec, split, ec: True, reads_base=True,
                            rewrite=lambda records: [dataclasses.replace(r, prompt=r.prompt[::-1]) for r in records])
    monkeypatch.setitem(ROW_KINDS, "reversed", reversed_kind)
    seen = []
    monkeypatch.setattr(generate_mod, "explain_all",
                        lambda model, tok, asks, *a, **k: [seen.append(ask.records) or ["x"] * len(ask.records) for ask in asks])
    job = make_train_job(tmp_path)
    unit = EvalUnit("input_ablation", "input_ablation", "t", "e reversed", "reversed", "e", job, "", "")
    records = make_records(3)
    assert Evaluator(1).explain([unit], [records], "plain", 4, 2) == [["x"] * 3]
    assert [r.prompt for r in seen[0]] == [r.prompt[::-1] for r in records]


def test_zero_and_shuffled_vector_controls_rewrite_only_the_vectors():
    """The control rows' explainers read zeros, or another test record's v from the same layers (never
    their own where the layer group has another record); prompts and labels are untouched."""
    import dataclasses

    import numpy as np

    from selfexplain.eval.rows import shuffled_vectors, zero_vectors

    base = make_records(7)
    records = [dataclasses.replace(r, vector=np.full(4, i, np.float32), layers=[i % 2]) for i, r in enumerate(base)]
    zeros = zero_vectors(records)
    assert all(not z.vector.any() and z.vector.shape == (4,) for z in zeros)
    shuffled = shuffled_vectors(records)
    assert [r.record_id for r in shuffled] == [r.record_id for r in records]
    assert [r.explanation for r in shuffled] == [r.explanation for r in records]
    source = [int(s.vector[0]) for s in shuffled]  # which record's v each now reads
    assert all(src != i and src % 2 == i % 2 for i, src in enumerate(source)), source
    assert sorted(source) == list(range(7)), "a permutation: every v is read once"
    assert [int(s.vector[0]) for s in shuffled_vectors(records)] == source, "seeded"


def test_trained_controls_train_and_score_their_own_explainer_on_rewritten_records(tmp_path):
    """eval.trained_controls adds one training job per explainer and target where the control applies (text-only
    for vector tasks, question-only for the others); its records lose the evidence in training and in eval,
    and its row is planned from the job."""
    import dataclasses

    import numpy as np

    from conftest import make_records, make_train_job
    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.train_job import train_jobs
    from selfexplain.eval.rows import ROW_KINDS, plan_rows, row_records
    from selfexplain.groundtruth.tasks import TASKS

    job = make_train_job(tmp_path)
    question_only = dataclasses.replace(job, control="question_only")
    assert [r.prompt for r in question_only.records()] == [""] * 16
    assert [r.question for r in question_only.records()] == [r.question for r in job.records()]
    with_v = [dataclasses.replace(r, vector=np.ones(4, np.float32), layers=[1]) for r in make_records(3)]
    text_only = dataclasses.replace(job, control="text_only")
    assert all(r.vector is None and r.layers == [1] for r in row_records(ROW_KINDS["trained_control"], text_only, with_v))
    assert all(r.vector is not None for r in row_records(ROW_KINDS["trained"], job, with_v))

    cfg = load_config("configs/quickstart.yaml", [f"out_dir={tmp_path / 'run'}",
                                                  "eval.trained_controls=[text_only, question_only]"])
    jobs = train_jobs(cfg)
    assert all(j.explainer == j.target for j in jobs if j.control)  # eval.trained_controls_for: self
    controls = {(j.task, j.control) for j in jobs if j.control}
    assert controls == {(t, "text_only" if TASKS[t].has_vectors else "question_only") for t in cfg.tasks}
    assert len({j.out_dir for j in jobs}) == len(jobs)
    mine = [j for j in jobs if j.control and (j.target, j.explainer) == (cfg.targets[0], cfg.explainers[0])]
    patching = next(j for j in mine if TASKS[j.task].has_vectors)
    labels = [r.label for r in plan_rows(TASKS[patching.task], "test", cfg.eval, "e", None, controls=[patching])]
    assert "e trained text-only" in labels
    with pytest.raises(Exception, match="trained_controls: unknown"):
        load_config("configs/quickstart.yaml", ["eval.trained_controls=[blind]"])

    # the data-efficiency curve: one job per size for the self-explainers, or for every explainer
    curve = ["eval.data_efficiency={activation_patching: [4, 16]}"]
    sized = lambda c: {(j.target, j.explainer, j.max_records_per_layer) for j in train_jobs(c) if j.max_records_per_layer}  # noqa: E731
    assert sized(load_config("configs/quickstart.yaml", curve)) == {(t, t, n) for t in cfg.targets for n in (4, 16)}
    every = load_config("configs/quickstart.yaml", curve + ["eval.data_efficiency_for=all"])
    assert sized(every) == {(t, e, n) for t in cfg.targets for e in cfg.explainers for n in (4, 16)}
    assert all(j.task == "activation_patching" for j in train_jobs(every) if j.max_records_per_layer)


def test_paired_differences_have_known_answers_and_pick_the_best_control():
    """A paired difference of two rows scored on the same records: all right minus all wrong is 1 [1, 1];
    a row equal to another is 0 [0, 0]; 10 more right of 40 is +0.25 with an interval above 0, narrower than
    the two rows' separate intervals would give. The headline compares each trained row with the control that
    scores best, and self with cross."""
    from selfexplain.eval.differences import headline_differences, paired_difference
    from selfexplain.eval.metrics import causal_from_units

    right, wrong = [True, True, True, True], [True, True, False, True]  # [gold, predicted, exact, content]
    ones, zeros = [right] * 40, [wrong] * 40
    exact = lambda a, b: paired_difference(a, b, causal_from_units, "exact_match")  # noqa: E731
    assert exact(ones, zeros) == {"difference": 1.0, "lo": 1.0, "hi": 1.0}
    assert exact(ones, ones) == {"difference": 0.0, "lo": 0.0, "hi": 0.0}
    better, worse = [right] * 30 + [wrong] * 10, [right] * 20 + [wrong] * 20
    d = exact(better, worse)
    assert d["difference"] == pytest.approx(0.25) and 0.1 < d["lo"] < 0.25 < d["hi"] <= 0.41
    assert d["hi"] - d["lo"] < 0.35  # independent rates would give about 0.41 (1.96 x 2 x 0.105)
    assert exact(better, worse[:-1]) is None  # not the same records

    cell = lambda row, kind, explainer, units: Cell("input_ablation", row, kind, explainer, "a",  # noqa: E731
                                                    causal_from_units(units), units)
    cells = [cell("a trained", "trained", "a", better), cell("b trained", "trained", "b", worse),
             cell("a untrained", "untrained", "a", worse), cell("majority", "baseline", "majority", zeros[:5] + ones[5:]),
             cell("b untrained", "untrained", "b", zeros), cell("gold", "baseline", "gold", ones)]
    found = [d for d in headline_differences(cells)["input_ablation"] if d["metric"] == "exact_match"]
    by = {(d["comparison"], d["first"]): d for d in found}
    assert by[("trained - best control", "a trained")]["second"] == "majority"  # beats 'a untrained'; gold is no control
    assert "no difference detectable at this size (-0.125 [" in by[("trained - best control", "a trained")]["reading"]
    assert by[("self - cross", "a trained")]["second"] == "b trained"
    assert by[("self - cross", "a trained")]["reading"].startswith("a trained beats b trained on exact_match by 0.250 [")


def test_each_point_of_the_data_curve_is_compared_with_its_own_controls():
    """A row trained on n records per layer is compared with the v-controls of its own export, the base
    model's rows and the baselines, never with the full-data explainer's controls; self vs cross pairs rows
    of one size; lift_curves gathers the lift per size, and the report tabulates it."""
    from selfexplain.eval.differences import headline_differences
    from selfexplain.eval.matrix import build_matrix, lift_curves
    from selfexplain.eval.metrics import causal_from_units
    from selfexplain.eval.report import lift_table

    right, wrong = [True, True, True, True], [True, True, False, True]
    rate = lambda k: [right] * k + [wrong] * (40 - k)  # noqa: E731  k of 40 exact

    def cell(row, kind, explainer, k, size=None, examples=None):
        metrics = causal_from_units(rate(k)) | ({"examples_per_layer": examples} if examples else {})
        return Cell("activation_patching", row, kind, explainer, "a", metrics, rate(k), size)

    cells = [cell("a trained", "trained", "a", 30, examples=100), cell("a trained, no vector", "no_vector", "a", 28),
             cell("a trained, 8 per layer", "trained", "a", 12, 8, 8),
             cell("a trained, 8 per layer, no vector", "no_vector", "a", 4, 8),
             cell("a untrained", "untrained", "a", 6), cell("majority", "baseline", "majority", 2),
             cell("b trained", "trained", "b", 10, examples=100)]
    found = [d for d in headline_differences(cells)["activation_patching"] if d["metric"] == "exact_match"]
    against = {d["first"]: d for d in found if d["comparison"] == "trained - best control"}
    assert against["a trained"]["second"] == "a trained, no vector"
    # the full-data row's control (28 of 40) would hide the small explainer's lift over its own (4 of 40)
    assert against["a trained, 8 per layer"]["second"] == "a untrained"
    assert against["a trained, 8 per layer"]["difference"] == pytest.approx(0.15)
    assert [(d["first"], d["second"]) for d in found if d["comparison"] == "self - cross"] == [("a trained", "b trained")]
    assert Cell("t", "a trained, 8 per layer", "trained", "a", "a", {}, size=8).is_self is False

    matrix = build_matrix(cells, {})
    table = matrix["tasks"]["activation_patching"]
    assert table["rows"]["a trained, 8 per layer, no vector"]["size"] == 8 and "size" not in table["rows"]["a trained"]
    curve = lift_curves(table)
    assert list(curve) == ["a<-a"]  # b has one size: no curve
    assert [(d["examples_per_layer"], round(d["difference"], 3)) for d in curve["a<-a"]["exact_match"]] == [(8, 0.15), (100, 0.05)]
    text = "\n".join(lift_table(curve))
    assert "| a<-a | exact_match | **+0.150 [" in text and "| 8 per layer | 100 per layer |" in text


def test_report_headline_flags_one_output_explainers_and_small_sets():
    """A trained row that gave one output for every record is called failed (a control doing so is not);
    a matrix of small test sets says it demonstrates the machinery and points to the study."""
    from selfexplain.eval.headline import headline_lines

    cell = {"n": 24, "distinct_outputs": 1, "top1": 0.1, "self": True}
    matrix = {"tasks": {"feature_descriptions": {"targets": ["a"], "metrics": ["top1"], "rows": {
        "a trained": {"kind": "trained", "explainer": "a", "cells": {"a": cell}},
        "a trained, zero v": {"kind": "zero_vector", "explainer": "a", "cells": {"a": cell}}}}}}
    text = "\n".join(headline_lines(matrix))
    assert "one output for every test record (a failed explainer): a trained on a" in text
    assert "zero v on a" not in text
    assert "demonstrates the machinery" in text and "docs/RESULTS.md" in text
    cell["n"] = 400
    assert "demonstrates the machinery" not in "\n".join(headline_lines(matrix))


def test_sweep_table_pairs_each_run_with_its_best_control_and_the_reference(tmp_path):
    import dataclasses
    import json

    from selfexplain.eval.matrix import Cell
    from selfexplain.eval.metrics import causal_from_units
    from selfexplain.eval.sweep import sweep_table
    from selfexplain.groundtruth.layout import RunLayout

    def write(run, row, kind, exact, size=None):  # 10 changed records, the first `exact` answered exactly
        units = [[True, True, i < exact, i < exact] for i in range(10)]
        cell = Cell("activation_patching", f"m {row}", kind, "m", "m", causal_from_units(units), units, size)
        path = RunLayout(tmp_path / run).eval_cell("activation_patching", "m", cell.row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": "k", "cell": dataclasses.asdict(cell)}))

    write("ref", "trained", "trained", 5)
    write("ref", "trained, zero v", "zero_vector", 2)
    write("longer", "trained", "trained", 8)
    write("longer", "trained, zero v", "zero_vector", 8)
    # a data-efficiency curve's rows are not the full-data explainer's, nor its controls
    write("ref", "trained, 4 per layer", "trained", 1, size=4)
    write("ref", "trained, 4 per layer, zero v", "zero_vector", 9, size=4)
    table = sweep_table([tmp_path / "ref", tmp_path / "longer"], "activation_patching", "m", "m")
    ref_line, longer_line = [line for line in table.split("\n") if line.startswith("| ref")][0], \
        [line for line in table.split("\n") if line.startswith("| longer")][0]
    assert "| trained, zero v |" in table and "4 per layer" not in table
    assert ref_line.split(" | ")[3].startswith("+0.300") and ref_line.endswith("| - |"), ref_line
    assert longer_line.split(" | ")[3].startswith("+0.000") and longer_line.split(" | ")[4].startswith("+0.300"), longer_line


def test_a_model_card_links_a_hub_base_model_and_shows_its_cells_beside_controls_and_baselines():
    from huggingface_hub import ModelCard

    from selfexplain.eval.report import export_results
    from selfexplain.training.model_card import model_card

    def row(kind, explainer, value):
        return {"kind": kind, "explainer": explainer,
                "cells": {"t": {"accuracy": value, "accuracy_lo": value - 0.1, "accuracy_hi": value + 0.1}}}

    matrix = {"tasks": {"activation_patching": {"metrics": ["accuracy"], "rows": {
        "a trained": row("trained", "a", 0.7), "a trained, no vector": row("no_vector", "a", 0.5),
        "b trained": row("trained", "b", 0.6), "majority": row("baseline", "majority", 0.4)}},
        "input_ablation": {"metrics": ["exact_match"], "rows": {"a trained": row("trained", "a", 0.9)}}}}
    lines = export_results(matrix, "activation_patching", "a", "t")
    meta = {"explainer_spec": {"source": "meta-llama/Llama-3.1-8B"}, "weights": "lora", "task": "activation_patching",
            "explainer": "a", "target": "t", "data": "0" * 64, "steps": 10, "vector_tokens": True,
            "train": {"lora": {"r": 128}, "lr": 5e-5, "precision": "bf16"}}
    card = ModelCard(model_card(meta, lines))
    assert card.data.base_model == "meta-llama/Llama-3.1-8B" and card.data.library_name == "peft"
    assert "| a trained | 0.700 [0.60, 0.80] |" in card.text and "| a trained, no vector | 0.500 [0.40, 0.60] |" in card.text
    assert "| majority | 0.400 [0.30, 0.50] |" in card.text
    assert "b trained" not in card.text and "exact_match" not in card.text, "only this explainer's task and rows"
    assert "injecting(model, vec_id, mapped)" in card.text
    assert export_results(matrix, "activation_patching", "c", "t") == [], "no cell of it: no results"


def test_headline_is_one_table_per_task_with_significant_differences_in_bold(tmp_path):
    from selfexplain.eval.headline import appendix_lines, headline_lines, headline_table
    from selfexplain.groundtruth.layout import RunLayout

    def diff(comparison, first, second, value, lo, hi):
        return {"comparison": comparison, "target": "a", "metric": "exact_match", "first": first, "second": second,
                "difference": value, "lo": lo, "hi": hi, "reading": f"{first} vs {second}"}

    table = {"targets": ["a"], "metrics": ["exact_match"], "rows": {}, "differences": [
        diff("trained - best control", "a trained", "a trained, zero v", 0.2, 0.05, 0.35),
        diff("trained - best control", "b trained", "majority", -0.01, -0.1, 0.08),
        diff("self - cross", "a trained", "b trained", 0.1, -0.02, 0.22)]}
    lines = headline_table("activation_patching", table)
    assert lines[0] == "| explainer | target | metric | trained - best control | self - cross |"
    assert lines[2] == ("| a trained | a | exact_match | **+0.200 [+0.050, +0.350]** vs a trained, zero v | "
                        "+0.100 [-0.020, +0.220] vs b trained |")
    assert lines[3] == "| b trained | a | exact_match | -0.010 [-0.100, +0.080] vs majority | - |"
    layout = RunLayout(tmp_path)
    text = "\n".join(headline_lines({"tasks": {"activation_patching": table}}, layout))
    assert "### activation_patching" in text and "![activation_patching headline](headline_activation_patching.png)" in text
    assert layout.figure("headline", "activation_patching").stat().st_size > 0
    assert layout.figure("headline", "activation_patching") in layout.figures()
    assert "- activation_patching, target a (self - cross): a trained vs b trained" in appendix_lines(
        {"tasks": {"activation_patching": table}})


def test_self_vs_cross_is_split_by_whether_the_cross_model_as_a_target_labels_the_item_alike():
    """agreement() matches items across targets by the task's same_item key (patching: pair, block, token
    type and text, not the tokenizer's position), and the split comparisons are the paired differences of
    exactly those records."""
    from selfexplain.eval.agreement import agreement
    from selfexplain.eval.differences import headline_differences, paired_difference
    from selfexplain.eval.headline import headline_lines
    from selfexplain.eval.forms import form_of
    from selfexplain.eval.matrix import Cell, build_matrix
    from selfexplain.groundtruth.records import Record

    def patch(target, pair, block, position, token, explanation):
        subject, other = pair
        return Record(record_id=f"{target}-activation_patching-{subject}_{other}-b{block}-t{position}",
                      task="activation_patching", target=target, split="test", source_id=f"capital:{subject}", prompt="",
                      question="", explanation=explanation, changed=True, output_before="", output_after="",
                      token_type="subject_final", query={"counterfactual_subject": other, "block": str(block), "token": token})

    mine = [patch("a", ("Norway", "Greece"), 0, 12, " Norway", "change to Athens"),
            patch("a", ("Norway", "Greece"), 1, 12, " Norway", "change to Athens"),
            patch("a", ("Mali", "Peru"), 0, 9, " Mali", "no change"),
            patch("a", ("Chad", "Iran"), 0, 9, " Chad", "no change")]
    theirs = [patch("b", ("Norway", "Greece"), 0, 15, " Norway", "change to Athens"),  # another position: same item
              patch("b", ("Norway", "Greece"), 1, 15, " Norway", "no change"),
              patch("b", ("Mali", "Peru"), 0, 11, " Mali", "no change")]
    flags = agreement("activation_patching", mine, theirs)
    assert flags == [True, False, True, None]
    assert agreement("feature_descriptions", mine, theirs) is None, "a target's own features have no counterpart"

    def cell(explainer, units):
        return Cell("activation_patching", f"{explainer} trained", "trained", explainer, "a", {"exact_match": 0.5, "n": 4}, units)

    form = form_of("activation_patching")
    unit = lambda exact: [True, True, bool(exact), bool(exact)]  # noqa: E731  [gold, predicted, exact, content]
    own, cross = cell("a", [unit(1), unit(1), unit(0), unit(1)]), cell("b", [unit(0), unit(1), unit(1), unit(0)])
    found = {d["comparison"]: d for d in headline_differences([own, cross], {("activation_patching", "a", "b"): flags})[
        "activation_patching"] if d["metric"] == "exact_match"}
    assert found["self - cross, agree"]["n"] == 2 and found["self - cross, disagree"]["n"] == 1
    expected = paired_difference([own.units[0], own.units[2]], [cross.units[0], cross.units[2]], form.aggregate,
                                 "exact_match")
    assert {k: found["self - cross, agree"][k] for k in ("difference", "lo", "hi")} == expected
    matrix = build_matrix([own, cross], {}, {("activation_patching", "a", "b"): flags})
    assert matrix["tasks"]["activation_patching"]["agreement"] == {"a": {"b": {"agree": 2, "disagree": 1, "unmatched": 1,
                                                                          "flags": flags}}}
    text = "\n".join(headline_lines(matrix))
    assert "| self - cross, agree | self - cross, disagree |" in text
    assert "target a vs b as a target: 2 agree, 1 disagree, 1 without the item" in text


def test_audit_recomputes_a_committed_headline_from_its_cells_and_names_a_number_that_differs(tmp_path, capsys):
    """The folder a study commits (matrix.json and the eval cells with their units) is enough to recompute
    every difference; cells read in another order name the same best control (ties go by name)."""
    from selfexplain.eval.audit import main as audit
    from selfexplain.eval.matrix import Cell, build_matrix, save_cell, write_matrix
    from selfexplain.eval.metrics import causal_from_units

    right, wrong = [True, True, True, True], [True, True, False, True]
    rows = {"a trained": ("trained", "a", [right] * 7 + [wrong] * 3), "b trained": ("trained", "b", [right] * 5 + [wrong] * 5),
            "a trained, zero v": ("zero_vector", "a", [wrong] * 4 + [right] * 4 + [wrong] * 2),
            "majority": ("baseline", "majority", [right] * 4 + [wrong] * 6)}  # tied with zero v on exact_match
    cells = [Cell("input_ablation", row, kind, explainer, "a", causal_from_units(units), units)
             for row, (kind, explainer, units) in rows.items()]
    flags = [True, False] * 5
    matrix = build_matrix(list(reversed(cells)), {}, {("input_ablation", "a", "b"): flags})
    folder = tmp_path / "study"
    write_matrix(folder / "matrix.json", matrix)
    for c in cells:
        save_cell(folder / "eval" / c.task / c.target / f"{c.row.replace(' ', '_').replace(',', '')}.json", "k", c, [])
    assert audit([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "| a trained | a | exact_match |" in out and "self - cross, disagree" in out
    assert "differences recomputed, 0 differ" in out
    best = {d["first"]: d["second"] for d in matrix["tasks"]["input_ablation"]["differences"]
            if d["comparison"] == "trained - best control" and d["metric"] == "exact_match"}
    assert best["a trained"] == "majority", "of two tied controls, the one last by name, in any order"
    split = {d["first"]: d for d in matrix["tasks"]["input_ablation"]["differences"]
             if d["comparison"] == "trained - best control, disagree" and d["metric"] == "exact_match"}
    assert {first: (d["other"], d["n"]) for first, d in split.items()} == {"a trained": ("b", 5), "b trained": ("b", 5)}
    assert "vs majority, 5 records where b differs" in out
    matrix["tasks"]["input_ablation"]["differences"][0]["lo"] += 0.01
    write_matrix(folder / "matrix.json", matrix)
    assert audit([str(folder)]) == 1
    assert "differs from the committed matrix.json: input_ablation: trained - best control" in capsys.readouterr().err


def test_a_trained_target_is_compared_with_its_random_weights_twin_and_the_audit_recomputes_it(tmp_path, capsys):
    """random_twins pairs 'reinit:X' with X among the targets; each explaining row (trained at full size,
    gold) on the trained target minus the same row on its twin, unpaired over two test sets of different
    sizes; controls and data-curve rows are not compared; the audit recomputes the contrast."""
    from selfexplain.eval.audit import main as audit
    from selfexplain.eval.differences import unpaired_difference
    from selfexplain.eval.matrix import build_matrix, save_cell, write_matrix
    from selfexplain.eval.metrics import causal_from_units
    from selfexplain.eval.report import random_target_lines
    from selfexplain.groundtruth.models import ModelSpec, random_twins

    models = {"m": ModelSpec("smollm2-135m-instruct"), "r": ModelSpec("reinit:smollm2-135m-instruct"),
              "q": ModelSpec("reinit:gemma-3-270m"), "b": ModelSpec("random:smollm2-135m-instruct")}
    # q's trained model is not a target; b (a byte tokenizer) differs from m in more than its weights
    assert random_twins(models, ["m", "r", "q", "b"]) == {"r": "m"}
    assert random_twins(models, ["r"]) == {}

    right, wrong = [True, True, True, True], [True, True, False, True]
    same = unpaired_difference([right] * 10, [right] * 30, causal_from_units, "exact_match")
    assert same == {"difference": 0.0, "lo": 0.0, "hi": 0.0}
    d = unpaired_difference([right] * 30 + [wrong] * 10, [right] * 10 + [wrong] * 50, causal_from_units, "exact_match")
    assert d["difference"] == pytest.approx(0.75 - 1 / 6) and 0.35 < d["lo"] < d["difference"] < d["hi"] < 0.8

    def cell(row, kind, target, k, n, size=None):
        units = [right] * k + [wrong] * (n - k)
        return Cell("input_ablation", row, kind, row.split()[0], target, causal_from_units(units), units, size)

    cells = [cell("m trained", "trained", "m", 30, 40), cell("m trained", "trained", "r", 3, 60),
             cell("m trained, 8 per layer", "trained", "m", 20, 40, 8), cell("m trained, 8 per layer", "trained", "r", 2, 60, 8),
             cell("m untrained", "untrained", "m", 0, 40), cell("m untrained", "untrained", "r", 0, 60),
             cell("gold", "baseline", "m", 40, 40), cell("gold", "baseline", "r", 60, 60)]
    matrix = build_matrix(cells, {}, None, {"r": "m"})
    found = {(d["row"], d["metric"]): d for d in matrix["tasks"]["input_ablation"]["random_target"]}
    assert {row for row, _ in found} == {"m trained", "gold"}
    assert found[("m trained", "exact_match")]["difference"] == pytest.approx(0.75 - 0.05)
    assert found[("gold", "exact_match")]["reading"].startswith("gold on m vs gold on r on exact_match: no difference")
    assert matrix["random_targets"] == {"r": "m"}
    assert "| m trained | m - r | exact_match | **+0.700 [" in "\n".join(random_target_lines(matrix["tasks"]["input_ablation"]))

    folder = tmp_path / "study"
    write_matrix(folder / "matrix.json", matrix)
    for c in cells:
        save_cell(folder / "eval" / c.task / c.target / f"{c.row.replace(' ', '_').replace(',', '')}.json", "k", c, [])
    assert audit([str(folder)]) == 0
    matrix["tasks"]["input_ablation"]["random_target"][0]["hi"] += 0.01
    write_matrix(folder / "matrix.json", matrix)
    assert audit([str(folder)]) == 1
    assert "trained - random target" in capsys.readouterr().err


def test_seeds_are_set_side_by_side_with_their_spread(tmp_path, capsys):
    """Each comparison of each seed's committed matrix.json in one row: the intervals, the spread of the
    point differences and how many seeds' intervals exclude zero; a comparison one seed lacks shows '-'."""
    from selfexplain.eval.seeds import main as seeds

    def diff(first, second, value, lo, hi, comparison="trained - best control", size=None):
        return {"comparison": comparison, "target": "a", "metric": "exact_match", "first": first, "second": second,
                "difference": value, "lo": lo, "hi": hi, **({"examples_per_layer": size} if size else {})}

    runs = {"seed0": [diff("a trained", "a trained, zero v", 0.08, 0.02, 0.15, size=300),
                      diff("a trained, 60 per layer", "majority", 0.01, -0.03, 0.05, size=60),
                      diff("a trained", "b trained", 0.03, -0.02, 0.08, "self - cross")],
            "seed1": [diff("a trained", "a trained, no vector", 0.00, -0.05, 0.05, size=300),
                      diff("a trained", "b trained", -0.01, -0.06, 0.04, "self - cross")]}
    for name, found in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "matrix.json").write_text(json.dumps({"tasks": {"activation_patching": {"differences": found}}}))
    seeds([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    out = capsys.readouterr().out
    lines = {line.split(" | ")[3]: line for line in out.splitlines() if line.startswith("| trained") or line.startswith("| self")}
    assert "**+0.080 [+0.020, +0.150]** vs a trained, zero v | +0.000 [-0.050, +0.050] vs a trained, no vector | +0.000, +0.080 | 1 of 2 |" \
        in lines["a trained"]
    assert "| - | +0.010, +0.010 | 0 of 1 |" in lines["a trained, 60 per layer"]
    assert "+0.030 [-0.020, +0.080] | -0.010 [-0.060, +0.040] | -0.010, +0.030 | 0 of 2 |" in lines["a trained - b trained"]
    assert out.index("a trained, 60 per layer") < out.index("| trained - best control | a | exact_match | a trained |")


def test_every_control_sets_each_trained_row_against_each_of_its_controls_from_the_cells(tmp_path, capsys):
    """--every-control recomputes, from a folder's committed cells, each trained row minus each control
    row of its own training size (or reading its base model) and each baseline, or those of the kinds
    named; another size's controls, other explainers and the gold ceiling are not its controls."""
    import dataclasses

    from selfexplain.eval.differences import paired_difference
    from selfexplain.eval.matrix import Cell
    from selfexplain.eval.metrics import causal_from_units
    from selfexplain.eval.seeds import main as seeds
    from selfexplain.groundtruth.layout import RunLayout

    def units(exact):  # 20 changed records, the first `exact` answered exactly
        return [[True, True, i < exact, i < exact] for i in range(20)]

    def write(row, kind, explainer, exact, size=None):
        cell = Cell("activation_patching", row, kind, explainer, "a", causal_from_units(units(exact)), units(exact), size)
        path = RunLayout(tmp_path / "seed0").eval_cell("activation_patching", "a", row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": "k", "cell": dataclasses.asdict(cell)}))

    write("a trained, 60 per layer", "trained", "a", 12, size=60)
    write("a trained, 60 per layer, zero v", "zero_vector", "a", 4, size=60)
    write("a trained, zero v", "zero_vector", "a", 0)  # the full-size export's control
    write("a untrained", "untrained", "a", 1)
    write("b trained, 60 per layer, zero v", "zero_vector", "b", 0, size=60)
    write("majority", "baseline", "majority", 2)
    write("gold", "baseline", "gold", 20)
    (tmp_path / "seed0" / "matrix.json").write_text(json.dumps({"tasks": {"activation_patching": {}}}))

    seeds([str(tmp_path / "seed0"), "--every-control", "--metric", "exact_match"])
    rows = {line.split(" | ")[3]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| trained")}
    assert sorted(rows) == ["a trained, 60 per layer - a trained, 60 per layer, zero v",
                            "a trained, 60 per layer - a untrained", "a trained, 60 per layer - majority"]
    expected = paired_difference(units(12), units(4), causal_from_units, "exact_match")
    assert f"+0.400 [{expected['lo']:+.3f}, {expected['hi']:+.3f}]" in rows["a trained, 60 per layer - a trained, 60 per layer, zero v"]
    seeds([str(tmp_path / "seed0"), "--every-control", "zero_vector", "--metric", "exact_match"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| trained")] == \
        [rows["a trained, 60 per layer - a trained, 60 per layer, zero v"]]


def test_a_form_is_one_registration_and_a_task_names_only_registered_ones(monkeypatch):
    """A task may bring its own explanation form (one register_form call) and is scored by it; a second
    form of a name is refused, and a task whose form nobody registered fails naming the known forms."""
    import dataclasses

    from selfexplain.eval import forms
    from selfexplain.groundtruth.records import Record
    from selfexplain.groundtruth.tasks import TASKS

    monkeypatch.setattr(forms, "FORMS", dict(forms.FORMS))  # this test's registrations leave with it
    yes_no = forms.Form("yes_no", ("accuracy",), ("accuracy",), ("accuracy",),
                        lambda units: {"n": len(units), "accuracy": sum(units) / len(units) if units else None},
                        lambda spec, task_cfg: lambda predictions, records: [
                            int(p.strip() == r.explanation) for p, r in zip(predictions, records)], ("right",))
    forms.register_form(yes_no)
    for name, form in (("yes_no_task", "yes_no"), ("unknown_form_task", "nobody's")):
        monkeypatch.setitem(TASKS, name, dataclasses.replace(TASKS["input_ablation"], name=name, explanation=form))
    records = [Record(f"r{i}", "yes_no_task", "a", "test", f"s{i}", "", "", gold, False, "", "")
               for i, gold in enumerate(["yes", "no", "yes", "yes"])]
    metrics, units = forms.make_scorer("yes_no_task", None)([" yes", "yes", "yes", "no"], records)
    assert units == [1, 0, 1, 0] and metrics["accuracy"] == 0.5 and metrics["accuracy_lo"] <= 0.5 <= metrics["accuracy_hi"]
    with pytest.raises(ValueError, match="registered twice"):
        forms.register_form(yes_no)
    with pytest.raises(KeyError, match="which no module registered .known: causal, description, attribution, list, yes_no"):
        forms.form_of("unknown_form_task")


def test_a_decode_budget_shorter_than_a_gold_explanation_is_named_before_generating(tmp_path):
    """An answer cut before its closing marker does not parse: a row would read as a failed explainer."""
    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.eval_pool import EvalPlan, EvalUnit, check_answer_budgets, eval_settings
    from selfexplain.distributed.train_job import train_jobs
    from selfexplain.groundtruth.models import byte_tokenizer

    def plan_for(budget: int) -> tuple:
        cfg = load_config("configs/quickstart.yaml", [f"out_dir={tmp_path / 'run'}", f"eval.max_new_tokens={budget}"])
        job = next(j for j in train_jobs(cfg) if j.task == "input_ablation")
        byte_tokenizer().save_pretrained(job.export_dir)
        test = make_records(6, target=job.target, split="test")
        plan = EvalPlan(records_of={("input_ablation", job.target): test})
        plan.units.append(EvalUnit("input_ablation", "input_ablation", job.target, "r", "trained", job.explainer, job,
                                   str(tmp_path / "cell.json"), "k"))
        return cfg, plan, max(len(r.explanation.encode()) for r in test)  # the byte tokenizer: a token a byte

    cfg, plan, longest = plan_for(1000)
    assert check_answer_budgets(cfg, plan) == []  # room to spare
    cfg, plan, _ = plan_for(longest)
    assert check_answer_budgets(cfg, plan) == []  # exactly enough
    cfg, plan, _ = plan_for(longest - 1)
    [warning] = check_answer_budgets(cfg, plan)
    assert f"the longest takes {longest} of" in warning and "max_new_tokens_by_task.input_ablation" in warning
    # a task's own budget overrides the run's, and is what the cells' keys and the actors get
    cfg = load_config("configs/quickstart.yaml", ["eval.max_new_tokens=3", f"eval.max_new_tokens_by_task={{input_ablation: {longest}}}"])
    assert check_answer_budgets(cfg, plan) == []
    assert eval_settings(cfg, "input_ablation")["max_new_tokens"] == longest and eval_settings(cfg, "head_patching")["max_new_tokens"] == 3
    with pytest.raises(Exception, match="max_new_tokens_by_task: 'nope' is not a task"):
        load_config("configs/quickstart.yaml", ["eval.max_new_tokens_by_task={nope: 3}"])
