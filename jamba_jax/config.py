"""`JambaConfig`: the model's shape and layer plan, read from an HF ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

ATTENTION, MAMBA = "attention", "mamba"


class ConfigError(ValueError):
    """A config that cannot describe a Jamba model."""


# Upper bounds on the sizes a config may ask for: far above the released models (Jamba-1.5-Large: hidden
# 8192, intermediate 24576, 72 layers, 64 heads, vocab 65536), low enough that nothing sized from a config
# (the param table, the checkpoint's key list, a cache) can grow without bound before the checkpoint's
# tensors are checked against it.
_SIZE_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "num_experts": 256, "num_experts_per_tok": 256,
    "expert_layer_period": 1024, "attn_layer_period": 1024, "mamba_d_state": 1024, "mamba_d_conv": 64,
    "mamba_expand": 16, "mamba_dt_rank": 1 << 16, "max_position_embeddings": 1 << 24,
}
_OFFSET_FIELDS = ("expert_layer_offset", "attn_layer_offset")
_BOOL_FIELDS = ("tie_word_embeddings", "mamba_conv_bias", "mamba_proj_bias")
_FLOAT_RANGES = {"rms_norm_eps": (1e-12, 1.0), "router_aux_loss_coef": (0.0, 1e3), "initializer_range": (0.0, 1e3)}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a checkpoint's params may be stored in


@dataclasses.dataclass(frozen=True)
class JambaConfig:
    """Every field of HF's ``JambaConfig`` that changes the network, with HF's defaults
    (Jamba-v0.1 / Jamba-1.5-Mini shapes). ``mamba_dt_rank`` is resolved ("auto" -> ceil(hidden/16))."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_experts: int = 16
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    dtype: str = "bfloat16"  # the checkpoint's dtype (HF "torch_dtype" / "dtype")

    def __post_init__(self):
        self._check_types()  # before anything is derived or sized from the fields
        if self.mamba_dt_rank == "auto":
            object.__setattr__(self, "mamba_dt_rank", math.ceil(self.hidden_size / 16))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _check_types(self):
        def fail(name, value, what):
            raise ConfigError(f"invalid Jamba config: {name} is {value!r}; expected {what}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name, top in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if name == "mamba_dt_rank" and value == "auto":
                continue
            if not is_int(value) or not 1 <= value <= top:
                fail(name, value, f"an integer in [1, {top:,}]")
        for name in _OFFSET_FIELDS:
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, getattr(self, name), "an integer >= 0")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "true or false")
        for name, (low, high) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                fail(name, value, f"a number in [{low:g}, {high:g}]")
        if not isinstance(self.hidden_act, str):
            fail("hidden_act", self.hidden_act, "a string")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value < self.vocab_size):
                fail(name, value, f"null or a token id in [0, {self.vocab_size})")
        eos = self.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else () if eos is None else (eos,)
        if not all(is_int(t) and 0 <= t < self.vocab_size for t in ids):
            fail("eos_token_id", eos, f"null, a token id or a list of token ids in [0, {self.vocab_size})")
        if self.dtype not in FLOAT_DTYPES:
            fail("dtype", self.dtype, "one of " + ", ".join(FLOAT_DTYPES))

    def _validate(self):
        def need(ok, what):
            if not ok:
                raise ConfigError(f"invalid Jamba config: {what}")

        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads {self.num_key_value_heads}")
        need(0 <= self.attn_layer_offset < self.attn_layer_period,
             f"attn_layer_offset {self.attn_layer_offset} must be in [0, attn_layer_period {self.attn_layer_period})")
        need(0 <= self.expert_layer_offset < self.expert_layer_period,
             f"expert_layer_offset {self.expert_layer_offset} must be in "
             f"[0, expert_layer_period {self.expert_layer_period})")
        need(self.num_experts >= 1, f"num_experts {self.num_experts} must be at least 1")
        need(self.num_experts == 1 or 1 <= self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts {self.num_experts}]")
        need(self.num_hidden_layers >= 1, "num_hidden_layers must be at least 1")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    # ---- layer plan ----------------------------------------------------------------------------
    def mixer_type(self, layer: int) -> str:
        """``"attention"`` or ``"mamba"`` for layer ``layer``."""
        return ATTENTION if layer % self.attn_layer_period == self.attn_layer_offset else MAMBA

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 1 and layer % self.expert_layer_period == self.expert_layer_offset

    @property
    def block_size(self) -> int:
        """Length of the repeating block of the layer plan: layer i and i + block_size have the same
        mixer and feed-forward type."""
        if self.num_experts > 1:
            return math.lcm(self.attn_layer_period, self.expert_layer_period)
        return self.attn_layer_period

    @property
    def num_blocks(self) -> int:
        """Number of full repeating blocks; scanned over."""
        return self.num_hidden_layers // self.block_size

    @property
    def num_tail_layers(self) -> int:
        """Layers after the last full block: the first ``num_tail_layers`` positions of the block."""
        return self.num_hidden_layers % self.block_size

    @property
    def layer_plan(self) -> tuple[tuple[str, bool], ...]:
        """``(mixer_type, is_moe)`` for every layer."""
        return tuple((self.mixer_type(i), self.is_moe(i)) for i in range(self.num_hidden_layers))

    @property
    def num_attention_layers(self) -> int:
        return sum(m == ATTENTION for m, _ in self.layer_plan)

    @property
    def num_mamba_layers(self) -> int:
        return self.num_hidden_layers - self.num_attention_layers

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    # ---- I/O -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JambaConfig":
        """Reads an HF ``config.json`` dict; keys that do not change the network are ignored."""
        model_type = d.get("model_type", "jamba")
        if model_type != "jamba":
            raise ConfigError(f"model_type is {model_type!r}, expected 'jamba'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "num_local_experts" in d and "num_experts" not in d:
            kwargs["num_experts"] = d["num_local_experts"]
        dtype = d.get("dtype") or d.get("torch_dtype")
        # No dtype recorded: HF then loads float32.
        kwargs["dtype"] = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """An HF-compatible ``config.json`` dict."""
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["model_type"] = "jamba"
        d["architectures"] = ["JambaForCausalLM"]
        d["num_key_value_heads"] = self.num_key_value_heads
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "JambaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def named(cls, name_or_path: str | Path) -> "JambaConfig":
        """A bundled config by name (``jamba-1.5-mini``; see ``config_names()``), a ``config.json``
        file, or a directory holding one."""
        path = Path(name_or_path)
        if path.is_dir():
            return cls.from_json(path / "config.json")
        if path.is_file():
            return cls.from_json(path)
        bundled = resources.files("jamba_jax.configs") / f"{name_or_path}.json"
        if bundled.is_file():
            return cls.from_dict(json.loads(bundled.read_text()))
        raise ConfigError(
            f"unknown config {str(name_or_path)!r}: not a file or directory; bundled configs are "
            + ", ".join(config_names())
        )


def config_names() -> list[str]:
    """Names of the bundled configs."""
    return sorted(p.name.removesuffix(".json") for p in resources.files("jamba_jax.configs").iterdir()
                  if p.name.endswith(".json"))
