"""Attention-head patching: the batched one-token patcher against one hooked full forward per head, on
Llama (grouped-query attention) and Gemma (sliding-window and global layers) shapes."""
import pytest
import torch

from selfexplain.groundtruth.head_patching import (attention_output, every_head, head_run, head_shape, head_vector,
                                                   patch_heads, patch_heads_slow)
from selfexplain.groundtruth.models import ModelSpec, load_model


def sharp(source: str):
    """A tiny random model whose weights are scaled up, so that one head's patch flips the argmax sometimes."""
    model, _ = load_model(ModelSpec(source))
    for p in model.parameters():
        p.data *= 3
    return model


@pytest.mark.parametrize("source", ["tiny-llama:hidden=32,layers=3,heads=4,kv_heads=2,seed=3",
                                    "tiny-gemma:hidden=32,layers=4,heads=4,kv_heads=1,window=4,seed=3"])
def test_batched_head_patching_gives_the_reference_labels_and_effects(source):
    model = sharp(source)
    heads = every_head(model)
    assert len(heads) == head_shape(model)[0] * 4
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for length, other in ((7, 7), (9, 6), (2, 5), (1, 3)):  # one length, two, and no prefix to cache
        x, x_prime = torch.randint(0, 250, (length,), generator=gen), torch.randint(0, 250, (other,), generator=gen)
        answers = (int(x[0]), int(x_prime[0]))
        slow = patch_heads_slow(model, x, x_prime, heads, answers)
        fast = patch_heads(model, x, x_prime, heads, answers)
        assert fast.clean.token == slow.clean.token
        assert [d.token for d in fast.patched] == [d.token for d in slow.patched]
        assert torch.allclose(torch.tensor(fast.effects), torch.tensor(slow.effects), atol=1e-4)
        changed += sum(d.token != slow.clean.token for d in slow.patched)
        assert any(abs(e) > 1e-3 for e in slow.effects), "some head moves the answers' logit difference"
    assert changed > 0, "the test should include heads whose patch changes the output"


def test_patching_a_head_with_its_own_output_changes_nothing():
    model = sharp("tiny-llama:hidden=32,layers=3,heads=4,kv_heads=2,seed=3")
    x = torch.tensor([5, 17, 99, 3, 42])
    result = patch_heads(model, x, x, every_head(model), answers=(5, 17))
    assert all(d.token == result.clean.token for d in result.patched)
    assert max(abs(e) for e in result.effects) < 1e-4


def test_head_vectors_sum_to_the_attention_output():
    """Each head's contribution is its slice through its columns of o_proj: over all heads they add up to
    what o_proj writes to the residual stream."""
    model = sharp("tiny-gemma:hidden=32,layers=2,heads=4,kv_heads=1,seed=1")
    run = head_run(model, torch.tensor([5, 17, 99, 3]))
    layers, heads, dim = head_shape(model)
    assert run.outputs.shape == (layers, heads, dim)
    for layer in range(layers):
        total = sum(head_vector(model, h, run.outputs[layer, h.head]) for h in every_head(model) if h.layer == layer)
        written = attention_output(model, layer)(run.outputs[layer].reshape(1, heads * dim))[0]
        assert torch.allclose(total, written.float(), atol=1e-5)


# ---------------------------------------------------------------- the ground-truth task
from selfexplain.groundtruth.fact_pairs import PatchItem, encode_side  # noqa: E402
from selfexplain.groundtruth.head_patching import answer_token  # noqa: E402
from selfexplain.groundtruth.head_patching_task import HeadPatchingConfig, run_head_patching  # noqa: E402
from selfexplain.groundtruth.sources.facts import Fact, FactPair  # noqa: E402
from selfexplain.training.batches import explainer_text  # noqa: E402

PAIR = FactPair(Fact("France", "capital", "The capital of {} is", "Paris"),
                Fact("Spain", "capital", "The capital of {} is", "Madrid"), ("Madrid", "Paris", "Rome"))


