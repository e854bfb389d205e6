import csv
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_records

from selfexplain.groundtruth.ablation import AblationConfig, HintSourceConfig, build_items, extract_answer, run_ablation
from selfexplain.groundtruth.dataset import balance, label_stats, split_of
from selfexplain.groundtruth.errors import DataSourceError
from selfexplain.groundtruth.generation import greedy_generate, render_prompt, shared_prefix
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.sources.multiple_choice import load_mmlu


def test_span_items_remove_exactly_the_span():
    items = build_items(AblationConfig(max_sources=5), seed=0)
    assert len({i.source_id for i in items}) == 5
    # countries x relations (some countries have no known language) x span kinds
    assert len(items) % 4 == 0 and 5 * 4 < len(items) <= 5 * 2 * 4
    for item in items:
        assert item.span in item.full and item.span not in item.ablated
        assert item.full.replace(item.span, "").replace("  ", " ").strip() == item.ablated.strip()


def test_hint_items_follow_the_paper_format():
    items = build_items(AblationConfig(source="hint_mcq", max_sources=30), seed=0)
    letters = Counter(dict(i.features)["hint_letter"] for i in items)
    assert set(letters) <= set("ABCD") and len(letters) >= 3, "hint letters are drawn at random"
    for item in items:
        assert item.full.endswith("Answer:") and item.ablated.endswith("Answer:")
        assert item.full.count("Hint: The answer is") == 1 and "Hint" not in item.ablated


def write_mmlu_csv(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "astronomy_test.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_mmlu_csv_and_parquet(tmp_path):
    write_mmlu_csv(tmp_path / "csv", [["What orbits Earth?", "Moon", "Sun", "Mars", "Venus", "A"],
                                      ["Hottest planet?", "Mars", "Venus", "Earth", "Moon", "B"]])
    questions = load_mmlu(str(tmp_path / "csv"))
    assert [q.answer for q in questions] == [0, 1] and questions[0].subject == "astronomy"
    table = pa.table({"question": ["2+2?"], "subject": ["math"], "choices": [["3", "4", "5", "6"]], "answer": [1]})
    pq.write_table(table, tmp_path / "test.parquet")
    (q,) = load_mmlu(str(tmp_path / "test.parquet"))
    assert q.choices == ("3", "4", "5", "6") and q.answer == 1 and q.subject == "math"
    cfg = AblationConfig(source="hint_mcq", hint=HintSourceConfig(questions="mmlu", mmlu_path=str(tmp_path / "csv")))
    assert len(build_items(cfg, seed=0)) == 2


def test_empty_or_malformed_question_source_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no MMLU questions found"):
        load_mmlu(str(tmp_path / "empty"))
    write_mmlu_csv(tmp_path / "bad", [["q", "a", "b", "c"]])
    with pytest.raises(ValueError, match="astronomy_test.csv:1: expected 6 columns"):
        load_mmlu(str(tmp_path / "bad"))
    with pytest.raises(DataSourceError, match="does not exist"):
        load_mmlu(str(tmp_path / "missing"))


def test_batched_generation_matches_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, text, "plain") for text in ["a", "The capital of", "xyz xyz xyz xyz", "Q: 1+1?\nA:"]]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


# tiny Gemma's sliding window (4) is shorter than the prompts: padding between a shared prefix and a
# prompt would take window positions, so it runs whole prompts (left-padded) instead
@pytest.mark.parametrize("arch,shares", [("tiny-llama", True), ("tiny-gemma", False)])
def test_a_shared_prefix_is_run_once_and_answers_as_one_at_a_time(arch, shares):
    model, tok = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,seed=3"))
    for p in model.parameters():
        p.data *= 3  # a sharp random model: answers differ per prompt
    preamble = "Q: capital of Peru? A: Lima.\n"
    prompts = [render_prompt(tok, preamble + text, "plain") for text in ["Q: Chile?", "Q: the capital of Spain?", "Q: Laos?"]]
    assert shared_prefix(prompts) >= len(preamble)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    finally:
        handle.remove()
    if shares:
        assert calls[0] == (1, shared_prefix(prompts)), "the preamble runs once, alone"
        assert calls[1][0] == 3 and calls[1][1] < max(map(len, prompts)) - len(preamble) + 1, "then only what follows it"
    else:
        assert calls[0] == (3, max(map(len, prompts)))
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and len(set(single)) > 1


@pytest.mark.parametrize("arch,options", [("tiny-llama", "seed=5,kv_heads=2"), ("tiny-gemma", "seed=5"),
                                          ("tiny-gemma", "seed=3,window=64,kv_heads=2")])
