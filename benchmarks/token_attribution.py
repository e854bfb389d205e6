"""Integrated gradients (captum, as the token-attribution task runs it) against leave-one-out ablation
of every word of the prompt text, on SmolLM2 with the patching study's few-shot preamble: seconds per
item, and how often the two name the same top word (techniques checked against each other).

Leave-one-out removes one word of the text at a time and takes the drop of log p(the clean greedy token);
IG attributes the same log-probability along the path from the padding token's embedding. `fast` is
IG's seconds, `naive` leave-one-out's; the target (0.1) asks IG to cost at most 10x the ablations.
"""
from __future__ import annotations

import torch

STUDY_PREAMBLE = ("The capital of Japan is Tokyo. The official language of Brazil is Portuguese. "
                  "The capital of Kenya is Nairobi. The official language of Egypt is Arabic.")
FACTS = 16


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


def bench_token_attribution(s) -> dict:
    from selfexplain.groundtruth.token_attribution import TokenAttributionConfig, build_items, run_attribution, words_of

    model, tok = s.load("smollm2-135m-instruct", dtype="float32")
    cfg = TokenAttributionConfig(system_prompt=STUDY_PREAMBLE, max_facts=FACTS)
    items = build_items(cfg, 0)
    fast, records = s.timed(lambda: run_attribution(model, tok, items, cfg, "t", lambda _: "train"), repeats=1)
    naive, drops = s.timed(lambda: [_leave_one_out(model, tok, cfg, it.fact.text) for it in items], repeats=1)
    same = sum(r.query["top_words"][0] == words_of(it.fact.text)[max(range(len(d)), key=d.__getitem__)][2]
               for r, it, d in zip(records, items, drops))
    kept = [r for r in records if "dropped" not in r.query]
    return s.write("token_attribution", fast, naive, 0.1,
                   {"model": "smollm2-135m-instruct", "facts": len(items), "steps": cfg.steps},
                   seconds_per_item={"integrated_gradients": round(fast / len(items), 3),
                                     "leave_one_out": round(naive / len(items), 3)},
                   same_top_word=f"{same}/{len(items)}", converged=f"{len(kept)}/{len(items)}",
                   top_word_in_subject=f"{sum(r.changed for r in records)}/{len(items)}")
