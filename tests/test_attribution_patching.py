"""Attribution patching: each estimate is the first-order change of log p(clean token), checked against a
central finite difference of the same perturbation (float64 weights, a step of 1e-3 of the patch's largest
change: the norms inside compute in float32, and the random models turn within a tenth of a patch); the
screen and its recall estimate."""
import pytest
import torch

from selfexplain.groundtruth.attribution_patching import (ScreenConfig, block_estimates, head_estimates, screen_recall,
                                                          screened)
from selfexplain.groundtruth.head_patching import attention_output, every_head, head_run, head_shape
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.patching import Intervention, clean_runs, decoder_layers, layer_blocks


def float64(source: str):
    model, _ = load_model(ModelSpec(source))
    return model.double()


def log_p(model, x, token, hooks) -> float:
    handles = [register(hook) for register, hook in hooks]
    try:
        with torch.no_grad():
            return float(model(input_ids=x[None]).logits[0, -1].log_softmax(-1)[token])
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("source", ["tiny-llama:hidden=32,layers=4,heads=4,kv_heads=2,seed=3",
                                    "tiny-gemma:hidden=32,layers=4,heads=4,kv_heads=1,window=4,seed=3"])
def test_block_estimates_are_the_first_order_change_of_the_block_patch(source):
    model = float64(source)
    gen = torch.Generator().manual_seed(0)
    x, x_prime = torch.randint(0, 250, (7,), generator=gen), torch.randint(0, 250, (7,), generator=gen)
    clean, src = clean_runs(model, [x, x_prime])
    blocks = layer_blocks(4, 2)
    plan = [Intervention(b, t, t) for b in range(2) for t in (0, 3, 6)]
    estimates = block_estimates(model, x, clean.states, src.states, blocks, plan)
    token, layers = clean.decision.token, decoder_layers(model)
    for iv, estimate in zip(plan, estimates):
        v = src.states[[l + 1 for l in blocks[iv.block]], iv.source_position].mean(0)
        eps = 1e-3 / max(float((v - clean.states[l + 1, iv.position]).norm()) for l in blocks[iv.block])

        def shifted(sign: float):
            def hooks():
                for l in blocks[iv.block]:
                    step = sign * eps * (v - clean.states[l + 1, iv.position])

                    def add(module, args, output, step=step):
                        hidden = output[0] if isinstance(output, tuple) else output
                        hidden[0, iv.position] += step
                        return output
                    yield layers[l].register_forward_hook, add
            return log_p(model, x, token, list(hooks()))

        assert estimate == pytest.approx((shifted(1) - shifted(-1)) / (2 * eps), rel=1e-2, abs=1e-3)
    assert any(abs(e) > 0.05 for e in estimates), "some patch moves the metric well beyond the tolerance"


def test_head_estimates_are_the_first_order_change_of_the_head_patch():
    model = float64("tiny-llama:hidden=32,layers=3,heads=4,kv_heads=2,seed=3")
    x, x_prime = torch.tensor([5, 17, 99, 3, 42]), torch.tensor([8, 1, 64, 30])
    clean, src = head_run(model, x), head_run(model, x_prime)
    heads = every_head(model)
    estimates = head_estimates(model, x, clean.outputs, src.outputs, heads)
    token, (_, _, dim) = int(clean.logits.argmax()), head_shape(model)
    for head, estimate in list(zip(heads, estimates))[::3]:
        eps = 1e-3 / float((src.outputs[head.layer, head.head] - clean.outputs[head.layer, head.head]).norm())

        def shifted(sign: float):
            step = sign * eps * (src.outputs[head.layer, head.head] - clean.outputs[head.layer, head.head])

            def add(module, args):
                args[0][0, -1, head.head * dim:(head.head + 1) * dim] += step
            return log_p(model, x, token, [(attention_output(model, head.layer).register_forward_pre_hook, add)])

        assert estimate == pytest.approx((shifted(1) - shifted(-1)) / (2 * eps), rel=1e-2, abs=1e-3)
    assert any(abs(e) > 0.05 for e in estimates), "some patch moves the metric well beyond the tolerance"


def test_the_screen_keeps_the_largest_estimates_and_audits_the_rest():
    estimates = [0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 0.01, 0.02, 0.03]
    picked = screened(estimates, ScreenConfig(top_fraction=0.2, audit_fraction=0.5), seed="pair")
    assert [i for i, why in picked.items() if why == "top"] == [1, 3]
    audit = [i for i, why in picked.items() if why == "audit"]
    assert len(audit) == 4 and not {1, 3} & set(audit)
    assert picked == screened(estimates, ScreenConfig(top_fraction=0.2, audit_fraction=0.5), seed="pair"), "seeded"