def test_head_patching_records_match_the_hooked_reference(tiny):
    model, tok = tiny
    cfg = HeadPatchingConfig()
    records = run_head_patching(model, tok, [PatchItem("s", PAIR)], cfg, "t", lambda s: "train")
    x, xp = encode_side(tok, cfg, PAIR, PAIR.x), encode_side(tok, cfg, PAIR, PAIR.x_prime)
    heads = every_head(model)
    assert len(records) == len(heads) and len({r.record_id for r in records}) == len(heads)
    answers = (answer_token(tok, "Paris"), answer_token(tok, "Madrid"))
    slow = patch_heads_slow(model, x.ids, xp.ids, heads, answers)
    source = head_run(model, xp.ids)
    for rec, head, decision, effect in zip(records, heads, slow.patched, slow.effects):
        assert (rec.query["layer"], rec.query["head"], rec.layers) == (head.layer, head.head, [head.layer])
        assert rec.output_before == tok.decode([slow.clean.token]).strip()
        assert rec.output_after == tok.decode([decision.token]).strip()
        assert rec.changed == (rec.output_after != rec.output_before)
        assert rec.query["effect"] == pytest.approx(effect, abs=1e-3)
        assert rec.query["logit_margin"] == pytest.approx(min(slow.clean.margin, decision.margin), abs=1e-3)
        assert torch.allclose(torch.from_numpy(rec.vector), head_vector(model, head, source.outputs[head.layer, head.head]))
        assert rec.query["position"] == len(x.ids) - 1 and rec.token_type == x.token_types[-1]
        assert rec.query["depth"] == str(4 * head.layer // head_shape(model)[0])
    text = explainer_text(records[5])
    assert f"head {heads[5].head}" in text.lower() and x.text in text


def test_head_patching_patches_the_configured_layers_only(tiny):
    model, tok = tiny
    layers = head_shape(model)[0]
    records = run_head_patching(model, tok, [PatchItem("s", PAIR)], HeadPatchingConfig(layers=[-1, 0, -1]), "t",
                                lambda s: "train")
    assert sorted({r.query["layer"] for r in records}) == [0, layers - 1]
    assert len(records) == 2 * head_shape(model)[1]


# ---------------------------------------------------------------- the list question: which heads carry the answer
def test_answer_heads_names_the_reference_top_heads_by_effect(tiny):
    """One record per pair whose list is the top_k heads by the hooked reference's effects, strongest
    first; `changed` is whether the top head alone changes the answer."""
    from selfexplain.eval.forms import make_scorer
    from selfexplain.groundtruth.answer_heads_task import AnswerHeadsConfig, run_answer_heads
    from selfexplain.groundtruth.explanations import format_list, parse_list

    model, tok = tiny
    cfg = AnswerHeadsConfig(top_k=4)
    [record] = run_answer_heads(model, tok, [PatchItem("s", PAIR)], cfg, "t", lambda s: "train")
    x, xp = encode_side(tok, cfg, PAIR, PAIR.x), encode_side(tok, cfg, PAIR, PAIR.x_prime)
    heads = every_head(model)
    slow = patch_heads_slow(model, x.ids, xp.ids, heads, (answer_token(tok, "Paris"), answer_token(tok, "Madrid")))
    ranked = sorted(range(len(heads)), key=lambda k: -slow.effects[k])[:4]
    assert parse_list(record.explanation) == [f"{heads[k].layer}.{heads[k].head}" for k in ranked]
    assert record.query["effects"] == pytest.approx([slow.effects[k] for k in ranked], abs=1e-3)
    assert record.changed == (tok.decode([slow.patched[ranked[0]].token]).strip() != record.output_before)
    text = explainer_text(record)
    assert PAIR.x_prime.text in text and "4" in text and record.vector is None

    # scored as a list: the gold itself, its first two (recall 0.5, precision 1), reversed, and no list
    gold = parse_list(record.explanation)
    score = make_scorer("answer_heads", cfg)
    units = score([record.explanation, format_list(gold[:2]), format_list(gold[::-1]), "layer 3"], [record] * 4)[1]
    assert units == [[True, 4, 4, 4, True], [True, 2, 2, 4, True], [True, 4, 4, 4, False], [False, 0, 0, 4, False]]


def test_head_prior_names_the_heads_most_often_on_top_in_training():
    from selfexplain.eval.baselines import head_prior
    from selfexplain.groundtruth.explanations import format_list
    from selfexplain.groundtruth.records import Record

    def pair(heads):
        return Record("r", "answer_heads", "t", "train", "s", "", "", format_list(heads), False, "", "")

    train = [pair(["5.1", "2.0", "3.3"]), pair(["5.1", "3.3", "1.1"]), pair(["3.3", "5.1", "0.2"])]
    assert head_prior(train, [pair(["9.9", "8.8"]), pair(["1.1"])]) == [format_list(["5.1", "3.3"]),
                                                                       format_list(["5.1"])]


def test_a_list_task_is_neither_balanced_nor_refused_for_one_class(tmp_path):
    from selfexplain.groundtruth.answer_heads_task import AnswerHeadsConfig
    from selfexplain.groundtruth.dataset import finalize
    from selfexplain.groundtruth.records import Record, write_split

    records = [Record(f"r{i}", "answer_heads", "t", "test" if i % 4 == 0 else "train", f"s{i}", "", "",
                      "The answer is carried by <<<1.2>>>.", True, "Paris", "Madrid") for i in range(12)]
    write_split(tmp_path / "raw", records, "h", shard_size=100)
    stats = finalize(tmp_path, AnswerHeadsConfig(balance=True), "h", 0, 100)
    assert stats["train"]["count"] == 9 and stats["test"]["count"] == 3, "every record kept, one class or not"


def test_answer_heads_runs_through_the_whole_pipeline(tmp_path):
    """Ground truth on Ray actors, training, eval with the list form's rows and the head prior, the report."""
    import json

    from conftest import run_one_model_pipeline

    cfg = run_one_model_pipeline(
        tmp_path, "heads", "tiny-llama:hidden=32,layers=3,heads=4,kv_heads=2,seed=3",
        {"answer_heads": {"max_facts": 30, "prompt_format": "plain", "target_format": "plain", "test_fraction": 0.3,
                          "top_k": 2}},
        {"max_new_tokens": 16, "baselines": ["majority", "head_prior"]}, items_per_shard=16)
    stats = json.loads((cfg.run_dir / "groundtruth" / "answer_heads" / "m" / "label_stats.json").read_text())
    assert stats["train"]["count"] + stats["test"]["count"] == stats["raw"]["count"] == 30, "no balancing"
    table = json.loads((cfg.run_dir / "matrix.json").read_text())["tasks"]["answer_heads"]
    assert table["metrics"] == ["recall_at_k", "precision_at_k", "top1", "parse_rate"]
    assert {"m trained", "m untrained", "majority", "head_prior"} <= set(table["rows"])
    prior = table["rows"]["head_prior"]["cells"]["m"]
    assert prior["parse_rate"] == 1.0 and 0 < prior["recall_at_k"] <= 1
    assert "answer_heads" in (cfg.run_dir / "report.md").read_text()
