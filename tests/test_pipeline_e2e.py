"""The whole pipeline on tiny models through the real machinery, all three tasks: Ray actor pool
(2 actors, one killed mid-shard), Ray Train + DeepSpeed ZeRO-2 (2 workers), Ray evaluators, report and
offline W&B. Explainer b is wider than target a, so its patching explainer reads vectors through Pi. (Target a is
the tiny seed whose patches do change its output: a set of one class is refused.)"""
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import wandb_workspaces.reports.v2 as wr
import yaml
from wandb_log import history, run_info

from selfexplain.distributed.cli import main as cli_main
from selfexplain.distributed.config import load_config
from selfexplain.groundtruth.faults import FAULT_ENV
from selfexplain.distributed.pipeline import run
from selfexplain.distributed.tracking import figure_key, train_logs
from selfexplain.distributed.wandb_report import build_report
from selfexplain.groundtruth.ablation import build_items
from selfexplain.groundtruth.features.neuronpedia import load_neuronpedia
from selfexplain.groundtruth.records import iter_records, read_manifest, safe_key, sha256_file
from selfexplain.training.live_log import job_run_name

CONFIG = {
    "name": "e2e",
    "models": {"a": {"source": "tiny-llama:hidden=32,layers=4,seed=3"}, "b": {"source": "tiny-llama:hidden=48,layers=2,seed=1"}},
    "targets": ["a"],
    "explainers": ["a", "b"],
    "tasks": {"input_ablation": {"max_sources": 12, "test_fraction": 0.3, "max_new_tokens": 3, "span": {"answer_pattern": "\\S+"}},
              "activation_patching": {"max_facts": 8, "relations": ["capital"], "num_blocks": 2, "test_fraction": 0.3,
                                      "max_train_records": 24, "max_test_records": 8},
              "head_patching": {"max_facts": 12, "relations": ["capital"], "test_fraction": 0.3, "max_train_records": 16,
                                "max_test_records": 8},
              "feature_descriptions": {"layers": [1], "corpus": ["wordnet"], "corpus_texts": 120, "texts_per_shard": 40,
                                       "max_tokens": 24, "sae": {"d_sae": 64, "k": 4, "steps": 80, "batch_size": 64},
                                       "top_k": 6, "negatives": 4, "min_exemplars": 3, "test_features_per_layer": 6}},
    "groundtruth": {"actors": 2, "actor_cpus": 0.5, "items_per_shard": 16, "batch_size": 8},
    "train": {"num_workers": 2, "worker_cpus": 0.5, "concurrent_groups": 2, "zero_stage": 2, "max_steps": 4, "micro_batch_size": 2,
              "checkpoint_every": 2, "log_every": 2, "projection": {"fit_texts": 40}},
    "eval": {"max_examples": 6, "max_new_tokens": 8, "actors": 2, "actor_cpus": 0.5,
             "baselines": ["majority", "nearest_neighbour", "gold"], "selfie_scales": [1, 10],
             "data_efficiency": {"feature_descriptions": [8]}},
    "ray": {"num_cpus": 4},
}


