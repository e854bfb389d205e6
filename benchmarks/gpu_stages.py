"""The GPU check's stages that run no training: patching (fp32 and bf16) and head patching against the hooked reference,
attribution patching with and without the QK fix, chat templates, the lstsq fit, generation with v injected, continuous batching, the SAE, and a model spread over two GPUs."""
from __future__ import annotations

import copy
import math
import time

from .gpu_common import REPO, SUBJECTS, TEMPLATES, Check, Outcome, Skipped, body_params, facts_pairs, params

PAPER_RECIPE = "configs/paper/activation_patching.yaml"

QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat template, cut to what matters: the assistant turn opens, and an empty thinking block is
closed only when enable_thinking is false (otherwise the model opens <think> and reasons first)."""


def _load_target(c: Check, dtype: str):
    from selfexplain.groundtruth.models import ModelSpec, load_model

    return load_model(ModelSpec(c.size.target, dtype), c.device)


def _patch_compare(c: Check, model, tok, tie_margin: float) -> Outcome:
    """The fast patcher against one hooked forward per intervention on the target as loaded: labels must
    agree wherever the reference's decision is not a near-tie (top-two logit gap under tie_margin)."""
    from selfexplain.groundtruth.fact_pairs import encode_pair
    from selfexplain.groundtruth.patching import Intervention, decoder_layers, layer_blocks, patch_fast, patch_slow
    from selfexplain.groundtruth.patching_task import PatchingConfig, align

    cfg = PatchingConfig(num_blocks=4)
    n_layers = len(decoder_layers(model))
    blocks = layer_blocks(n_layers, 4)
    per_layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    head = model.config.hidden_size * model.config.vocab_size
    same = excused = near_ties = decisions = changed = tokens = 0
    flops = fast_s = slow_s = 0.0
    for item in facts_pairs(c.size.pairs):
        x, xp = encode_pair(tok, cfg, item)
        plan = [Intervention(b, t, align(t, x, xp)) for b in range(4) for t in range(len(x.ids))]
        c.sync()
        start = time.perf_counter()
        fast = patch_fast(model, x.ids, xp.ids, blocks, plan)
        c.sync()
        fast_s += time.perf_counter() - start
        start = time.perf_counter()
        slow = patch_slow(model, x.ids, xp.ids, blocks, plan)
        c.sync()
        slow_s += time.perf_counter() - start
        for got, want in zip([fast[0], *fast[1]], [slow[0], *slow[1]]):
            tie = want.margin < tie_margin
            same += got.token == want.token
            excused += got.token != want.token and tie
            near_ties += tie
        decisions += 1 + len(plan)
        changed += sum(d.token != slow[0].token for d in slow[1])
        tokens += len(x.ids) * len(plan) + len(x.ids) + len(xp.ids)
        flops += 2 * 2 * len(x.ids) * n_layers * per_layer  # the clean runs of x and x'
        flops += sum(2 * len(x.ids) * (n_layers - blocks[iv.block][0]) * per_layer + 2 * head for iv in plan)
    return Outcome(same + excused == decisions, fast_s, tokens, flops, {
        "model": c.size.target, "dtype": str(next(model.parameters()).dtype), "labels_agree": f"{same}/{decisions}",
        "differ_at_near_ties": excused, "near_ties": f"{near_ties} (top-two gap < {tie_margin:g})", "changed": changed,
        "speedup_vs_hooked": round(slow_s / fast_s, 2), "on": str(next(model.parameters()).device)})


def stage_patching(c: Check) -> Outcome:
    """fp32, as ground truth decides labels; then the records of the pairs, for the stages after."""
    from selfexplain.groundtruth.patching_task import PatchingConfig, run_patching

    model, tok = _load_target(c, "float32")
    out = _patch_compare(c, model, tok, tie_margin=1e-3)
    c.records = run_patching(model, tok, facts_pairs(c.size.pairs), PatchingConfig(num_blocks=4), "t",
                             lambda s: "test" if s.endswith(("-0", "-1")) else "train")
    out.details["records"] = len(c.records)
    return out


