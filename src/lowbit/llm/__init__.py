"""lowbit.llm: a compact Llama-family decoder with streaming quantized loading, a static KV
cache, prefill + (compiled) decode generation, perplexity, and prefill/decode format pairs.

    from lowbit.llm import load_model, make_quantizer, Generator
    model = load_model("llama-3-8b", random_weights=True, quantizer=make_quantizer("w4a8"),
                       device="cuda", dtype=torch.bfloat16)

Importing this package imports neither transformers nor triton.
"""

from lowbit.llm.checkpoint import HFCheckpoint, RandomWeights
from lowbit.llm.config import PRESETS, ModelArgs, RopeKind, RopeScaling, from_hf_config, preset
from lowbit.llm.generate import GenerationResult, Generator, Sampling, sample
from lowbit.llm.loading import QUANT_CHOICES, build_model, load_model, make_quantizer
from lowbit.llm.model import Transformer, rope_inv_freq
from lowbit.llm.perplexity import PerplexityResult, perplexity
from lowbit.llm.phased import Phase, PhasedLinear, PrefillDecodeConfig, quantize_phased_, set_phase, use_phase
from lowbit.llm.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "QUANT_CHOICES",
    "ByteTokenizer",
    "GenerationResult",
    "Generator",
    "HFCheckpoint",
    "ModelArgs",
    "PerplexityResult",
    "Phase",
    "PhasedLinear",
    "PrefillDecodeConfig",
    "RandomWeights",
    "RopeKind",
    "RopeScaling",
    "Sampling",
    "Transformer",
    "build_model",
    "from_hf_config",
    "load_model",
    "load_tokenizer",
    "make_quantizer",
    "perplexity",
    "preset",
    "quantize_phased_",
    "rope_inv_freq",
    "sample",
    "set_phase",
    "use_phase",
]
