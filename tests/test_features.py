"""Feature descriptions: WordNet reading, activations, SAE, exemplars, describers, simulators, judges,
the endpoint client against a local fake server, Neuronpedia import."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from selfexplain.groundtruth.errors import DataSourceError
from selfexplain.groundtruth.features.activations import ActivationBatch, corpus_activations
from selfexplain.groundtruth.features.describers import (DESCRIBERS, DescriberSettings, best_description, describe_features,
                                                         top_tokens, wordnet_describer)
from selfexplain.groundtruth.features.endpoint import ChatEndpoint, EndpointConfig, EndpointError
from selfexplain.groundtruth.features.exemplars import FeatureExemplars, Window, merge_exemplars, mine_exemplars
from selfexplain.groundtruth.features.neuronpedia import load_neuronpedia
from selfexplain.groundtruth.features.simulators import LexicalSimulator, LLMSimulator, simulation_score
from selfexplain.groundtruth.sources.wordnet import category_members, load_synsets, parse_data_line

MEMBERS = {"noun.animal": frozenset({"dog", "cat", "horse", "mule", "ox"}), "noun.location": frozenset({"paris", "rome", "city"})}
lexical = LexicalSimulator(members=lambda c: MEMBERS.get(c, frozenset()))


def animal_feature() -> FeatureExemplars:
    """A feature that fires on animal words (strongest on 'dog'), silent elsewhere."""
    def window(words, acts):
        return Window([" " + w for w in words], acts)
    top = [window(["the", "dog", "ran"], [0, 5.0, 0]), window(["a", "cat", "sat"], [0, 4.0, 0]),
           window(["my", "dog", "barked"], [0, 4.5, 0]), window(["one", "horse", "ate"], [0, 3.0, 0.2]),
           window(["the", "mule", "slept"], [0, 2.8, 0]), window(["an", "ox", "pulled"], [0, 2.7, 0])]
    negatives = [window(["in", "paris", "today"], [0, 0, 0]), window(["rome", "is", "old"], [0, 0, 0.1])]
    return FeatureExemplars(layer=3, feature=7, top=top, negatives=negatives, active_tokens=6, tokens=24)


def test_wordnet_data_lines_parse_into_categories_words_and_examples():
    line = ('02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis; '
            '"the dog barked all night"  ')
    s = parse_data_line(line)
    assert s.category == "noun.animal" and s.words == ("dog", "domestic dog", "canis familiaris")
    assert s.examples == ("the dog barked all night",) and s.gloss == "a member of the genus Canis"


def test_installed_wordnet_has_its_45_categories():
    synsets = load_synsets()
    assert len(synsets) > 100_000
    members = category_members()
    assert len(members) == 45 and "dog" in members["noun.animal"] and "run" in members["verb.motion"]


def test_lexical_simulation_ranks_a_matching_description_above_wrong_ones():
    ex = animal_feature()
    right = simulation_score(lexical, 'words for animals (noun.animal), such as "dog"', ex)
    tokens = simulation_score(lexical, 'the tokens "dog" and "cat"', ex)
    wrong = simulation_score(lexical, 'words for places (noun.location), such as "paris"', ex)
    nothing = simulation_score(lexical, "nothing quoted here", ex)
    assert right > 0.9 and tokens > 0.7 and right > tokens > wrong and nothing == 0.0


def test_describers_find_the_feature_and_the_best_candidate_wins():
    ex = animal_feature()
    assert top_tokens(ex)[:2] == ['the token "dog"', 'the tokens "dog" and "cat"']
    described = wordnet_describer(MEMBERS)(ex)
    assert described[0].startswith("words for animals (noun.animal), such as") and '"dog"' in described[0]
    candidates = describe_features([ex], {"top_tokens": top_tokens, "wordnet": wordnet_describer(MEMBERS)})[0]
    best = best_description(ex, candidates, lexical)
    text, describer, score, candidates = best
    assert describer == "wordnet" and score == max(c["simulation"] for c in candidates) and len(candidates) >= 4


def dense_exemplars(batch, codes: np.ndarray, top_k: int, negatives: int, before: int, after: int, seed: int = 0,
                    shard: int = 0) -> dict:
    """The slow, obvious reference: every feature's dense codes at once, its top_k texts by their maximum."""
    import random

    starts = np.unique(batch.text_of, return_index=True)[1]
    ends = np.append(starts[1:], len(batch.text_of))
    negative_texts = random.Random(seed).sample(range(len(starts)), min(negatives, len(starts)))
    out = {}
    for f in np.nonzero((codes > 0).sum(0))[0]:
        col = codes[:, f]
        maxima = [(col[s:e].max(), s + int(col[s:e].argmax()), s, e) for s, e in zip(starts, ends)]
        ranked = sorted(maxima, key=lambda m: -m[0])[:top_k]
        window = lambda lo, hi, origin=None: Window(batch.tokens[lo:hi], [round(float(a), 4) for a in col[lo:hi]], origin)  # noqa: E731
        ex = FeatureExemplars(0, int(f), active_tokens=int((col > 0).sum()), tokens=len(col))
        ex.top = [window(max(s, p - before), min(e, p + after + 1), [shard, p]) for m, p, s, e in ranked if m > 0]
        ex.negatives = [window(starts[i], min(ends[i], starts[i] + before + after + 1)) for i in negative_texts]
        out[int(f)] = ex
    return out