def stage_patching_bf16(c: Check) -> Outcome:
    """bf16 weights: batched and one-at-a-time kernels round differently, so labels may differ where the
    reference's top two are within the near-tie margin ground truth flags (PatchingConfig.near_tie_margin)."""
    from selfexplain.groundtruth.dataset import SplitConfig

    return _patch_compare(c, *_load_target(c, "bfloat16"), tie_margin=SplitConfig().near_tie_margin)


def stage_head_patching(c: Check) -> Outcome:
    """Head patching in fp32: every head's one-token row over x's cached keys and values against one hooked
    full forward per head; labels must agree wherever the reference's decision is not a near-tie."""
    from selfexplain.groundtruth.fact_pairs import encode_pair
    from selfexplain.groundtruth.head_patching import every_head, patch_heads, patch_heads_slow
    from selfexplain.groundtruth.head_patching_task import HeadPatchingConfig
    from selfexplain.groundtruth.patching import decoder_layers

    model, tok = _load_target(c, "float32")
    cfg, heads = HeadPatchingConfig(), every_head(model)
    per_token = 2 * sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    same = excused = decisions = changed = tokens = 0
    flops = fast_s = slow_s = 0.0
    for item in facts_pairs(c.size.pairs):
        x, xp = encode_pair(tok, cfg, item)
        c.sync()
        start = time.perf_counter()
        fast = patch_heads(model, x.ids, xp.ids, heads)
        c.sync()
        fast_s += time.perf_counter() - start
        start = time.perf_counter()
        slow = patch_heads_slow(model, x.ids, xp.ids, heads)
        c.sync()
        slow_s += time.perf_counter() - start
        for got, want in zip([fast.clean, *fast.patched], [slow.clean, *slow.patched]):
            same += got.token == want.token
            excused += got.token != want.token and want.margin < 1e-3
        decisions += 1 + len(heads)
        changed += sum(d.token != slow.clean.token for d in slow.patched)
        tokens += len(x.ids) + len(xp.ids) + len(heads)
        flops += per_token * (len(x.ids) + len(xp.ids) + len(heads))
    return Outcome(same + excused == decisions, fast_s, tokens, flops, {
        "model": c.size.target, "heads": len(heads), "labels_agree": f"{same}/{decisions}", "differ_at_near_ties": excused,
        "changed": changed, "speedup_vs_hooked": round(slow_s / fast_s, 2)})


def stage_atp(c: Check) -> Outcome:
    """Attribution patching on the device, fp32: every (block, position) of each pair estimated by AtP and
    by AtP* with the QK fix, against the exact labels (fast patcher). Passes where the fixed layer's
    patched probabilities equal a patched forward's at one site and every estimate is finite; reports the
    recall of changed labels among each pair's top fifth by |estimate| for both."""
    from selfexplain.groundtruth.attribution_patching import ATP_PASSES, block_estimates
    from selfexplain.groundtruth.fact_pairs import encode_pair
    from selfexplain.groundtruth.patching import Intervention, clean_runs, decoder_layers, layer_blocks, patch_fast
    from selfexplain.groundtruth.patching_task import PatchingConfig, align
    from selfexplain.groundtruth.qk_fix import patched_probs, query_key, recorded_attention
    import torch

    model, tok = _load_target(c, "float32")
    layers, cfg = decoder_layers(model), PatchingConfig(num_blocks=4)
    blocks = layer_blocks(len(layers), 4)
    per_token = 2 * sum(p.numel() for layer in layers for p in layer.parameters())
    found, seconds, changed, finite, worst = {False: 0, True: 0}, {False: 0.0, True: 0.0}, 0, True, 0.0
    tokens = 0
    for item in facts_pairs(c.size.pairs):
        x, xp = encode_pair(tok, cfg, item)
        plan = [Intervention(b, t, align(t, x, xp)) for b in range(4) for t in range(len(x.ids))]
        clean, source = clean_runs(model, [x.ids, xp.ids])
        labels = [d.token != clean.decision.token for d in patch_fast(model, x.ids, xp.ids, blocks, plan)[1]]
        changed += sum(labels)
        tokens += len(x.ids)
        for fix in (False, True):
            c.sync()
            start = time.perf_counter()
            estimates = block_estimates(model, x.ids, clean.states, source.states, blocks, plan, qk_fix=fix)
            c.sync()
            seconds[fix] += time.perf_counter() - start
            finite &= all(math.isfinite(e) for e in estimates)
            top = sorted(range(len(plan)), key=lambda k: -abs(estimates[k]))[:math.ceil(0.2 * len(plan))]
            found[fix] += sum(labels[k] for k in top)
        layer, position = blocks[0][-1], len(x.ids) // 2  # layer + 1 reads v at the position
        v = source.states[layer + 1, align(position, x, xp)].to(c.device)
        seen, patched = [], []
        with torch.no_grad(), recorded_attention(layers, seen):
            model(input_ids=x.ids[None].to(c.device))

        def overwrite(module, args, output):
            (output[0] if isinstance(output, tuple) else output)[0, position] = v
            return output
        handle = layers[layer].register_forward_hook(overwrite)
        with torch.no_grad(), recorded_attention(layers, patched):
            model(input_ids=x.ids[None].to(c.device))
        handle.remove()
        with torch.no_grad():
            where = torch.tensor([position], device=c.device)
            predicted = patched_probs(seen[layer + 1], where, *query_key(layers[layer + 1], seen[layer + 1], v[None], where))
        worst = max(worst, float((predicted[0] - patched[layer + 1].probs[0].float()).abs().max()))
    return Outcome(finite and worst < 1e-4, seconds[True], tokens, ATP_PASSES * per_token * tokens, {
        "model": c.size.target, "changed": changed, "recall_top_fifth": {"atp": round(found[False] / max(changed, 1), 3),
                                                                          "atp_qk_fix": round(found[True] / max(changed, 1), 3)},
        "estimate_seconds": {"atp": round(seconds[False], 3), "atp_qk_fix": round(seconds[True], 3)},
        "patched_probs_max_error": worst})


