"""Draws docs/architecture.png: Jamba-1.5's layer plan, the decode cache and the sharding rules.

    python docs/architecture_figure.py [--out docs/architecture.png]

Every number in the picture comes from the bundled configs (``jamba_jax.JambaConfig``) and from
``jamba_jax.cache.cache_bytes`` and ``jamba_jax.sharding.RULES``; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from jamba_jax.cache import cache_bytes  # noqa: E402
from jamba_jax.config import ATTENTION, JambaConfig  # noqa: E402
from jamba_jax.sharding import RULES  # noqa: E402

MAMBA_COLOR, ATTN_COLOR, MOE_COLOR, MLP_COLOR = "#7fb3d5", "#f5b041", "#a9dfbf", "#e5e8e8"


def box(ax, x, y, w, h, text, color, fontsize=8, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01,rounding_size=0.08", fc=color, ec="#444",
                                lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def note(ax, x, y, text, width=165):
    ax.text(x, y, textwrap.fill(text, width), fontsize=8.5, va="center")


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def draw(out: Path) -> None:
    mini, large = JambaConfig.named("jamba-1.5-mini"), JambaConfig.named("jamba-1.5-large")
    fig = plt.figure(figsize=(12, 8.2))
    fig.suptitle("jamba_jax: Jamba-1.5 layer plan, decode cache and sharding", fontsize=13, weight="bold")

    # 1. One block of the layer plan.
    ax = fig.add_axes([0.02, 0.50, 0.96, 0.42])
    ax.set_xlim(0, 8.6)
    ax.set_ylim(-0.9, 3.6)
    ax.axis("off")
    p = mini.block_size
    note(ax, 0.05, 3.35, f"One block = {p} layers (attention iff i % {mini.attn_layer_period} == "
         f"{mini.attn_layer_offset}; "
            f"MoE iff i % {mini.expert_layer_period} == {mini.expert_layer_offset}). Jamba-1.5-Mini: "
            f"{mini.num_blocks} blocks ({mini.num_hidden_layers} layers); Jamba-1.5-Large: {large.num_blocks} blocks "
            f"({large.num_hidden_layers} layers). The blocks run under nn.scan: compile time is flat in depth.")
    for i, (mixer, moe) in enumerate(mini.layer_plan[:p]):
        x = 0.1 + i * 1.05
        ax.text(x + 0.45, 2.95, f"layer {i}", ha="center", fontsize=8, weight="bold")
        box(ax, x, 2.55, 0.9, 0.25, "RMSNorm", "white", 7)
        if mixer == ATTENTION:
            box(ax, x, 1.7, 0.9, 0.75, f"Attention\nGQA {mini.num_attention_heads}/{mini.num_key_value_heads}\nno RoPE",
                ATTN_COLOR, 7.5, "bold")
        else:
            box(ax, x, 1.7, 0.9, 0.75, f"Mamba\nd_inner {mini.d_inner}\nd_state {mini.mamba_d_state}",
                MAMBA_COLOR, 7.5)
        box(ax, x, 1.3, 0.9, 0.25, "RMSNorm", "white", 7)
        if moe:
            box(ax, x, 0.45, 0.9, 0.75, f"MoE\n{mini.num_experts} experts\ntop-{mini.num_experts_per_tok}",
                MOE_COLOR, 7.5)
        else:
            box(ax, x, 0.45, 0.9, 0.75, f"MLP\nSwiGLU\n{mini.intermediate_size}", MLP_COLOR, 7.5)
        if i < p - 1:
            ax.annotate("", xy=(x + 1.03, 1.45), xytext=(x + 0.92, 1.45), arrowprops=dict(arrowstyle="->", lw=0.8))
    note(ax, 0.05, 0.08, "Each layer: h = x + mixer(norm(x)); out = h + ffn(norm(h)). Model: embed -> blocks (-> tail "
            "layers when the count is not a multiple of the block) -> final norm -> lm_head. Params: layer i at "
            f"blocks/layer_{{i % {p}}}[i // {p}], stacked over blocks.")
    note(ax, 0.05, -0.38, "Prefill: the prompt in chunks of 256 tokens through the cache (blocked online-softmax "
            "attention; chunked associative or Pallas selective scan). Decode: one token per step in an on-device "
            "while_loop (split-K attention, fused one-step scan).")
    note(ax, 0.05, -0.78, "ExpertsInt8: expert and MLP weights int8 + fp32 per-output-channel scales, multiplied by "
            "an int8 grouped matmul (Pallas on GPU, XLA elsewhere).")

    # 2. The cache: bytes per sequence against context length.
    ax2 = fig.add_axes([0.07, 0.07, 0.40, 0.33])
    contexts = [2**k for k in range(10, 19)]
    for config, name, style in ((mini, "Mini", "-"), (large, "Large", "--")):
        sizes = [cache_bytes(config, 1, n, jnp.bfloat16) for n in contexts]
        ax2.plot(contexts, [s["kv_cache_bytes"] / 2**30 for s in sizes], style, color=ATTN_COLOR, marker="o",
                 ms=3, label=f"{name}: K/V of {config.num_attention_layers} attention layers (bf16)")
        ax2.plot(contexts, [s["mamba_state_bytes"] / 2**30 for s in sizes], style, color=MAMBA_COLOR, marker="s",
                 ms=3, label=f"{name}: conv + fp32 ssm state of {config.num_mamba_layers} Mamba layers")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("context (tokens), batch 1")
    ax2.set_ylabel("GiB")
    ax2.set_title("Decode cache per sequence (cache.CACHE_TABLE)", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)

    # 3. The cache and parameter pytrees.
    ax3 = fig.add_axes([0.52, 0.05, 0.46, 0.37])
    ax3.axis("off")
    at = cache_bytes(mini, 1, 262144, jnp.bfloat16)
    lines = [
        ("Cache (one pytree laid out like the params)", "bold"),
        ("pos []  int32: filled slots;  valid [batch, max_len] bool", "normal"),
        ("attention layer: key, value [blocks, batch, kv_heads, max_len, head_dim]", "normal"),
        ("Mamba layer: conv [blocks, batch, d_conv - 1, d_inner];", "normal"),
        ("             ssm [blocks, batch, d_inner, d_state] float32", "normal"),
        (f"Mini at 256K: {human(at['kv_cache_bytes'])} K/V + {human(at['mamba_state_bytes'])} Mamba state", "normal"),
        ("", "normal"),
        ("Sharding: mesh (data, expert, tensor), sharding.RULES", "bold"),
        *((f"{axis:<9} -> {RULES[axis] or 'replicated'}", "normal")
          for axis in ("batch", "kv_heads", "d_inner", "experts", "mlp", "vocab", "embed")),
        ("MoE under shard_map: own experts, hidden slice, one psum", "normal"),
    ]
    for k, (text, weight) in enumerate(lines):
        ax3.text(0.0, 1.02 - k * 0.066, text, fontsize=8.5, weight=weight, family="monospace" if weight == "normal"
                 else None, va="top")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).with_name("architecture.png")))
    args = parser.parse_args()
    draw(Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
