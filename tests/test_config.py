import pytest
import yaml

from selfexplain.distributed.config import load_config, save_resolved
from selfexplain.distributed.typed_yaml import ConfigError

BASE = {
    "name": "t",
    "models": {"a": {"source": "tiny-llama"}},
    "targets": ["a"],
    "explainers": ["a"],
    "tasks": {"input_ablation": {"max_sources": 3}},
}


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_recipes_validate():
    quick = load_config("configs/quickstart.yaml")
    assert quick.targets == ["smollm2", "gemma"] and quick.tasks["input_ablation"].source == "span_facts"
    paper = load_config("configs/paper/input_ablation.yaml")
    assert paper.models["llama"].source == "meta-llama/Llama-3.1-8B-Instruct"
    assert paper.train.lr == 1e-5 and paper.train.precision == "bf16" and paper.train.use_gpu


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-3", "train.zero_stage=3", "eval.max_examples=7",
                                              "tasks.input_ablation.span.kinds=[word]"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.zero_stage == 3 and cfg.eval.max_examples == 7
    assert cfg.tasks["input_ablation"].span.kinds == ["word"]


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.use_ray=maybe", "train.use_ray: expected true or false"),
    ("train.zero_stage=4", "train.zero_stage: must be 0, 1, 2 or 3"),
    ("train.precision=fp8", "train.precision: must be one of"),
    ("targets=[b]", "targets[0]: 'b' is not in models"),
    ("models.a.source=nonsense", "models.a.source: unknown model source 'nonsense'; accepted forms"),
    ("tasks.input_ablation.source=nope", "tasks.input_ablation.source: unknown item source"),
    ("tasks.input_ablation.span.kinds=[foo]", "tasks.input_ablation.span.kinds: unknown kinds"),
    ("groundtruth.actors=two", "groundtruth.actors: expected an integer"),
    ("eval.baselines=[oracle]", "eval.baselines: unknown ['oracle']"),
    ("train.max_steps_by_task={activation_patchin: 5}", "'activation_patchin' is not a task (known: "),
    ("train.max_steps_by_task={input_ablation: 0}", "every count must be at least 1"),
    ("eval.data_efficiency={features: [8]}", "eval.data_efficiency: 'features' is not a task"),
    ("eval.data_efficiency={input_ablation: [0]}", "eval.data_efficiency.input_ablation: sizes must be at least 1"),
])
def test_bad_values_name_the_dotted_key(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert expected in str(err.value)


def test_missing_required_key_and_no_tasks(tmp_path):
    data = dict(BASE)
    del data["targets"]
    with pytest.raises(ConfigError, match="targets: required key is missing"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match="tasks: enable at least one task"):
        load_config(write(tmp_path, {**BASE, "tasks": {}}))


def test_resolved_config_is_saved_with_code_version(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "out_dir": str(tmp_path / "run")}), ["train.lr=2e-4"])
    saved = yaml.safe_load(save_resolved(cfg).read_text())
    assert saved["config"]["train"]["lr"] == pytest.approx(2e-4)
    assert saved["code_version"]


def test_steps_by_task_reach_only_that_tasks_jobs(tmp_path):
    from selfexplain.distributed.train_job import train_jobs

    tasks = {"input_ablation": {"max_sources": 3}, "activation_patching": {"max_facts": 3}}
    cfg = load_config(write(tmp_path, {**BASE, "tasks": tasks}), ["train.max_steps=30",
                                                                  "train.max_steps_by_task={activation_patching: 120}"])
    steps = {job.task: job.train.max_steps for job in train_jobs(cfg)}
    assert steps == {"input_ablation": 30, "activation_patching": 120}
    other = load_config(write(tmp_path, {**BASE, "tasks": tasks}), ["train.max_steps=30"])
    ablation = [j for j in train_jobs(cfg) if j.task == "input_ablation"][0]
    same = [j for j in train_jobs(other) if j.task == "input_ablation"][0]
    assert ablation.train == same.train, "another task's step count is no part of this task's jobs"
    # switched off with --set, a task's per-task settings stay valid and reach no job
    narrowed = load_config(write(tmp_path, {**BASE, "tasks": tasks}), [
        "train.max_steps_by_task={activation_patching: 120}", "eval.data_efficiency={activation_patching: [4]}",
        "tasks.activation_patching=null"])
    assert {job.task for job in train_jobs(narrowed)} == {"input_ablation"}
    assert all(job.max_records_per_layer is None for job in train_jobs(narrowed))
