"""What a task is: the TaskSpec a task module declares (and the dry run's TaskWork estimate).

Everything that differs between tasks is a field of its spec, so nothing else in the tree names a task:
its config class, how its ground truth is made (a recipe of steps, or per-item `build_items` + `run`,
from which its recipe is made),
the explainer's prompt templates, the form of its explanations (which selects parsers and metrics),
the query fields that identify an input, the work a dry run estimates, its data check, and
capabilities such as `has_vectors` that decide which eval rows and baselines apply. The registry
(groundtruth/tasks.py) holds the specs by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .per_item import per_item_recipe
from .records import Record
from .stages import StageContext, StagedRecipe

ExplanationForm = str
"""The name of a form registered in eval/forms.py (how explanations are parsed and scored). Built in: causal: "The most likely output would change to <<<X>>>." / "... unchanged from <<<X>>>." (exact match,
changed-F1, content match); description: free text (judge and simulation scores); attribution: "The
output depends most on <<<W>>>." (exact match on the top input word, recall@k of the record's top words:
records carry query["top_words"], query["words"] and query["subject_word"]); list: "The answer is carried
by <<<23.4, 20.1>>>." (top-1, precision@k, recall@k of the gold list). A task module may register its own."""


def split_records(task_cfg: Any, items: int) -> tuple[int, int]:
    """(train, test) records of n items for a per-item task with SplitConfig fields (an upper bound:
    before balancing)."""
    train = items * (1 - task_cfg.test_fraction)
    cap = task_cfg.max_train_records
    return int(min(train, cap) if cap else train), int(items * task_cfg.test_fraction)


@dataclass(frozen=True)
class MemoryPlan:
    """A task's memory per step on one target, for the dry run's scale plan."""

    summary: str
    """The sizes it depends on, in words."""
    steps: list[tuple[str, float, float]]
    """(step, GPU bytes per actor or task, host bytes per process)."""
    disk: str


@dataclass(frozen=True)
class TaskWork:
    """What a dry run estimates for a task (typical paper-format prompts; see docs/SCALING.md)."""

    target_tokens: int
    """Prompt tokens of one target forward pass while making ground truth."""
    explainer_tokens: int
    """Tokens of one explainer training example (template, query, explanation)."""
    paper_items: int = 0
    """Work items per target when the source cannot be counted offline (the paper's data set sizes)."""
    passes: Callable[[Any], int] = lambda task_cfg: 1
    """Target forward passes of target_tokens per item, from the task config."""
    items_per_shard: Optional[Callable[[Any], int]] = None
    """Work items per ground-truth shard, from the task config; None: the run's groundtruth.items_per_shard."""
    records: Callable[[Any, int], tuple[int, int]] = split_records
    """(train, test) records a target yields from n items."""
    memory: Optional[Callable[[Any, Any, int, int], MemoryPlan]] = None
    """(task config, target shape, weight bytes, batch size) -> memory per step, for a task whose steps
    hold more than the target (None: the target's weights bound it)."""


