"""The Pallas attention kernels (interpret mode on CPU) against the XLA attention paths, the
``attend`` dispatch, and a check that both kernels lower for the Triton GPU backend (lowering only:
no GPU is needed to build the Triton IR)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jamba_jax.attention import attend, naive_attention
from helpers import rel_err, triton_kernels_for_cuda
from pallas_kernels.flash_attention import decode_attention_pallas, flash_attention_pallas
from test_attention import case, real_queries

TOL = 1e-5


def with_reference(kernel):
    """One jitted function returning ``(kernel(...), naive_attention(...))`` (one compile per case)."""
    return jax.jit(lambda q, k, v, start, valid: (kernel(q, k, v, start, valid),
                                                  naive_attention(q, k, v, start, valid)))


def check(fn, q, k, v, start, valid, q_len):
    got, ref = fn(q, k, v, start, valid)
    assert got.shape == q.shape and got.dtype == q.dtype
    real = real_queries(valid, start, q_len) if valid is not None else np.ones((q.shape[0], q_len), bool)
    assert rel_err(got, ref, real) < TOL, start


def oracle(q, k, v, start, valid):
    """float64 numpy attention, written from the masking rule."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    slots = np.arange(k.shape[2])
    mask = (slots[None, :] <= start + np.arange(q.shape[1])[:, None])[None] & np.asarray(valid)[:, None, :]
    s = np.einsum("bqhgd,bhkd->bhgqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None], s, -1e300)  # a fully masked (padding) row: uniform, not NaN
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhgqk,bhkd->bqhgd", p / p.sum(-1, keepdims=True), v)


# (batch, q_len, k_len, kv_heads, group, head_dim, block_q, block_k (None: through ``attend``), left pads
#  (None: kv_valid None),
#  q_start values (the slot of the first query))
PREFILL_CASES = [
    (2, 37, 37, 2, 4, 8, 16, 16, (5, 0), (0,)),         # self-attention, lengths not multiples of the blocks
    (1, 16, 100, 1, 8, 16, 32, 32, None, (84, 40)),     # kv_valid None; chunked prefill at the end of the
                                                        # cache, then at slot 40 (later slots filled, masked)
    (3, 20, 20, 4, 1, 8, None, None, (0, 19, 3), (0,)),  # GQA 1; a row that is all padding but its last;
                                                        # attend's defaults (blocks clipped to one)
    (2, 9, 64, 2, 2, 32, 16, 16, (30, 0), (20, 55)),    # GQA 2, queries before and after the padding ends
]


@pytest.mark.parametrize("case_", PREFILL_CASES, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-g{c[4]}-hd{c[5]}")
def test_flash_equals_xla(case_):
    batch, q_len, k_len, n_kv, group, hd, bq, bk, pads, starts = case_
    q, k, v, _, valid = case(sum(case_[:6]), batch, q_len, k_len, n_kv, group, hd, left_pad=pads or (0,))
    valid = None if pads is None else valid
    if bq is None:
        fn = with_reference(lambda *a: attend(*a, impl="pallas-interpret"))
    else:
        fn = with_reference(lambda *a: flash_attention_pallas(*a, block_q=bq, block_k=bk, interpret=True))
    for start in starts:  # q_start is traced: one compile
        check(fn, q, k, v, start, valid, q_len)


def test_flash_bf16_close_to_xla_bf16():
    q, k, v, start, valid = case(4, 2, 33, 33, 2, 4, 16, left_pad=(7, 0))
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got, ref = with_reference(lambda *a: flash_attention_pallas(*a, block_q=32, block_k=16, interpret=True))(
        *low, start, valid)
    assert got.dtype == jnp.bfloat16
    real = real_queries(valid, start, 33)
    truth = oracle(q, k, v, start, valid)
    err_kernel, err_xla = rel_err(got, truth, real), rel_err(ref, truth, real)
    assert err_kernel < 2e-2 and err_kernel <= 2 * err_xla + 1e-3, (err_kernel, err_xla)


# (k_len, kv_heads, group, head_dim, block_k, num_splits (block_k None: through ``attend``), left pads,
#  cache fills (q_start values))
DECODE_CASES = [
    (100, 2, 2, 8, 16, 3, (10, 0), (99, 40, 3, 10)),  # splits sharing 1..7 live blocks, padded key axis;
                                                      # at fill 10 row 0's only real key is the query
    (64, 1, 8, 16, 16, 16, (0,), (40, 0, 63)),        # more splits than live blocks: empty splits
    (200, 2, 1, 32, None, None, (5, 0), (199, 17, 130)),  # GQA 1; attend's defaults (automatic splits)
]


@pytest.mark.parametrize("case_", DECODE_CASES, ids=lambda c: f"k{c[0]}-g{c[2]}-S{c[5]}")
def test_decode_equals_xla(case_):
    k_len, n_kv, group, hd, bk, splits, pads, fills = case_
    q, k, v, _, valid = case(k_len + group, len(pads), 1, k_len, n_kv, group, hd, left_pad=pads)
    if bk is None:
        fn = with_reference(lambda *a: attend(*a, impl="pallas-interpret"))
    else:
        fn = with_reference(lambda *a: decode_attention_pallas(*a, block_k=bk, num_splits=splits, interpret=True))
    for start in fills:
        check(fn, q, k, v, start, valid, 1)


def test_attend_dispatch_and_bad_arguments():
    q, k, v, start, valid = case(5, 1, 1, 20, 2, 2, 8, left_pad=(3,), q_start=12)
    # "pallas" off GPU is the XLA path itself.
    traced = {impl: str(jax.make_jaxpr(lambda *a: attend(*a, impl=impl))(q, k, v, start, valid))
              for impl in ("xla", "pallas", "pallas-interpret")}
    assert traced["pallas"] == traced["xla"] and "pallas_call" not in traced["xla"]
    assert "pallas_call" in traced["pallas-interpret"]
    with pytest.raises(ValueError):
        attend(q, k, v, start, valid, impl="nope")
    with pytest.raises(ValueError):
        flash_attention_pallas(q, k, v, start, valid, block_q=24, interpret=True)
    with pytest.raises(ValueError):
        decode_attention_pallas(q[:, [0, 0]], k, v, start, valid, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_triton_gpu(dtype):
    """Builds the Triton IR for CUDA at Jamba-1.5-Mini head shapes (kv_heads 8, group 4, head_dim
    128) without a GPU; catches unsupported ops and non power-of-two shapes. Compiling that IR to
    PTX still needs the GPU toolchain."""

    sd = jax.ShapeDtypeStruct
    kv = sd((1, 8, 300, 128), dtype)
    checks = [
        (lambda q, k, v, s, m: flash_attention_pallas(q, k, v, s, m, block_q=128, block_k=64), 64),
        (lambda q, k, v, s, m: flash_attention_pallas(q, k, v, s, None), 64),
        (lambda q, k, v, s, m: decode_attention_pallas(q, k, v, s, m), 1),
        (lambda q, k, v, s, m: decode_attention_pallas(q, k, v, s, None, num_splits=4), 1),
    ]
    for fn, q_len in checks:
        args = (sd((1, q_len, 8, 4, 128), dtype), kv, kv, sd((), jnp.int32), sd((1, 300), jnp.bool_))
        assert triton_kernels_for_cuda(fn, *args) == 1