def stage_chat_template(c: Check) -> Outcome:
    """A Qwen3-style template, rendered as ground truth, training and eval render prompts: the model spec's
    chat_template_kwargs close the thinking block; without them it stays open to the model."""
    import yaml

    from selfexplain.groundtruth.generation import render_prompt
    from selfexplain.groundtruth.models import ModelSpec, load_model

    start = time.perf_counter()
    qwen = yaml.safe_load((REPO / PAPER_RECIPE).read_text())["models"]["qwen"]  # the recipe's own spec
    spec = ModelSpec(**{**qwen, "source": c.size.target, "dtype": "float32"})
    _, tok = load_model(spec, "cpu")
    tok.chat_template = QWEN3_TEMPLATE
    ids = render_prompt(tok, "The capital of France is", "chat")
    rendered = tok.decode(ids)
    plain = copy.copy(tok)
    plain.chat_template_kwargs = {}
    open_block = tok.decode(render_prompt(plain, "The capital of France is", "chat"))
    ok = rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "<think>" not in open_block
    return Outcome(ok, time.perf_counter() - start, len(ids), 0.0, {
        "chat_template_kwargs": spec.chat_template_kwargs, "ends_with": rendered[-40:]})


def stage_lstsq(c: Check) -> Outcome:
    """Pi fitted between the target and a model of another family and width, on the device; kept for the
    cross-explainer's training."""
    from selfexplain.groundtruth.models import ModelSpec
    from selfexplain.training.projection import ProjectionConfig
    from selfexplain.training.projection import fit_projection
    from selfexplain.training.vectors import vector_keys

    corpus = c.work / "fit_corpus.txt"
    corpus.write_text("\n".join(f"{s} is a country; its capital and its language are known to many people {i}."
                                for i in range(c.size.fit_texts) for s in [SUBJECTS[i % len(SUBJECTS)]]))
    keys = vector_keys(c.records)
    cfg = ProjectionConfig(fit_corpus=str(corpus), fit_texts=c.size.fit_texts)
    target, explainer = ModelSpec(c.size.target, c.dtype), ModelSpec(c.size.cross, c.dtype)
    c.sync()
    start = time.perf_counter()
    c.projection = fit_projection(keys, target, explainer, cfg, seed=0, trainable=False, device=c.device)
    c.sync()
    seconds = time.perf_counter() - start
    n_params = body_params(target) + body_params(explainer)
    fit_error = c.projection.fit_error
    tokens = int(sum(e["tokens"] for e in fit_error.values()) / len(keys) * 1.25)  # fit + held-out
    errors = {k: round(e["heldout"], 3) for k, e in fit_error.items()}
    ok = all(0 <= e < 1.0 for e in errors.values())
    return Outcome(ok, seconds, tokens, 2.0 * n_params * tokens, {"keys": keys, "heldout_error": errors,
                                                                   "target": c.size.target, "explainer": c.size.cross})


