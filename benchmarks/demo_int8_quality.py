"""The bundled demo model with ExpertsInt8: held-out loss and greedy output against bf16 and fp32.

    python benchmarks/demo_int8_quality.py --out docs/results/demo_int8_quality.json

The test ``tests/test_demo_int8.py`` imports its helpers.

Models (all from ``jamba_jax/demo/``, whose weights are stored in bf16; ``Kernels(scan="sequential")``, the
scan of the training run):

- ``fp32``: ``load(dtype="float32")``, the reference;
- ``bf16``: ``load(dtype="bfloat16")``;
- ``int8``: ``load(dtype="bfloat16", quantize="experts-int8")`` (int8 feed-forward weights, bf16 compute);
- ``int8_fp32``: ``load(dtype="float32", quantize="experts-int8")`` (the quantization error alone);
- ``int4_control``: ``int8`` with every int8 value rounded to a multiple of 16 (15 levels, 4-bit
  precision): a deliberately coarse quantization, to show what the loss and greedy checks see when the
  weights are damaged.

Held-out loss: the held-out token stream of the demo's training run (``benchmarks/train_demo.sh``: the
``pydoc_data.topics`` documents, the demo tokenizer, the last 5% of the token stream), cut into windows of
the run's 128 tokens by ``jamba_jax.train.eval_batches`` (batches of 8, as in training) and scored with
``jamba_jax.train.lm_loss``, token-weighted over all windows as ``jamba_jax.train.evaluate_tokens`` does.
The bf16 - fp32 difference is the noise scale the int8 - bf16 difference is read against.

Greedy output: 64 new tokens for each of ``PROMPTS`` (one prompt at a time, EOS not stopping; every
prompt is at most 16 tokens, so one prefill compile per model), each model against bf16 (and int8 against
fp32): whether they are equal and, if not, the first position where they differ.
The loss's standard error over the held-out windows (the statistical noise of the measurement itself) is
reported beside the differences.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from jamba_jax import Kernels
from jamba_jax.demo import DEMO_DIR
from jamba_jax.quant import QuantizedWeight
from jamba_jax.train import TrainConfig, Trainer, encode_texts, eval_batches, evaluate_tokens, lm_loss, read_texts

from common import environment, log, write_json

SEQ = 128  # --seq of benchmarks/train_demo.sh
BATCH = 8  # --batch of benchmarks/train_demo.sh (the held-out batches are this size too)
EVAL_FRACTION = 0.05  # jamba train's default --eval-fraction
NEW_TOKENS = 64
PROMPTS = (
    'The "for" statement is used to',
    "A class definition defines",
    "Lambda expressions are used to",
    'The "while" statement',
    "Dictionaries can be created by",
)
KERNELS = Kernels(scan="sequential")  # --scan of benchmarks/train_demo.sh (the run's held-out loss used it too)
MODELS = {  # name: load() keywords
    "fp32": {"dtype": "float32", "kernels": KERNELS},
    "bf16": {"dtype": "bfloat16", "kernels": KERNELS},
    "int8": {"dtype": "bfloat16", "quantize": "experts-int8", "kernels": KERNELS},
    "int8_fp32": {"dtype": "float32", "quantize": "experts-int8", "kernels": KERNELS},
}


def coarsened(model, step: int = 16):
    """``model`` (ExpertsInt8) with every int8 weight value rounded to a multiple of ``step``."""
    def coarse(leaf):
        if not isinstance(leaf, QuantizedWeight):
            return leaf
        q = jnp.clip(jnp.round(leaf.q.astype(jnp.float32) / step) * step, -127, 127).astype(jnp.int8)
        return QuantizedWeight(q, leaf.scale)
    return model.replace(params=jax.tree.map(coarse, model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))


def held_out_tokens(tokenizer, eval_fraction: float = EVAL_FRACTION) -> np.ndarray:
    """The held-out token stream of the demo run: the topics written to files as train_demo.sh does,
    read back by ``read_texts`` (same order), encoded by ``encode_texts``, last ``eval_fraction`` kept
    (the split of ``jamba_jax.train.train``)."""
    import pydoc_data.topics

    with tempfile.TemporaryDirectory() as data:
        for name, text in sorted(pydoc_data.topics.topics.items()):
            Path(data, f"{name}.txt").write_text(text, encoding="utf-8")
        texts = read_texts(data)
    tokens = encode_texts(tokenizer, texts, tokenizer.token_to_id("<|endoftext|>"))
    n_eval = int(len(tokens) * eval_fraction)
    return tokens[len(tokens) - n_eval:]


def window_losses(model, tokens: np.ndarray, *, seq: int = SEQ, batch: int = BATCH, windows: int | None = None):
    """``[(sum of token cross-entropies, target count)]``, one per held-out window (the first ``windows``),
    run ``batch`` windows at a time as in training."""
    out = []
    for b in eval_batches(tokens, batch, seq):
        logits = jamba_jax.forward(model, b["input_ids"], b["attention_mask"])
        for r in range(batch):
            n = int(np.sum(b["attention_mask"][r, 1:] & b["attention_mask"][r, :-1]))
            if n:
                rows = slice(r, r + 1)
                out.append((float(lm_loss(logits[rows], b["input_ids"][rows], b["attention_mask"][rows])) * n, n))
        if windows is not None and len(out) >= windows:
            return out[:windows]
    return out


def mean_loss(parts) -> float:
    """The token-weighted mean of ``window_losses``."""
    return sum(s for s, _ in parts) / max(sum(n for _, n in parts), 1)


def greedy(model, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt`` (EOS does not stop the row)."""
    return jamba_jax.generate(model, prompt, max_new_tokens=new_tokens, stop_ids=()).tokens[0]


