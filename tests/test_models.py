import pytest
import torch

from selfexplain.groundtruth.models import ModelSpec, ModelSpecError, describe, load_model


def test_tiny_llama_is_deterministic_and_configurable():
    a, tok = load_model(ModelSpec("tiny-llama:hidden=48,layers=3,seed=5"))
    b, _ = load_model(ModelSpec("tiny-llama:hidden=48,layers=3,seed=5"))
    c, _ = load_model(ModelSpec("tiny-llama:hidden=48,layers=3,seed=6"))
    assert a.config.hidden_size == 48 and a.config.num_hidden_layers == 3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    ids = tok("héllo", add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "héllo"


def test_unknown_spec_lists_accepted_forms():
    with pytest.raises(ModelSpecError) as err:
        describe("no such model")
    for form in ("tiny-llama", "smollm2-135m-instruct", "gemma-3-270m", "local folder", "hub id"):
        assert form in str(err.value)
    with pytest.raises(ModelSpecError, match="bad tiny model option"):
        load_model(ModelSpec("tiny-llama:width=3"))


def test_forms_are_recognised_without_loading(tmp_path):
    assert describe("meta-llama/Llama-3.1-8B-Instruct") == "hub id"
    assert describe("smollm2-135m-instruct") == "packaged GGUF"
    assert describe(str(tmp_path)) == "local folder"


def test_local_folder_round_trip(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(ModelSpec(str(tmp_path / "m")))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.pad_token_id == tok.pad_token_id


def test_folder_without_config_fails_clearly(tmp_path):
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model(ModelSpec(str(tmp_path)))