def load_export(folder, device: str):
    from selfexplain.training.export import load_explainer

    return load_explainer(folder, {"task": "activation_patching", "target": "t"}, device)


def explain_held_out(c: Check, explainer: tuple) -> tuple[Outcome, list[str]]:
    """A loaded explainer (load_export) explains held-out records with v injected (batched, KV cache):
    timing, counts and its answers."""
    from selfexplain.eval.generate import explain
    from selfexplain.groundtruth.models import model_device
    from selfexplain.training.batches import encode_prompt

    model, tok, projection = explainer
    held = c.held_out
    c.sync()
    start = time.perf_counter()
    answers = explain(model, tok, held, "plain", max_new_tokens=50, batch_size=32, projection=projection)
    c.sync()
    seconds = time.perf_counter() - start
    generated = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    prompt = sum(len(encode_prompt(tok, r, "plain")) for r in held)
    return Outcome(len(answers) == len(held) > 0, seconds, generated, 2.0 * params(model) * (generated + prompt), {
        "records": len(held), "generated_tokens": generated, "prompt_tokens": prompt, "on": str(model_device(model)),
        "projection": f"{projection.kind} on {projection.weight(projection.keys[0]).device}, "
                      f"{projection.weight(projection.keys[0]).dtype}" if projection and projection.maps else None}), answers


def stage_generation(c: Check) -> Outcome:
    return explain_held_out(c, load_export(c.export, c.device))[0]


def stage_continuous(c: Check) -> Outcome:
    """Continuous batching against drained batches (greedy_generate's continuous=True / False) on the
    trained export's held-out questions with v left out, four batches' worth: the same greedy answers,
    and the seconds each takes (each timed after a warm-up run)."""
    from selfexplain.groundtruth.generation import greedy_generate
    from selfexplain.training.batches import encode_prompt

    model, tok, _ = load_export(c.export, c.device)
    prompts = [encode_prompt(tok, r, "plain", False) for r in c.held_out] * 4
    batch = max(2, len(prompts) // 4)
    seconds, answers = {}, {}
    for continuous in (True, False, True, False):
        c.sync()
        start = time.perf_counter()
        answers[continuous] = greedy_generate(model, tok, prompts, 50, batch, continuous=continuous)
        c.sync()
        seconds[continuous] = time.perf_counter() - start  # the second run of each: warmed up
    generated = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers[True])
    prompt = sum(map(len, prompts))
    return Outcome(answers[True] == answers[False], seconds[True], generated,
                   2.0 * params(model) * (generated + prompt), {
                       "prompts": len(prompts), "batch": batch, "continuous_s": round(seconds[True], 3),
                       "drain_s": round(seconds[False], 3), "continuous_vs_drain": round(seconds[False] / seconds[True], 3),
                       "answers_agree": f"{sum(a == b for a, b in zip(answers[True], answers[False]))}/{len(prompts)}"})


