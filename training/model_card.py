"""The model card of an explainer export: README.md with the Hugging Face Hub's metadata header, so that
`huggingface-cli upload REPO EXPORT_FOLDER` publishes the folder as it is. It names what the explainer was
trained from and on, shows how to load it and inject a vector, and (once eval has run) its matrix cells
beside the controls and baselines of the same target."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def card_metadata(meta: dict) -> dict:
    """The card's YAML header: the fields the Hub reads (library_name picks the loading snippet it shows,
    base_model links the base's page: only a hub id can)."""
    source = meta["explainer_spec"]["source"]
    header = {"library_name": "peft" if meta["weights"] == "lora" else "transformers",
              "pipeline_tag": "text-generation",
              "tags": ["selfexplain", "interpretability", "explainer", meta["task"].split(":")[0]]}
    if HUB_ID.match(source):
        header["base_model"] = source
    return header


def _identity_lines(meta: dict) -> list[str]:
    train = meta["train"]
    lines = [f"| base model | `{meta['explainer_spec']['source']}` (`{meta['explainer']}`) |",
             f"| task | `{meta['task']}` |",
             f"| target (the model it explains) | `{meta['target']}`"
             + (" (itself: a self-explainer)" if meta["target"] == meta["explainer"] else "") + " |",
             f"| training data | sha256 `{meta['data']}` (the ground-truth shards, by content) |",
             f"| weights | {'LoRA r=' + str(train['lora']['r']) + ' adapter (PEFT)' if meta['weights'] == 'lora' else 'full fine-tune'}, "
             f"{meta['steps']} steps, lr {train['lr']}, {train['precision']} |"]
    if meta.get("control"):
        lines.append(f"| control | `{meta['control']}` (trained without what the task explains; compare with it) |")
    if "projection" in meta:
        errors = ", ".join(f"{k}: {e['heldout']:.3f}" for k, e in meta["projection"]["fit_error"].items()
                           if "heldout" in e)
        lines.append(f"| Pi (target -> explainer) | {meta['projection']['kind']}, layers {', '.join(meta['projection']['keys'])}"
                     + (f"; held-out relative error {errors}" if errors else "") + " |")
    return ["| | |", "|---|---|", *lines]


def _usage_lines(meta: dict) -> list[str]:
    source = meta["explainer_spec"]["source"]
    if meta["weights"] == "lora":
        base = [f"base = AutoModelForCausalLM.from_pretrained({source!r})"] if HUB_ID.match(source) else [
            "from selfexplain.groundtruth.models import ModelSpec, load_model",
            f"base, _ = load_model(ModelSpec({source!r}))  # not a hub id: a model selfexplain packages or builds"]
        direct = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "tokenizer = AutoTokenizer.from_pretrained(FOLDER)  # holds the [begin][vec][end] tokens",
                  *base,
                  "if base.get_input_embeddings().num_embeddings < len(tokenizer):",
                  "    base.resize_token_embeddings(len(tokenizer))",
                  "model = PeftModel.from_pretrained(base, FOLDER).merge_and_unload()"]
    else:
        direct = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
                  "tokenizer = AutoTokenizer.from_pretrained(FOLDER)"]
    lines = ["With selfexplain (the base model loaded as training loaded it, Pi beside it):", "", "```python",
             "from selfexplain.training.export import load_explainer", "",
             "model, tokenizer, projection = load_explainer(FOLDER)", "```", "",
             "With transformers / peft alone:", "", "```python", *direct, "```"]
    if meta.get("vector_tokens"):
        lines += ["", "The explainer reads a vector v of the target through the `[vec]` soft token: its input embedding is",
                  "replaced by Pi v (`projection.safetensors`, one map per target layer; the identity for a self-explainer).",
                  "",
                  "```python", "from selfexplain.training.explainer import VECTOR_TEXT, injecting", "",
                  "vec_id = tokenizer.convert_tokens_to_ids('<|se_vec|>')",
                  "ids = tokenizer(PROMPT_WITH(VECTOR_TEXT), return_tensors='pt').input_ids",
                  "mapped = projection(v[None], [LAYER_KEY]) if projection is not None else v[None]",
                  "with injecting(model, vec_id, mapped):",
                  "    out = model.generate(ids, max_new_tokens=24)", "```"]
    return lines


def model_card(meta: dict, results: Optional[list[str]] = None) -> str:
    """README.md for an export with metadata `meta` (selfexplain.json); `results`: markdown lines of its
    matrix cells (eval/report.py), or None before eval has run."""
    title = (f"# selfexplain explainer: {meta['explainer']} explaining {meta['target']} ({meta['task']})")
    body = [title, "",
            "Trained with selfexplain to explain the target model's internal computation",
            "in words (Li et al. 2025, \"Training Language Models to Explain Their Own Computations\").", "",
            *_identity_lines(meta), "", "## Results", "",
            *(results or ["Not evaluated yet: `selfexplain eval CONFIG` then `selfexplain report CONFIG` fill this in."]),
            "", "## Use", "", *_usage_lines(meta), ""]
    header = yaml.safe_dump(card_metadata(meta), sort_keys=False)
    return f"---\n{header}---\n\n" + "\n".join(body)


def write_model_card(folder: Path, meta: dict, results: Optional[list[str]] = None) -> Path:
    path = Path(folder) / CARD
    path.write_text(model_card(meta, results))
    return path
