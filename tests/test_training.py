import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_records, make_train_job as make_job
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.training.batches import IGNORE, collate, encode_example, micro_batch_order, padding_share
from selfexplain.training.projection import ProjectionConfig
from selfexplain.training.export import CheckpointMismatch, export_differences, export_matches, job_identity, load_explainer
from selfexplain.training.loss import ExplainerLM
from selfexplain.training.job import TrainConfig, deepspeed_config
from selfexplain.training.step import init_process_group_if_needed, initialize_engine, run_training


def test_labels_cover_exactly_the_explanation_and_eos(tiny):
    _, tok = tiny
    rec = make_records(1)[0]
    example = encode_example(tok, rec, "plain", max_len=512)
    ids, labels = example.ids, example.labels
    answer = tok(rec.explanation, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kept = [lab for lab in labels if lab != IGNORE]
    assert kept == answer and ids[-len(answer):] == answer
    assert all(lab == IGNORE for lab in labels[: len(ids) - len(answer)])
    short = encode_example(tok, rec, "plain", max_len=len(answer) + 5)
    short_ids, short_labels = short.ids, short.labels
    assert len(short_ids) == len(answer) + 5 and [x for x in short_labels if x != IGNORE] == answer


def test_restricted_head_loss_equals_full_logits_loss(tiny):
    model, tok = tiny
    batch = collate([encode_example(tok, r, "plain", 512) for r in make_records(3)], tok.pad_token_id)
    restricted = ExplainerLM(model, restrict_head=True)(**batch)
    full = ExplainerLM(model, restrict_head=False)(**batch)
    # reference: per-token losses averaged over explanation tokens only (never over padded length)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    reference = per_token.sum() / (targets != IGNORE).sum()
    assert torch.allclose(restricted, reference, atol=1e-5) and torch.allclose(full, reference, atol=1e-5)


def test_one_rank_without_zero_skips_the_allreduce_and_trains_the_same(tiny):
    """The all-reduce skipped on one rank (initialize_engine) changes no weight: two steps of two
    accumulated micro-batches each match DeepSpeed's own engine, which reduces."""
    _, tok = tiny
    init_process_group_if_needed()
    ds_config = deepspeed_config(TrainConfig(micro_batch_size=2, grad_accum=2, lr=1e-2, zero_stage=0), 1)
    batches = [collate([encode_example(tok, r, "plain", 512) for r in make_records(8)[i:i + 2]], tok.pad_token_id)
               for i in range(0, 8, 2)]

    def trained(skip: bool) -> dict:
        torch.manual_seed(0)
        model, _ = load_model(ModelSpec("tiny-llama"))
        engine = initialize_engine(ExplainerLM(model), ds_config, world=1)
        if not skip:
            engine.enable_backward_allreduce = True
        else:
            assert not engine.enable_backward_allreduce
        for batch in batches:
            engine.backward(engine(**batch))
            engine.step()
        engine.destroy()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    skipped, reduced = trained(True), trained(False)
    start = load_model(ModelSpec("tiny-llama"))[0].state_dict()
    assert any(not torch.equal(start[k], skipped[k]) for k in skipped), "the steps trained something"
    assert all(torch.allclose(skipped[k], reduced[k], rtol=0, atol=1e-7) for k in skipped)


@pytest.mark.parametrize("window", [1, 4])
def test_every_rank_gets_equal_disjoint_batches(window):
    lengths = [(7 * i) % 23 for i in range(23)]
    orders = [micro_batch_order(lengths, rank, 3, 2, seed=0, epoch=1, window=window) for rank in range(3)]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == 23 // 3 // 2
    flat = [i for o in orders for b in o for i in b]
    assert len(flat) == len(set(flat))
    assert orders[0] != micro_batch_order(lengths, 0, 3, 2, seed=0, epoch=2, window=window), "a new order each epoch"


def test_length_windows_cut_padding_and_still_mix_batches():
    lengths = [random.Random(i).randint(10, 120) for i in range(400)]
    plain = micro_batch_order(lengths, 0, 1, 8, seed=0, epoch=0, window=1)
    sorted_ = micro_batch_order(lengths, 0, 1, 8, seed=0, epoch=0, window=16)
    assert sorted(i for b in sorted_ for i in b) == sorted(i for b in plain for i in b), "the same examples"
    assert padding_share(sorted_, lengths) < 0.1 < padding_share(plain, lengths)
    # the same examples as a brute-force reference: sorting each window of 128 shuffled examples
    order = list(range(400))
    random.Random(0).shuffle(order)
    windows = [sorted(order[s:s + 128], key=lambda i: lengths[i]) for s in range(0, 400, 128)]
    reference = {frozenset(w[i:i + 8]) for w in windows for i in range(0, len(w) - 7, 8)}
    assert {frozenset(b) for b in sorted_} == reference
    lengths_in_order = [max(lengths[i] for i in b) for b in sorted_]
    assert lengths_in_order != sorted(lengths_in_order), "batches are shuffled after the cut"
    next_epoch = micro_batch_order(lengths, 0, 1, 8, seed=0, epoch=1, window=16)
    assert {frozenset(b) for b in next_epoch} != reference, "each epoch makes new batches"


@pytest.mark.parametrize("stage", [0, 2, 3])  # 0: the CPU configs' one-rank jobs
def test_training_learns_exports_and_resumes(tmp_path, stage):
    job = make_job(tmp_path, max_steps=10, zero_stage=stage, keep_checkpoints_after_export=True)
    first = run_training(job)
    log = [json.loads(line) for line in (Path(job.out_dir) / "train_log.jsonl").read_text().splitlines()]
    assert first["steps"] == 10 and log[-1]["loss"] < log[0]["loss"] * 0.9
    assert export_matches(job)
    umask = os.umask(0)
    os.umask(umask)
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in Path(job.export_dir).iterdir()), \
        "every file of an export is as readable as any other file the run writes"
    model, _, projection = load_explainer(job.export_dir, {"task": "input_ablation", "target": "t"})
    assert projection is None, "a text-only task exports no projection"
    assert model.config.hidden_size == 32
    # resume: a longer run starts from the step-10 checkpoint, not from scratch
    longer = make_job(tmp_path, max_steps=15, zero_stage=stage, keep_checkpoints_after_export=True)
    second = run_training(longer)
    assert second["steps"] == 15
    lines = (Path(job.out_dir) / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 10, 15]