def test_streaming_exemplars_equal_the_dense_reference_and_merge_like_one_pass():
    rng = np.random.default_rng(0)
    n_texts, per_text, d_sae = 12, 6, 5
    tokens = [f" w{i}" for i in range(n_texts * per_text)]
    text_of = np.repeat(np.arange(n_texts), per_text)
    acts = np.maximum(rng.normal(size=(len(tokens), d_sae)), 0).astype(np.float32)
    identity = lambda rows: rows  # noqa: E731 (the "SAE" whose codes are the activations)
    whole = ActivationBatch(tokens, text_of, {0: acts})
    # chunks of 10 tokens: texts span chunk edges of the streaming passes
    one_pass = mine_exemplars(whole, 0, identity, top_k=3, negatives=2, before=2, after=1, chunk_tokens=10)
    assert {f: ex.to_json() for f, ex in one_pass.items()} == \
        {f: ex.to_json() for f, ex in dense_exemplars(whole, acts, 3, 2, 2, 1).items()}
    half = len(tokens) // 2
    parts = [mine_exemplars(ActivationBatch(tokens[s], text_of[s], {0: acts[s]}), 0, identity, 3, 0, 2, 1)
             for s in (slice(0, half), slice(half, None))]
    merged = merge_exemplars(parts, top_k=3, negatives=0)
    folded = merge_exemplars([merge_exemplars([{}, parts[0]], 3, 0), parts[1]], 3, 0)
    assert {f: ex.to_json() for f, ex in folded.items()} == {f: ex.to_json() for f, ex in merged.items()}
    assert set(merged) == set(one_pass)
    for f in one_pass:
        assert [w.peak for w in merged[f].top] == [w.peak for w in one_pass[f].top]
        assert merged[f].tokens == len(tokens) and merged[f].active_tokens == int((acts[:, f] > 0).sum())
        assert all(len(w.tokens) <= 4 for w in one_pass[f].top)


