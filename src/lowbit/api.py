"""quantize_: the one entry point that turns nn.Linear weights into quantized weights."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import QuantConfig

FilterFn = Callable[[nn.Module, str], bool]
CONFIG_ATTR = "_lowbit_configs"
PROGRESS_MIN_LAYERS = 16


class OnUnsupported(str, enum.Enum):
    """What quantize_ does with a layer whose shape the format cannot take."""

    SKIP = "skip"  # leave it in high precision, one warning listing every such layer
    ERROR = "error"  # raise ValueError before touching the model


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _progress(items: list, desc: str):
    if len(items) < PROGRESS_MIN_LAYERS:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


class ModelConfig(Protocol):
    """A config that transforms the model itself (e.g. lowbit.qat.QATConfig)."""

    def apply_to_model(self, model: nn.Module, filter_fn: FilterFn | None = None,
                       device: torch.device | str | None = None,
                       on_unsupported: OnUnsupported | str = OnUnsupported.SKIP) -> nn.Module: ...


def quantize_(
    model: nn.Module,
    config: QuantConfig | ModelConfig,
    filter_fn: FilterFn | None = None,
    device: torch.device | str | None = None,
    on_unsupported: OnUnsupported | str = OnUnsupported.SKIP,
) -> nn.Module:
    """Quantize, in place, every nn.Linear that `filter_fn(module, fqn)` accepts.

    All-or-nothing: every weight is quantized first and swapped in only when all
    succeeded, so an error leaves `model` exactly as it was. Returns `model`.
    """
    # Configs that rewrite modules rather than weights (e.g. QATConfig) apply themselves,
    # under the same all-or-nothing contract.
    apply_to_model = getattr(config, "apply_to_model", None)
    if not isinstance(config, QuantConfig) and callable(apply_to_model):
        return apply_to_model(model, filter_fn=filter_fn, device=device, on_unsupported=on_unsupported)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a lowbit config (e.g. Int8DynamicActivationInt4WeightConfig()), "
                        f"got {type(config).__name__}")
    try:
        policy = OnUnsupported(on_unsupported)
    except ValueError:
        raise ValueError(f"on_unsupported={on_unsupported!r}; allowed: "
                         f"{[p.value for p in OnUnsupported]}") from None
    accept = filter_fn or _default_filter
    targets: list[tuple[str, nn.Linear]] = []
    unsupported: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not accept(module, fqn):
            continue
        if isinstance(module.weight, QuantizedTensor):
            raise ValueError(f"layer {fqn!r} is already quantized ({type(module.weight).__name__}); "
                             "quantize a fresh high-precision model")
        n, k = module.weight.shape
        reason = config.unsupported_reason(n, k)
        if reason is not None:
            unsupported.append(f"{fqn} ({reason})")
        else:
            targets.append((fqn, module))
    if unsupported and policy is OnUnsupported.ERROR:
        raise ValueError(f"{type(config).__name__} cannot take {len(unsupported)} layer(s): "
                         + "; ".join(unsupported))
    new_weights: list[tuple[nn.Linear, QuantizedTensor, torch.Tensor | None]] = []
    for fqn, module in _progress(targets, f"quantize {type(config).__name__}"):
        w = module.weight.detach()
        if device is not None:
            w = w.to(device)
        try:
            q = config.quantize_weight(w)
        except Exception as e:
            raise RuntimeError(f"quantizing layer {fqn!r} failed (model unchanged): {e}") from e
        bias = module.bias
        new_bias = bias.detach().to(device) if bias is not None and device is not None else None
        new_weights.append((module, q, new_bias))
    for module, q, new_bias in new_weights:
        module.weight = nn.Parameter(q, requires_grad=False)
        if new_bias is not None:
            module.bias = nn.Parameter(new_bias, requires_grad=module.bias.requires_grad)
    record = dict(getattr(model, CONFIG_ATTR, {}))
    for fqn, _ in targets:
        record[fqn] = config.to_dict()
    setattr(model, CONFIG_ATTR, record)
    if unsupported:
        warnings.warn(f"{type(config).__name__}: skipped {len(unsupported)} layer(s) it cannot take: "
                      + "; ".join(unsupported), UserWarning, stacklevel=2)
    return model


class FlatQuantizedLinear(nn.Module):
    """A linear whose quantized weight is stored as its plain inner tensors (buffers).

    The forward rebuilds the weight subclass from them, which torch.compile traces away,
    so a compiled call receives plain tensors: no per-call subclass flattening (which
    costs microseconds per weight per call, milliseconds per step for an LLM's
    few hundred linears). Same kernels, same outputs as the subclass-weight linear.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight
        if not isinstance(w, QuantizedTensor):
            raise TypeError(f"expected a quantized weight, got {type(w).__name__}")
        names, ctx = w.__tensor_flatten__()
        for n in names:
            self.register_buffer(f"weight_{n}", getattr(w, n))
        self._names, self._ctx, self._cls = tuple(names), ctx, type(w)
        self._size, self._stride = w.size(), w.stride()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    @property
    def weight(self) -> QuantizedTensor:
        inner = {n: getattr(self, f"weight_{n}") for n in self._names}
        return self._cls.__tensor_unflatten__(inner, self._ctx, self._size, self._stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self._cls.__name__}")


def flatten_quantized_linears(model: nn.Module) -> int:
    """Swap every nn.Linear with a quantized weight for a FlatQuantizedLinear, in place.

    For torch.compile'd inference (e.g. CUDA-graph decode loops): returns how many
    linears were swapped. Weights are shared, not copied.
    """
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and isinstance(child.weight, QuantizedTensor)]
    for parent, name, child in swaps:
        setattr(parent, name, FlatQuantizedLinear(child))
    return len(swaps)