def test_a_finished_job_frees_its_model(tmp_path, monkeypatch):
    """Jobs run one after another in one process (a Ray Train group, the in-process path): a finished
    job's engine, model and optimizer state must go, or memory grows by a model per job."""
    import gc
    import weakref

    import selfexplain.training.step as step

    wrappers = []

    class Tracked(ExplainerLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrappers.append(weakref.ref(self))

    monkeypatch.setattr(step, "ExplainerLM", Tracked)
    run_training(make_job(tmp_path, max_steps=2))
    gc.collect()
    assert len(wrappers) == 1 and wrappers[0]() is None
    assert gc.isenabled(), "DeepSpeed switches cyclic GC off while an engine is live"


def test_export_of_another_config_is_refused(tmp_path):
    job = make_job(tmp_path, max_steps=2)
    run_training(job)
    assert not job.checkpoint_dir.exists(), "checkpoints go once the export is written (default)"
    with pytest.raises(CheckpointMismatch, match="target: checkpoint has 't', config says 'other'"):
        load_explainer(job.export_dir, {"target": "other"})
    assert not export_matches(make_job(tmp_path, max_steps=2, lr=1.0))
    assert export_differences(make_job(tmp_path, max_steps=2, lr=1.0)) == ["train.lr"], "the message names the field"
    copied = tmp_path / "copy"  # the same data elsewhere: still this job's export
    shutil.copytree(tmp_path / "data", copied / "data")
    shutil.copytree(job.export_dir, copied / "job" / "export")
    assert export_differences(make_job(copied, max_steps=2)) == []
    with pytest.raises(CheckpointMismatch, match="not a finished explainer export"):
        load_explainer(tmp_path, {})
    normed = ProjectionConfig(match_norm=True)  # input ablation reads no vector: Pi settings are not its identity
    assert export_differences(make_job(tmp_path, max_steps=2, projection=normed)) == []
    patching = dataclasses.replace(job, task="activation_patching")
    assert job_identity(patching)["train"]["projection"] == dataclasses.asdict(ProjectionConfig())
    assert "projection" not in job_identity(job)["train"]


def test_lora_adapters_are_w_plus_scaled_ba_and_train_alone(tmp_path):
    from selfexplain.training.lora import LoraConfig, adapted_layers, apply_lora

    model, _ = load_model(ModelSpec("tiny-llama"))
    ids = torch.tensor([[5, 9, 60, 7]])
    reference = model(input_ids=ids).logits
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    assert adapted_layers(model) == 7 * 2
    assert torch.allclose(model(input_ids=ids).logits, reference), "B = 0: adapters start as a no-op"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference)
    # the slow obvious reference: every adapted weight replaced by W + (alpha / r) B A in a plain copy
    by_hand, _ = load_model(ModelSpec("tiny-llama"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            layer = "base_model.model." + name.removesuffix(".weight")
            if f"{layer}.lora_A.default.weight" in params:
                a, b = params[f"{layer}.lora_A.default.weight"], params[f"{layer}.lora_B.default.weight"]
                p.add_(8 / 4 * b @ a)
    assert torch.allclose(by_hand(input_ids=ids).logits, adapted, atol=1e-5)


def test_a_lora_export_is_a_peft_adapter_folder_that_peft_loads_alone(tmp_path):
    from peft import PeftModel

    from selfexplain.training.lora import LoraConfig

    job = make_job(tmp_path, max_steps=6, lora=LoraConfig(r=8, alpha=16), train_embeddings=False)
    run_training(job)
    export = Path(job.export_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "selfexplain.json", "README.md",
            "tokenizer.json"} <= {f.name for f in export.iterdir()}
    saved = load_file(export / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), "adapters only: nothing frozen"
    exported, tok, _ = load_explainer(export, {"task": "input_ablation"})
    assert not any("lora" in name for name, _ in exported.named_parameters()), "merged into the base weights"
    base, _ = load_model(ModelSpec("tiny-llama"))
    changed = [n for n, p in exported.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert any("q_proj" in n for n in changed), "adapted weights moved"
    assert not any("norm" in n or "embed" in n for n in changed), "frozen weights (embeddings included) did not"
    direct = PeftModel.from_pretrained(base, str(export))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.allclose(direct(input_ids=ids).logits, exported(input_ids=ids).logits, atol=1e-5)
    check_hub_folder(export, library="peft", base_model=None)


def check_hub_folder(folder: Path, library: str, base_model) -> None:
    """What `huggingface-cli upload REPO FOLDER` publishes as it is: a model card whose metadata header the
    Hub parses (library, pipeline tag, tags; base_model only a hub id), and nothing it would skip or choke on."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == library and card.data.pipeline_tag == "text-generation"
    assert "selfexplain" in card.data.tags and card.data.to_dict().get("base_model") == base_model
    assert "## Results" in card.text and "load_explainer" in card.text
    assert not [f.name for f in folder.iterdir() if f.name.startswith(".") or f.is_dir()]


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-gemma"])  # an untied and a tied LM head
@pytest.mark.parametrize("lora", [False, True])
def test_an_export_folder_loads_with_transformers_or_peft_as_load_explainer_does(tmp_path, source, lora):
    """The model training left (vector tokens added at random, some weights moved) is what both the
    ecosystem's loaders and load_explainer rebuild from the folder: same tokenizer, same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfexplain.training.explainer import VECTOR_TEXT, add_vector_tokens
    from selfexplain.training.export import FORMAT, METADATA
    from selfexplain.training.export_format import write_weights
    from selfexplain.training.lora import LoraConfig, apply_lora

    model, tok = load_model(ModelSpec(source))
    add_vector_tokens(model, tok)  # 3 rows more, initialised at random; train_embeddings: false
    if lora:
        model = apply_lora(model, LoraConfig(r=4, alpha=8))
    model.get_input_embeddings().weight.requires_grad_(False)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    folder = tmp_path / "export"
    folder.mkdir()
    weights = write_weights(folder, model, tok, model.state_dict(), trained, LoraConfig(r=4, alpha=8) if lora else None,
                            source)
    (folder / METADATA).write_text(json.dumps({"explainer_spec": dataclasses.asdict(ModelSpec(source)), "format": FORMAT,
                                               "weights": weights, "vector_tokens": True}))
    ids = tok(f"Explain {VECTOR_TEXT} now", return_tensors="pt").input_ids
    want = model(input_ids=ids).logits
    loaded, loaded_tok, _ = load_explainer(folder)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
    direct_tok = AutoTokenizer.from_pretrained(folder)
    assert direct_tok(f"Explain {VECTOR_TEXT} now", return_tensors="pt").input_ids.tolist() == ids.tolist()
    if lora:
        adapter = load_file(folder / "adapter_model.safetensors")
        rows = [k for k in adapter if "trainable_tokens" in k]
        assert len(rows) == (1 if source == "tiny-gemma" else 2), "a tied head shares the input rows"
        base, _ = load_model(ModelSpec(source))
        base.resize_token_embeddings(len(direct_tok))  # rows added at random: the adapter carries their values
        direct = PeftModel.from_pretrained(base, str(folder))
    else:
        direct = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.allclose(direct(input_ids=ids).logits, want, atol=1e-5)


def test_an_export_of_the_earlier_format_is_refused_with_how_to_convert(tmp_path):
    job = make_job(tmp_path, max_steps=2)
    run_training(job)
    meta = json.loads((job.export_dir / "selfexplain.json").read_text())
    for produced in ("format", "weights"):
        meta.pop(produced)
    (job.export_dir / "selfexplain.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match=r"earlier selfexplain \(format 1.*selfexplain convert-export"):
        load_explainer(job.export_dir)
    assert export_matches(job), "the stage does not retrain it silently: eval names the conversion"


def test_convert_export_rewrites_a_format_1_lora_export_into_the_model_it_held(tmp_path, capsys):
    """A format-1 export written by hand (adapters as lora_a / lora_b, untrained [vec] rows, projection.pt)
    converts, without retraining, into a folder whose model is W + (alpha / r) B A with those rows."""
    from selfexplain.distributed.cli import main as cli_main
    from selfexplain.training.explainer import VECTOR_TEXT, add_vector_tokens
    from selfexplain.training.projection import Projection
    from safetensors.torch import save_file

    expected, tok = load_model(ModelSpec("tiny-llama"))
    ids_ = add_vector_tokens(expected, tok)
    rows = [ids_.begin, ids_.vec, ids_.end]
    torch.manual_seed(3)
    tensors = {"vector_token_rows.input": torch.randn(3, 32), "vector_token_rows.output": torch.randn(3, 32)}
    with torch.no_grad():
        expected.get_input_embeddings().weight[rows] = tensors["vector_token_rows.input"]
        expected.get_output_embeddings().weight[rows] = tensors["vector_token_rows.output"]
        for i, layer in enumerate(expected.model.layers):
            a, b = torch.randn(4, 32) * 0.1, torch.randn(32, 4) * 0.1
            tensors |= {f"model.layers.{i}.self_attn.q_proj.lora_a": a, f"model.layers.{i}.self_attn.q_proj.lora_b": b}
            layer.self_attn.q_proj.weight.add_(8 / 4 * b @ a)
    folder = tmp_path / "export"
    folder.mkdir()
    save_file(tensors, folder / "trained.safetensors")
    pi = Projection("random", ["1"], 32, 32)
    torch.save({"kind": "random", "keys": ["1"], "d_target": 32, "d_explainer": 32, "maps": {"1": pi.weight("1").detach()},
                "fit_error": {}, "norm": None}, folder / "projection.pt")
    meta = {"explainer_spec": dataclasses.asdict(ModelSpec("tiny-llama")), "vector_tokens": True, "task": "activation_patching",
            "explainer": "tiny", "target": "t", "data": "0" * 64, "steps": 3,
            "projection": {"kind": "random", "keys": ["1"], "fit_error": {}, "norm": None},
            "train": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}, "lr": 1e-3, "precision": "fp32"}}
    (folder / "selfexplain.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="convert-export"):
        load_explainer(folder)
    assert cli_main(["convert-export", str(folder)]) == 0 and "converted" in capsys.readouterr().out
    assert not (folder / "trained.safetensors").exists() and (folder / "adapter_config.json").exists()
    model, loaded_tok, projection = load_explainer(folder)
    ids = loaded_tok(f"Explain {VECTOR_TEXT} now", return_tensors="pt").input_ids
    assert torch.allclose(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(projection.weight("1"), pi.weight("1").detach())
    assert cli_main(["convert-export", str(folder)]) == 0 and "already current" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(tmp_path, stage, monkeypatch):
    import selfexplain.training.step as step

    calls = {}
    original = step.load_model

    def counted(spec, device):
        model, tok = original(spec, device)
        mlp = model.get_decoder().layers[0].mlp  # inside the checkpointed layer: it runs again when recomputed
        mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(key, calls.get(key, 0) + 1))
        return model, tok

    monkeypatch.setattr(step, "load_model", counted)
    losses = {}
    for key in (False, True):
        job = make_job(tmp_path / str(key), max_steps=4, log_every=1, zero_stage=stage, gradient_checkpointing=key)
        run_training(job)
        losses[key] = [json.loads(line)["loss"] for line in job.train_log.read_text().splitlines()]
    assert calls[True] == 2 * calls[False] == 2 * 4, "each layer runs again in the backward"
    assert losses[True] == pytest.approx(losses[False], rel=1e-5), "recomputing changes no number"


def test_a_tiny_model_loads_partitioned_under_zero3_with_the_weights_it_has_anywhere():
    """Under ZeRO-3 a tiny model is built partitioned (zero.Init), as from_pretrained builds a real one, and
    its seeded weights are loaded into the partitions: training meets partitioned shapes, and an export's
    base model (loaded plainly) is the model that trained."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from selfexplain.groundtruth.models import KEEP

    init_process_group_if_needed()
    spec = ModelSpec("tiny-llama:hidden=32,layers=2,vocab=300")
    plain, _ = load_model(spec, "cpu")
    config = deepspeed_config(TrainConfig(zero_stage=3), 1)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 (transformers reads it while it lives)
    partitioned, _ = load_model(spec, KEEP)
    embedding = partitioned.get_input_embeddings()
    assert embedding.weight.shape[0] == 0 and embedding.num_embeddings == 300, "partitioned at load"
    for name, p in partitioned.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p, plain.get_parameter(name)), name
