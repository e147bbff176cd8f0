"""Float8Linear and `convert_to_float8_training`.

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training

    report = convert_to_float8_training(model, Float8TrainingConfig.from_recipe("rowwise"))
    model = torch.compile(model)          # the casts fuse around each float8 GEMM
    ... train as usual (bf16 weights, or fp32 under autocast) ...

A Float8Linear keeps its weight as the same high-precision nn.Parameter (and the same bias): the
float8 copies live only inside each step, so optimizers, checkpoints (state_dict), FSDP-style
wrapping and weight tying see an ordinary nn.Linear.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.float8_training.autograd import Float8LinearFunction
from lowbit.float8_training.config import Float8TrainingConfig
from lowbit.float8_training.fsdp import Float8AllGatherWeight, unwrap_state_dict_hook
from lowbit.float8_training.kernels import MM_ALIGN, float8_unsupported_reason, resolve_emulate

FilterFn = Callable[[nn.Module, str], bool]


class Float8Linear(nn.Linear):
    """nn.Linear whose three training GEMMs run in float8 (see lowbit.float8_training.autograd)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: Float8TrainingConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config if config is not None else Float8TrainingConfig()
        self.register_state_dict_post_hook(unwrap_state_dict_hook)  # fsdp_float8_all_gather

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Float8TrainingConfig) -> "Float8Linear":
        """A Float8Linear sharing `linear`'s Parameters (no copy: optimizer state stays valid)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            config=config,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear expects input (..., {self.in_features}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"Float8Linear expects a floating-point input, got {x.dtype}")
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        emulate = resolve_emulate(self.config, x.device)
        x2 = x.reshape(-1, self.in_features)
        y = Float8LinearFunction.apply(x2, self.weight, self.config, emulate)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        casts = ", ".join(
            f"{op}={str(c.cast(op).dtype).removeprefix('torch.float8_')}/{c.cast(op).granularity.value}"
            for op in ("input", "weight", "grad_output")
        )
        hp = [g for g in ("output", "grad_input", "grad_weight") if c.gemm(g).high_precision]
        return f"{super().extra_repr()}, {casts}" + (f", high_precision={hp}" if hp else "")


@dataclass
class Float8ConversionReport:
    """What `convert_to_float8_training` did: fqn lists of swapped and skipped nn.Linear layers."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # fqn -> reason

    def __str__(self) -> str:
        lines = [f"float8 training: {len(self.converted)} linear(s) converted, {len(self.skipped)} skipped"]
        lines += [f"  skipped {fqn}: {why}" for fqn, why in self.skipped.items()]
        return "\n".join(lines)


def _ineligible_reason(linear: nn.Linear) -> str | None:
    n, k = linear.out_features, linear.in_features
    if n % MM_ALIGN or k % MM_ALIGN:
        return f"in_features={k}, out_features={n}: float8 GEMMs need both divisible by {MM_ALIGN}"
    if not linear.weight.is_floating_point():
        return f"weight dtype {linear.weight.dtype} is not a floating-point training weight"
    if type(linear.weight) is not nn.Parameter and type(linear.weight) is not torch.Tensor:
        return f"weight is a {type(linear.weight).__name__}, not a plain high-precision Parameter"
    return None


def convert_to_float8_training(
    model: nn.Module, config: Float8TrainingConfig | None = None, module_filter_fn: FilterFn | None = None
) -> Float8ConversionReport:
    """Swap every eligible nn.Linear of `model` (in place) for a Float8Linear sharing its Parameters.

    `module_filter_fn(module, fqn) -> bool` chooses among the nn.Linear layers (None: all).
    With `config.fsdp_float8_all_gather` each converted weight becomes a new Parameter (a
    Float8AllGatherWeight over the same data; weights shared between converted layers stay
    shared): convert before fully_shard and before creating the optimizer. A weight that a
    module left as is also uses (an embedding tied to the LM head) keeps its plain Parameter.
    Eligible: in_features and out_features divisible by 16 (what float8 GEMMs take); others are
    skipped with one warning and listed in the returned report. On a model already on a CUDA GPU
    that cannot run float8 GEMMs this raises before changing anything (unless config.emulate=True).
    """
    config = config if config is not None else Float8TrainingConfig()
    if not isinstance(config, Float8TrainingConfig):
        raise ValueError(
            f"config={config!r} must be a Float8TrainingConfig "
            "(e.g. Float8TrainingConfig.from_recipe('tensorwise'))"
        )
    if isinstance(model, nn.Linear):
        raise ValueError(
            "convert_to_float8_training swaps submodules in place: pass a model that contains "
            "the nn.Linear layers, not a bare nn.Linear (wrap it, e.g. in nn.Sequential)"
        )
    report = Float8ConversionReport()
    targets: list[tuple[str, nn.Linear]] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
            continue
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            continue
        reason = _ineligible_reason(module)
        if reason is not None:
            report.skipped[fqn] = reason
        else:
            targets.append((fqn, module))
    devices = {m.weight.device for _, m in targets if m.weight.device.type == "cuda"}
    for device in devices:  # fail fast, before any swap, when the GPU is known already
        if not config.emulate and float8_unsupported_reason(config, device) is not None:
            resolve_emulate(config, device)  # raises the error naming the requirement
    wrapped: dict[int, nn.Parameter] = {}  # id(old weight) -> its wrapper: tied weights stay tied
    # A weight also used by a module that stays as is (an embedding tied to the LM head) keeps
    # its plain Parameter: that module needs the high-precision weight, not a float8 copy.
    converted = {id(m) for _, m in targets}
    shared = {id(p) for m in model.modules() if id(m) not in converted for p in m._parameters.values()}
    for fqn, module in targets:
        new = Float8Linear.from_linear(module, config)
        if config.fsdp_float8_all_gather and id(module.weight) not in shared:
            w = module.weight  # a new Parameter: create the optimizer after converting
            if id(w) not in wrapped:
                wrapped[id(w)] = nn.Parameter(
                    Float8AllGatherWeight(w.detach(), config.cast_weight), requires_grad=w.requires_grad
                )
            new.weight = wrapped[id(w)]
        model.set_submodule(fqn, new)
        report.converted.append(fqn)
    if report.skipped:
        first = "; ".join(f"{fqn} ({why})" for fqn, why in list(report.skipped.items())[:4])
        more = f"; and {len(report.skipped) - 4} more" if len(report.skipped) > 4 else ""
        warnings.warn(
            f"float8 training skipped {len(report.skipped)} nn.Linear layer(s), which stay in high "
            f"precision: {first}{more}",
            stacklevel=2,
        )
    return report
