"""Explainers that read vectors: training moves (or keeps) Pi, exports carry it, eval injects it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfexplain.eval.generate import Ask, explain, explain_all
from selfexplain.groundtruth.explanations import format_explanation
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.records import Record, write_split
from selfexplain.training.batches import encode_prompt
from selfexplain.training.explainer import add_vector_tokens, inject
from selfexplain.training.projection import Projection, ProjectionConfig, vector_key
from selfexplain.training.export import load_explainer
from selfexplain.training.job import TrainConfig, TrainJob
from selfexplain.training.step import run_training

D_TARGET = 48


def vector_records(n: int, split: str = "train") -> list[Record]:
    """Patching-like records whose label is a function of the vector alone (the sign of its first entry)."""
    gen = np.random.default_rng(0)
    records = []
    for i in range(n):
        changed = i % 2 == 0
        vector = gen.normal(size=D_TARGET).astype(np.float32)
        vector[0] = 3.0 if changed else -3.0
        records.append(Record(
            record_id=f"t-r{i:04d}", task="activation_patching", target="t", split=split, source_id=f"s{i}",
            prompt="The capital of France is", question="How would the output change?",
            explanation=format_explanation(changed, "Madrid" if changed else "Paris"), changed=changed,
            output_before="Paris", output_after="Madrid" if changed else "Paris",
            query={"token": " France", "position": 4, "block": str(i % 2)},
            layers=[0, 1] if i % 2 else [2, 3], token_type="subject_final", vector=vector,
        ))
    return records


def vector_job(tmp_path, kind: str, **train) -> TrainJob:
    data = tmp_path / "data" / "train"
    if not data.exists():
        write_split(data, vector_records(16), "h", shard_size=8)
    settings = {"projection": ProjectionConfig(cross_kind=kind, fit_texts=40), **train}
    cfg = TrainConfig(micro_batch_size=4, lr=3e-3, use_ray=False, log_every=2, checkpoint_every=50, **settings)
    return TrainJob("activation_patching", "t", "e", ModelSpec("tiny-llama:hidden=32,layers=2"), str(data),
                    str(tmp_path / f"job-{kind}"), cfg, target_spec=ModelSpec(f"tiny-llama:hidden={D_TARGET},layers=4,seed=1"))


@pytest.fixture()
def partition_everything(monkeypatch):
    """ZeRO-3 partitions even tiny tensors (it would keep these maps and embeddings whole otherwise)."""
    import selfexplain.training.step as step_mod

    original = step_mod.deepspeed_config

    def config(cfg, world):
        out = original(cfg, world)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    monkeypatch.setattr(step_mod, "deepspeed_config", config)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_trainable_projection_is_trained_exported_and_loaded(tmp_path, stage, partition_everything):
    job = vector_job(tmp_path, "random", max_steps=8, zero_stage=stage)
    run_training(job)
    log = [json.loads(line) for line in (Path(job.out_dir) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    model, tok, projection = load_explainer(job.export_dir, {"task": "activation_patching"})
    start = Projection("random", ["0-1", "2-3"], D_TARGET, 32, seed=job.seed)
    assert projection.keys == start.keys and projection.kind == "random"
    assert not torch.allclose(projection.weight("0-1"), start.weight("0-1")), "Pi moved during training"
    assert len(tok) == model.get_input_embeddings().weight.shape[0] and "<|se_vec|>" in tok.get_vocab()
    meta = json.loads((job.export_dir / "selfexplain.json").read_text())
    assert meta["projection"]["kind"] == "random" and meta["projection"]["keys"] == ["0-1", "2-3"]


def test_zero3_keeps_spare_embedding_rows_through_training_export_and_load(tmp_path, partition_everything):
    """A model with more embedding rows than tokenizer entries (Qwen3: 151,936 for ~151,672): under ZeRO-3
    the partitioned weight reads as shape [0], which must not shrink the vocabulary to the tokenizer."""
    from dataclasses import replace

    job = replace(vector_job(tmp_path, "random", max_steps=2, zero_stage=3),
                  explainer_spec=ModelSpec("tiny-llama:hidden=32,layers=2,vocab=300"))
    base, base_tok = load_model(job.explainer_spec)
    assert base.get_input_embeddings().num_embeddings == 300 > len(base_tok) + 3
    run_training(job)
    model, tok, _ = load_explainer(job.export_dir, {"task": "activation_patching"})
    assert model.get_input_embeddings().num_embeddings == 300 and len(tok) == len(base_tok) + 3
    assert model.get_output_embeddings().weight.shape[0] == 300

    # zero.Init ran in this process: an nn.Module defined now still gets its other bases' set-up
    from typing import Generic, TypeVar

    T = TypeVar("T")

    class Probe(torch.nn.Module, Generic[T]):
        pass

    assert Probe.__parameters__ == (T,) and Probe[int] is not None
    assert "__init_subclass__" not in torch.nn.Module.__dict__


def test_match_norm_injects_at_the_embedding_norm_through_training_and_export(tmp_path, partition_everything):
    job = vector_job(tmp_path, "random", max_steps=2, zero_stage=3, train_embeddings=False,
                     projection=ProjectionConfig(cross_kind="random", match_norm=True))
    run_training(job)  # ZeRO-3 with the embedding partitioned: the norm is read from the gathered weight
    model, tok, projection = load_explainer(job.export_dir, {"task": "activation_patching"})
    reference = model.get_input_embeddings().weight[:-3].norm(dim=-1).mean().item()  # the 3 added rows aside
    assert projection.norm == pytest.approx(reference, rel=0.02)
    vectors = torch.randn(4, D_TARGET) * 100
    vectors[1] = 0
    norms = projection(vectors, ["0-1", "2-3", "0-1", "2-3"]).norm(dim=-1)
    assert torch.allclose(norms[[0, 2, 3]], torch.full((3,), projection.norm)) and norms[1] == 0, "zero v stays zero"
    meta = json.loads((job.export_dir / "selfexplain.json").read_text())
    assert meta["projection"]["norm"] == projection.norm and meta["train"]["projection"]["match_norm"] is True


def test_an_lstsq_projection_is_fitted_once_and_stays_frozen(tmp_path):
    job = vector_job(tmp_path, "lstsq", max_steps=4)
    run_training(job)
    fitted = Projection.load(job.projection_init_path)
    assert set(fitted.fit_error) == {"0-1", "2-3"}
    for errors in fitted.fit_error.values():
        assert 0 < errors["fit"] < 1.0 and 0 < errors["heldout"] < 1.0 and errors["tokens"] >= D_TARGET  # < 1: beats Pi = 0
    _, _, exported = load_explainer(job.export_dir, {"task": "activation_patching"})
    for key in fitted.keys:
        assert torch.equal(exported.weight(key), fitted.weight(key)), "a frozen Pi leaves training unchanged"
    meta = json.loads((job.export_dir / "selfexplain.json").read_text())
    assert meta["projection"]["fit_error"] == fitted.fit_error


def test_jobs_of_one_pair_share_one_lstsq_fit_and_each_keeps_its_keys(tmp_path, monkeypatch):
    import dataclasses

    import selfexplain.training.vectors as vectors
    from selfexplain.training.vectors import prefit_projections

    patching = vector_job(tmp_path, "lstsq")
    features_data = tmp_path / "features" / "train"
    write_split(features_data, [dataclasses.replace(r, layers=[3], record_id=f"f{i}") for i, r in enumerate(vector_records(4))],
                "h", shard_size=8)
    features = dataclasses.replace(patching, task="feature_descriptions", data_dir=str(features_data),
                                   out_dir=str(tmp_path / "job-features"))
    calls = []
    original = vectors.fit_projection
    monkeypatch.setattr(vectors, "fit_projection", lambda keys, *a: calls.append(keys) or original(keys, *a))
    prefit_projections([patching, features])
    assert calls == [["0-1", "2-3", "3"]], "both models ran over the fit passages once"
    shared = original(["0-1", "2-3", "3"], patching.target_spec, patching.explainer_spec, patching.train.projection,
                      patching.seed, False)
    for job, keys in ((patching, ["0-1", "2-3"]), (features, ["3"])):
        saved = Projection.load(job.projection_init_path)
        assert saved.keys == keys and set(saved.fit_error) == set(keys)
        assert all(torch.allclose(saved.weight(k), shared.weight(k), atol=1e-6) for k in keys)
    prefit_projections([patching, features])
    assert len(calls) == 1, "a second call finds the fitted files and fits nothing"


def test_pi_maps_every_layer_of_the_ground_truth_also_those_no_train_record_has(tmp_path):
    """A test record at layers no train record has (a small balanced set of head patches) is still read:
    the fit covers the layers of every split beside the train split."""
    import dataclasses

    from selfexplain.groundtruth.records import read_manifest, split_layers, write_manifest
    from selfexplain.training.vectors import prefit_projections

    job = vector_job(tmp_path, "lstsq", max_steps=2)
    write_split(tmp_path / "data" / "test", [dataclasses.replace(r, layers=[3], record_id=f"t{i}", split="test")
                                             for i, r in enumerate(vector_records(2))], "h", shard_size=8)
    prefit_projections([job])
    assert Projection.load(job.projection_init_path).keys == ["0-1", "2-3", "3"]
    test = tmp_path / "data" / "test"
    manifest = read_manifest(test)  # the layers come from the manifest, or a shard that does not list them
    assert [entry["layers"] for entry in manifest["shards"].values()] == [[[3]]]
    for entry in manifest["shards"].values():
        del entry["layers"]
    write_manifest(test, manifest)
    assert split_layers(test) == [[3]]
    run_training(job)
    _, _, exported = load_explainer(job.export_dir, {"task": "activation_patching"})
    assert exported(torch.randn(2, D_TARGET), ["3", "0-1"]).shape == (2, 32)


def test_self_explainers_with_kind_none_need_equal_sizes(tmp_path):
    job = vector_job(tmp_path, "none", max_steps=2)  # cross_kind none: 48 -> 32 cannot be the identity
    with pytest.raises(ValueError, match="cannot map target hidden size 48 to explainer hidden size 32"):
        run_training(job)


def test_generation_reads_the_vector_like_a_no_cache_reference():
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=2,seed=2"))
    for p in model.parameters():
        p.data *= 4  # a sharp random model, so the vector visibly steers the output
    tokens = add_vector_tokens(model, tok)
    records = vector_records(4, "test")
    projection = Projection("random", ["0-1", "2-3"], D_TARGET, 32, seed=5)
    got = explain(model, tok, records, "plain", max_new_tokens=6, batch_size=3, projection=projection)
    for record, text in zip(records, got):
        ids = torch.tensor([encode_prompt(tok, record, "plain")])
        v = projection(torch.from_numpy(record.vector)[None], [vector_key(record.layers)])
        out = []
        for _ in range(6):  # one full forward per token, the vector injected by hand
            logits = model(inputs_embeds=inject(model, ids, tokens.vec, v)).logits[0, -1]
            logits[[tokens.begin, tokens.vec, tokens.end]] = -float("inf")
            token = int(logits.argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert text == tok.decode(out, skip_special_tokens=True)
    without = explain(model, tok, records, "plain", max_new_tokens=6, projection=projection, with_vector=False)
    assert without != got, "leaving the vector out changes what the explainer says"
    assert all("<|se_vec|>" not in tok.decode(encode_prompt(tok, r, "plain", with_vector=False)) for r in records)


def test_rows_asked_together_answer_as_they_do_alone():
    """explain_all sorts the prompts of several rows (v, no v, a SelfIE scale) into shared batches; each
    row's answers are what it gets asked alone."""
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=2,seed=2"))
    for p in model.parameters():
        p.data *= 4
    add_vector_tokens(model, tok)
    records = vector_records(5, "test")
    projection = Projection("random", ["0-1", "2-3"], D_TARGET, 32, seed=5)
    asks = [Ask(records, projection), Ask(records[:3], projection, with_vector=False),
            Ask(records[1:], projection, vector_scale=10.0)]
    together = explain_all(model, tok, asks, "plain", max_new_tokens=6, batch_size=4)
    alone = [explain(model, tok, a.records, "plain", 6, 4, a.projection, a.with_vector, a.vector_scale) for a in asks]
    assert together == alone
    assert together[0][:3] != together[1], "the rows differ, so a mix-up would show"