def test_corpus_activations_drop_the_first_position_and_match_the_residual_stream(tiny):
    from selfexplain.groundtruth.patching import layer_states

    model, tok = tiny
    texts = ["the cat sat on the mat", "a dog"]
    batch = corpus_activations(model, tok, texts, layers=[0, 1], batch_size=2)
    ids = tok(texts[0])["input_ids"]
    kept = [i for i in ids[1:] if i not in set(tok.all_special_ids)]
    assert batch.tokens[:len(kept)] == [tok.decode([i]) for i in kept]
    states = layer_states(model, torch.tensor(ids))  # [L + 1, T, d]
    first = batch.acts[1][:len(kept)]
    assert np.allclose(first, states[2, len(ids) - len(kept):].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        corpus_activations(model, tok, texts, layers=[99])


def test_sae_trains_on_activations_with_few_dead_features_and_round_trips(tmp_path):
    from selfexplain.groundtruth.features.sae import (
        SAEConfig,
        decoder_directions,
        encode,
        load_sae,
        sae_metrics,
        save_sae,
        train_sae,
    )

    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(32, 16)).astype(np.float32)  # sparse codes over 32 directions
    codes = (rng.random((3000, 32)) < 0.1) * rng.random((3000, 32))
    acts = (codes @ atoms).astype(np.float32)
    cfg = SAEConfig(d_sae=64, k=4, steps=300, batch_size=128, lr=3e-3)
    sae = train_sae(acts, cfg)
    metrics = sae_metrics(sae, acts)
    assert metrics["explained_variance"] > 0.6 and metrics["l0"] <= 4.0 and metrics["dead_fraction"] < 0.5
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "{layer}").replace("{layer}", "sae"), layer=3)
    assert np.allclose(encode(loaded, acts[:50]), encode(sae, acts[:50]), atol=1e-5)
    save_sae(loaded, tmp_path / "again")  # a loaded SAE (how a pretrained one arrives) saves as it is
    assert np.allclose(encode(load_sae(str(tmp_path / "again"), layer=3), acts[:50]), encode(sae, acts[:50]), atol=1e-5)
    directions = decoder_directions(loaded)
    assert directions.shape == (64, 16) and np.allclose(np.linalg.norm(directions, axis=1), 1, atol=1e-5)
    with pytest.raises(DataSourceError, match="cfg.json"):
        load_sae(str(tmp_path / "missing_{layer}"), 0)


class FakeChatServer:
    """A local server speaking the OpenAI chat-completions API; `answer(prompt)` writes the reply.
    The first `fail_first` requests get HTTP 503 (retried by the client)."""

    def __init__(self, answer, fail_first: int = 0):
        self.prompts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "fake"
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                prompt = body["messages"][-1]["content"]
                outer.prompts.append(prompt)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer(prompt)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.fail_first = fail_first
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EndpointConfig:
        self.thread.start()
        return EndpointConfig(url=f"http://127.0.0.1:{self.server.server_port}/v1", model="fake", retries=2, timeout=10)

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def fake_llm(prompt: str) -> str:
    """Describes 'animals'; simulates 10 on animal tokens when the description mentions animals;
    grades 5 when both descriptions mention animals, else 1."""
    if "what does the feature respond to" in prompt:
        return "names of animals\n"
    if "index<TAB>value" in prompt:
        listing = prompt.split("\n\n")[-1].splitlines()
        animal = "animal" in prompt.split("Its description:")[1].split("\n")[0]
        return "\n".join(f"{line.split(chr(9))[0]}\t{10 if animal and any(a in line for a in ('dog', 'cat', 'horse')) else 0}"
                         for line in listing)
    a, b = prompt.split("Description A:")[1].split("Description B:")
    return "5" if "animal" in a and "animal" in b else "1"


def test_llm_describer_simulator_and_judge_through_a_fake_endpoint():
    from selfexplain.eval.judges import make_judge

    ex = animal_feature()
    with FakeChatServer(fake_llm, fail_first=1) as endpoint:
        describe = DESCRIBERS["llm"](DescriberSettings(endpoint=endpoint))
        assert describe(ex) == ["names of animals"]
        simulator = LLMSimulator(ChatEndpoint(endpoint))
        assert simulation_score(simulator, "names of animals", ex) > simulation_score(simulator, "places", ex)
        judge = make_judge("llm", endpoint)
        assert judge.grade(["animal words", "city names"], ["names of animals", "names of animals"]) == [1.0, 0.0]
    with pytest.raises(EndpointError, match="gave up after 1 attempts"):
        ChatEndpoint(EndpointConfig(url=endpoint.url, model="fake", retries=0, timeout=2)).complete(
            [{"role": "user", "content": "hi"}])


def test_many_requests_to_a_server_are_in_flight_at_once_and_answered_in_order():
    """complete_many keeps up to batch_size requests open (a server batches them), replies in request order."""
    lock, state = threading.Lock(), {"open": 0, "most": 0}

    def slow_echo(prompt: str) -> str:
        with lock:
            state["open"] += 1
            state["most"] = max(state["most"], state["open"])
        time.sleep(0.3)
        with lock:
            state["open"] -= 1
        return prompt.upper()

    with FakeChatServer(slow_echo) as endpoint:
        client = ChatEndpoint(dataclasses.replace(endpoint, batch_size=4))
        prompts = [f"request {i}" for i in range(8)]
        assert client.complete_many([[{"role": "user", "content": p}] for p in prompts]) == [p.upper() for p in prompts]
    assert state["most"] == 4 and client.calls == 8