@pytest.fixture()
def config(tmp_path):
    data = json.loads(json.dumps(CONFIG))
    data["out_dir"] = str(tmp_path / "run")
    data["ray"]["temp_dir"] = tempfile.mkdtemp(prefix="se-ray-")  # short: Ray's socket paths have a length limit
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_pipeline_end_to_end_with_a_killed_actor(config, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "actor-died"
    monkeypatch.setenv(FAULT_ENV, f"kill:1:{marker}")
    cfg = load_config(config)
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run(cfg)
    assert marker.exists(), "the fault was injected: an actor died in the middle of shard 1"
    # DeepSpeed's CPU shm allreduce (a 69 MB /dev/shm buffer per rank, never unlinked) is never built
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before

    # every work item is present exactly once in the raw shards
    gt = cfg.run_dir / "groundtruth" / "input_ablation" / "a"
    expected = sorted(safe_key("a", "input_ablation", i.item_id) for i in build_items(cfg.tasks["input_ablation"], cfg.seed))
    present = Counter(r.record_id for r in iter_records(gt / "raw"))
    assert sorted(present) == expected
    assert set(present.values()) == {1}
    assert not list((gt / "raw").glob(".*")), "no partial or temporary shard survives"
    train_ids = {r.source_id for r in iter_records(gt / "train")}
    test_ids = {r.source_id for r in iter_records(gt / "test")}
    assert train_ids and test_ids and not train_ids & test_ids
    assert json.loads((gt / "label_stats.json").read_text())["raw"]["count"] == len(expected)

    # every explainer trained through Ray Train, two groups of 2 workers at once, and exported
    for name in ("input_ablation/a_on_a", "input_ablation/b_on_a", "activation_patching/a_on_a", "activation_patching/b_on_a",
                 "head_patching/a_on_a", "head_patching/b_on_a", "feature_descriptions/a_on_a", "feature_descriptions/b_on_a"):
        export = cfg.run_dir / "explainers" / name / "export"
        meta = json.loads((export / "selfexplain.json").read_text())
        assert meta["steps"] == 4
        log = (export.parent / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in log] == [2, 4]

    matrix = json.loads((cfg.run_dir / "matrix.json").read_text())
    rows = matrix["tasks"]["input_ablation"]["rows"]
    assert set(rows) == {"a trained", "a untrained", "b trained", "b untrained", "majority"}
    assert rows["a trained"]["cells"]["a"]["self"] and not rows["b trained"]["cells"]["a"]["self"]
    assert all(0.0 <= r["cells"]["a"]["exact_match"] <= 1.0 for r in rows.values())
    assert (cfg.run_dir / "report.md").exists() and (cfg.run_dir / "heatmap_input_ablation.png").exists()

    # activation patching: vectors in the shards, no-vector rows, the cross explainer through a fitted Pi
    patching = matrix["tasks"]["activation_patching"]
    controls = {f"{e} trained, {c}" for e in ("a", "b") for c in ("no vector", "zero v", "shuffled v")}
    assert set(patching["rows"]) == {"a trained", "a untrained", "b trained", "b untrained", "majority",
                                     "nearest_neighbour"} | controls
    assert list(patching["rows"])[:5] == ["a trained", "b trained", "a trained, no vector", "b trained, no vector",
                                          "a trained, zero v"], "rows in the row registry's order"
    test = list(iter_records(cfg.run_dir / "groundtruth" / "activation_patching" / "a" / "test"))
    assert test and all(r.vector.shape == (32,) and r.layers and r.token_type for r in test)
    assert all("logit_margin" in r.query for r in test)
    patch_stats = json.loads((cfg.run_dir / "groundtruth" / "activation_patching" / "a" / "label_stats.json").read_text())
    assert 0 < patch_stats["train"]["changed_rate"] < 1 and "near_ties" in patch_stats["raw"]
    assert list(patching["projection_fit_error"]) == ["b<-a"]
    cross = cfg.run_dir / "explainers" / "activation_patching" / "b_on_a" / "export"
    assert (cross / "projection.safetensors").exists()
    # a full fine-tune's export is a model folder: transformers loads it as load_explainer does; report fills its card
    from transformers import AutoModelForCausalLM

    from selfexplain.training.explainer import VECTOR_TEXT
    from selfexplain.training.export import load_explainer

    mine, tok, _ = load_explainer(cross)
    ids = tok(f"Explain {VECTOR_TEXT}", return_tensors="pt").input_ids
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(cross)(input_ids=ids).logits, mine(input_ids=ids).logits)
    card = (cross / "README.md").read_text()
    assert "| b trained |" in card and "| b trained, zero v |" in card and "| majority |" in card and "| a trained |" not in card
    assert json.loads((cross / "selfexplain.json").read_text())["projection"]["kind"] == "lstsq"
    assert "lstsq projection b<-a" in (cfg.run_dir / "report.md").read_text()
    assert list((cfg.run_dir / "wandb").glob("offline-run-*"))

    # head patching: a head's contribution as v, its controls; heads do not correspond across models, so no
    # agree / disagree split
    heads = matrix["tasks"]["head_patching"]
    assert {"a trained", "b trained", "a trained, zero v", "b trained, shuffled v", "majority"} <= set(heads["rows"])
    head_test = list(iter_records(cfg.run_dir / "groundtruth" / "head_patching" / "a" / "test"))
    assert head_test and all(r.vector.shape == (32,) and r.layers == [r.query["layer"]] and "effect" in r.query
                             for r in head_test)
    assert "agreement" not in heads

    # feature descriptions: an SAE trained here, whole features held out, judge and simulation scores
    features = matrix["tasks"]["feature_descriptions"]
    assert features["metrics"] == ["top1", "mean_rank", "judge", "simulation"]
    assert set(features["rows"]) == {"a trained", "a trained, 8 per layer", "a trained, no vector", "a untrained",
                                     "a SelfIE", "b trained", "b trained, no vector", "b untrained", "b SelfIE",
                                     "majority", "nearest_neighbour", "gold"} | controls \
        | {f"a trained, 8 per layer, {c}" for c in ("no vector", "zero v", "shuffled v")}
    selfie = features["rows"]["a SelfIE"]["cells"]["a"]
    assert selfie["scale"] in (1, 10) and set(selfie["top1_by_scale"]) == {"1.0", "10.0"}
    assert features["rows"]["a trained, 8 per layer"]["cells"]["a"]["examples_per_layer"] == 8
    # each point of the curve against its own controls: the lift per size is in matrix.json and report.md
    lifts = {d["examples_per_layer"]: d["second"] for d in features["differences"]
             if d["first"].startswith("a trained") and d["comparison"] == "trained - best control" and d["metric"] == "top1"}
    assert len(lifts) == 2 and 8 in lifts  # the full-data row and the 8-per-layer row
    assert not lifts[8].startswith("a trained, ") or lifts[8].startswith("a trained, 8 per layer, ")
    assert "Trained minus its best control (that size's" in (cfg.run_dir / "report.md").read_text()
    assert (cfg.run_dir / "efficiency_feature_descriptions.png").exists()
    for ood in ("act", "dact"):  # out-of-distribution sets: trained rows and baselines
        table = matrix["tasks"][f"feature_descriptions:{ood}"]
        assert {"a trained", "b trained", "gold"} <= set(table["rows"]) and "a untrained" not in table["rows"]
    stats = features["label_stats"]["a"]
    assert stats["sae"]["1"]["d_sae"] == 64 and 0 < stats["sae"]["1"]["explained_variance"] <= 1
    fgt = cfg.run_dir / "groundtruth" / "feature_descriptions" / "a"
    train_f = {r.source_id for r in iter_records(fgt / "train")}
    test_f = list(iter_records(fgt / "test"))
    assert len(test_f) == 6 and train_f and not train_f & {r.source_id for r in test_f}
    assert all(r.vector.shape == (32,) and r.layers == [1] and r.query["exemplars"]["top"] for r in test_f)
    gold = features["rows"]["gold"]["cells"]["a"]
    assert gold["judge"] == pytest.approx(1.0, abs=1e-3) and gold["simulation"] > 0.3
    assert 0 <= gold["top1_lo"] <= gold["top1"] <= gold["top1_hi"] <= 1 and gold["top1_chance"] > 0
    # the headline: each trained row against its best control, and self against cross, per target
    comparisons = {(d["comparison"], d["target"]) for d in features["differences"]}
    assert comparisons == {(c, t) for c in ("trained - best control", "self - cross") for t in features["targets"]}
    assert "## Headline" in (cfg.run_dir / "report.md").read_text()
    assert "SAE layer 1 (trained here): 64 features" in (cfg.run_dir / "report.md").read_text()
    assert (cfg.run_dir / "config.resolved.yaml").exists()

    # the W&B report: a section per matrix task, panels on exactly the keys the run logged
    report = build_report(cfg, matrix, entity="someone")
    assert [b.text for b in report.blocks if isinstance(b, wr.H1)] == list(matrix["tasks"])
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    curves = {(g.runsets[0].query, p.y[0].name) for g in grids for p in g.panels if isinstance(p, wr.LinePlot)}
    jobs = train_logs(cfg.layout)
    assert {query for query, key in curves if key == "train/loss"} == {
        job_run_name(cfg.name, job.split("/")[0] + "/") for job in jobs}, "each task's loss curves: its jobs' runs"
    # ... and the runs are there: one per training job, grouped under the pipeline run, a history row per step
    # logged while the job trained (each before its export was written), beside the pipeline's own run
    runs = {}
    for log in (cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        info = run_info(log)
        runs.setdefault(info["job_type"], []).append((info, history(log)))
    assert len(jobs) == 9 and sorted(i["name"] for i, _ in runs["train"]) == sorted(job_run_name(cfg.name, j) for j in jobs)
    assert {i["group"] for kind in runs.values() for i, _ in kind} == {cfg.name}
    for info, rows in runs["train"]:
        export = cfg.run_dir / "explainers" / info["name"].removeprefix(f"{cfg.name}/") / "export"
        assert [r["_step"] for r in rows] == [1, 2, 3, 4] and all(r["train/tokens_per_s"] > 0 for r in rows)
        assert all("train/loss" in r and "train/lr" in r and "train/memory_gb" in r for r in rows)
        assert rows[-1]["_timestamp"] <= (export / "selfexplain.json").stat().st_mtime, "logged as it trained"
    pipeline_rows = [r for _, rows in runs["pipeline"] for r in rows]
    progress = {k for r in pipeline_rows for k in r if k.startswith("progress/groundtruth/input_ablation/a/")}
    assert {"progress/groundtruth/input_ablation/a/records", "progress/groundtruth/input_ablation/a/records_per_s"} <= progress
    assert any(k.startswith("progress/eval") for r in pipeline_rows for k in r)
    tables = {k: v["nrows"] for r in pipeline_rows for k, v in r.items() if isinstance(v, dict) and v.get("_type") == "table-file"}
    assert tables["training_jobs"] == 9 and tables["matrix"] > 0, "the pipeline run links its jobs beside the matrix"
    media = {k for g in grids for p in g.panels if isinstance(p, wr.MediaBrowser) for k in p.media_keys}
    assert media == {figure_key(p) for p in cfg.run_dir.glob("*.png")} and "figures/efficiency_feature_descriptions" in media
    capsys.readouterr()
    assert cli_main(["report", config, "--wandb"]) == 2, "offline: publishing a report is refused with a message"
    assert "a report lives on the W&B server" in capsys.readouterr().err

    # a rerun of finished stages is a no-op: no shard, export or eval cell is rewritten
    watched = list(gt.rglob("*.tar")) + list(cfg.run_dir.glob("explainers/*/*/export/*.safetensors")) \
        + list(cfg.run_dir.glob("eval/*/*/*.json")) + list(fgt.rglob("*.tar")) + list(fgt.rglob("layer_*.npy"))
    assert any("export" in str(p) for p in watched), "the exports are among what is watched"
    before = {p: p.stat().st_mtime_ns for p in watched}
    monkeypatch.delenv(FAULT_ENV)
    run(cfg, ("groundtruth", "train", "eval"))
    assert {p: p.stat().st_mtime_ns for p in watched} == before

    # a copied run folder is complete where it lands: rerunning there rewrites nothing either
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(cfg.run_dir, moved, ignore=shutil.ignore_patterns("ray_train", "wandb"))
    copy = load_config(config, [f"out_dir={moved}"])
    watched = [moved / p.relative_to(cfg.run_dir) for p in watched]
    before = {p: p.stat().st_mtime_ns for p in watched}
    run(copy, ("groundtruth", "train", "eval"))
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert "already exported, skipping" in capsys.readouterr().out

    # selfexplain explain, every task: each unit exactly once though an explain actor dies mid-shard, a
    # validation sample beside its controls, the Neuronpedia export, the browser; a rerun rewrites nothing
    explained = {"input_ablation": expected, "activation_patching": sorted(r.record_id for r in iter_records(cfg.layout.groundtruth("activation_patching", "a") / "raw")),
                 "feature_descriptions": sorted(safe_key("feature_descriptions", "a", "L1", f"F{f}") for f in range(64))}
    marker = tmp_path / "explain-actor-died"
    monkeypatch.setenv(FAULT_ENV, f"kill:1:{marker}")
    for task, units in explained.items():
        args = ["explain", config, "--task", task, "--explainer", "b", "--target", "a", "--validate", "12", "--chunk-size", "4"]
        assert cli_main(args) == 0
        out = cfg.run_dir / "explain" / task / "b_on_a"
        rows = [json.loads(line) for p in sorted(out.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]
        assert sorted(r["unit"] for r in rows) == units, f"{task}: every unit exactly once"
        assert not list(out.glob(".*")), "no partial shard survives"
        validation = json.loads((out / "validation.json").read_text())
        assert validation["labelled"] >= 2 and validation["sampled"] <= 12
        assert not {u for u in validation["units"]} & {r["unit"] for r in rows if r["trained_on"]}, "never a trained-on unit"
        controls = {"another unit's answer"} | ({"explainer, v left out"} if task != "input_ablation" else set())
        assert set(validation["rows"]) == {"explainer"} | controls
        assert {d["control"] for d in validation["differences"]} == controls
        page = (out / "index.html").read_text()
        assert all(r["unit"] in page for r in rows)
        watched = {p: p.stat().st_mtime_ns for p in out.iterdir()}
        assert cli_main(args) == 0
        assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == watched, "a rerun explains and writes nothing"
    assert marker.exists(), "the fault was injected: an explain actor died in the middle of shard 1"
    labels = load_neuronpedia(str(cfg.run_dir / "explain" / "feature_descriptions" / "b_on_a" / "neuronpedia.json"))
    assert sorted(labels) == [(1, f) for f in range(64)]
    # --source: an SAE the run did not analyse, here the run's own saved elsewhere: the same units and answers
    sae = shutil.copytree(next(fgt.glob("work/*/sae/layer_1")), tmp_path / "some_sae")
    args = ["explain", config, "--task", "feature_descriptions", "--explainer", "b", "--target", "a", "--validate", "12",
            "--chunk-size", "4", "--source", str(sae), "--layers", "1"]
    assert cli_main(args) == 0
    (out,) = [p for p in (cfg.run_dir / "explain" / "feature_descriptions").iterdir() if "some_sae" in p.name]
    def answers(folder):
        return {r["unit"]: r["explanation"] for p in sorted(folder.glob("shard-*.jsonl")) for r in map(json.loads, p.read_text().splitlines())}

    assert answers(out) == answers(out.parent / "b_on_a") and len(answers(out)) == 64
    assert (out / "groundtruth").is_dir() and json.loads((out / "validation.json").read_text())["labelled"] >= 2
    # --source for input ablation: a person's prompts file, every span of it explained and a sample validated
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Rain fell on day {i}. The sky was grey. The capital of Peru is",
                                              "id": f"day{i}"}) for i in range(4)))
    args = ["explain", config, "--task", "input_ablation", "--explainer", "b", "--target", "a", "--validate", "4",
            "--source", str(prompts)]
    assert cli_main(args) == 0
    (out,) = [p for p in (cfg.run_dir / "explain" / "input_ablation").iterdir() if "my_prompts" in p.name]
    rows = [json.loads(line) for p in sorted(out.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]
    assert sorted((r["source_id"], r["query"]["span"]) for r in rows) == \
        sorted((f"day{i}", s) for i in range(4) for s in (f"Rain fell on day {i}.", "The sky was grey."))
    assert not any(r["trained_on"] for r in rows) and json.loads((out / "validation.json").read_text())["labelled"] >= 1


def test_corrupt_shard_fails_with_its_name(config, tmp_path, capsys):
    cfg = load_config(config, ["train.use_ray=false", "eval.untrained=false", "explainers=[a]"])
    run(cfg, ("groundtruth",))
    shard = next((cfg.run_dir / "groundtruth" / "input_ablation" / "a" / "train").glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:700])
    code = cli_main(["train", config, "--set", "train.use_ray=false", "--set", "explainers=[a]"])
    err = capsys.readouterr().err
    assert code == 2 and f"{shard}" in err and "delete it and rerun the groundtruth stage" in err
    # the advice works: the groundtruth stage makes the deleted shard again, byte for byte
    shard.unlink()
    assert cli_main(["groundtruth", config, "--set", "explainers=[a]"]) == 0
    entry = read_manifest(shard.parent)["shards"][shard.name]
    assert shard.exists() and sha256_file(shard) == entry["sha256"] and list(iter_records(shard.parent))


