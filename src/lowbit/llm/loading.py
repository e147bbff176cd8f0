"""Streaming model construction: meta skeleton, then one block at a time onto the device,
quantized right away.

Peak device memory while loading is the quantized model so far plus one block of
high-precision weights (and the quantizer's temporaries for one layer), never the whole
high-precision model: a Llama-3-70B int4 model can be built on a GPU that could not hold it
in bf16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.api import quantize_
from lowbit.formats.configs import CONFIGS_BY_SHORT_NAME, QuantConfig, config_from_short_name
from lowbit.llm.checkpoint import HFCheckpoint, RandomWeights, expected_shapes
from lowbit.llm.config import PRESETS, ModelArgs, preset
from lowbit.llm.model import Transformer
from lowbit.llm.phased import PrefillDecodeConfig, quantize_phased_

LOWBIT_FORMATS = ("int8wo", "int8dq", "int4wo", "w4a8", "fp8wo", "fp8dq")
BASELINE_FORMATS = ("torch-int4", "torchao-int4")
QUANT_CHOICES = ("none", *LOWBIT_FORMATS, *BASELINE_FORMATS)


class Quantizer(Protocol):
    label: str

    def apply(self, parent: nn.Module) -> None:
        """Quantize every nn.Linear inside `parent` (never `parent` itself) in place."""

    def describe(self) -> dict[str, Any] | None: ...


class NoQuantizer:
    label = "none"

    def apply(self, parent: nn.Module) -> None:
        return None

    def describe(self) -> dict[str, Any] | None:
        return None


class ConfigQuantizer:
    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.label = config.short_name or type(config).__name__

    def apply(self, parent: nn.Module) -> None:
        quantize_(parent, self.config, filter_fn=lambda m, fqn: bool(fqn))

    def describe(self) -> dict[str, Any] | None:
        return self.config.to_dict()


class PhasedQuantizer:
    def __init__(self, config: PrefillDecodeConfig) -> None:
        self.config = config
        names = [c.short_name if c is not None else "none" for c in (config.prefill, config.decode)]
        self.label = f"{names[0]}+decode:{names[1]}"

    def apply(self, parent: nn.Module) -> None:
        quantize_phased_(parent, self.config)

    def describe(self) -> dict[str, Any] | None:
        return self.config.to_dict()


def _config(name: str, group_size: int | None, decode_threshold: int | None) -> QuantConfig:
    cls = CONFIGS_BY_SHORT_NAME[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if group_size is not None and "group_size" in fields:
        kwargs["group_size"] = group_size or None  # 0 = one scale per row
    if decode_threshold is not None and "decode_threshold" in fields:
        kwargs["decode_threshold"] = decode_threshold
    return config_from_short_name(name, **kwargs)


def make_quantizer(
    quant: str = "none",
    decode_quant: str | None = None,
    group_size: int | None = None,
    decode_threshold: int | None = None,
) -> Quantizer:
    """A quantizer from CLI-style names (`--quant`, `--decode-quant`, `--group-size`, ...)."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant {quant!r} is unknown; allowed: {list(QUANT_CHOICES)}")
    if decode_quant is not None and decode_quant not in ("none", *LOWBIT_FORMATS):
        raise ValueError(f"--decode-quant {decode_quant!r} is unknown; allowed: {['none', *LOWBIT_FORMATS]}")
    names = [quant] + ([decode_quant] if decode_quant is not None else [])
    if group_size is not None and not any(n in ("int4wo", "w4a8", *BASELINE_FORMATS) for n in names):
        raise ValueError(f"--group-size applies to int4wo, w4a8 and the int4 baselines, not {names}")
    if decode_threshold is not None and not any(n in ("int8dq", "w4a8", "fp8dq") for n in names):
        raise ValueError(f"--decode-threshold applies to int8dq, w4a8 and fp8dq, not {names}")
    if quant in BASELINE_FORMATS:
        if decode_quant is not None:
            raise ValueError(f"--decode-quant cannot be combined with the baseline {quant!r}")
        from lowbit.llm.baselines import TinyGemmInt4Quantizer, TorchAOInt4Quantizer

        gs = group_size or 128
        return TinyGemmInt4Quantizer(gs) if quant == "torch-int4" else TorchAOInt4Quantizer(gs)
    if decode_quant is None:
        return (
            NoQuantizer()
            if quant == "none"
            else ConfigQuantizer(_config(quant, group_size, decode_threshold))
        )

    def one(n: str) -> QuantConfig | None:
        return None if n == "none" else _config(n, group_size, decode_threshold)

    return PhasedQuantizer(PrefillDecodeConfig(prefill=one(quant), decode=one(decode_quant)))


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))


BlockHook = Callable[[int, nn.Module], None]


def build_model(
    args: ModelArgs,
    source: HFCheckpoint | RandomWeights,
    quantizer: Quantizer,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    quantize_output: bool = True,
    on_block: BlockHook | None = None,
) -> Transformer:
    """Materialise `args` from `source` block by block, quantizing each block as it lands.

    `on_block(i, model)` runs after block i is quantized (tests use it to check that only
    one block of high-precision weights ever exists).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} must be a floating-point dtype")
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    shapes = expected_shapes(args)

    def put(name: str) -> None:
        _put(model, name, source.tensor(name, shapes[name], device, dtype))

    with source:
        put("tok_embeddings.weight")
        for i, block in enumerate(model.layers):
            for pname, _ in list(block.named_parameters()):
                put(f"layers.{i}.{pname}")
            quantizer.apply(block)
            if on_block is not None:
                on_block(i, model)
        put("norm.weight")
        quantize_head = quantize_output and not isinstance(quantizer, NoQuantizer)
        if args.tie_embeddings and not quantize_head:
            model.output.weight = model.tok_embeddings.weight  # tied: one stored tensor
        else:
            put("output.weight")
            if quantize_head:
                holder = nn.Module()
                holder.output = model.output
                quantizer.apply(holder)
                model.output = holder.output
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"build_model left tensors on the meta device: {left[:4]}")
    model.quantizer_label = quantizer.label
    return model.eval()


def resolve_source(model: str, random_weights: bool, seed: int = 0) -> tuple[ModelArgs, Any]:
    """(`ModelArgs`, weight source) for a preset name or a checkpoint directory."""
    path = Path(model)
    if path.is_dir():
        ckpt = HFCheckpoint(path)
        return ckpt.args, (RandomWeights(ckpt.args, seed) if random_weights else ckpt)
    if model not in PRESETS and ("/" in model or model.startswith((".", "~"))):
        from lowbit.serialization import LoadError

        raise LoadError(f"checkpoint directory {model} does not exist")
    args = preset(model)  # ValueError naming the presets for unknown names
    if not random_weights:
        raise ValueError(
            f"model {model!r} is a shape preset with no weights: pass --random-weights, "
            "or give a Hugging Face checkpoint directory"
        )
    return args, RandomWeights(args, seed)


def load_model(
    model: str,
    *,
    random_weights: bool = False,
    quantizer: Quantizer | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    quantize_output: bool = True,
    on_block: BlockHook | None = None,
) -> Transformer:
    """Build a preset (`random_weights=True`) or a HF checkpoint directory, streaming-quantized."""
    args, source = resolve_source(model, random_weights, seed)
    return build_model(
        args,
        source,
        quantizer or NoQuantizer(),
        device,
        dtype,
        quantize_output=quantize_output,
        on_block=on_block,
    )