def test_torchrun_ranks_fit_an_lstsq_projection_once(tmp_path):
    """Without a prefit (a JOB.json run by hand), rank 0 fits and saves Pi; the other rank waits and loads it."""
    import subprocess
    import sys

    from conftest import child_env

    job = vector_job(tmp_path, "lstsq", max_steps=2, zero_stage=2)
    spec = tmp_path / "job.json"
    spec.write_text(job.to_json())
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "selfexplain.training.step", str(spec)],
                          cwd=Path(__file__).resolve().parents[1], env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[fit] lstsq Pi") == 1, done.stdout
    _, _, exported = load_explainer(job.export_dir, {"task": "activation_patching"})
    fitted = Projection.load(job.projection_init_path)
    assert all(torch.equal(exported.weight(k), fitted.weight(k)) for k in fitted.keys)


def test_selfexplain_jobs_fits_each_pairs_projection_before_the_ranks_start(tmp_path, capsys):
    import yaml

    from selfexplain.distributed.config import load_config
    from selfexplain.distributed.train_job import write_job_files
    from selfexplain.groundtruth.errors import DataSourceError

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "jobs", "out_dir": str(tmp_path / "run"), "targets": ["big"], "explainers": ["small", "big"],
        "models": {"small": {"source": "tiny-llama:hidden=32,layers=2"},
                   "big": {"source": f"tiny-llama:hidden={D_TARGET},layers=4,seed=1"}},
        "tasks": {"activation_patching": {}}, "train": {"projection": {"fit_texts": 40}},
        "eval": {"trained_controls": []}}))
    cfg = load_config(str(config))
    with pytest.raises(DataSourceError, match="run `selfexplain groundtruth` first"):
        write_job_files(cfg)
    write_split(cfg.layout.split("activation_patching", "big", "train"), vector_records(16), "h", shard_size=8)
    paths = write_job_files(cfg)
    jobs = {TrainJob.from_json(p.read_text()).explainer: TrainJob.from_json(p.read_text()) for p in paths}
    assert set(jobs) == {"small", "big"}
    assert jobs["small"].projection_init_path.exists(), "the cross pair's lstsq Pi is fitted beside its job"
    assert not jobs["big"].projection_init_path.exists(), "a self-explainer reads v unprojected"
    assert capsys.readouterr().out.count("[fit] lstsq Pi") == 1
    write_job_files(cfg)
    assert "[fit]" not in capsys.readouterr().out, "a second call finds the fit"


