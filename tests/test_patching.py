"""The fast patcher (cached clean run, one batch per block) against one hooked forward per intervention."""
import pytest
import torch

from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.generation import MIN_SHARED_PREFIX, shared_prefix
from selfexplain.groundtruth.patching import (Intervention, PairPatches, block_vector, clean_runs, decided_tokens, layer_blocks,
                                  layer_states, patch_fast, patch_pairs, patch_slow)


def test_blocks_are_contiguous_and_cover_every_layer():
    assert layer_blocks(30, 4) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23)), list(range(23, 30))]
    assert sum(layer_blocks(7, 7), []) == list(range(7))


def test_layer_states_match_the_models_own_output():
    model, _ = load_model(ModelSpec("tiny-llama:hidden=32,layers=4"))
    ids = torch.tensor([5, 17, 99, 3, 42])
    states = layer_states(model, ids)
    assert states.shape == (5, 5, 32)
    logits = model(input_ids=ids.unsqueeze(0)).logits[0]
    assert torch.allclose(model.lm_head(model.model.norm(states[-1])), logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma"])  # Gemma: sliding window 4 + global layers
def test_a_shared_prefix_runs_once_and_changes_nothing(arch):
    model, _ = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,seed=3"))
    gen = torch.Generator().manual_seed(1)
    preamble = torch.randint(0, 250, (MIN_SHARED_PREFIX + 2,), generator=gen)
    prompts = [torch.cat([preamble, torch.randint(0, 250, (n,), generator=gen)]) for n in (3, 5, 3)]
    assert shared_prefix(prompts) == len(preamble) and shared_prefix(prompts[:1]) == 0
    assert shared_prefix([p[3:] for p in prompts]) == 0, "too short a prefix is not worth a forward of its own"
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        together = clean_runs(model, prompts)
    finally:
        handle.remove()
    assert calls == [(1, len(preamble)), (3, 5)], "the preamble once, then each prompt's own tokens"
    for prompt, run in zip(prompts, together):
        alone = clean_runs(model, [prompt])[0]
        assert run.states.shape == alone.states.shape
        assert torch.allclose(run.states, alone.states, atol=1e-5)
        assert run.decision.token == alone.decision.token


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma"])  # Gemma: sliding-window + global layers
@pytest.mark.parametrize("first", [0, 3])  # 3: positions 0-2 come from the prefix cache
@pytest.mark.parametrize("shared", [0, MIN_SHARED_PREFIX + 1])  # x and x' begin alike: their clean runs share it
def test_fast_patcher_gives_the_reference_labels(arch, first, shared):
    # a sharper random model, so that patches do change the argmax sometimes
    model, _ = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,seed=3"))
    for p in model.parameters():
        p.data *= 3
    gen = torch.Generator().manual_seed(0)
    blocks = layer_blocks(4, 2)
    changed = 0
    for _ in range(4):
        common = torch.randint(0, 250, (shared,), generator=gen)
        x = torch.cat([common, torch.randint(0, 250, (7,), generator=gen)])
        x_prime = torch.cat([common, torch.randint(0, 250, (7,), generator=gen)])
        interventions = [Intervention(b, t, t) for b in range(2) for t in range(first + shared, 7 + shared)]
        slow_result = patch_slow(model, x, x_prime, blocks, interventions)
        fast_result = patch_fast(model, x, x_prime, blocks, interventions)
        clean_slow, slow = decided_tokens(slow_result)
        assert decided_tokens(fast_result) == (clean_slow, slow)
        margins = [d.margin for d in [slow_result[0], *slow_result[1]]], [d.margin for d in [fast_result[0], *fast_result[1]]]
        assert margins[0] == pytest.approx(margins[1], abs=1e-4) and min(margins[0]) >= 0
        changed += sum(token != clean_slow for token in slow)
    assert changed > 0, "the check is only meaningful if some patch changes the output"


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma"])
def test_pairs_of_one_length_share_their_clean_runs_and_patched_forwards(arch, monkeypatch):
    """Four pairs of one length run two by two (CLEAN_ROWS 4), their preamble once per group; a pair of two
    lengths runs alone; each pair's states match its own clean runs. Patched together (patch_pairs, at
    most 6 rows a forward), every pair gets the hooked reference's labels."""
    import selfexplain.groundtruth.patching as patching_mod

    monkeypatch.setattr(patching_mod, "CLEAN_ROWS", 4)
    monkeypatch.setattr(patching_mod, "PATCH_ROWS", 6)
    model, _ = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,seed=3"))
    for p in model.parameters():
        p.data *= 3
    gen = torch.Generator().manual_seed(2)
    preamble = torch.randint(0, 250, (MIN_SHARED_PREFIX + 1,), generator=gen)
    sides = lambda n: torch.cat([preamble, torch.randint(0, 250, (n,), generator=gen)])  # noqa: E731
    pairs = [(sides(5), sides(5)), (sides(5), sides(5)), (sides(4), sides(6)), (sides(5), sides(5)), (sides(5), sides(5))]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        groups = list(patching_mod.pair_clean_runs(model, pairs))
    finally:
        handle.remove()
    assert calls == [(1, len(preamble)), (4, 5)] * 2 + [(1, len(preamble)), (2, 6)], "2 groups of 2 pairs, then the odd pair"
    assert [[i for i, *_ in group] for group in groups] == [[0, 1], [3, 4], [2]]
    runs = {i: (clean, source) for group in groups for i, clean, source in group}
    blocks = layer_blocks(4, 2)
    plans = []
    for i, (x, x_prime) in enumerate(pairs):
        clean, source = runs[i]
        alone = clean_runs(model, [x, x_prime])
        assert torch.allclose(clean.states, alone[0].states, atol=1e-5) and torch.allclose(source.states, alone[1].states, atol=1e-5)
        ivs = [Intervention(b, t, t) for b in range(2) for t in range(len(preamble) + i % 2, min(len(x), len(x_prime)))]
        plans.append(PairPatches(x, ivs, clean, source))  # odd pairs start a position later: a run of their own
    changed = 0
    for (x, x_prime), plan, patched in zip(pairs, plans, patch_pairs(model, plans, blocks)):
        slow_clean, slow = decided_tokens(patch_slow(model, x, x_prime, blocks, plan.interventions))
        assert plan.clean.decision.token == slow_clean and [d.token for d in patched] == slow
        changed += sum(token != slow_clean for token in slow)
    assert changed > 0


# ---------------------------------------------------------------- the ground-truth task
import json  # noqa: E402

from selfexplain.groundtruth.dataset import balance  # noqa: E402
from selfexplain.groundtruth.fact_pairs import PatchItem, encode_side  # noqa: E402
from selfexplain.groundtruth.patching_task import PatchingConfig, align, run_patching  # noqa: E402
from selfexplain.groundtruth.records import Record  # noqa: E402
from selfexplain.groundtruth.sources.facts import Fact, FactPair, load_counterfact, make_pairs  # noqa: E402

PAIR = FactPair(Fact("France", "capital", "The capital of {} is", "Paris"),
                Fact("Spain", "capital", "The capital of {} is", "Madrid"), ("Madrid", "Paris", "Rome"))


def test_token_types_and_alignment_follow_the_documented_rule(tiny):
    _, tok = tiny  # byte tokenizer: one token per character after <s>
    cfg = PatchingConfig()
    x, xp = encode_side(tok, cfg, PAIR, PAIR.x), encode_side(tok, cfg, PAIR, PAIR.x_prime)
    text = "The capital of France is"
    assert len(x.ids) == 1 + len(text) and x.token_types[0] == "other"  # <s>
    first, last = 1 + text.index("France"), text.index("France") + len("France")
    assert x.subject == (first, last) and x.token_types[last] == "subject_final"
    assert all(x.token_types[t] == "other" for t in range(first, last))  # non-final subject tokens
    assert all(x.token_types[t] == "relation" for t in range(1, first)) and x.token_types[-1] == "relation"
    assert align(last, x, xp) == xp.subject[1], "subject-final aligns with subject-final"
    assert align(len(x.ids) - 1, x, xp) == len(xp.ids) - 1, "the last token aligns with the last"
    assert align(3, x, xp) == 3, "tokens before the subject align by index"
    assert align(first + 2, x, xp) == xp.subject[1] - (last - first - 2)  # counted back from the subject's end
    assert align(first, x, xp) == xp.subject[0], "clipped at the shorter subject's first token"


def test_text_positions_skip_a_preamble(tiny):
    model, tok = tiny
    cfg = PatchingConfig(system_prompt="The capital of Japan is Tokyo.", positions="text", num_blocks=1)
    x = encode_side(tok, cfg, PAIR, PAIR.x)
    preamble = 1 + len("The capital of Japan is Tokyo.\n\n")  # <s>, then one token per preamble byte
    assert x.text_positions == list(range(preamble, len(x.ids)))
    records = run_patching(model, tok, [PatchItem("s", PAIR)], cfg, "t", lambda s: "train")
    assert [r.query["position"] for r in records] == x.text_positions


def test_forced_choice_prompts_type_the_options(tiny):
    _, tok = tiny
    cfg = PatchingConfig(prompt_format="forced_choice")
    x = encode_side(tok, cfg, PAIR, PAIR.x)
    assert "Respond with one of Madrid or Paris or Rome or unknown" in x.text
    kinds = {t for t in x.token_types}
    assert {"original_option", "new_option", "other_option", "subject_final", "relation"} <= kinds
    paris = x.text.index("Paris")
    assert x.token_types[1 + paris] == "original_option" and x.token_types[1 + x.text.index("Madrid")] == "new_option"


def test_patching_records_match_the_hooked_reference(tiny):
    model, tok = tiny
    cfg = PatchingConfig(num_blocks=2)
    pair = make_pairs([PAIR.x, PAIR.x_prime], 1, 2, seed=0)[0]
    records = run_patching(model, tok, [PatchItem("s", pair)], cfg, "t",
                           lambda s: "train")
    x, xp = encode_side(tok, cfg, pair, pair.x), encode_side(tok, cfg, pair, pair.x_prime)
    assert len(records) == 2 * len(x.ids)
    blocks = layer_blocks(len(model.model.layers), 2)
    interventions = [Intervention(b, t, align(t, x, xp)) for b in range(2) for t in range(len(x.ids))]
    clean, slow = patch_slow(model, x.ids, xp.ids, blocks, interventions)
    source = layer_states(model, xp.ids)
    for rec, iv, decision in zip(records, interventions, slow):
        assert rec.output_before == tok.decode([clean.token]).strip() and rec.output_after == tok.decode([decision.token]).strip()
        assert rec.query["logit_margin"] == pytest.approx(min(clean.margin, decision.margin), abs=1e-3)
        assert rec.changed == (rec.output_after != rec.output_before)
        assert rec.layers == blocks[iv.block] and rec.query["position"] == iv.position
        assert torch.allclose(torch.from_numpy(rec.vector), block_vector(source, blocks[iv.block], iv.source_position))
        assert rec.token_type == x.token_types[iv.position]


def test_counterfact_loader_reads_the_published_format(tmp_path):
    def record(case, subject, prompt, true):
        return {"case_id": case, "requested_rewrite": {"prompt": prompt, "relation_id": "P36", "subject": subject,
                                                       "target_new": {"str": "X"}, "target_true": {"str": " " + true}},
                "paraphrase_prompts": [], "neighborhood_prompts": []}
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([record(0, "France", "The capital of {} is", "Paris"),
                                record(1, "Spain", "The capital of {} is", "Madrid"),
                                record(2, "Italy", "{}'s capital is", "Rome")]))
    facts = load_counterfact(str(path))
    assert [f.answer for f in facts] == ["Paris", "Madrid", "Rome"] and facts[2].text == "Italy's capital is"
    pairs = make_pairs(facts, pairs_per_fact=2, n_options=3, seed=0)
    assert len(pairs) == 2  # Italy's template differs: it pairs with no one (mixing templates misaligns positions)
    for p in pairs:
        assert p.x.relation == p.x_prime.relation and p.x.subject != p.x_prime.subject
        assert p.x.template == p.x_prime.template
        assert {p.x.answer, p.x_prime.answer} <= set(p.options) and len(p.options) == 3
    path.write_text(json.dumps([{"case_id": 0, "requested_rewrite": {"prompt": "{} is"}}]))
    with pytest.raises(ValueError, match="record 0: requested_rewrite.subject must be a non-empty string"):
        load_counterfact(str(path))


