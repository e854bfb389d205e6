"""Integrated gradients (captum, as the token-attribution task runs it) against leave-one-out ablation
of every word of the prompt text, on SmolLM2 with the patching study's few-shot preamble: seconds per
item, and how often the two name the same top word (techniques checked against each other).

Leave-one-out removes one word of the text at a time and takes the drop of log p(the clean greedy token);
IG attributes the same log-probability along the path from the padding token's embedding. `fast` is
IG's seconds, `naive` leave-one-out's; the target (0.1) asks IG to cost at most 10x the ablations.

Against input ablation's labels on the same prompts: the input-ablation task's own technique, each word
of a fact prompt a span removed in turn (a prompts-file input), says which words change the target's
greedy answer when removed. `agreement` gives, over the prompts where some word does, how often IG's
top word is one of them (with its Wilson interval), beside leave-one-out's top word and the two words a
person would guess (the last word, the subject's last word).
"""
from __future__ import annotations

import torch

STUDY_PREAMBLE = ("The capital of Japan is Tokyo. The official language of Brazil is Portuguese. "
                  "The capital of Kenya is Nairobi. The official language of Egypt is Arabic.")
FACTS = 48
"""Fact prompts: enough for an agreement interval about +-0.15 wide, IG's four minutes on 2 cores."""


def _leave_one_out(model, tok, cfg, text: str) -> list[float]:
    """Per word of text: log p(clean token) minus log p(it) with the word removed from the prompt."""
    from selfexplain.groundtruth.generation import render_prompt
    from selfexplain.groundtruth.token_attribution import words_of

    def log_probs(prompt: str, token=None):
        ids = torch.tensor(render_prompt(tok, prompt, cfg.target_format, cfg.system_prompt))[None]
        with torch.no_grad():
            out = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        token = int(out.argmax()) if token is None else token
        return token, float(out[token])

    token, clean = log_probs(text)
    drops = []
    for start, end, _ in words_of(text):
        drops.append(clean - log_probs((text[:start] + text[end:]).replace("  ", " ").strip(), token)[1])
    return drops


def _output_changing_words(model, tok, cfg, items) -> dict[str, set[str]]:
    """Per fact prompt (its source id): the words whose removal changes the target's greedy answer, by
    input ablation (each word that occurs once in the prompt a span of its own)."""
    from selfexplain.groundtruth.ablation import (AblationConfig, PromptsFileConfig, SpanSourceConfig, items_of_inputs,
                                                  run_ablation)
    from selfexplain.groundtruth.dataset import UNANSWERED
    from selfexplain.groundtruth.token_attribution import words_of

    ablation = AblationConfig(source="prompts_file", target_format=cfg.target_format, system_prompt=cfg.system_prompt,
                              prompts=PromptsFileConfig(answer_pattern=SpanSourceConfig().answer_pattern))
    inputs = []
    for item in items:
        words = [w for _, _, w in words_of(item.fact.text)]
        inputs.append({"id": item.source_id, "prompt": item.fact.text, "spans": [w for w in words if words.count(w) == 1]})
    records = run_ablation(model, tok, items_of_inputs(ablation, inputs), ablation, "t", lambda _: "train")
    changing: dict[str, set[str]] = {item.source_id: set() for item in items}
    for r in records:
        if r.changed and not r.query.get(UNANSWERED):
            changing[r.source_id].add(r.query["span"])
    return changing


def _agreement(picks: dict[str, list[str]], changing: dict[str, set[str]]) -> dict:
    """Per way of picking a word: how often its word changes the answer when removed, over the prompts
    where some word does, with a Wilson 95% interval."""
    from selfexplain.groundtruth.attribution_patching import wilson_interval

    some = [source for source, words in changing.items() if words]
    out = {"prompts_with_an_output_changing_word": f"{len(some)}/{len(changing)}"}
    for name, picked in picks.items():
        hits = sum(picked[i] in changing[source] for i, source in enumerate(changing) if source in some)
        lo, hi = wilson_interval(hits, len(some)) if some else (None, None)
        out[name] = {"hits": hits, "of": len(some), "rate": round(hits / len(some), 3) if some else None,
                     "lo": lo and round(lo, 3), "hi": hi and round(hi, 3)}
    return out


def bench_token_attribution(s) -> dict:
    from selfexplain.groundtruth.token_attribution import TokenAttributionConfig, build_items, run_attribution, words_of

    model, tok = s.load("smollm2-135m-instruct", dtype="float32")
    cfg = TokenAttributionConfig(system_prompt=STUDY_PREAMBLE, max_facts=FACTS)
    items = build_items(cfg, 0)
    fast, records = s.timed(lambda: run_attribution(model, tok, items, cfg, "t", lambda _: "train"), repeats=1)
    naive, drops = s.timed(lambda: [_leave_one_out(model, tok, cfg, it.fact.text) for it in items], repeats=1)
    kept = [r for r in records if "dropped" not in r.query]
    changing = _output_changing_words(model, tok, cfg, items)
    loo_top = [words_of(it.fact.text)[max(range(len(d)), key=d.__getitem__)][2] for it, d in zip(items, drops)]
    agreement = _agreement({"integrated_gradients_top": [r.query["top_words"][0] for r in records],
                            "leave_one_out_top": loo_top, "last_word": [r.query["words"][-1] for r in records],
                            "subject_word": [r.query["subject_word"] for r in records]}, changing)
    return s.write("token_attribution", fast, naive, 0.1,
                   {"model": "smollm2-135m-instruct", "facts": len(items), "steps": cfg.steps},
                   seconds_per_item={"integrated_gradients": round(fast / len(items), 3),
                                     "leave_one_out": round(naive / len(items), 3)},
                   same_top_word=f"{sum(r.query['top_words'][0] == w for r, w in zip(records, loo_top))}/{len(items)}",
                   converged=f"{len(kept)}/{len(items)}",
                   top_word_in_subject=f"{sum(r.changed for r in records)}/{len(items)}",
                   against_input_ablation=agreement)
