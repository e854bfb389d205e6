"""A model spread over several GPUs (device_map: embedding on the first, later layers, cache layers and the
final norm on others): index tensors must be host tensors, legal on every device, and a second model gets
only the memory the first left. A CPU has one device, so the 'other device' is played by meta tensors, the
layers staying on the CPU: an index made on the embedding's device lands on meta and is caught."""
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from selfexplain.groundtruth import generation
from selfexplain.groundtruth.models import gpu_memory_map
from selfexplain.groundtruth.patching import clean_runs


def _index_devices(monkeypatch) -> list:
    """Record the device of every index a cache layer is cut with (the layers' own selection)."""
    seen = []
    for layer_type in (DynamicLayer, generation.PreallocatedLayer):
        original = layer_type.batch_select_indices

        def spy(self, indices, _original=original):
            seen.append(indices.device)
            return _original(self, indices)

        monkeypatch.setattr(layer_type, "batch_select_indices", spy)
    return seen


def test_decoding_cuts_finished_rows_with_a_host_index(tiny, monkeypatch):
    model, tok = tiny
    prompts = [tok("The capital of France is")["input_ids"], tok("Rome")["input_ids"], tok("Hi there")["input_ids"]]
    cache, mask, logits = generation._run_prompts(model, prompts, tok.pad_token_id, ())
    cache, mask, logits = generation._decode_batch(model, [(cache, mask, logits)], room=4)
    seen = _index_devices(monkeypatch)
    # the mask and tokens where the embedding is (meta: another device than the cache's layers)
    mask, tokens = generation.keep_rows(cache, mask.to("meta"), logits.argmax(-1).to("meta"), writing=[0, 2])
    assert seen and all(d.type == "cpu" for d in seen), f"cache layers were cut with an index on {set(seen)}"
    assert mask.shape[0] == tokens.shape[0] == 2 and all(layer.keys.shape[0] == 2 for layer in cache.layers)


def test_clean_runs_ask_for_the_last_positions_with_a_host_index(monkeypatch):
    from selfexplain.groundtruth.models import ModelSpec, load_model

    model, _ = load_model(ModelSpec("tiny-llama"), "cpu")
    model.to("meta")  # the whole model elsewhere than the host: its head's input is not on the host
    asked = []
    model.register_forward_pre_hook(lambda m, args, kwargs: asked.append(kwargs.get("logits_to_keep")), with_kwargs=True)
    prompts = [torch.tensor([1, 5, 9, 7]), torch.tensor([1, 5, 9, 7, 3, 3])]  # two lengths: two positions kept
    with pytest.raises((NotImplementedError, RuntimeError)):  # a meta model's decisions cannot be read
        clean_runs(model, prompts)
    kept = asked[-1]
    assert isinstance(kept, torch.Tensor) and kept.device.type == "cpu" and kept.tolist() == [3, 5]


def test_a_second_model_gets_only_what_the_first_left(monkeypatch):
    gb = 1 << 30
    held = {0: 40 * gb, 1: 10 * gb}  # the target, spread over two 80 GB GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (80 * gb - held[i], 80 * gb))
    budget = gpu_memory_map(headroom=0.9)
    assert budget == {0: 32 * gb, 1: 62 * gb}, "free memory less a tenth of each GPU for activations"
    held[0] = 79 * gb
    assert gpu_memory_map(headroom=0.9)[0] == 0