def test_balancing_spreads_each_class_over_cells():
    def rec(i, cell, changed):
        return Record(f"r{i:04d}", "activation_patching", "t", "train", "s", "p", "q", "e", changed, "a", "b",
                      query={"block": "0"}, token_type=cell)
    # "relation" dominates both classes 4 to 1
    records = [rec(i, "relation" if i % 10 > 1 else "subject_final", i % 2 == 0) for i in range(400)]
    cell_of = lambda r: r.token_type  # noqa: E731
    plain = balance(records, 0.5, seed=0, cap=40)
    spread = balance(records, 0.5, seed=0, cap=40, cell_of=cell_of)
    share = lambda rs: sum(r.token_type == "relation" for r in rs) / len(rs)  # noqa: E731
    assert len(spread) == 40 and sum(r.changed for r in spread) == 20
    assert share(spread) == 0.5 < share(plain)


def test_balancing_equalises_the_label_mix_within_each_cell():
    """Where the cell predicts the label (subject_final mostly changes, relation mostly not), the balanced
    set holds each cell at the target ratio, so the cell alone predicts at the majority rate; the old
    balancing (per class over cells) kept the cell a 0.8-accurate predictor. Empty answers are dropped."""
    from selfexplain.groundtruth.dataset import SplitConfig, label_stats

    def rec(i, cell, changed):
        return Record(f"r{i:04d}", "activation_patching", "t", "train", "s", "p", "q", "e", changed, "a",
                      "b" if changed else "a", query={"block": "0"}, token_type=cell)
    records = [rec(i, "subject_final", i % 5 != 0) for i in range(100)] + \
              [rec(100 + i, "relation", i % 5 == 0) for i in range(100)]
    cell_of = lambda r: r.token_type  # noqa: E731
    assert label_stats(records, cell_of=cell_of)["trivial_rules"]["cell"] == 0.8
    chosen = balance(records, 0.5, seed=0, cell_of=cell_of)
    stats = label_stats(chosen, cell_of=cell_of)
    assert len(chosen) == 80 and stats["changed_rate"] == 0.5 and stats["trivial_rules"]["cell"] == 0.5
    capped = balance(records, 0.5, seed=0, cap=30, cell_of=cell_of)
    assert len(capped) == 30 and label_stats(capped, cell_of=cell_of)["trivial_rules"]["cell"] <= 0.54
    empty = rec(999, "relation", True)
    empty.output_after = ""
    assert not SplitConfig().usable(empty) and label_stats([empty, *records[:3]])["empty_answers"] == 1