def test_a_local_model_serves_the_llm_clients_offline_one_request_or_many():
    """url: local runs the model in this process: a batch of requests gets each request's own greedy
    answer (as one decoded alone), a system message leads the prompt, and every client shares one copy."""
    from selfexplain.groundtruth.features.endpoint import client_for
    from selfexplain.groundtruth.features.local_chat import LocalChat, _loaded, render_messages
    from selfexplain.groundtruth.generation import greedy_generate

    cfg = EndpointConfig(url="local", model="tiny-llama:hidden=32,layers=2,seed=4", max_tokens=5, batch_size=2)
    client = client_for(cfg, "the llm describer")
    assert isinstance(client, LocalChat)
    requests = [[{"role": "user", "content": text}] for text in ("a cat", "the dog ran far", "x", "Q: 1+1?")]
    requests.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "why"}])
    model, tok = _loaded(client.model, client.device)
    for p in model.parameters():
        p.data *= 3  # a sharp random model: answers differ per prompt
    replies = client.complete_many(requests)
    for p in (client_for(cfg, "the llm judge"), LocalChat(cfg.model)):
        assert _loaded(p.model, p.device)[0] is model
    rendered = tok.decode(render_messages(tok, requests[-1]))
    assert "Be brief." in rendered and rendered.index("Be brief.") < rendered.index("why")
    alone = [greedy_generate(model, tok, [render_messages(tok, m)], 5, batch_size=1)[0] for m in requests]
    assert replies == alone and len(set(replies)) > 1
    assert client.complete(requests[1]) == replies[1] and client.calls == len(requests) + 1
    with pytest.raises(ValueError, match="one turn"):
        client.complete([{"role": "assistant", "content": "hi"}])


def test_a_batched_describer_gets_the_features_a_chunk_at_a_time():
    class Spy:
        def __init__(self):
            self.sizes = []

        def __call__(self, ex):
            raise AssertionError("a describer with `many` is asked in chunks")

        def many(self, exemplars):
            self.sizes.append(len(exemplars))
            return [[f"feature with {len(ex.top)} exemplars"] for ex in exemplars]

    spy, features = Spy(), [animal_feature() for _ in range(5)]
    features[3].top = features[3].top[:2]
    rows = describe_features(features, {"spy": spy, "top_tokens": top_tokens}, chunk=2)
    assert spy.sizes == [2, 2, 1]
    assert [r["spy"] for r in rows] == [["feature with 6 exemplars"]] * 3 + [["feature with 2 exemplars"], ["feature with 6 exemplars"]]
    assert all(r["top_tokens"] == top_tokens(ex) for r, ex in zip(rows, features))


def test_embedding_judge_prefers_the_matching_description():
    from selfexplain.eval.judges import make_judge

    judge = make_judge("embedding")
    gold = ["words for animals, such as dog and horse", 'the tokens "Paris" and "Rome"']
    right = judge.grade(['words for animals (noun.animal), such as "cat"', 'the tokens "Rome" and "Paris"'], gold)
    wrong = judge.grade(['the tokens "Rome" and "Paris"', 'words for animals (noun.animal), such as "cat"'], gold)
    assert all(0 <= g <= 1 for g in right + wrong) and right[0] > wrong[0] and right[1] > wrong[1]
    assert judge.grade(["same text"], ["same text"])[0] == pytest.approx(1.0, abs=1e-4)


