"""Joining a torchrun launch for tensor-parallel generation (`lowbit generate --tp N`).

torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK; each process
builds the model, keeps its shard of every block, and decodes in lockstep with the others
(NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launch_hint(tp: int) -> str:
    return f"torchrun --nproc-per-node {tp} -m lowbit generate --tp {tp} ..."


def init_tensor_parallel(tp: int, device: str = "auto") -> tuple[torch.device, bool]:
    """Join (or reuse) the process group of a torchrun launch with `tp` processes.

    Returns this rank's device (cuda:LOCAL_RANK for "auto"/"cuda") and whether this call created
    the process group (the caller then destroys it when done).
    """
    if dist.is_initialized():
        world = dist.get_world_size()
        if world != tp:
            raise ValueError(f"--tp {tp} but the process group has {world} ranks")
    elif "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp {tp} runs one process per GPU: launch it with `{launch_hint(tp)}`")
    elif int(os.environ["WORLD_SIZE"]) != tp:
        raise ValueError(
            f"--tp {tp} but torchrun started {os.environ['WORLD_SIZE']} processes: "
            f"--nproc-per-node must equal --tp"
        )
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device in ("auto", "cuda"):
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device == "cuda" and dev.type != "cuda":
            raise ValueError("--device cuda: CUDA is not available in this torch build")
    else:
        dev = torch.device(device)
        if dev.type == "cuda":
            raise ValueError(f"--tp {tp} --device {device}: each rank takes cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        if dev.type != "cpu":
            raise ValueError(f"--tp: --device {device} is not supported (cuda or cpu)")
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        created = True
    return dev, created


def is_main_rank() -> bool:
    """True on rank 0 of a process group, and always without one (it prints and writes results)."""
    return not dist.is_initialized() or dist.get_rank() == 0
