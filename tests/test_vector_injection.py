"""Vector injection: the vector sits at [vec] and nowhere else; projections train or stay frozen."""
import pytest
import torch

from selfexplain.groundtruth.models import ModelSpec, load_model
from torch import nn

from selfexplain.training.explainer import add_vector_tokens, embedding_norm, projected_inputs
from selfexplain.training.projection import Projection, key_layers, vector_key


@pytest.fixture()
def explainer():
    model, tok = load_model(ModelSpec("tiny-llama:hidden=32,layers=2"))
    return model, tok, add_vector_tokens(model, tok)


def test_tokens_are_added_once_and_embeddings_resized(explainer):
    model, tok, ids = explainer
    n = len(tok)
    assert model.get_input_embeddings().weight.shape[0] == n
    assert add_vector_tokens(model, tok) == ids and len(tok) == n
    encoded = tok(f"At layer 3, {ids.text} encodes", add_special_tokens=False)["input_ids"]
    assert [i for i in encoded if i in (ids.begin, ids.vec, ids.end)] == [ids.begin, ids.vec, ids.end]


def _first_layer_input(model, embeds):
    seen = {}

    def record(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    hook = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    model(inputs_embeds=embeds)
    hook.remove()
    return seen["h"]


@pytest.mark.parametrize("kind", ["none", "random"])
def test_vector_is_at_vec_position_and_nowhere_else(explainer, kind):
    model, tok, ids = explainer
    texts = [f"Layer 1: {ids.text} means", f"x {ids.text}"]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    vectors = torch.randn(2, 32)
    projection = Projection(kind, ["1"], 32, 32)
    embeds = projected_inputs(model, projection, batch, ids.vec, vectors, ["1", "1"])
    hidden = _first_layer_input(model, embeds)  # what the first decoder layer receives
    plain = model.get_input_embeddings()(batch)
    expected = projection(vectors, ["1", "1"])
    if kind == "none":
        assert torch.equal(expected, vectors)
    at_vec = batch == ids.vec
    assert torch.allclose(hidden[at_vec], expected)
    assert torch.equal(hidden[~at_vec], plain[~at_vec]), "every other position keeps its token embedding"


def test_gradients_reach_a_trainable_projection_only(explainer):
    model, tok, ids = explainer
    batch = tok([f"{ids.text} is"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    for trainable in (True, False):
        projection = Projection("random", ["0", "4-7"], 48, 32, trainable=trainable)
        embeds = projected_inputs(model, projection, batch, ids.vec, torch.randn(1, 48), ["4-7"])
        model(inputs_embeds=embeds).logits.sum().backward()
        grad = projection.weight("4-7").grad
        assert (grad is not None and grad.abs().sum() > 0) if trainable else grad is None
        assert projection.weight("0").grad is None, "an unused layer's map gets no gradient"
        model.zero_grad()


def test_mismatched_sizes_need_a_projection():
    with pytest.raises(ValueError, match="cannot map target hidden size 48 to explainer hidden size 32"):
        Projection("none", ["0"], 48, 32)


def test_lstsq_recovers_a_linear_map():
    true = torch.randn(32, 48, dtype=torch.float64)  # [d_e, d_t]
    h_target = torch.randn(500, 48, dtype=torch.float64)
    h_explainer = h_target @ true.T + 1e-3 * torch.randn(500, 32, dtype=torch.float64)
    projection = Projection("lstsq", ["2"], 48, 32)
    error = projection.fit("2", h_target.float(), h_explainer.float())
    assert error < 1e-2 and projection.fit_error["2"]["fit"] == error
    assert torch.allclose(projection.weight("2").double(), true, atol=1e-2)


def test_projection_round_trips_through_its_file(tmp_path):
    projection = Projection("random", ["0-3", "4-7"], 48, 32)
    projection.fit_error["0-3"] = {"fit": 0.5}
    projection.save(tmp_path / "projection.safetensors")
    loaded = Projection.load(tmp_path / "projection.safetensors")
    assert loaded.keys == ["0-3", "4-7"] and loaded.fit_error == {"0-3": {"fit": 0.5}}
    vectors = torch.randn(3, 48)
    assert torch.equal(loaded(vectors, ["0-3", "4-7", "0-3"]), projection(vectors, ["0-3", "4-7", "0-3"]))
    assert not any(p.requires_grad for p in loaded.parameters()), "a loaded projection is frozen unless asked"


def test_vector_keys_name_layers_and_blocks():
    assert vector_key([5]) == "5" and vector_key(list(range(8, 16))) == "8-15"
    assert key_layers("8-15") == list(range(8, 16)) and key_layers("5") == [5]


def test_a_normed_projection_keeps_direction_and_survives_save_and_subset(tmp_path):
    projection = Projection("random", ["0-3", "4-7"], 48, 32)
    vectors = torch.randn(3, 48) * torch.tensor([[0.01], [100.0], [0.0]])
    keys = ["0-3", "4-7", "0-3"]
    plain = projection(vectors, keys)
    projection.norm = 3.0
    normed = projection(vectors, keys)
    assert torch.allclose(normed.norm(dim=-1), torch.tensor([3.0, 3.0, 0.0]))
    assert torch.allclose(normed[:2], plain[:2] / plain[:2].norm(dim=-1, keepdim=True) * 3.0, atol=1e-6)
    projection.save(tmp_path / "p.pt")
    assert Projection.load(tmp_path / "p.pt").norm == 3.0 and projection.subset(["4-7"]).norm == 3.0


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind: the module multiplies its rows by a constant."""

    def forward(self, ids):
        return super().forward(ids) * 5.0


def test_embedding_norm_is_the_mean_output_norm_over_the_vocabulary():
    embed = ScaledEmbedding(20_000, 16)  # more rows than one chunk
    model = type("M", (), {"get_input_embeddings": lambda self: embed})()
    slow = sum(embed(torch.tensor([i])).norm().item() for i in range(20_000)) / 20_000
    assert embedding_norm(model, chunk=8192) == pytest.approx(slow, rel=1e-5)
    assert embedding_norm(model) == pytest.approx(5.0 * embed.weight.norm(dim=-1).mean().item(), rel=1e-5)
