"""jamba_jax: AI21's Jamba-1.5 hybrid Transformer-Mamba MoE models in JAX/Flax."""

from .api import Jamba, load
from .config import ConfigError, JambaConfig, config_names
from .convert.hf_checkpoint import CheckpointError
from .generate import GenerationResult, chat, generate
from .kernels import Kernels
from .model import JambaLM
from .params import abstract_params, init_params
from .quant import QuantizedWeight, quantize_params
from .sharding import make_mesh
from .steps import decode_step, forward, init_cache, prefill

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "Jamba", "JambaConfig", "JambaLM", "Kernels", "abstract_params",
    "GenerationResult", "QuantizedWeight", "chat", "config_names", "decode_step", "forward", "generate",
    "init_cache", "init_params", "load", "make_mesh", "prefill", "quantize_params",
]