def test_eval_refuses_ground_truth_made_for_another_target(config, capsys):
    only_ablation = ["explainers=[a]", "tasks.activation_patching=null", "tasks.head_patching=null",
                     "tasks.feature_descriptions=null"]
    cfg = load_config(config, only_ablation)
    run(cfg, ("groundtruth",))
    other = ["models.a.source=tiny-llama:seed=5", *only_ablation]
    assert cli_main(["eval", config, *[arg for o in other for arg in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "was made for another target model or input_ablation settings" in err and "rerun the groundtruth" in err


def test_dry_runs_print_the_plan(capsys):
    # the paper recipes need hub weights and published data this machine lacks: the plan, then exit 2
    assert cli_main(["run", "configs/paper/input_ablation.yaml", "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B-Instruct (hub id" in out and '"stage": 3' in out and "8 actors" in out
    assert cli_main(["run", "configs/paper/activation_patching.yaml", "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "LoRA r=128" in out and "qwen on llama, reads v through Pi 'lstsq'" in out
    assert "llama on llama, reads v through Pi 'none'" in out and "activation_patching: 11 rows x 2 targets" in out
    assert "items not countable here" in out and "counterfact.json" in out  # no CounterFact on this machine
    assert cli_main(["run", "configs/paper/feature_descriptions.yaml", "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "pretrained release:llama_scope_lxr_32x:l{layer}r_32x" in out and "describers neuronpedia, simulator llm" in out
    assert "qwen on llama, reads v through Pi 'lstsq'" in out and "feature_descriptions:dact: 4 rows x 1 targets" in out
    # memory per stage of the 131,072-feature recipe, each within an 80 GB GPU and a 256 GB node
    stages = [line for line in out.splitlines() if line.startswith("    ") and ": GPU " in line]
    assert [line.split(":")[0].strip() for line in stages] == [
        "activations (per actor)", "SAE (per layer task)", "exemplars (per shard task)", "describe (driver, one layer at a time)"]
    assert all(line.endswith(": fits") for line in stages) and "d_sae=131072" in out and "100 activation shards" in out
    # explain's plan at paper scale: every latent of Llama Scope's 31 SAEs, from the config alone
    assert cli_main(["explain", "configs/paper/feature_descriptions.yaml", "--task", "feature_descriptions",
                     "--explainer", "qwen", "--target", "llama", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{31 * 131072} latents in {31 * 131072 // 256} shards" in out and "GPU-h" in out
    assert cli_main(["explain", "configs/paper/feature_descriptions.yaml", "--task", "nope", "--explainer", "qwen",
                     "--target", "llama", "--dry-run"]) == 2
    assert "--task 'nope' is not in" in capsys.readouterr().err
    assert cli_main(["run", "configs/quickstart.yaml", "--dry-run"]) == 0
    quick = load_config("configs/quickstart.yaml")
    n = len(build_items(quick.tasks["input_ablation"], quick.seed))
    assert f"task input_ablation: {n} items" in capsys.readouterr().out


def test_bad_config_exits_with_a_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": {"zero_stag": 2}}))
    assert cli_main(["run", str(path), "--dry-run"]) == 2
    assert "train.zero_stag: unknown key" in capsys.readouterr().err


def test_empty_question_source_fails_with_a_message(tmp_path, capsys):
    (tmp_path / "mmlu").mkdir()
    path = tmp_path / "c.yaml"
    data = {**CONFIG, "out_dir": str(tmp_path / "run"),
            "tasks": {"input_ablation": {"source": "hint_mcq", "hint": {"questions": "mmlu", "mmlu_path": str(tmp_path / "mmlu")}}}}
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["groundtruth", str(path)]) == 2
    assert f"no MMLU questions found in {tmp_path / 'mmlu'}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "groundtruth").exists(), "nothing half-made is left behind"