def test_neuronpedia_export_loads_and_bad_rows_are_named(tmp_path):
    export = [{"modelId": "llama3.1-8b", "layer": "12-llamascope-res-131k", "index": "345", "description": "legal terms"},
              {"modelId": "llama3.1-8b", "layer": "12-llamascope-res-131k", "index": "345", "description": "law words"},
              {"modelId": "llama3.1-8b", "layer": "3-llamascope-res-131k", "index": "7", "description": "animals"}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    table = load_neuronpedia(str(path))
    assert table == {(12, 345): ["legal terms", "law words"], (3, 7): ["animals"]}
    describe = DESCRIBERS["neuronpedia"](DescriberSettings(neuronpedia=table))
    assert describe(animal_feature()) == ["animals"]
    path.write_text(json.dumps(export + [{"layer": "4-x", "description": "no index"}]))
    with pytest.raises(ValueError, match="explanation 3"):
        load_neuronpedia(str(path))
    path.write_text(json.dumps(export + [{"layer": "5-x", "index": "1", "description": None}]))
    with pytest.raises(ValueError, match="explanation 3: description must be a non-empty string"):
        load_neuronpedia(str(path))  # never a feature labelled None


def feature_record(layer: int, feature: int, vector, description: str):
    from selfexplain.groundtruth.records import Record

    ex = animal_feature()
    return Record(record_id=f"L{layer}-F{feature}", task="feature_descriptions", target="t", split="raw",
                  source_id=f"L{layer}-F{feature}", prompt="", question="", explanation=description, changed=False,
                  output_before="", output_after="", layers=[layer], vector=np.asarray(vector, dtype=np.float32),
                  query={"simulation": 0.5, "describer": "top_tokens", "exemplars": ex.to_json()})


def test_features_are_held_out_whole_per_layer():
    from selfexplain.groundtruth.features.task import FeatureConfig, split_features

    records = [feature_record(layer, f, [1.0, 0.0], f"d{f}") for layer in (2, 5) for f in range(20)]
    train, test = split_features(records, FeatureConfig(test_features_per_layer=4, max_train_features_per_layer=10), seed=0)
    assert [sum(r.layers[0] == l for r in test) for l in (2, 5)] == [4, 4]
    assert [sum(r.layers[0] == l for r in train) for l in (2, 5)] == [10, 10]
    assert not {r.source_id for r in train} & {r.source_id for r in test}
    assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}


def test_nearest_neighbour_takes_the_label_of_the_largest_dot_product_in_the_same_layer_else_any():
    from selfexplain.eval.baselines import BASELINES

    train = [feature_record(1, 0, [1, 0], "one-x"), feature_record(1, 1, [0, 1], "one-y"), feature_record(2, 2, [5, 5], "two")]
    test = [feature_record(1, 9, [0.2, 0.9], "?"), feature_record(1, 8, [3, -1], "?"), feature_record(2, 7, [-1, 0], "?")]
    assert BASELINES["nearest_neighbour"].predict(train, test) == ["one-y", "one-x", "two"]
    elsewhere = [feature_record(3, 6, [4, 6], "?"), feature_record(3, 5, [2, -9], "?")]  # no train record at layer 3
    assert BASELINES["nearest_neighbour"].predict(train, elsewhere) == ["two", "one-x"]
    assert not BASELINES["nearest_neighbour"].applies_to("input_ablation")


def test_description_scores_rank_the_right_description_first():
    from selfexplain.eval.metrics import score_descriptions

    class WordJudge:  # 1 when the two texts share a word, else 0
        def grade(self, predictions, golds):
            return [float(bool(set(p.split()) & set(g.split()))) for p, g in zip(predictions, golds)]

    records = [feature_record(1, 0, [1, 0], 'words for animals (noun.animal), such as "dog"')]
    right = score_descriptions(['the tokens "dog" and "cat"'], records, WordJudge(), lexical)
    wrong = score_descriptions(['the token "paris"'], records, WordJudge(), lexical)
    assert right["simulation"] > 0.5 > wrong["simulation"] and right["n"] == 1


def test_ood_sets_read_the_peak_activation_and_swap_the_peak_token():
    from selfexplain.groundtruth.features.ood import act_records, dact_pair, dact_records

    record = feature_record(1, 0, [1.0, 0.0], "animals")
    ex = animal_feature()
    ex.top[0].origin = [2, 17]
    record.query["exemplars"] = ex.to_json()
    seen = []

    def activation_at(shard, index, layer):
        seen.append((shard, index, layer))
        return np.array([3.0, 4.0])

    act = act_records([record], activation_at)
    assert seen == [(2, 17, 1)] and act[0].split == "act" and np.allclose(act[0].vector, [0.6, 0.8])
    assert act[0].explanation == "animals" and act[0].record_id.endswith("-act")
    assert dact_pair(ex) == (" the dog", " the in")  # the peak token swapped for a silent one
    dact = dact_records([record], lambda texts, layer: np.array([[1.0, 2.0], [1.0, 0.0]]))
    assert np.allclose(dact[0].vector, [0.0, 1.0]) and dact[0].query["dact_prompts"] == [" the dog", " the in"]


