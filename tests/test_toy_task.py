"""A fourth task defined entirely in this file: its config, items, technique and one register_task call.
The run config names this module in task_modules; ground truth (Ray actors), training and eval (Ray
evaluators) then run it on tiny models, and no file of the project knows its name."""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from conftest import run_one_model_pipeline


from selfexplain.groundtruth.dataset import UNANSWERED, SplitConfig
from selfexplain.groundtruth.explanations import format_explanation
from selfexplain.groundtruth.generation import greedy_generate, render_prompt
from selfexplain.groundtruth.records import Record, safe_key
from selfexplain.groundtruth.tasks import TASK_MODULES_ENV, TaskSpec, TaskWork, register_task

TASK = "toy_last_word"


@dataclass
class ToyConfig(SplitConfig):
    """Drop the last word of a short text: does the target's next token change?"""

    texts: int = 40
    max_new_tokens: int = 1


@dataclass(frozen=True)
class ToyItem:
    source_id: str
    text: str


def build_items(cfg: ToyConfig, seed: int) -> list[ToyItem]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return [ToyItem(f"t{i}", " ".join(words[(i * k + seed) % len(words)] for k in range(1, 2 + i % 4)))
            for i in range(cfg.texts)]


def run(model, tokenizer, items: list[ToyItem], cfg: ToyConfig, target: str, split_of, batch_size: int = 16):
    prompts = [render_prompt(tokenizer, t, "plain") for it in items for t in (it.text, it.text.rsplit(" ", 1)[0] + " ")]
    outs = [o.strip() for o in greedy_generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size)]
    records = []
    for n, item in enumerate(items):
        before, after = outs[2 * n], outs[2 * n + 1]
        records.append(Record(
            safe_key(target, TASK, item.source_id), TASK, target, split_of(item.source_id), item.source_id, item.text,
            "If the last word were removed, how would the output change?",
            format_explanation(before != after, after), before != after, before, after,
            query={"words": str(len(item.text.split())), **({UNANSWERED: True} if not (before and after) else {})}))
    return records


register_task(TaskSpec(TASK, ToyConfig, "if the last word were removed, how would the output change?", "causal",
                       templates=("{prompt}\n{question}",), explanation_tokens=12,
                       work=TaskWork(target_tokens=8, explainer_tokens=40, passes=lambda cfg: 2),
                       build_items=build_items, run=run))


def test_a_task_defined_in_one_file_runs_through_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    # Ray workers import this module by name (task_modules): it must be on their path. Loading the config
    # notes the module in the environment for worker processes: restored after the test, like PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(TASK_MODULES_ENV, os.environ.get(TASK_MODULES_ENV, ""))
    cfg = run_one_model_pipeline(tmp_path, "toy", "tiny-llama:hidden=32,layers=2,seed=4",
                                 {TASK: {"texts": 40, "test_fraction": 0.3, "max_unanswered_fraction": 0.5}},
                                 {"max_new_tokens": 6, "baselines": ["majority", "nearest_neighbour"]},
                                 task_modules=[Path(__file__).stem])

    stats = json.loads((cfg.run_dir / "groundtruth" / TASK / "m" / "label_stats.json").read_text())
    assert stats["train"]["count"] > 0 and 0 < stats["train"]["changed_rate"] < 1
    rows = json.loads((cfg.run_dir / "matrix.json").read_text())["tasks"][TASK]["rows"]
    # rows by capability: no vectors, so no no-vector row and no nearest neighbour
    assert set(rows) == {"m trained", "m untrained", "majority"}
    assert 0 <= rows["m trained"]["cells"]["m"]["exact_match"] <= 1
    assert TASK in (cfg.run_dir / "report.md").read_text()
    out = capsys.readouterr().out
    assert [line.split(" done in ")[0] for line in out.splitlines() if " done in " in line and " min" in line] == \
        ["[groundtruth]", "[train]", "[eval]"], "each stage's wall time, in order"

    repo = Path(__file__).resolve().parents[1]
    naming = [p for p in repo.rglob("*.py") if ".venv" not in p.parts and p != Path(__file__).resolve()
              and TASK in p.read_text()]
    assert naming == [], "only this file knows the task"


def test_the_same_recipe_runs_without_ray_and_resumes_unit_by_unit(tmp_path):
    """A per-item task's recipe (its raw shards, then balanced splits) in one process: the path a GPU
    check takes, the same steps Ray fans out. A deleted raw shard is the only unit redone."""
    import dataclasses
    import shutil

    from selfexplain.groundtruth.layout import RAW
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.groundtruth.records import iter_records, read_manifest
    from selfexplain.groundtruth.stages import StageContext, run_in_process
    from selfexplain.groundtruth.tasks import task_spec

    cfg = ToyConfig(texts=30, test_fraction=0.3, max_unanswered_fraction=0.5)
    ctx = StageContext(task=TASK, task_cfg=cfg, target="a", model=ModelSpec("tiny-llama:hidden=32,layers=2,seed=4"),
                       folder=tmp_path / "gt", config_hash="h" * 64, seed=0, batch_size=8, shard_size=100,
                       items_per_shard=8)
    recipe = task_spec(TASK).recipe
    stats = json.loads(json.dumps(run_in_process(recipe, ctx)))  # as label_stats.json holds it
    raw = read_manifest(ctx.folder / RAW)
    assert raw["complete"] and raw["count"] == 30 and len(raw["shards"]) == 4, "30 items in shards of 8"
    ids = sorted(r.source_id for r in iter_records(ctx.folder / RAW))
    assert ids == sorted(item.source_id for item in build_items(cfg, 0))
    train = {r.source_id for r in iter_records(ctx.folder / "train")}
    test = {r.source_id for r in iter_records(ctx.folder / "test")}
    assert train and test and not train & test and stats["train"]["count"] == len(train)

    assert run_in_process(recipe, ctx) == stats, "finished: read back"
    (ctx.folder / RAW / "shard-000002.tar").unlink()
    shutil.rmtree(ctx.folder / "test")
    ran = []
    step = recipe.steps[0]
    watched = dataclasses.replace(recipe, steps=(dataclasses.replace(
        step, run=lambda c, unit, *target: ran.append(unit[0]) or step.run(c, unit, *target)),))
    again = run_in_process(watched, ctx)
    assert ran == [2] and json.loads(json.dumps(again)) == stats
    assert {r.source_id for r in iter_records(ctx.folder / "test")} == test
