"""Every loader of a published format refuses a malformed record field by field, naming the file and the
record: CounterFact, MMLU (CSV and parquet), Neuronpedia explanation exports."""
from __future__ import annotations

import copy
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfexplain.groundtruth.errors import DataSourceError
from selfexplain.groundtruth.features.neuronpedia import load_neuronpedia
from selfexplain.groundtruth.sources.facts import load_counterfact
from selfexplain.groundtruth.sources.multiple_choice import load_mmlu

COUNTERFACT = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                                   "relation_id": "P103", "target_true": {"str": "French", "id": "Q150"},
                                                   "target_new": {"str": "English", "id": "Q1860"}}}


def _set(record: dict, path: str, value) -> dict:
    out = copy.deepcopy(record)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DROP:
        del node[last]
    else:
        node[last] = value
    return out


_DROP = object()

COUNTERFACT_CASES = {
    "no requested_rewrite": ("requested_rewrite", _DROP, "requested_rewrite must be an object"),
    "requested_rewrite not an object": ("requested_rewrite", ["x"], "requested_rewrite must be an object"),
    "prompt missing": ("requested_rewrite.prompt", _DROP, "requested_rewrite.prompt must be a non-empty string"),
    "prompt not a string": ("requested_rewrite.prompt", 7, "requested_rewrite.prompt must be a non-empty string"),
    "prompt without a subject slot": ("requested_rewrite.prompt", "The mother tongue is", "exactly one '{}'"),
    "prompt with two subject slots": ("requested_rewrite.prompt", "{} and {} speak", "exactly one '{}'"),
    "subject empty": ("requested_rewrite.subject", "  ", "requested_rewrite.subject must be a non-empty string"),
    "subject not a string": ("requested_rewrite.subject", None, "requested_rewrite.subject must be a non-empty string"),
    "relation id not a string": ("requested_rewrite.relation_id", 103, "relation_id must be a non-empty string"),
    "target_true missing": ("requested_rewrite.target_true", _DROP, "target_true.str must be a non-empty string"),
    "true object empty": ("requested_rewrite.target_true.str", "", "target_true.str must be a non-empty string"),
    "true object not a string": ("requested_rewrite.target_true.str", ["French"], "target_true.str must be a non-empty"),
}


def test_counterfact_reads_a_well_formed_file(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([COUNTERFACT]))
    (fact,) = load_counterfact(str(path))
    assert (fact.subject, fact.relation, fact.answer, fact.text) == (
        "Danielle Darrieux", "P103", "French", "The mother tongue of Danielle Darrieux is")


@pytest.mark.parametrize("case", sorted(COUNTERFACT_CASES))
def test_counterfact_refuses_each_malformed_field(tmp_path, case):
    field, value, message = COUNTERFACT_CASES[case]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([COUNTERFACT, _set(COUNTERFACT, field, value)]))
    with pytest.raises(DataSourceError, match=rf"counterfact.json: record 1: .*{message}"):
        load_counterfact(str(path))


