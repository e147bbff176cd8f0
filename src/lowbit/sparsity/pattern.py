"""2:4 semi-structured sparsity: magnitude pruning, pattern checks and the stored compressed layout.

2:4 means: in every group of 4 consecutive weights along K (the input dim of a linear
weight (N, K)), at most 2 are non-zero. Sparse tensor cores skip the zeros, so a 2:4
weight is stored as its kept values plus 2-bit positions.

Stored layout (device independent; what save/load writes, what the CPU path reads):

    values (N, K/2)       the 2 kept weights of each group of 4, in increasing K order
    meta   (N, K/8) uint8 one nibble per group (low nibble = even group):
                          bits 0-1: position (0..3) of the first kept weight,
                          bits 2-3: position of the second (first < second)

    K:      0  1  2  3   4  5  6  7
    w row: [a  0  b  0 | 0  c  0  d]  ->  values [a b c d],  meta byte = 0xD8
                                          (group 0 nibble 0b1000 = 0 | 2<<2, group 1 0b1101 = 1 | 3<<2)

The nibble code (first | second << 2) is the one NVIDIA's sparse tensor-core metadata uses
before a backend's tile reordering; the GPU backends build their own reordered copies from the
dense pruned weight (see backends.py), so this layout never depends on the GPU.

Kept positions: the 2 largest |w| of each group, ties to the lower position. A weight that
is already 2:4 therefore keeps every non-zero (zeros fill the free slots).
"""

from __future__ import annotations

import torch

GROUP = 4  # weights per group along K
KEEP = 2  # weights kept per group
# Two 4-bit group codes per metadata byte, so the stored layout needs K % 8 == 0.
LAYOUT_K_MULTIPLE = 8


def _groups(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"2:4 sparsity takes a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"2:4 sparsity needs K divisible by {GROUP}, got K={k}")
    return w.reshape(n, k // GROUP, GROUP)


def kept_positions(w: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K/4, 2) int64: the two kept positions per group, ascending."""
    g = _groups(w)
    # float32 holds bf16/fp16/int8 magnitudes exactly (int8 abs would overflow at -128);
    # a stable descending sort breaks ties towards the lower position.
    order = torch.sort(g.to(torch.float32).abs(), dim=-1, descending=True, stable=True).indices
    return order[..., :KEEP].sort(dim=-1).values


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Boolean (N, K) mask of the weights 2:4 magnitude pruning keeps."""
    g = _groups(w)
    keep = torch.zeros(g.shape, dtype=torch.bool, device=w.device)
    keep.scatter_(-1, kept_positions(w), True)
    return keep.reshape(w.shape)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """2:4 magnitude pruning: keep the 2 largest |w| of every group of 4 along K."""
    return torch.where(mask_24(w), w, torch.zeros((), dtype=w.dtype, device=w.device))


def count_24_violations(w: torch.Tensor) -> tuple[int, int]:
    """(groups with more than 2 non-zeros, all groups)."""
    g = _groups(w)
    bad = int(((g != 0).sum(-1) > KEEP).sum())
    return bad, g.shape[0] * g.shape[1]


def is_24(w: torch.Tensor) -> bool:
    return count_24_violations(w)[0] == 0


def not_24_message(w: torch.Tensor) -> str | None:
    """None when w is 2:4, else a one-line explanation naming how far it is from it."""
    bad, total = count_24_violations(w)
    if not bad:
        return None
    return (
        f"weight is not 2:4 sparse ({bad} of {total} groups of 4 along K have more than 2 "
        "non-zeros); prune it first (lowbit.sparsity.sparsify_ or SemiSparseMasks) or pass prune=True"
    )


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> values (N, K/2) in w's dtype, meta (N, K/8) uint8. Drops everything but the
    2 largest |w| per group: callers check `is_24` first where dropping would be an error."""
    n, k = w.shape
    if k % LAYOUT_K_MULTIPLE:
        raise ValueError(
            f"the 2:4 layout packs two groups per metadata byte: K must be divisible "
            f"by {LAYOUT_K_MULTIPLE}, got K={k}"
        )
    pos = kept_positions(w)
    values = _groups(w).gather(-1, pos).reshape(n, k // 2)
    code = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # (N, K/4)
    meta = code[:, 0::2] | (code[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of compress_24: the dense (N, K) 2:4 weight, in values' dtype.

    Pointwise selects (no scatter), so torch.compile fuses it into one kernel.
    """
    n, half = values.shape
    code = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(n, half // 2)  # (N, K/4)
    first = (code & 0x3).unsqueeze(-1)
    second = (code >> 2).unsqueeze(-1)
    v = values.reshape(n, half // 2, KEEP)
    slot = torch.arange(GROUP, device=values.device, dtype=torch.uint8)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    dense = torch.where(slot == first, v[..., 0:1], torch.where(slot == second, v[..., 1:2], zero))
    return dense.reshape(n, half * 2)