def test_selfie_reports_the_best_scale():
    from selfexplain.distributed.eval_pool import best_scale

    scale, metrics = best_scale({1.0: {"judge": 0.4}, 10.0: {"judge": 0.7}, 50.0: {"judge": 0.7}}, "judge")
    assert scale == 10.0 and metrics["judge"] == 0.7 and metrics["judge_by_scale"] == {"1.0": 0.4, "10.0": 0.7, "50.0": 0.7}


def test_data_efficiency_subsets_are_the_first_records_of_each_layer(tmp_path):
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.groundtruth.records import write_split
    from selfexplain.training.job import TrainJob

    records = [feature_record(layer, f, [1.0, 0.0], f"d{f}") for layer in (1, 2) for f in range(5)]
    write_split(tmp_path / "train", records, "h", 100)
    job = TrainJob("feature_descriptions", "t", "t", ModelSpec("tiny-llama"), str(tmp_path / "train"), str(tmp_path / "out"),
                   max_records_per_layer=2)
    assert [r.record_id for r in job.records()] == ["L1-F0", "L1-F1", "L2-F0", "L2-F1"]
    assert job.records_per_layer() == 2
    full = TrainJob("feature_descriptions", "t", "t", ModelSpec("tiny-llama"), str(tmp_path / "train"), str(tmp_path / "o2"))
    assert len(full.records()) == 10 and full.records_per_layer() == 5


MINE_AT_SCALE = r"""
import json, resource, sys
import numpy as np, torch
from selfexplain.groundtruth.features.activations import ActivationBatch
from selfexplain.groundtruth.features.exemplars import mine_exemplars

torch.set_num_threads(1)
d_in, d_sae, per_text, n_texts = 32, 131_072, 32, 256
rng = np.random.default_rng(0)
acts = rng.normal(size=(per_text * n_texts, d_in)).astype(np.float32)
batch = ActivationBatch([f" t{i}" for i in range(len(acts))], np.repeat(np.arange(n_texts), per_text), {0: acts})
weight = torch.from_numpy(rng.normal(size=(d_in, d_sae)).astype(np.float32))  # a random 131,072-feature encoder
encode = lambda rows: torch.relu(rows @ weight - 25.0)  # 4.4 sigma: a few features in a hundred ever fire
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mined = mine_exemplars(batch, 0, encode, top_k=5, negatives=2, chunk_tokens=256)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "dense": len(acts) * d_sae * 4, "features": len(mined),
                  "windows": sum(len(e.top) for e in mined.values())}))
"""


def test_exemplars_of_a_131k_feature_sae_are_mined_within_bounded_memory():
    """Streaming top-k: the peak memory of mining stays far below the dense [tokens, d_sae] codes."""
    import subprocess
    import sys

    # a fresh process, so its peak resident size is this mining's alone
    out = subprocess.run([sys.executable, "-c", MINE_AT_SCALE], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[memory] mining 131,072 features over 8,192 tokens: peak grew {measured['growth'] / 1e6:.0f} MB; "
          f"dense codes would be {measured['dense'] / 1e9:.1f} GB; {measured['features']} features fired")
    assert measured["dense"] > 4e9 and measured["growth"] < 1e9  # chunk codes and the encoder's temporaries
    assert measured["features"] > 500 and measured["windows"] >= measured["features"]


