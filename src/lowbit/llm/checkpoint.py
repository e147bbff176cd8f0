"""Weight sources for the streaming loader: a Hugging Face Llama checkpoint, or random weights.

A source hands out one tensor at a time by lowbit name (`layers.3.attention.wqkv.weight`),
already on the target device and dtype, so the loader never holds more than one block of
high-precision weights.

HF names map onto lowbit names as follows (q/k/v and gate/up are concatenated along the
output dim; HF's q/k layout is already the rotate-half RoPE layout lowbit uses):

    model.embed_tokens.weight                       -> tok_embeddings.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  -> layers.{i}.attention.wqkv.weight
    model.layers.{i}.self_attn.o_proj.weight        -> layers.{i}.attention.wo.weight
    model.layers.{i}.mlp.{gate,up}_proj.weight      -> layers.{i}.feed_forward.w13.weight
    model.layers.{i}.mlp.down_proj.weight           -> layers.{i}.feed_forward.w2.weight
    model.layers.{i}.input_layernorm.weight         -> layers.{i}.attention_norm.weight
    model.layers.{i}.post_attention_layernorm.weight-> layers.{i}.ffn_norm.weight
    model.norm.weight                               -> norm.weight
    lm_head.weight (or embed_tokens when tied)      -> output.weight
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lowbit.llm.config import ModelArgs, from_hf_config
from lowbit.serialization import LoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exporters add that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "attention.wqkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "attention.wo.weight": ("self_attn.o_proj.weight",),
    "feed_forward.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight",),
    "attention_norm.weight": ("input_layernorm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
}


def hf_names(name: str, tied: bool) -> tuple[str, ...]:
    """The HF tensor names that make up lowbit tensor `name`."""
    if name == "tok_embeddings.weight":
        return ("model.embed_tokens.weight",)
    if name == "norm.weight":
        return ("model.norm.weight",)
    if name == "output.weight":
        return ("model.embed_tokens.weight",) if tied else ("lm_head.weight",)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _BLOCK_MAP:
        return tuple(f"model.layers.{parts[1]}.{s}" for s in _BLOCK_MAP[parts[2]])
    raise KeyError(f"no HF mapping for lowbit tensor {name!r}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every lowbit weight name with its shape."""
    d, f = args.dim, args.ffn_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = (args.q_dim + 2 * args.kv_dim, d)
        out[p + "attention.wo.weight"] = (d, args.q_dim)
        out[p + "feed_forward.w13.weight"] = (2 * f, d)
        out[p + "feed_forward.w2.weight"] = (d, f)
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    out["output.weight"] = (args.vocab_size, d)
    return out


def _hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor (the split of each fused lowbit tensor)."""
    d, f = args.dim, args.ffn_dim
    split = {
        "self_attn.q_proj.weight": (args.q_dim, d),
        "self_attn.k_proj.weight": (args.kv_dim, d),
        "self_attn.v_proj.weight": (args.kv_dim, d),
        "self_attn.o_proj.weight": (d, args.q_dim),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    out = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_embeddings:
        out["lm_head.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        for k, s in split.items():
            out[f"model.layers.{i}.{k}"] = s
    return out


class HFCheckpoint:
    """A local HF Llama directory: config.json + model.safetensors or a sharded index.

    The constructor validates everything it can without reading weights (config, index,
    every shard header, every tensor name and shape) and raises LoadError naming the problem.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise LoadError(f"checkpoint directory {self.dir} does not exist")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise LoadError(f"{cfg_path} is missing (expected a Hugging Face Llama checkpoint)")
        try:
            self.hf_config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoadError(f"{cfg_path} is not valid JSON: {e}") from None
        try:
            self.args = from_hf_config(self.hf_config, name=self.dir.name)
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"{cfg_path}: {e}") from None
        self.weight_map = self._weight_map()
        self._check_tensors()
        self._handles: dict[str, Any] = {}
        self._stack: contextlib.ExitStack | None = None

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LoadError(f"{index} is not a valid safetensors index: {e!r}") from None
            return {str(k): str(v) for k, v in wmap.items()}
        single = self.dir / SINGLE_FILE
        if not single.is_file():
            raise LoadError(
                f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                "(only safetensors checkpoints are read)"
            )
        return {name: SINGLE_FILE for name in self._header_shapes(SINGLE_FILE)}

    def _header_shapes(self, file: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        path = self.dir / file
        if not path.is_file():
            raise LoadError(f"shard {path} listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise LoadError(f"{path} is corrupt or unreadable: {e}") from None

    def _check_tensors(self) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.weight_map.values())):
            for k, s in self._header_shapes(file).items():
                if self.weight_map.get(k) == file:
                    shapes[k] = s
        want = _hf_shapes(self.args)
        missing = [k for k in want if k not in shapes]
        if missing:
            raise LoadError(f"{self.dir}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        wrong = [f"{k} {shapes[k]} != {want[k]}" for k in want if shapes[k] != want[k]]
        if wrong:
            raise LoadError(f"{self.dir}: shape mismatch vs config.json: {wrong[:3]}")
        extra = [
            k
            for k in shapes
            if k not in want
            and not k.endswith(IGNORED_SUFFIXES)
            and not (k == "lm_head.weight" and self.args.tie_embeddings)
        ]
        if extra:
            raise LoadError(f"{self.dir}: unexpected tensor(s) for a Llama model, e.g. {extra[:3]}")

    # -- reading -------------------------------------------------------------
    def __enter__(self) -> "HFCheckpoint":
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
        self._handles, self._stack = {}, None

    def _read(self, hf_name: str, device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[hf_name]
        key = f"{file}@{device}"
        if key not in self._handles:
            # safetensors wants an explicit index ("cuda:0"), so loads land on the current GPU
            dev = f"cuda:{torch.cuda.current_device()}" if device == torch.device("cuda") else str(device)
            handle = safe_open(str(self.dir / file), framework="pt", device=dev)
            self._handles[key] = self._stack.enter_context(handle) if self._stack else handle
        try:
            return self._handles[key].get_tensor(hf_name)
        except Exception as e:
            raise LoadError(f"{self.dir / file}: reading {hf_name} failed: {e}") from None

    def tensor(
        self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        parts = [self._read(n, device).to(dtype) for n in hf_names(name, self.args.tie_embeddings)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(t.shape) != tuple(shape):
            raise LoadError(f"{name}: checkpoint shape {tuple(t.shape)} != expected {tuple(shape)}")
        return t

    def describe(self) -> str:
        return f"hf:{self.dir}"


class RandomWeights:
    """Deterministic cheap init drawn directly on the device in the target dtype:
    normal(0, 0.02) for matrices, ones for norms. Each tensor has its own seed derived from
    its name, so a block's weights do not depend on which blocks were made before it."""

    def __init__(self, args: ModelArgs, seed: int = 0, std: float = 0.02) -> None:
        self.args, self.seed, self.std = args, seed, std

    def __enter__(self) -> "RandomWeights":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def tensor(
        self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        if len(shape) == 1:  # RMSNorm weights
            return torch.ones(shape, device=device, dtype=dtype)
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, self.std, generator=gen)

    def describe(self) -> str:
        return f"random(seed={self.seed}, std={self.std})"