def stage_sae(c: Check) -> Outcome:
    import numpy as np

    from selfexplain.groundtruth.features.activations import ActivationBatch, write_activations
    from selfexplain.groundtruth.features.exemplars import mine_exemplars
    from selfexplain.groundtruth.features.sae import SAEConfig, encoder, sae_metrics, train_sae

    model, tok = _load_target(c, c.dtype)
    layer = model.config.num_hidden_layers // 2
    texts = [f"{SUBJECTS[i % len(SUBJECTS)]} {TEMPLATES[i % 2].format('it')} number {i}, said the report." for i in
             range(c.size.corpus_texts)]
    c.sync()
    start = time.perf_counter()
    n = write_activations(model, tok, texts, [layer], c.work / "acts", batch_size=64, max_tokens=48)
    c.sync()
    acts_s = time.perf_counter() - start
    batch = ActivationBatch.load(c.work / "acts")
    acts = np.asarray(batch.acts[layer])
    cfg = SAEConfig(d_sae=c.size.d_sae, k=c.size.sae_k, steps=c.size.sae_steps, batch_size=min(1024, len(acts) // 2))
    start = time.perf_counter()
    sae = train_sae(acts, cfg, device=c.device)
    c.sync()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    mined = mine_exemplars(batch, layer, encoder(sae), top_k=10, negatives=5, chunk_tokens=4096, device=c.device)
    c.sync()
    mine_s = time.perf_counter() - start
    metrics = sae_metrics(sae, acts)
    d = acts.shape[1]
    flops = 2.0 * params(model) * n + 6.0 * 2 * d * cfg.d_sae * cfg.steps * cfg.batch_size + 2 * 2 * d * cfg.d_sae * n
    ok = metrics["explained_variance"] > 0 and len(mined) > 0  # better than the mean; quality is tested elsewhere
    return Outcome(ok, acts_s + train_s + mine_s, n, flops, {
        "tokens": n, "activations_s": round(acts_s, 2), "train_s": round(train_s, 2), "mine_s": round(mine_s, 2),
        "d_sae": cfg.d_sae, "features_fired": len(mined), **{k: round(v, 3) for k, v in metrics.items()
                                                             if k in ("l0", "explained_variance", "dead_fraction")},
        "sae_on": str(sae.W_dec.device)})


def spread(model, devices: list):
    """The model's layers over two devices (accelerate's device_map, as load_model places a model on an
    actor holding several GPUs): the embedding on the first, the last layers and the final norm on the
    second. Returns the map."""
    from accelerate import dispatch_model, infer_auto_device_map

    if devices[0] == devices[1]:  # one device (a CPU run of the stage's logic): nothing to spread
        return {"": devices[0]}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(model, max_memory={devices[0]: int(size * 0.6), devices[1]: 4 * size},
                                       no_split_module_classes=model._no_split_modules)
    dispatch_model(model, device_map)
    return device_map


def spread_agrees(c: Check, devices: list) -> Outcome:
    """A model over two devices decodes and runs clean_runs as the same weights on one device do. One row
    ends early (its first token is made the EOS), so decoding also cuts finished rows from the cache."""
    import torch

    from selfexplain.groundtruth import generation
    from selfexplain.groundtruth.models import ModelSpec, load_model
    from selfexplain.groundtruth.patching import clean_runs

    model, tok = load_model(ModelSpec(c.size.target), "cpu")  # fp32: both placements compute the same
    whole = copy.deepcopy(model).to(devices[0])
    device_map = spread(model, devices)
    prompts = [tok(f"{TEMPLATES[i % 2].format(s)}")["input_ids"] for i, s in enumerate(SUBJECTS[:6])]
    with torch.no_grad():
        first = int(whole(input_ids=torch.tensor(prompts[:1], device=whole.device)).logits[0, -1].argmax())
    tok.eos_token = tok.convert_ids_to_tokens(first)  # the first row's first answer token ends it
    cut = []
    original = generation.keep_rows
    generation.keep_rows = lambda *a: cut.append(a[-1]) or original(*a)
    start = time.perf_counter()
    try:
        answers = generation.greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    finally:
        generation.keep_rows = original
    runs = clean_runs(model, [torch.tensor(p) for p in prompts])
    seconds = time.perf_counter() - start
    reference = generation.greedy_generate(whole, tok, prompts, max_new_tokens=12, batch_size=8)
    same_runs = [a.decision.token == b.decision.token for a, b in zip(runs, clean_runs(whole, [torch.tensor(p) for p in prompts]))]
    on = sorted({str(d) for d in device_map.values()})
    ok = answers == reference and all(same_runs) and bool(cut) and len(on) == len(set(devices))
    tokens = sum(map(len, prompts)) * 2 + 12 * len(prompts)
    return Outcome(ok, seconds, tokens, 2.0 * params(whole) * tokens, {
        "devices": on, "answers_agree": sum(a == b for a, b in zip(answers, reference)), "rows": len(prompts),
        "rows_cut_while_decoding": bool(cut), "clean_runs_agree": f"{sum(same_runs)}/{len(same_runs)}"})


def stage_two_gpus(c: Check) -> Outcome:
    import torch

    if c.device != "cuda" or torch.cuda.device_count() < 2:
        raise Skipped(f"needs two GPUs, this machine has {torch.cuda.device_count() if c.device == 'cuda' else 0}")
    return spread_agrees(c, [0, 1])
