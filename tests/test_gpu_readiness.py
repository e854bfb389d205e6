"""What a GPU run depends on, checked where no GPU is: chat-template settings, the dtype policy,
refusing degenerate label sets, near-tie margins, random-init models of the real shapes, and the
GPU check itself run on the CPU at tiny sizes."""
import json
from dataclasses import replace

import pytest
import torch
from conftest import make_records

from benchmarks.gpu_stages import QWEN3_TEMPLATE
from selfexplain.distributed.config import load_config
from selfexplain.groundtruth.ablation import AblationConfig, build_items, run_ablation
from selfexplain.groundtruth.dataset import DegenerateSetError, finalize, label_stats
from selfexplain.groundtruth.generation import prompt_string
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.patching import block_vector
from selfexplain.groundtruth.records import write_split
from selfexplain.groundtruth.tasks import TASKS

@pytest.mark.parametrize("recipe", ["input_ablation", "activation_patching"])
def test_paper_recipes_render_qwen3_prompts_without_thinking(recipe):
    cfg = load_config(f"configs/paper/{recipe}.yaml")
    qwen = cfg.models["qwen"]
    assert qwen.chat_template_kwargs == {"enable_thinking": False}
    # the recipe's settings reach the template through the tokenizer load_model returns
    _, tok = load_model(replace(qwen, source="tiny-llama", dtype="float32"))
    tok.chat_template = QWEN3_TEMPLATE
    rendered, _ = prompt_string(tok, "The capital of France is", "chat")
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    _, plain_tok = load_model(ModelSpec("tiny-llama"))
    plain_tok.chat_template = QWEN3_TEMPLATE
    assert "<think>" not in prompt_string(plain_tok, "The capital of France is", "chat")[0], \
        "without the setting the template leaves the thinking block to the model"


def test_bf16_weights_cannot_train_without_fp32_master_weights(tmp_path):
    with pytest.raises(ValueError, match=r"models\.llama\.dtype: bfloat16 weights with train\.precision fp32"):
        load_config("configs/paper/input_ablation.yaml", ["train.precision=fp32"])
    with pytest.raises(ValueError, match="float16 weights with train.precision bf16"):
        load_config("configs/paper/input_ablation.yaml", ["models.qwen.dtype=float16"])
    load_config("configs/paper/input_ablation.yaml", ["models.qwen.dtype=float32"])  # fp32 weights, bf16 compute: fine


def test_block_means_are_fp32_from_bf16_states():
    states = (torch.randn(5, 3, 8) * 100).to(torch.bfloat16)
    v = block_vector(states, [0, 1, 2], 1)
    assert v.dtype == torch.float32
    assert torch.allclose(v, states[[1, 2, 3], 1].float().mean(0))


def _raw(folder, records):
    write_split(folder / "raw", records, "h", shard_size=100)


def test_unanswered_records_are_dropped_and_counted_then_refused_above_the_limit(tmp_path, tiny):
    model, tok = tiny
    cfg = AblationConfig(max_sources=6, test_fraction=0.3, max_new_tokens=3, balance=False)
    cfg.span.answer_pattern = "ZZZ"  # never in a continuation: no answer can be read
    items = build_items(cfg, seed=0)
    records = run_ablation(model, tok, items, cfg, "t", lambda s: "train")
    assert all(r.query.get("unanswered") for r in records), "an unread answer is flagged, never labelled"
    _raw(tmp_path / "a", records)
    with pytest.raises(DegenerateSetError) as err:
        finalize(tmp_path / "a", cfg, "h", 0, 100)
    message = str(err.value)
    assert f"{len(records)} of {len(records)} raw records" in message and "span.answer_pattern" in message
    assert json.loads((tmp_path / "a" / "label_stats.json").read_text())["raw"]["unanswered"] == len(records)

    # under the limit: the unanswered records are left out of the splits and counted
    good = make_records(20)
    for r in good[:3]:
        r.query["unanswered"] = True
    for r in good[::4]:
        r.split = "test"
    _raw(tmp_path / "b", good)
    stats = finalize(tmp_path / "b", replace(cfg, balance=False), "h", 0, 100)
    assert stats["raw"]["unanswered"] == 3 and stats["train"]["unanswered"] == stats["test"]["unanswered"] == 0
    assert stats["train"]["count"] + stats["test"]["count"] == 17


def test_a_train_split_of_one_class_is_refused_with_its_numbers(tmp_path):
    records = make_records(20)
    for r in records:
        r.changed = False
    for r in records[::4]:
        r.split = "test"
    _raw(tmp_path, records)
    with pytest.raises(DegenerateSetError, match=r"every one of the 15 train records is 'unchanged'.*changed_rate 0\.0"):
        finalize(tmp_path, AblationConfig(balance=False), "h", 0, 100)