def test_a_zero3_export_gathers_only_what_it_keeps(tmp_path, partition_everything, monkeypatch):
    """A LoRA explainer under ZeRO-3: the export gathers the adapters, Pi and the embeddings whose [vec] rows
    it keeps, never a frozen weight it does not write (for a 70B explainer: 141 GB onto rank 0's host)."""
    import deepspeed

    import selfexplain.training.step as step_mod
    from selfexplain.training.lora import LoraConfig

    gathered: list[set] = []
    exporting = []
    original_gather, original_export = deepspeed.zero.GatheredParameters, step_mod.export_explainer

    def gather(params, *args, **kwargs):
        if exporting:
            gathered.append({id(p) for p in (params if isinstance(params, (list, tuple)) else [params])})
        return original_gather(params, *args, **kwargs)

    def export(engine, wrapper, *args, **kwargs):
        names = {id(p): n for n, p in wrapper.named_parameters()}
        exporting.append(names)
        try:
            return original_export(engine, wrapper, *args, **kwargs)
        finally:
            exporting.clear()
            gathered[:] = [{names.get(i, "?") for i in ids} for ids in gathered]

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gather)
    monkeypatch.setattr(step_mod, "export_explainer", export)
    job = vector_job(tmp_path, "random", max_steps=2, zero_stage=3, train_embeddings=False,
                     lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    run_training(job)
    names = set().union(*gathered)
    assert names and all(len(g) == 1 for g in gathered), "one parameter at a time"
    kept = {n for n in names if "lora_" in n or n.startswith("projection.")}
    assert names - kept == {"model.base_model.model.model.embed_tokens.weight",
                            "model.base_model.model.lm_head.weight"}, names - kept
    assert not any(n.endswith("base_layer.weight") or "mlp" in n or "norm" in n for n in names)
    model, tok, projection = load_explainer(job.export_dir, {"task": "activation_patching"})
    saved = load_file(job.export_dir / "adapter_model.safetensors")
    assert {k for k in saved if "trainable_tokens" in k} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta"}, "the [vec] rows of both untied matrices"
    assert sum(".lora_A." in k for k in saved) == 2 * 2 and projection.keys == ["0-1", "2-3"]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_pi_computes_in_the_training_precision_at_every_zero_stage(tmp_path, stage, partition_everything):
    from selfexplain.training.job import deepspeed_config
    from selfexplain.training.step import _prepare, init_process_group_if_needed

    job = vector_job(tmp_path, "random", max_steps=1, zero_stage=stage, precision="bf16")
    init_process_group_if_needed()
    run, _ = _prepare(job, 0, 1, torch.device("cpu"))
    try:
        weights = [run.wrapper.projection.weight(k) for k in run.wrapper.projection.keys]
        dtypes = {getattr(w, "ds_tensor", w).dtype for w in weights}  # a ZeRO-3 partition holds the values
        embedding = run.wrapper.model.get_input_embeddings().weight
        assert dtypes == {torch.bfloat16} == {getattr(embedding, "ds_tensor", embedding).dtype}
        assert deepspeed_config(job.train, 1)["bf16"]["enabled"]
    finally:
        run.engine.destroy()


def test_the_notebook_explainer_describes_vectors_as_eval_asks_features(tmp_path):
    """Explainer.load reads an export (task, target, prompt format, Pi) and describe(vectors, layer) gives
    what eval's explain gives for feature records of those vectors; a patching explainer refuses describe."""
    import dataclasses

    from selfexplain import Explainer

    data = tmp_path / "features" / "train"
    write_split(data, [dataclasses.replace(r, task="feature_descriptions", layers=[3], record_id=f"f{i}", prompt="",
                                           question="", explanation=f"word {i % 3}") for i, r in enumerate(vector_records(8))],
                "h", shard_size=8)
    job = dataclasses.replace(vector_job(tmp_path, "lstsq", max_steps=2), task="feature_descriptions", data_dir=str(data),
                              out_dir=str(tmp_path / "job-features"))
    run_training(job)
    explainer = Explainer.load(job.export_dir)
    assert explainer.task == "feature_descriptions" and explainer.projection is not None
    vectors = torch.randn(5, D_TARGET) * 4
    got = explainer.describe(vectors, layer=3, max_new_tokens=5)
    model, tok, projection = load_explainer(job.export_dir)
    records = [Record(f"v{i}", "feature_descriptions", "t", "test", f"v{i}", "", "", "", False, "", "", layers=[3],
                      vector=v.numpy()) for i, v in enumerate(vectors)]
    assert got == explain(model, tok, records, "auto", 5, projection=projection) and len(got) == 5
    assert explainer.describe(vectors.numpy()[:2], layer=3, max_new_tokens=5) == got[:2]
    with pytest.raises(ValueError, match=r"must be \[N, d\]"):
        explainer.describe(vectors[0], layer=3)
    patching = vector_job(tmp_path, "lstsq", max_steps=2)
    run_training(patching)
    with pytest.raises(ValueError, match="asks about a vector together with a prompt"):
        Explainer.load(patching.export_dir).describe(vectors, layer=3)
