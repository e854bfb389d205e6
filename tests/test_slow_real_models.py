"""Checks on the real packaged models (slow: the first run dequantises the GGUF, ~25 s)."""
import pytest

from groundtruth.ablation import AblationConfig, build_items, run_ablation
from groundtruth.generation import greedy_generate, render_prompt
from groundtruth.models import ModelSpec, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec("smollm2-135m-instruct"))


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    (answer,) = greedy_generate(model, tok, [render_prompt(tok, "The capital of France is", "plain")], 4)
    assert "Paris" in answer


def test_smollm2_ablation_labels_are_not_degenerate(smollm2):
    model, tok = smollm2
    cfg = AblationConfig(max_sources=6)
    items = build_items(cfg, seed=0)
    records = run_ablation(model, tok, items, cfg, "smollm2", lambda s: "train", batch_size=16)
    changed = sum(r.changed for r in records)
    assert 0.15 < changed / len(records) < 0.85, "both labels occur"
    assert len({r.output_after for r in records}) >= 5, "answers vary with the prompt"