def first_difference(a, b) -> int | None:
    """The first index where ``a`` and ``b`` differ (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/demo_int8_quality.json")
    ap.add_argument("--test-windows", type=int, default=8, help="leading held-out windows also scored alone "
                    "(what tests/test_demo_int8.py checks)")
    args = ap.parse_args()

    models = {name: jamba_jax.load(DEMO_DIR, **kw) for name, kw in MODELS.items()}
    models["int4_control"] = coarsened(models["int8"])
    tokens = held_out_tokens(models["bf16"].tokenizer)
    result = {**environment(), "held_out_tokens": int(len(tokens)), "seq": SEQ, "batch": BATCH,
              "new_tokens": NEW_TOKENS,
              "models": {**MODELS, "int4_control": "int8 with int8 values rounded to multiples of 16"}}

    # The training run's own evaluation (Trainer, fp32, its scan) of the fp32 model's params: the losses
    # below are computed the same way, so fp32 must reproduce it.
    trainer = Trainer(models["fp32"].config, TrainConfig(kernels=KERNELS))
    result["trainer_fp32_loss"] = evaluate_tokens(trainer, models["fp32"].params, tokens, BATCH, SEQ)["lm_loss"]

    subset = f"first_{args.test_windows}_windows"
    loss = {"held_out": {}, subset: {}}
    for name, model in models.items():
        t0 = time.perf_counter()
        parts = window_losses(model, tokens)
        loss["held_out"][name] = mean_loss(parts)
        loss[subset][name] = mean_loss(parts[:args.test_windows])
        if name == "bf16":
            per_window = np.array([s / n for s, n in parts])
            loss["windows"] = len(parts)
            loss[f"{subset}_targets"] = sum(n for _, n in parts[:args.test_windows])
            loss["bf16_standard_error"] = float(per_window.std(ddof=1) / np.sqrt(len(parts)))
        log(f"{name:12s} held-out loss {loss['held_out'][name]:.6f}  {subset} {loss[subset][name]:.6f}"
            f"  ({time.perf_counter() - t0:.1f} s)")
    pairs = (("bf16", "fp32"), ("int8", "bf16"), ("int8", "fp32"), ("int8_fp32", "fp32"), ("int4_control", "bf16"))
    loss["differences"] = {which: {f"{a}-{b}": loss[which][a] - loss[which][b] for a, b in pairs}
                           for which in ("held_out", subset)}
    result["loss"] = loss

    tok = models["bf16"].tokenizer
    compared = (("fp32", "bf16"), ("int8", "bf16"), ("int8", "fp32"), ("int8_fp32", "bf16"), ("int4_control", "bf16"))
    rows = []
    for prompt in PROMPTS:
        out = {name: greedy(model, prompt) for name, model in models.items()}
        row = {"prompt": prompt, "text": {name: tok.decode(ids) for name, ids in out.items()},
               "first_difference": {f"{a}_vs_{b}": first_difference(out[a], out[b]) for a, b in compared}}
        rows.append(row)
        log(f"{prompt!r}: first differences {row['first_difference']}")
    result["greedy"] = {"prompts": rows, "equal_fraction": {
        f"{a}_vs_{b}": sum(r["first_difference"][f"{a}_vs_{b}"] is None for r in rows) / len(rows)
        for a, b in compared}}
    print(json.dumps({k: v for k, v in loss.items() if k in ("differences", "bf16_standard_error")}, indent=1))
    print(json.dumps(result["greedy"]["equal_fraction"], indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