def test_generation_answers_as_transformers_generate_on_each_prompt_alone(arch, options, monkeypatch):
    """The slow reference is transformers' own generate() on one prompt at a time. Batched: prompts run in
    chunks of 2, the chunks joined into decode batches of 6 with room for the answers (a window of 4 keeps
    them apart; one of 64 spans them), rows that write EOS leave their batch while the others write on,
    the next chunk joins the rows still writing as soon as two have left (continuous batching; or, to
    compare, only once the batch has drained), and decode steps attend with two query heads per
    key-value head."""
    import selfexplain.groundtruth.generation as generation_mod

    model, tok = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,{options}"))
    for p in model.parameters():
        p.data *= 3  # a sharp random model: answers differ per prompt
    texts = ["a", "The capital of", "xyz xyz xyz xyz", "Q: 1+1?\nA:", "b c", "The official language of Peru is",
             "1 2 3", "hello there", "Q: Laos?"]
    prompts = [render_prompt(tok, text, "plain") for text in texts]

    def reference(ids: list[int], eos: int | None, tokens: int = 6) -> list[int]:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist()

    # EOS: the token written most often in the first three, so rows stop at different steps
    early = [reference(ids, None, 3) for ids in prompts]
    eos, _ = Counter(t for answer in early for t in set(answer)).most_common(1)[0]
    assert 1 < sum(eos in answer for answer in early) < len(prompts), "some rows stop early, some do not"
    tok.eos_token_id = eos  # this test's own tokenizer
    monkeypatch.setattr(generation_mod, "PROMPT_ROWS", 2)

    expected = [tok.decode(reference(ids, eos), skip_special_tokens=True) for ids in prompts]
    merges = arch == "tiny-llama" or "window=64" in options  # tiny Gemma's own window is 4
    join = generation_mod._Stream.join
    for continuous in (True, False):
        running = []  # rows decoding when each chunk of prompts joined
        monkeypatch.setattr(generation_mod._Stream, "join",
                            lambda self, *a, **k: running.append(len(self.rows)) or join(self, *a, **k))
        assert greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=6, continuous=continuous) == expected
        # prompts join rows still writing only where caches merge (no window shorter than prompt plus
        # answer), and only continuously; otherwise each batch starts once the last has drained
        assert any(running) == (merges and continuous), running
    assert len(set(expected)) > 2


def test_run_ablation_labels_agree_with_reference(tiny):
    model, tok = tiny
    cfg = AblationConfig(max_sources=3, max_new_tokens=3)
    cfg.span.answer_pattern = r"\S+"
    items = build_items(cfg, seed=0)[:10]
    records = run_ablation(model, tok, items, cfg, "t", lambda s: "train", batch_size=4)
    for item, rec in zip(items, records):
        # slow reference: each input alone
        before = greedy_generate(model, tok, [render_prompt(tok, item.full, "plain")], 3, 1)[0]
        after = greedy_generate(model, tok, [render_prompt(tok, item.ablated, "plain")], 3, 1)[0]
        assert rec.output_before == extract_answer(before, r"\S+")
        assert rec.output_after == extract_answer(after, r"\S+")
        assert rec.changed == (rec.output_before != rec.output_after)
        assert f"<<<{rec.output_after}>>>" in rec.explanation


def test_split_keeps_sources_apart():
    splits = {s: split_of(s, 0.3, seed=1) for s in (f"src{i}" for i in range(400))}
    assert 0.2 < sum(v == "test" for v in splits.values()) / 400 < 0.4
    assert all(split_of(s, 0.3, seed=1) == v for s, v in splits.items())


def test_balance_and_label_stats():
    records = make_records(40)
    for i, r in enumerate(records):
        r.changed = i < 30  # 30 changed, 10 unchanged
    chosen = balance(records, 0.5, seed=0)
    assert sum(r.changed for r in chosen) == 10 and sum(not r.changed for r in chosen) == 10
    assert len(balance(records, 0.5, seed=0, cap=8)) == 8
    stats = label_stats(make_records(40))
    assert stats["changed_rate"] == 0.5
    assert stats["trivial_rules"]["kind"] == 1.0, "kind alone predicts 'changed' in these records"


def test_mmlu_is_read_strictly(tmp_path):
    """One split of a published folder; answers outside 0-3 refused; non-UTF-8 named; a BOM stripped."""
    root = tmp_path / "mmlu"
    for split in ("test", "dev", "auxiliary_train"):
        write_mmlu_csv(root / split, [[f"{split} question?", "w", "x", "y", "z", "C"]])
        (root / split / "astronomy_test.csv").rename(root / split / f"astronomy_{split}.csv")
    assert [q.question for q in load_mmlu(str(root))] == ["test question?"]
    assert [q.question for q in load_mmlu(str(root), split="dev")] == ["dev question?"]

    pq.write_table(pa.table({"question": ["q?"], "subject": ["s"], "choices": [["a", "b", "c", "d"]], "answer": [-1]}),
                   tmp_path / "test-00000.parquet")
    with pytest.raises(DataSourceError, match=r"test-00000.parquet: row 0 has answer -1, expected 0-3"):
        load_mmlu(str(tmp_path / "test-00000.parquet"))

    latin = tmp_path / "latin" / "test"
    latin.mkdir(parents=True)
    (latin / "french_test.csv").write_bytes("Caf\xe9?,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match="french_test.csv: not UTF-8"):
        load_mmlu(str(tmp_path / "latin"))
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "history_test.csv").write_bytes("\ufeffWho?,a,b,c,d,B\n".encode("utf-8"))
    (q,) = load_mmlu(str(bom))
    assert q.question == "Who?" and q.answer == 1