def test_a_cap_smaller_than_the_number_of_cells_keeps_the_ratio():
    """20 (token type, block) cells and a cap of 12: each cell's queue starts at its own phase of the ratio,
    so the first round already holds it (every queue starting on a changed record made 12 of 12 changed)."""
    def rec(i, changed):
        return Record(f"r{i:04d}", "activation_patching", "t", "test", "s", "p", "q", "e", changed, "a",
                      "b" if changed else "a", query={"block": str(i % 4)}, token_type=f"type{i % 5}")
    records = [rec(i, (i // 20) % 4 == 0) for i in range(800)]  # a quarter changed, in every cell
    cell_of = lambda r: f"{r.token_type}/{r.query['block']}"  # noqa: E731
    for cap, fraction in ((12, 0.5), (10, 0.5), (30, 0.5), (20, 0.3)):
        chosen = balance(records, fraction, seed=0, cap=cap, cell_of=cell_of)
        assert len(chosen) == cap and abs(sum(r.changed for r in chosen) - fraction * cap) <= 1, (cap, fraction)
    full = balance(records, 0.5, seed=0, cell_of=cell_of)
    assert len(full) == 400 and sum(r.changed for r in full) == 200


def test_patching_pairs_never_share_a_prompt_across_the_split():
    """No prompt of a test pair is in train in either role (x or x'): the counterfactual x' is drawn
    from its x's split. The old split by x alone put most test x' into train pairs."""
    from selfexplain.groundtruth.dataset import split_of
    from selfexplain.groundtruth.fact_pairs import build_items
    from selfexplain.groundtruth.patching_task import PatchingConfig

    cfg = PatchingConfig(test_fraction=0.3, pairs_per_fact=2)
    items = build_items(cfg, seed=0)
    split = {i.pair.pair_id: split_of(i.source_id, cfg.test_fraction, 0) for i in items}
    prompts = {s: {t for i in items if split[i.pair.pair_id] == s for t in (i.pair.x.text, i.pair.x_prime.text)}
               for s in ("train", "test")}
    assert prompts["test"] and prompts["train"] and not prompts["test"] & prompts["train"]
    assert len(items) > 0.9 * 2 * len({i.source_id for i in items})  # nearly every fact still gets its pairs


def test_answers_are_whole_words_where_the_token_begins_one_option():
    from selfexplain.groundtruth.fact_pairs import whole_answer

    class Tok:
        def decode(self, ids):
            return {1: " Br", 2: " Ma", 3: " the", 4: " "}[ids[0]]

    options = ("Brazil", "Madrid", "Malta")
    assert whole_answer(Tok(), 1, options) == "Brazil"
    assert whole_answer(Tok(), 2, options) == "Ma"  # begins two options: left as the token says
    assert whole_answer(Tok(), 3, options) == "the" and whole_answer(Tok(), 4, options) == ""