@dataclass(frozen=True)
class ExplainUnits:
    """What `selfexplain explain` asks a trained explainer about: every unit the task's technique could
    analyse on a target (an SAE latent, a (block, position) of a prompt pair, a span of an input), analysed
    or not. Every callable reads the (task, target) ground-truth context of the run."""

    chunks: Callable[[StageContext, int], list]
    """(context, work items per chunk) -> the work in chunks, each one output shard; loads no model. A
    chunk is sized and cut like a list of work items (len(chunk), chunk[:n])."""
    queries: Callable[..., list[Record]]
    """queries(context, chunk, model, tokenizer) -> one record per unit, as the explainer is asked about
    it, unlabelled (model and tokenizer are the target's, None unless needs_target)."""
    truth: Callable[..., list[Record]]
    """truth(context, records, model, tokenizer) -> the units' labels by the task's own technique (the
    target loaded), as records with the same ids; a unit the technique cannot label is left out."""
    needs_target: bool = False
    """queries runs the target (patching reads v from x''s run)."""
    chunk_size: int = 16
    """Default work items per chunk (latents, or pairs / inputs)."""
    unit_name: str = "item"
    """What one work item is, for --limit and the progress bar (latent, pair, input)."""
    units_per_item: Callable[[Any], int] = lambda task_cfg: 1
    """Units one work item holds, for the dry run's estimate (patching: positions x blocks of a pair)."""
    feature_of: Optional[Callable[[dict], tuple[int, int]]] = None
    """(layer, index) of an SAE latent unit from its query: its labels are exported in Neuronpedia's format."""
    with_source: Optional[Callable[[Any, str, Optional[list[int]]], Any]] = None
    """(task config, source, layers) -> the task config whose units are those of another source than the
    run analysed (an SAE: a folder or a sae-lens release), for `selfexplain explain --source`; None: the
    task explains only the run's own units."""
    of_inputs: Optional[Callable[..., list[Record]]] = None
    """of_inputs(task config, inputs, model, tokenizer, target) -> one record per unit of inputs a person
    brings (prompts as the task's prompts file holds them), unlabelled and in the test split; model and
    tokenizer are the target's, None unless needs_target. For Explainer.explain(prompts); None: the task's
    units come only from a run."""
    prepare: tuple = ()
    """Steps (groundtruth/stages.py Step) that make a --source's units and the files its truth reads, run
    on the explain folder's own ground-truth context before explaining (a new SAE: activations over the
    run's corpus, the SAE loaded, exemplars mined; no latent is described but the validation sample)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type
    """The task's config dataclass (the run config's `tasks.<name>` section)."""
    summary: str
    """One line: what the explainer is asked."""
    explanation: ExplanationForm
    templates: tuple[str, ...]
    """Explainer prompt templates, one picked per record (by a hash of its id). Fields: {prompt},
    {question}, and for vector tasks {vec} (the [begin][vec][end] triple, or nothing when the vector is
    left out), {layers}, {token}, {position}; any query field as {query[name]}."""
    explanation_tokens: int
    """Max new tokens when an explainer answers (the paper: 50 for causal tasks, 20 for descriptions)."""
    work: TaskWork
    build_items: Optional[Callable[[Any, int], list]] = None
    """(task config, seed) -> items, each with .source_id; with run, a per-item task."""
    run: Optional[Callable[..., list]] = None
    """(model, tokenizer, items, task config, target, split_of, batch_size) -> records."""
    staged: Optional[StagedRecipe] = None
    """A recipe written out (groundtruth/stages.py), instead of build_items and run."""
    check_inputs: Optional[Callable[[Any, int], None]] = None
    """(task config, seed): read the task's data sources, raising DataSourceError for a missing, empty or
    malformed one (for the dry run and before a run starts). None: building the items does it."""
    has_vectors: bool = False
    """Records carry a vector the explainer reads through [vec]."""
    balance_cell: Optional[Callable[[Record], str]] = None
    """Cells balancing spreads records over."""
    identity_fields: tuple[str, ...] = ()
    """Query fields that identify an input rather than describe it: label_stats tries no rule on them."""
    eval_splits: tuple[str, ...] = ("test",)
    """Splits eval scores: test, then out-of-distribution sets."""
    selfie: bool = False
    """Eval adds the SelfIE row (untrained explainer, scaled v)."""
    same_item: Optional[Callable[[Record], str]] = None
    """A record's item as any target would have it (the same input and intervention, whatever the model's
    tokenizer or depth): eval splits self vs cross by whether the cross-explainer's model, as a target,
    gives the same label for the same item. None: no such split (the item is the target's own, e.g. one
    of its SAE features)."""
    simulator: Optional[Callable[[Any], Any]] = None
    """(task config) -> what predicts activations from a description (description form: its simulation
    and discriminative scores; groundtruth/features/simulators.py)."""
    explain_units: Optional[ExplainUnits] = None
    """What `selfexplain explain` asks about (None: the task cannot be explained beyond its ground truth)."""
    label_stats_lines: Optional[Callable[[dict], list[str]]] = None
    """Report lines (markdown bullets) of one target's label_stats.json, for a task whose statistics are
    its own (feature descriptions: its SAEs and descriptions); None: per split, the per-item counts."""

    def __post_init__(self) -> None:
        per_item = self.build_items is not None and self.run is not None
        if per_item == (self.staged is not None) or (self.build_items is None) != (self.run is None):
            raise ValueError(f"task {self.name!r}: give build_items and run (a per-item task), or staged (a recipe)")

    @property
    def recipe(self) -> StagedRecipe:
        """How the ground truth is made: the staged recipe, or the one made from build_items and run."""
        return self.staged or per_item_recipe(self.build_items, self.run, self.balance_cell, self.identity_fields)
