"""Saving and loading quantized models.

* `torch.save(model.state_dict())` + `torch.load(..., weights_only=True)` works with
  no allow-list work by the user: lowbit registers its tensor classes and their
  attribute types as safe globals when it is imported. Load into a fresh model
  with `model.load_state_dict(sd, assign=True)`.
* `save_quantized(model, dir)` / `load_quantized(model, dir)`: safetensors with
  each quantized tensor stored as its inner tensors, plus `lowbit_config.json`
  describing every tensor and the configs used. Loading validates everything
  before touching the target model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.qtype import ZeroPointDomain
from lowbit.core.tensor import QuantizedTensor, _rebuild_quantized
from lowbit.formats.common import ActGranularity, ActQuant
from lowbit.formats.float8 import Float8Tensor
from lowbit.formats.int4 import Int4Tensor
from lowbit.formats.int8 import Int8Tensor
from lowbit.sparsity.tensors import SemiSparseInt8Tensor, SemiSparseTensor

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "lowbit_config.json"
FORMAT_VERSION = 1
TENSOR_CLASSES: dict[str, type[QuantizedTensor]] = {
    c.__name__: c for c in (Int8Tensor, Int4Tensor, Float8Tensor, SemiSparseTensor, SemiSparseInt8Tensor)
}


def register_safe_globals() -> None:
    torch.serialization.add_safe_globals(
        [*TENSOR_CLASSES.values(), _rebuild_quantized, ActQuant, ActGranularity, KernelChoice,
         ZeroPointDomain]
    )


class LoadError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the target model."""


def _attr_to_json(name: str, value: Any) -> Any:
    if isinstance(value, ActQuant):
        return value.to_dict()
    if isinstance(value, (KernelChoice, ZeroPointDomain)):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def _attr_from_json(name: str, value: Any) -> Any:
    if name == "act_quant":
        return None if value is None else ActQuant.from_dict(value)
    if name == "kernel":
        return KernelChoice(value)
    if name == "zero_point_domain":
        return ZeroPointDomain(value)
    if name == "block_size":
        return tuple(value)
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model.safetensors` + `lowbit_config.json` into `directory`."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, QuantizedTensor):
            names = [n for n in value.tensor_data_names if getattr(value, n) is not None]
            for n in names:
                flat[f"{key}.{n}"] = getattr(value, n).detach().contiguous().cpu()
            described[key] = {
                "class": type(value).__name__, "shape": list(value.shape),
                "dtype": _dtype_name(value.dtype), "tensors": names,
                "attributes": {k: _attr_to_json(k, v) for k, v in value.attributes().items()},
            }
        else:
            flat[key] = value.detach().contiguous().cpu()
    # safetensors refuses shared storage; contiguous().clone() breaks any aliasing.
    flat = {k: v.clone() for k, v in flat.items()}
    save_file(flat, str(out / WEIGHTS_FILE), metadata={"format": "lowbit"})
    meta = {"lowbit_format_version": FORMAT_VERSION, "tensors": described,
            "configs": getattr(model, "_lowbit_configs", {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath, cpath = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    for p in (wpath, cpath):
        if not p.is_file():
            raise LoadError(f"{p} does not exist (expected a directory written by save_quantized)")
    try:
        meta = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cpath} is not valid JSON: {e}") from None
    if meta.get("lowbit_format_version") != FORMAT_VERSION:
        raise LoadError(f"{cpath}: lowbit_format_version={meta.get('lowbit_format_version')!r}, "
                        f"this lowbit reads {FORMAT_VERSION}")
    try:
        flat = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{wpath} is corrupt or unreadable: {e}") from None
    return flat, meta


def _check_inner_shapes(key: str, t: QuantizedTensor) -> None:
    """Inner tensors must fit the described shape and block size: a weights file from another
    config (e.g. group 64 under a group-128 description) would otherwise load and compute garbage."""
    own_layout = getattr(t, "expected_inner_shapes", None)
    if own_layout is not None:  # formats with their own layout (2:4 sparse) describe it themselves
        for name, want in own_layout().items():
            inner = getattr(t, name, None)
            if inner is None or tuple(inner.shape) != want:
                got = None if inner is None else tuple(inner.shape)
                raise LoadError(f"{key}.{name}: stored shape {got} != expected {want} "
                                f"(weights file does not match {CONFIG_FILE})")
        return
    shape, block = tuple(t.shape), tuple(getattr(t, "block_size", ()))
    if len(block) != len(shape) or any(b <= 0 or s % b for s, b in zip(shape, block)):
        raise LoadError(f"{key}: block_size {block} does not divide shape {shape}")
    per_block = tuple(s // b for s, b in zip(shape, block))
    packed = (*shape[:-1], shape[-1] // 2)  # int4: two values per byte along K
    expected = {"qdata": packed if isinstance(t, Int4Tensor) else shape,
                "scale": per_block, "zero_point": per_block}
    for name, want in expected.items():
        inner = getattr(t, name, None)
        if inner is not None and tuple(inner.shape) != want:
            raise LoadError(f"{key}.{name}: stored shape {tuple(inner.shape)} != expected {want} "
                            f"(weights file does not match {CONFIG_FILE})")


def _rebuild_state(flat: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key, desc in meta["tensors"].items():
        cls = TENSOR_CLASSES.get(desc.get("class"))
        if cls is None:
            raise LoadError(f"{key}: unknown tensor class {desc.get('class')!r}")
        tensors: list[torch.Tensor | None] = []
        for n in cls.tensor_data_names:
            fk = f"{key}.{n}"
            if n in desc["tensors"]:
                if fk not in flat:
                    raise LoadError(f"{key}: inner tensor {fk!r} missing from the weights file")
                tensors.append(flat[fk])
                consumed.add(fk)
            else:
                tensors.append(None)
        attrs = {k: _attr_from_json(k, v) for k, v in desc["attributes"].items()}
        try:
            qt = cls(*tensors, shape=tuple(desc["shape"]),
                     dtype=getattr(torch, desc["dtype"]), **attrs)
        except (TypeError, ValueError) as e:
            raise LoadError(f"{key}: cannot rebuild {cls.__name__}: {e}") from None
        _check_inner_shapes(key, qt)
        state[key] = qt
    for k, v in flat.items():
        if k not in consumed:
            state[k] = v
    return state


def load_quantized(model_or_factory: nn.Module | Any, directory: str | os.PathLike,
                   device: torch.device | str | None = None, strict: bool = True) -> nn.Module:
    """Load a directory written by `save_quantized` into a (fresh, high-precision or
    already quantized) model of the same architecture; returns the model.

    Every key, shape and dtype is validated first: on any error the model is unchanged.
    """
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    flat, meta = _read(Path(directory))
    state = _rebuild_state(flat, meta)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise LoadError(f"checkpoint does not match the model: missing {missing[:8]}, "
                        f"unexpected {unexpected[:8]}")
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise LoadError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=strict, assign=True)
    for p in model.parameters():
        if isinstance(p, QuantizedTensor):
            p.requires_grad_(False)
    model._lowbit_configs = dict(meta.get("configs", {}))
    return model