def test_the_feature_recipe_runs_in_one_process_and_redoes_only_what_is_missing(tmp_path, monkeypatch):
    """Task A's staged recipe without Ray: activations -> SAEs -> exemplars -> described splits -> ACT/dACT;
    a rerun after deleting one exemplar shard and the test split redoes just those and gives the same set."""
    import dataclasses
    import shutil

    from selfexplain.groundtruth.features import recipe
    from selfexplain.groundtruth.features.sae import SAEConfig
    from selfexplain.groundtruth.features.task import FeatureConfig
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.groundtruth.records import iter_records
    from selfexplain.groundtruth.stages import StageContext, run_in_process

    cfg = FeatureConfig(layers=[1], corpus=["wordnet"], corpus_texts=120, texts_per_shard=40, max_tokens=24,
                        sae=SAEConfig(d_sae=64, k=4, steps=80, batch_size=64), top_k=6, negatives=4, min_exemplars=3,
                        test_features_per_layer=6)
    ctx = StageContext(task="feature_descriptions", task_cfg=cfg, target="t", model=ModelSpec("tiny-llama"),
                       folder=tmp_path / "gt", config_hash="c" * 64, seed=0, batch_size=8, shard_size=16)
    stats = run_in_process(recipe.FEATURE_RECIPE, ctx)
    assert len(list((ctx.work / "activations").iterdir())) == 3 and stats["sae"]["1"]["d_sae"] == 64
    train = {r.source_id: r.explanation for r in iter_records(ctx.folder / "train")}
    test = [r.source_id for r in iter_records(ctx.folder / "test")]
    assert len(test) == 6 and train and not set(train) & set(test)
    act = list(iter_records(ctx.folder / "act"))
    assert act and {r.split for r in act} == {"act"} and all(abs(np.linalg.norm(r.vector) - 1) < 1e-4 for r in act)
    assert stats["test"]["count"] == 6 and stats["act"]["count"] == len(act)

    assert run_in_process(recipe.FEATURE_RECIPE, ctx) == stats  # finished: read back, nothing run
    shutil.rmtree(ctx.folder / "test")
    shutil.rmtree(ctx.work / "exemplars" / "shard-000001")
    ran = []

    def counted(step):  # the step, noting each unit it runs
        def run(ctx, unit, *target):
            ran.append((step.name, unit))
            return step.run(ctx, unit, *target)
        return dataclasses.replace(step, run=run)

    watched = dataclasses.replace(recipe.FEATURE_RECIPE, steps=tuple(map(counted, recipe.FEATURE_RECIPE.steps)))
    again = run_in_process(watched, ctx)
    assert ran == [("exemplars", 1), ("describe", 0), ("ood sets", 0)]
    assert {r.source_id: r.explanation for r in iter_records(ctx.folder / "train")} == train
    assert [r.source_id for r in iter_records(ctx.folder / "test")] == test and again["test"] == stats["test"]


def city_feature() -> FeatureExemplars:
    """A feature that fires on city names, silent elsewhere."""
    def window(words, acts):
        return Window([" " + w for w in words], acts)
    top = [window(["in", "paris", "today"], [0, 5.0, 0]), window(["rome", "is", "old"], [4.0, 0, 0]),
           window(["to", "paris", "again"], [0, 4.2, 0])]
    return FeatureExemplars(layer=3, feature=8, top=top, negatives=[window(["the", "dog", "ran"], [0, 0, 0])],
                            active_tokens=3, tokens=12)


def test_discriminative_metric_ranks_a_description_against_other_features_exemplars():
    """top1: a description simulated on its own feature's exemplars must beat K other features'. Right
    descriptions rank first; swapped ones rank last; a description that fits no feature ties and counts as last."""
    import dataclasses

    from selfexplain.eval.metrics import score_descriptions

    class NoJudge:
        def grade(self, predictions, golds):
            return [0.0] * len(predictions)

    animal = feature_record(1, 0, [1, 0], "animals")
    city = dataclasses.replace(feature_record(1, 1, [0, 1], "cities"),
                               query={**animal.query, "exemplars": city_feature().to_json()})
    records = [animal, city]
    right = score_descriptions(['the tokens "dog" and "cat"', 'the tokens "paris" and "rome"'], records, NoJudge(), lexical)
    swapped = score_descriptions(['the tokens "paris" and "rome"', 'the tokens "dog" and "cat"'], records, NoJudge(), lexical)
    same = score_descriptions(['the token "zebra"'] * 2, records, NoJudge(), lexical)
    assert (right["top1"], right["mean_rank"], right["top1_chance"]) == (1.0, 1.0, 0.5)
    assert (swapped["top1"], swapped["mean_rank"]) == (0.0, 2.0)
    assert same["top1"] == 0.0
