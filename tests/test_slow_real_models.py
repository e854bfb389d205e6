"""Checks on the real packaged models (slow: the first run dequantises the GGUF, ~25 s)."""
import pytest

from selfexplain.groundtruth.ablation import AblationConfig, build_items, run_ablation
from selfexplain.groundtruth.generation import greedy_generate, render_prompt
from selfexplain.groundtruth.models import ModelSpec, load_model

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


def fast_equals_slow(model, tok, text: str, counterfactual: str):
    """Every (block, position) of a same-length pair through both patchers; asserts they agree and
    returns (x, interventions, clean token, patched tokens)."""
    import torch

    from selfexplain.groundtruth.patching import Intervention, decided_tokens, layer_blocks, patch_fast, patch_slow

    x, x_prime = (torch.tensor(tok(t)["input_ids"]) for t in (text, counterfactual))
    blocks = layer_blocks(model.config.num_hidden_layers, 4)
    interventions = [Intervention(b, t, t) for b in range(4) for t in range(len(x))]
    clean, slow = decided_tokens(patch_slow(model, x, x_prime, blocks, interventions))
    assert decided_tokens(patch_fast(model, x, x_prime, blocks, interventions)) == (clean, slow)
    return x, interventions, clean, slow


def test_smollm2_fast_patcher_matches_reference_and_flips_the_capital(smollm2):
    model, tok = smollm2
    x, interventions, clean, slow = fast_equals_slow(model, tok, "The capital of France is", "The capital of Spain is")
    assert tok.decode([clean]).strip() == "Paris"
    subject = len(x) - 2  # "France" / "Spain": the subject's last token
    flipped = [tok.decode([slow[i]]).strip() for i, iv in enumerate(interventions) if iv.position == subject]
    assert "Madrid" in flipped


def test_smollm2_patching_task_labels_are_not_degenerate(smollm2):
    from selfexplain.groundtruth.fact_pairs import build_items as patch_items
    from selfexplain.groundtruth.patching_task import PatchingConfig, run_patching

    model, tok = smollm2
    cfg = PatchingConfig(max_facts=4, relations=["capital"])
    records = run_patching(model, tok, patch_items(cfg, seed=0), cfg, "smollm2", lambda s: "train")
    changed = [r for r in records if r.changed]
    assert 0.1 < len(changed) / len(records) < 0.9, "both labels occur"
    assert {r.token_type for r in records} >= {"subject_final", "relation"}
    # patching the subject's last token moves the answer towards the counterfactual's somewhere
    assert any(r.token_type == "subject_final" for r in changed)
    assert all(r.vector.shape == (576,) and len(r.layers) in (7, 8) for r in records)


def test_gemma_fast_patcher_matches_the_reference():
    model, tok = load_model(ModelSpec("gemma-3-270m"))  # sliding-window and global layers, scaled embeddings
    _, _, clean, slow = fast_equals_slow(model, tok, "The official language of Brazil is",
                                         "The official language of Japan is")
    assert any(token != clean for token in slow), "some patch changes Gemma's answer"


def test_a_smollm2_lora_export_loads_with_peft_as_load_explainer_does(tmp_path):
    """The packaged model's GGUF tokenizer, saved with the vector tokens, reloads as the same tokenizer, and
    the adapter folder rebuilds on a fresh SmolLM2 the model training left (same logits)."""
    import dataclasses
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from selfexplain.training.explainer import VECTOR_TEXT, add_vector_tokens
    from selfexplain.training.export import FORMAT, METADATA, load_explainer
    from selfexplain.training.export_format import write_weights
    from selfexplain.training.lora import LoraConfig, apply_lora

    spec, lora = ModelSpec("smollm2-135m-instruct"), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    model, tok = load_model(spec)
    add_vector_tokens(model, tok)
    model = apply_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    folder = tmp_path / "export"
    folder.mkdir()
    weights = write_weights(folder, model, tok, model.state_dict(), {n for n, p in model.named_parameters() if p.requires_grad},
                            lora, spec.source)
    (folder / METADATA).write_text(json.dumps({"explainer_spec": dataclasses.asdict(spec), "format": FORMAT,
                                               "weights": weights, "vector_tokens": True}))
    text = f"The capital of France is {VECTOR_TEXT} Paris"
    ids = tok(text, return_tensors="pt").input_ids
    want = model(input_ids=ids).logits
    direct_tok = AutoTokenizer.from_pretrained(folder)
    assert direct_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    base, _ = load_model(spec)
    base.resize_token_embeddings(len(direct_tok))
    assert torch.allclose(PeftModel.from_pretrained(base, str(folder))(input_ids=ids).logits, want, atol=1e-4)
    loaded, _, _ = load_explainer(folder)
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-4)
