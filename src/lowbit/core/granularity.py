"""Granularities: which elements share one scale. Each maps to a block size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class PerRow:
    """One scale per output channel (row of an (N, K) weight)."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (len(shape) - 1) + (shape[-1],)


@dataclass(frozen=True)
class PerToken:
    """One scale per token of an activation (all leading dims are tokens)."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (len(shape) - 1) + (shape[-1],)


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements along K (the last dim)."""

    group_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int")

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if shape[-1] % self.group_size:
            raise ValueError(
                f"K={shape[-1]} is not divisible by group_size={self.group_size}"
            )
        return (1,) * (len(shape) - 1) + (self.group_size,)


Granularity = PerTensor | PerRow | PerToken | PerGroup


def granularity_to_dict(g: Granularity) -> dict:
    out: dict = {"type": type(g).__name__}
    if isinstance(g, PerGroup):
        out["group_size"] = g.group_size
    return out


def granularity_from_dict(d: dict) -> Granularity:
    kinds = {"PerTensor": PerTensor, "PerRow": PerRow, "PerToken": PerToken, "PerGroup": PerGroup}
    if d.get("type") not in kinds:
        raise ValueError(f"granularity type={d.get('type')!r}; allowed: {sorted(kinds)}")
    if d["type"] == "PerGroup":
        return PerGroup(int(d["group_size"]))
    return kinds[d["type"]]()
