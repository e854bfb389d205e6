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


def test_a_reinitialised_model_keeps_its_tokenizer_and_shapes_and_changes_only_its_weights(tmp_path):
    """reinit:<source>, the random-weights control target: the source's tokenizer and config, weights drawn
    anew (seeded: every process gets the same); random: and tiny models cannot be re-initialised."""
    from selfexplain.groundtruth.models import hidden_size

    model, tok = load_model(ModelSpec("tiny-llama:hidden=48,layers=3,seed=5"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = ModelSpec(f"reinit:{tmp_path / 'm'}")
    assert describe(spec.source) == "re-initialised model" and hidden_size(spec) == 48
    fresh, fresh_tok = load_model(spec)
    again, _ = load_model(spec)
    assert fresh_tok.get_vocab() == tok.get_vocab() and fresh.config.num_hidden_layers == 3
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), again.parameters()))
    weights = [(p, q) for p, q in zip(fresh.parameters(), model.parameters()) if p.dim() == 2]
    assert not any(torch.equal(p, q) for p, q in weights)
    for bad in ("reinit:tiny-llama", "reinit:random:gemma-3-270m", "reinit:reinit:smollm2-135m-instruct"):
        with pytest.raises(ModelSpecError, match="reinit takes a packaged model"):
            describe(bad)


def test_folder_without_config_fails_clearly(tmp_path):
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model(ModelSpec(str(tmp_path)))


def test_the_kv_cache_goes_by_the_name_the_model_takes(tiny):
    """transformers renamed past_key_values to cache: a model whose forward takes `cache` gets it (no
    deprecation warning from the pinned version), one that takes only `past_key_values` (the GPU image's
    5.17) gets that; outputs are read under the name their class declares."""
    import logging
    import warnings
    from dataclasses import dataclass

    from selfexplain.groundtruth.generation import greedy_generate
    from selfexplain.groundtruth.kv_cache import cache_kwargs, cache_of
    from selfexplain.groundtruth.patching import clean_runs

    model, tok = tiny

    class OldModel:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    @dataclass
    class OldOutput:
        past_key_values: object = None

    assert cache_kwargs(OldModel(), "kv") == {"past_key_values": "kv"} and cache_of(OldOutput("kv")) == "kv"
    assert cache_kwargs(model, "kv") == {"cache": "kv"}
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert cache_of(out) is not None and cache_of(out).get_seq_length() == 3
    def deprecations(run) -> list[str]:
        """What transformers says is deprecated while `run` runs: its logger and Python warnings."""
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        logging.Logger.warning_once.cache_clear()  # transformers warns once per process: each run must be able to
        logger = logging.getLogger("transformers")
        level = logger.level  # other tests quieten transformers
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        return [m for m in seen + [str(w.message) for w in caught] if "deprecated" in m]

    prompts = [tok("Hello there").input_ids, tok("Hello you").input_ids]
    assert deprecations(lambda: greedy_generate(model, tok, prompts, max_new_tokens=3)) == []
    same_length = [torch.tensor(tok(text).input_ids) for text in ("The cat sat", "The dog sat")]
    assert deprecations(lambda: clean_runs(model, same_length, keep_cache=(0,))[0].cache.get_seq_length()) == []

    def old_names():
        out = model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
        model(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True)

    assert len(deprecations(old_names)) == 2, "the check can see the old names"