def test_counterfact_syntax_errors_and_empty_files_name_the_file(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text('[{"requested_rewrite": ')
    with pytest.raises(DataSourceError, match="counterfact.json is not valid JSON"):
        load_counterfact(str(path))
    path.write_text("[]")
    with pytest.raises(DataSourceError, match="holds no CounterFact records"):
        load_counterfact(str(path))
    path.write_text("[3]")
    with pytest.raises(DataSourceError, match="record 0: requested_rewrite must be an object"):
        load_counterfact(str(path))


MMLU_ROW = ["Which planet is largest?", "Mars", "Jupiter", "Venus", "Earth", "B"]
CSV_CASES = {
    "question empty": (0, "", "question must be a non-empty string"),
    "a choice empty": (3, " ", "choice C must be a non-empty string"),
    "answer not a letter": (5, "E", "expected 6 columns"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_mmlu_csv_refuses_each_malformed_field(tmp_path, case):
    column, value, message = CSV_CASES[case]
    bad = list(MMLU_ROW)
    bad[column] = value
    folder = tmp_path / "mmlu"
    folder.mkdir()
    with open(folder / "astronomy_test.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([MMLU_ROW, bad])
    with pytest.raises(DataSourceError, match=rf"astronomy_test.csv:2: .*{message}"):
        load_mmlu(str(folder))


PARQUET_ROW = {"question": "Which planet is largest?", "subject": "astronomy", "choices": ["Mars", "Jupiter", "Venus", "Earth"],
               "answer": 1}
PARQUET_CASES = {
    "question missing": ("question", _DROP, "lacks columns"),
    "question empty": ("question", "", "question must be a non-empty string"),
    "three choices": ("choices", ["a", "b", "c"], "choices must be 4 strings"),
    "choices not a list": ("choices", "abcd", "choices must be 4 strings"),
    "a choice missing": ("choices", ["a", "b", "c", None], "choice D must be a non-empty string"),
    "answer out of range": ("answer", 4, "has answer 4"),
    "answer a boolean": ("answer", True, "has answer True"),
    "answer a wrong letter": ("answer", "E", "has answer 'E'"),
    "subject not a string": ("subject", 3, "subject must be a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(PARQUET_CASES))
def test_mmlu_parquet_refuses_each_malformed_field(tmp_path, case):
    field, value, message = PARQUET_CASES[case]
    path = tmp_path / "test-00000.parquet"
    bad = _set(PARQUET_ROW, field, value)
    # one file per row shape: parquet needs one type per column, so the bad row stands alone after a good file
    pq.write_table(pa.Table.from_pylist([bad]), path)
    with pytest.raises(DataSourceError, match=rf"test-00000.parquet: row 0.*{message}"):
        load_mmlu(str(path))
    pq.write_table(pa.Table.from_pylist([PARQUET_ROW]), path)
    (q,) = load_mmlu(str(path))
    assert (q.question, q.choices[q.answer], q.subject) == ("Which planet is largest?", "Jupiter", "astronomy")


EXPLANATION = {"modelId": "llama3.1-8b", "layer": "12-llamascope-res-131k", "index": "345", "description": "legal terms"}
NEURONPEDIA_CASES = {
    "not an object": (None, ["x"], "must be an object"),
    "layer missing": ("layer", _DROP, "layer None must be a layer id"),
    "layer without its number": ("layer", "res-131k", "layer 'res-131k' must be a layer id"),
    "index missing": ("index", _DROP, "index None must be a feature number"),
    "index not a number": ("index", "12a", "index '12a' must be a feature number"),
    "index a boolean": ("index", True, "index True must be a feature number"),
    "description missing": ("description", _DROP, "description must be a non-empty string"),
    "description empty": ("description", "", "description must be a non-empty string"),
    "description not a string": ("description", 5, "description must be a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(NEURONPEDIA_CASES))
@pytest.mark.parametrize("layout", ["array", "lines"])
def test_neuronpedia_refuses_each_malformed_field(tmp_path, case, layout):
    field, value, message = NEURONPEDIA_CASES[case]
    bad = value if field is None else _set(EXPLANATION, field, value)
    path = tmp_path / ("export.json" if layout == "array" else "export.jsonl")
    rows = [EXPLANATION, bad]
    path.write_text(json.dumps(rows) if layout == "array" else "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataSourceError, match=rf"{path.name}: explanation 1.*{message}"):
        load_neuronpedia(str(path))


def test_neuronpedia_syntax_errors_and_empty_exports_name_the_file(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps(EXPLANATION) + "\n{\"layer\": \n")
    with pytest.raises(DataSourceError, match=r"export.jsonl:2 is not valid JSON"):
        load_neuronpedia(str(path))
    path = tmp_path / "export.json"
    path.write_text("[" + json.dumps(EXPLANATION))
    with pytest.raises(DataSourceError, match=r"export.json is not valid JSON"):
        load_neuronpedia(str(path))
    path.write_text("[]")
    with pytest.raises(DataSourceError, match="holds no explanations"):
        load_neuronpedia(str(path))
    path.write_text(json.dumps([EXPLANATION | {"layer": 12, "index": 345}]))
    assert load_neuronpedia(str(path)) == {(12, 345): ["legal terms"]}, "numbers as numbers are read too"


def test_feature_labels_written_as_a_neuronpedia_export_load_back(tmp_path):
    from selfexplain.groundtruth.features.neuronpedia import FeatureLabel, load_neuronpedia, write_neuronpedia

    labels = [FeatureLabel(15, 7, "numbers and digits", {"simulation": 0.41}), FeatureLabel(15, 1200, "the word 'the'"),
              FeatureLabel(3, 7, "capital cities")]
    path = write_neuronpedia(tmp_path / "np" / "explanations.json", labels, "smollm2-135m", "selfexplain-res-8k",
                             "smollm2 self-explainer")
    assert load_neuronpedia(str(path)) == {(15, 7): ["numbers and digits"], (15, 1200): ["the word 'the'"],
                                           (3, 7): ["capital cities"]}
    row = json.loads(path.read_text())[0]
    assert row["layer"] == "15-selfexplain-res-8k" and row["index"] == "7" and row["modelId"] == "smollm2-135m"
    assert row["scores"] == [{"explanationScoreTypeName": "simulation", "value": 0.41}]