def test_near_ties_are_counted_and_can_be_dropped(tmp_path):
    from selfexplain.groundtruth.patching_task import PatchingConfig

    records = make_records(20)
    for i, r in enumerate(records):
        r.query["logit_margin"] = 0.1 if i % 5 == 0 else 2.0
        r.split = "test" if i % 4 == 0 else "train"
    assert label_stats(records, near_tie_margin=0.25)["near_ties"] == 4
    _raw(tmp_path, records)
    patching = TASKS["activation_patching"]
    stats = finalize(tmp_path, PatchingConfig(balance=False, drop_near_ties=True), "h", 0, 100, patching.balance_cell,
                     patching.identity_fields)
    assert stats["raw"]["near_ties"] == 4 and stats["train"]["near_ties"] == stats["test"]["near_ties"] == 0


def test_random_init_models_have_the_real_shapes():
    from selfexplain.groundtruth.models import hidden_size

    with torch.device("meta"):
        smol, _ = load_model(ModelSpec("random:smollm2-135m-instruct"), "keep")
        gemma, _ = load_model(ModelSpec("random:gemma-3-270m"), "keep")
    assert round(sum(p.numel() for p in smol.parameters()) / 1e6, 1) == 134.5
    assert round(sum(p.numel() for p in gemma.parameters()) / 1e6, 1) == 268.1
    assert (smol.config.num_hidden_layers, gemma.config.num_hidden_layers) == (30, 18)
    assert hidden_size(ModelSpec("random:gemma-3-270m")) == 640


def test_gpu_check_runs_every_stage_on_the_cpu_at_tiny_sizes(tmp_path, capsys):
    from benchmarks.gpu_check import STAGES, main

    assert main(["--device", "cpu", "--out", str(tmp_path / "check.json")]) == 0, "the CPU default is the tiny size"
    result = json.loads((tmp_path / "check.json").read_text())
    print(capsys.readouterr().out)
    assert [s["stage"] for s in result["stages"]] == list(STAGES) and result["passed"] and result["size"] == "tiny"
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert by_stage.pop("two_gpus")["status"] == "SKIP", "one device: skipped, with the reason printed"
    assert all(s["status"] == "ok" and s["device"] == "cpu" and s["tokens_per_s"] > 0 for s in by_stage.values())
    assert all(s["mfu"] > 0 for name, s in by_stage.items() if name != "chat_template")
    for stage, least in (("patching", 100), ("patching_bf16", 100), ("head_patching", 60)):
        agree, decisions = map(int, by_stage[stage]["labels_agree"].split("/"))
        assert agree + by_stage[stage]["differ_at_near_ties"] == decisions > least
    assert by_stage["head_patching"]["changed"] > 0, "some head's patch changes the tiny target's answer"
    assert by_stage["atp"]["changed"] > 0 and set(by_stage["atp"]["recall_top_fifth"]) == {"atp", "atp_qk_fix"}
    for stage in ("train_zero2", "train_zero3", "lora_zero2", "lora_zero3", "cross"):
        first, last = by_stage[stage]["loss"]
        assert last < first and by_stage[stage]["export_loads"]
    rows, exported = by_stage["train_zero3"]["embedding_rows"]
    assert rows == exported == 320, "the target's spare embedding rows survive ZeRO-3"
    for stage in ("lora_zero2", "lora_zero3"):
        assert by_stage[stage]["steps_redone"] and by_stage[stage]["max_relative_loss_difference"] < 1e-4
    assert by_stage["cross"]["explained"] == by_stage["generation"]["records"] > 0


def test_two_devices_stage_logic_on_one_device():
    """The two-GPU stage's own logic (a row cut from the decode batch, answers and clean runs compared with
    the unspread model), run where both devices are the CPU; on two GPUs the same code spreads the model."""
    from pathlib import Path

    from benchmarks.gpu_common import SIZES, Check
    from benchmarks.gpu_stages import spread_agrees

    out = spread_agrees(Check("cpu", SIZES["tiny"], Path("."), None), ["cpu", "cpu"])
    assert out.ok and out.details["rows_cut_while_decoding"] and out.details["answers_agree"] == out.details["rows"]


def test_a_stage_past_its_limit_is_reported_and_the_check_goes_on(tmp_path, monkeypatch):
    import time

    import benchmarks.gpu_check as gpu_check

    stages = {"hang": lambda c: time.sleep(60), "chat_template": gpu_check.STAGES["chat_template"]}
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    started = time.monotonic()
    assert gpu_check.main(["--device", "cpu", "--stage-timeout", "2", "--out", str(tmp_path / "c.json")]) == 1
    assert time.monotonic() - started < 30
    rows = {r["stage"]: r for r in json.loads((tmp_path / "c.json").read_text())["stages"]}
    assert rows["hang"]["status"] == "FAIL" and rows["hang"]["why"] == "over its 2 s limit"
    assert rows["chat_template"]["status"] == "ok"
