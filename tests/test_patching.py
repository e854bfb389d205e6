"""The fast patcher (cached clean run, one batch per block) against one hooked forward per intervention."""
import pytest
import torch

from groundtruth.models import ModelSpec, load_model
from groundtruth.patching import Intervention, layer_blocks, layer_states, patch_fast, patch_slow


def test_blocks_are_contiguous_and_cover_every_layer():
    assert layer_blocks(30, 4) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23)), list(range(23, 30))]
    assert sum(layer_blocks(7, 7), []) == list(range(7))


def test_layer_states_match_the_models_own_output():
    model, _ = load_model(ModelSpec("tiny-llama:hidden=32,layers=4"))
    ids = torch.tensor([5, 17, 99, 3, 42])
    states = layer_states(model, ids)
    assert states.shape == (5, 5, 32)
    logits = model(input_ids=ids.unsqueeze(0)).logits[0]
    assert torch.allclose(model.lm_head(model.model.norm(states[-1])), logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma"])  # Gemma: sliding-window + global layers
def test_fast_patcher_gives_the_reference_labels(arch):
    # a sharper random model, so that patches do change the argmax sometimes
    model, _ = load_model(ModelSpec(f"{arch}:hidden=32,layers=4,seed=3"))
    for p in model.parameters():
        p.data *= 3
    gen = torch.Generator().manual_seed(0)
    blocks = layer_blocks(4, 2)
    changed = 0
    for _ in range(4):
        x = torch.randint(0, 250, (7,), generator=gen)
        x_prime = torch.randint(0, 250, (7,), generator=gen)
        interventions = [Intervention(b, t, t) for b in range(2) for t in range(7)]
        clean_slow, slow = patch_slow(model, x, x_prime, blocks, interventions)
        clean_fast, fast = patch_fast(model, x, x_prime, blocks, interventions)
        assert clean_fast == clean_slow and fast == slow
        changed += sum(token != clean_slow for token in slow)
    assert changed > 0, "the check is only meaningful if some patch changes the output"
