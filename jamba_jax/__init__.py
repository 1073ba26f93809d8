"""jamba_jax: AI21's Jamba-1.5 hybrid Transformer-Mamba MoE models in JAX/Flax."""

from .api import Jamba, forward, load
from .config import ConfigError, JambaConfig, config_names
from .convert.hf_checkpoint import CheckpointError
from .generate import GenerationResult, chat, generate
from .model import JambaLM, abstract_params, init_params
from .quant import QuantizedWeight, quantize_params
from .sharding import make_mesh

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "Jamba", "JambaConfig", "JambaLM", "abstract_params",
    "GenerationResult", "QuantizedWeight", "chat", "config_names", "forward", "generate", "init_params", "load",
    "make_mesh", "quantize_params",
]
