"""FLOPs of a prefill, by layer kind: the count MFU is computed from (``benchmarks/gpu_prefill.py``).

A multiply-add counts 2 FLOPs; a matmul ``[M, K] @ [K, N]`` is ``2 M K N``. The count is what the model's
math needs, per sequence (times ``batch``), for ``T = prompt_tokens`` new tokens after ``S = context_start``
cached ones (``H`` hidden, ``I`` intermediate, ``V`` vocab, ``nh`` heads, ``kv`` kv heads, ``hd`` head dim,
``di = expand * H``, ``N`` d_state, ``R`` dt_rank, ``k`` conv width, ``E`` experts, ``top`` experts per token):

- ``attention_proj`` (per attention layer): ``2 T H (nh hd + 2 kv hd + nh hd)`` (q, k, v, o).
- ``attention_scores`` (per attention layer, causal): query ``i`` sees ``S + i + 1`` keys, so
  ``P = T S + T (T + 1) / 2`` (query, key) pairs, each ``2 nh hd`` for ``q.k`` and ``2 nh hd`` for
  ``p.v``: ``4 nh hd P``. Masked pairs (the upper triangle, padding, unfilled cache slots) are left out.
- ``mamba_in_proj`` ``2 T H 2 di``, ``mamba_x_proj`` ``2 T di (R + 2 N)``, ``mamba_dt_proj`` ``2 T R di``,
  ``mamba_out_proj`` ``2 T di H`` (per Mamba layer).
- ``mamba_conv``: the depthwise causal conv, ``2 T di k`` (per Mamba layer; not a matmul).
- ``mamba_scan``: per (channel, state, position) ``6``: ``exp(dt A)``'s product (1), ``(dt x) B`` (1), the
  state update ``h = dA h + dBx`` (2) and the output ``y += C h`` (2): ``6 T di N`` (not a matmul; the
  exponential counts as nothing).
- ``router`` ``2 T H E`` and ``experts`` ``2 T top 3 H I`` (only the active experts) per MoE layer.
- ``dense_mlp`` ``2 T 3 H I`` per dense (non-MoE) layer.
- ``lm_head`` ``2 H V`` per logits position: one position per sequence (``logits="last"``: what
  ``steps.prefill`` / ``generate`` compute, ``apply_step``'s ``last_only``), or ``T`` (``logits="all"``: a
  plain ``forward``).

``matmul`` sums every kind but ``mamba_conv`` and ``mamba_scan``; ``total`` sums them all. Norms, softmax,
activations, residual adds and the embedding gather are left out (``O(T H)`` each, small beside the matmuls).
"""

from __future__ import annotations

from .config import JambaConfig

MATMUL_KINDS = ("attention_proj", "attention_scores", "mamba_in_proj", "mamba_x_proj", "mamba_dt_proj",
                "mamba_out_proj", "router", "experts", "dense_mlp", "lm_head")
OTHER_KINDS = ("mamba_conv", "mamba_scan")
SCAN_FLOPS_PER_STATE = 6


def causal_pairs(prompt_tokens: int, context_start: int = 0) -> int:
    """(query, key) pairs causal attention computes for ``prompt_tokens`` queries after ``context_start``
    cached keys: ``T S + T (T + 1) / 2``."""
    t, s = prompt_tokens, context_start
    return t * s + t * (t + 1) // 2


def layer_flops(config: JambaConfig, prompt_tokens: int, context_start: int = 0) -> dict[str, dict[str, int]]:
    """FLOPs of one layer of each kind for one sequence: ``{"attention": {...}, "mamba": {...},
    "moe": {...}, "dense_mlp": {...}}`` (the mixers and the feed-forwards; formulas in the module doc)."""
    c, t = config, prompt_tokens
    h, di, n, r = c.hidden_size, c.d_inner, c.mamba_d_state, c.mamba_dt_rank
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "attention": {"attention_proj": 2 * t * h * (2 * q_dim + 2 * kv_dim),
                      "attention_scores": 4 * q_dim * causal_pairs(t, context_start)},
        "mamba": {"mamba_in_proj": 2 * t * h * 2 * di, "mamba_x_proj": 2 * t * di * (r + 2 * n),
                  "mamba_dt_proj": 2 * t * r * di, "mamba_out_proj": 2 * t * di * h,
                  "mamba_conv": 2 * t * di * c.mamba_d_conv, "mamba_scan": SCAN_FLOPS_PER_STATE * t * di * n},
        "moe": {"router": 2 * t * h * c.num_experts,
                "experts": 2 * t * c.num_experts_per_tok * 3 * h * c.intermediate_size},
        "dense_mlp": {"dense_mlp": 2 * t * 3 * h * c.intermediate_size},
    }


def prefill_flops(config: JambaConfig, prompt_tokens: int, context_start: int = 0, *, batch: int = 1,
                  logits: str = "last") -> dict[str, int]:
    """FLOPs of a prefill of ``prompt_tokens`` tokens per sequence after ``context_start`` cached ones, for
    ``batch`` sequences: one entry per kind (``MATMUL_KINDS``, ``OTHER_KINDS``) summed over the layers,
    ``matmul`` (the matmul kinds) and ``total``. ``logits``: ``"last"`` (the LM head on each sequence's last
    position, as ``prefill`` / ``generate`` run it) or ``"all"`` (every position, as ``forward``). A chunked
    prefill's chunks add up to the one-shot count (the causal pairs do)."""
    if prompt_tokens < 0 or context_start < 0 or batch < 1:
        raise ValueError(f"prefill_flops: need prompt_tokens, context_start >= 0 and batch >= 1, got "
                         f"{prompt_tokens}, {context_start}, {batch}")
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    per = layer_flops(config, prompt_tokens, context_start)
    out = dict.fromkeys(MATMUL_KINDS + OTHER_KINDS, 0)
    for mixer, is_moe in config.layer_plan:
        for kind, value in {**per[mixer], **per["moe" if is_moe else "dense_mlp"]}.items():
            out[kind] += value
    positions = (1 if prompt_tokens else 0) if logits == "last" else prompt_tokens
    out["lm_head"] = 2 * positions * config.hidden_size * config.vocab_size
    out = {kind: batch * value for kind, value in out.items()}
    out["matmul"] = sum(out[k] for k in MATMUL_KINDS)
    out["total"] = out["matmul"] + sum(out[k] for k in OTHER_KINDS)
    return out