def test_screen_recall_counts_what_the_audit_says_was_missed():
    assert screen_recall(found=9, audit_changed=0, audited=20, unscreened=80)["recall"] == 1.0
    r = screen_recall(found=9, audit_changed=1, audited=20, unscreened=80)  # 1 in 20 of 80 unscreened: 4 missed
    assert r["recall"] == pytest.approx(9 / 13, abs=1e-4) and r["recall_lo"] < r["recall"] < r["recall_hi"] <= 1.0
    assert screen_recall(found=3, audit_changed=0, audited=0, unscreened=50) is None


# ---------------------------------------------------------------- the screen in both patching tasks
from selfexplain.groundtruth.dataset import label_stats  # noqa: E402
from selfexplain.groundtruth.fact_pairs import build_items  # noqa: E402
from selfexplain.groundtruth.head_patching_task import HeadPatchingConfig, run_head_patching  # noqa: E402
from selfexplain.groundtruth.patching_task import PatchingConfig, run_patching  # noqa: E402


def _screened_run(task: str) -> tuple[dict, list]:
    """(every record of an exhaustive run by id, the records a screened run of the same pairs kept)."""
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=4,seed=3"))
    for p in model.parameters():  # sharper, so that patches change the answer
        p.data *= 3
    run, config = (run_patching, PatchingConfig) if task == "blocks" else (run_head_patching, HeadPatchingConfig)
    cfg = config(max_facts=4, relations=["capital"])
    items = build_items(cfg, 0)
    every = {r.record_id: r for r in run(model, tok, items, cfg, "t", lambda s: "train")}
    screen_cfg = ScreenConfig(top_fraction=0.25, audit_fraction=0.2)
    return every, run(model, tok, items, config(max_facts=4, relations=["capital"], screen=screen_cfg), "t", lambda s: "train")


@pytest.mark.parametrize("task", ["blocks", "heads"])
def test_a_screened_run_patches_the_top_sites_and_an_audit_exactly_and_reports_its_recall(task):
    every, kept = _screened_run(task)
    assert 0.25 * len(every) <= len(kept) < 0.5 * len(every)
    for record in kept:  # exactly what the exhaustive run labels them
        assert (record.changed, record.explanation) == (every[record.record_id].changed, every[record.record_id].explanation)
    marks = [r.query["screen"] for r in kept]
    assert {m["kept"] for m in marks} == {"top", "audit"}
    # per pair, the top sites have the largest |estimate|
    for group in {m["group"] for m in marks}:
        mine = [m for m in marks if m["group"] == group]
        assert min(abs(m["estimate"]) for m in mine if m["kept"] == "top") >= \
            max(abs(m["estimate"]) for m in mine if m["kept"] == "audit")
    stats = label_stats(kept)["screen"]
    assert stats["sites"] == len(every) and stats["patched_fraction"] == pytest.approx(len(kept) / len(every), abs=1e-3)
    assert 0 <= stats["recall_lo"] <= stats["recall"] <= stats["recall_hi"] <= 1
    assert stats["found"] == sum(r.changed for r in kept if r.query["screen"]["kept"] == "top") > 0


def test_only_the_raw_set_reports_the_screens_recall(tmp_path):
    """A balanced split draws its records by label, so an audit's changed rate over it estimates nothing."""
    from selfexplain.groundtruth.dataset import finalize
    from selfexplain.groundtruth.records import write_split
    from selfexplain.groundtruth.tasks import TASKS

    _, kept = _screened_run("blocks")
    for i, r in enumerate(kept):
        r.split = "test" if i % 4 == 0 else "train"
    write_split(tmp_path / "raw", kept, "h", shard_size=100)
    stats = finalize(tmp_path, PatchingConfig(balance=True, changed_fraction=0.5), "h", 0, 100,
                     TASKS["activation_patching"].balance_cell)
    assert stats["raw"]["screen"] == label_stats(kept)["screen"]
    assert stats["train"]["count"] > 0 and "screen" not in stats["train"] and "screen" not in stats["test"]


def test_the_report_says_what_a_screen_patched_and_the_recall_its_audit_implies():
    from selfexplain.eval.report import _split_lines

    screen = {"recall": 0.9, "recall_lo": 0.7, "recall_hi": 1.0, "audited": 30, "found": 9, "audit_changed": 1,
              "unscreened": 300, "patched_fraction": 0.25, "sites": 400}
    stats = {"count": 100, "changed_rate": 0.1, "majority_rate": 0.9, "trivial_rules": {},
             "top_outputs_after": [("Paris", 3)]}
    line = _split_lines({"raw": {**stats, "screen": screen}})[0]
    assert "AtP screen: 25% of 400 sites patched exactly, recall of changed labels 0.90 [0.70, 1.00] by an audit of 30" in line
    assert "AtP screen" not in _split_lines({"raw": stats})[0]
