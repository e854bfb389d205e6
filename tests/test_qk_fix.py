"""AtP*'s QK fix: exact on one attention layer whose output the metric reads linearly; the patched
probabilities equal a real patched forward's on Llama and Gemma shapes; and the fix is second order in the
patch (the estimate's first-order part is left as AtP's)."""
import pytest
import torch

from selfexplain.groundtruth.attribution_patching import block_estimates
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.patching import Intervention, clean_runs, decoder_layers, layer_blocks
from selfexplain.groundtruth.qk_fix import (LayerAttention, additive_mask, attention_scores, patched_probs, query_key,
                                            recorded_attention)

SOURCES = ["tiny-llama:hidden=32,layers=4,heads=4,kv_heads=2,seed=3",
           "tiny-gemma:hidden=32,layers=4,heads=4,kv_heads=1,window=4,seed=3"]


def test_patching_a_query_or_key_of_one_attention_layer_is_estimated_exactly():
    """Attention only, one layer, a metric linear in its output: the fixed estimate equals the patch's
    effect, where the linear estimate (AtP) is off by far more on these saturated scores."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, length, dim = 4, 2, 6, 8
    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = 3 * normal(heads, length, dim), 3 * normal(kv_heads, length, dim)
    values, readout = normal(kv_heads, length, dim), normal(heads, length, dim)
    mask, scaling = additive_mask(None, length, length, "cpu"), dim ** -0.5

    def probs_of(q, k):
        return torch.softmax(attention_scores(q, k.repeat_interleave(2, 0), scaling, None) + mask, -1)

    def metric(probs):
        return (probs @ values.repeat_interleave(2, 0) * readout).sum()

    q0, k0 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    probs = probs_of(q0, k0)
    probs.retain_grad()
    metric(probs).backward()
    record = LayerAttention(torch.zeros(length, 1), {}, q[None], k[None], probs.detach()[None], mask, scaling, None)
    misses = []
    for position in (0, 2, 5):
        for patched in ("query", "key"):
            q1, k1 = q.clone(), k.clone()
            target = q1 if patched == "query" else k1
            target[:, position] += 2 * normal(target.shape[0], dim)
            exact = float(metric(probs_of(q1, k1)) - metric(probs.detach()))
            new = patched_probs(record, torch.tensor([position]), q1[:, position][None], k1[:, position][None])[0]
            fixed = float(((new - probs.detach()) * probs.grad).sum())
            linear = float((q1 - q).flatten() @ q0.grad.flatten() + (k1 - k).flatten() @ k0.grad.flatten())
            assert fixed == pytest.approx(exact, rel=1e-9, abs=1e-12)
            misses.append(abs(linear - exact))
    assert max(misses) > 0.5, "the scores saturate: the linear estimate is far off somewhere"


@pytest.mark.parametrize("source", SOURCES)
def test_the_patched_probabilities_are_those_of_a_patched_forward(source):
    """Overwrite the residual stream at a position after layer l: layer l + 1's attention probabilities
    are patched_probs of the query and key its own code makes of the new state (a sliding window of 4
    for Gemma's local layers, grouped-query heads for both)."""
    model, _ = load_model(ModelSpec(source))
    layers = decoder_layers(model)
    gen = torch.Generator().manual_seed(1)
    x, x_prime = torch.randint(0, 250, (7,), generator=gen), torch.randint(0, 250, (7,), generator=gen)
    clean, src = clean_runs(model, [x, x_prime])
    for layer, position in ((0, 2), (1, 6), (2, 0)):
        v = src.states[layer + 1, position]
        attention, patched = [], []
        with torch.no_grad(), recorded_attention(layers, attention):
            model(input_ids=x[None])

        def overwrite(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[0, position] = v
            return output
        handle = layers[layer].register_forward_hook(overwrite)
        try:
            with torch.no_grad(), recorded_attention(layers, patched):
                model(input_ids=x[None])
        finally:
            handle.remove()
        record = attention[layer + 1]
        with torch.no_grad():
            q, k = query_key(layers[layer + 1], record, v[None], torch.tensor([position]))
            predicted = patched_probs(record, torch.tensor([position]), q, k)[0]
        assert torch.allclose(predicted, patched[layer + 1].probs[0].float(), atol=1e-5)
        assert not torch.allclose(predicted, record.probs[0].float(), atol=1e-3), "the patch moves the attention"


@pytest.mark.parametrize("source", SOURCES)
def test_the_fix_is_second_order_in_the_patch(source):
    """A patch scaled by eps changes the fixed estimate by about eps^2 (doubling eps: 4x): the first-order
    part, AtP's, is subtracted exactly, so only the softmax's curvature is added."""
    model, _ = load_model(ModelSpec(source))
    model = model.double()
    gen = torch.Generator().manual_seed(2)
    x, x_prime = torch.randint(0, 250, (7,), generator=gen), torch.randint(0, 250, (7,), generator=gen)
    clean, src = clean_runs(model, [x, x_prime])
    blocks = layer_blocks(4, 4)  # one layer each: v - the clean state is eps (x' - x) exactly
    plan = [Intervention(b, t, t) for b in range(3) for t in (0, 3, 6)]

    def fix(eps: float) -> torch.Tensor:
        source = clean.states + eps * (src.states - clean.states)
        return (torch.tensor(block_estimates(model, x, clean.states, source, blocks, plan, qk_fix=True), dtype=torch.float64)
                - torch.tensor(block_estimates(model, x, clean.states, source, blocks, plan), dtype=torch.float64))

    small, double = fix(1e-2), fix(2e-2)
    big = double.abs() > 1e-9
    assert big.sum() >= 3
    assert torch.allclose(double[big] / small[big], torch.full((int(big.sum()),), 4.0, dtype=torch.float64), rtol=0.1)
    assert fix(1.0).abs().max() > 1e3 * small.abs().max(), "the fix matters at a whole patch's size"


def test_a_missing_mask_is_causal_within_a_sliding_window():
    """Flash attention passes no mask and the window beside it: the mask built for it equals SDPA's."""
    inf = float("-inf")
    assert additive_mask(None, 2, 4, "cpu").tolist() == [[0, 0, 0, inf], [0, 0, 0, 0]]
    assert additive_mask(None, 4, 4, "cpu", window=2).tolist() == [
        [0, inf, inf, inf], [0, 0, inf, inf], [inf, 0, 0, inf], [inf, inf, 0, 0]]
    given = torch.tensor([[True, False], [True, True]])[None, None]
    assert additive_mask(given, 2, 2, "cpu").tolist() == [[0, inf], [0, 0]]
