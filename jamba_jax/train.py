"""Training: the causal-LM loss, HF's router load-balancing loss and Jamba-1.5's activation loss;
a jitted (optionally data-parallel) AdamW step; Orbax train-state checkpoints; HF-format export.

The training loss is ``lm + router_aux_loss_coef * aux + alpha * act`` where

- ``lm`` is HF's ``ForCausalLMLoss``: position ``t`` predicts token ``t + 1``; the mean over target
  positions that are real tokens (``attention_mask`` 1), in fp32;
- ``aux`` is HF's ``load_balancing_loss_func`` over the router logits of every MoE layer:
  ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of (token, choice) assignments to expert ``e`` (summing
  to top-k) and ``P_e`` its mean router probability, both over real tokens of all MoE layers;
- ``act`` is the activation loss of the Jamba-1.5 paper (sec. 3.2): ``mean(a ** 2)`` over the real
  positions of the chosen forward activations (default: every Mamba mixer output and every feed-forward,
  i.e. MoE-expert or MLP, output); ``alpha = 0`` leaves it out of the loss.

The router logits and activations come out of the model with ``mutable=["intermediates"]`` (the layers
``self.sow`` them). The train state is a plain dict ``{"step", "params", "opt_state"}``; batches are
``{"input_ids": [batch, seq] int32, "attention_mask": [batch, seq] bool}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import JambaConfig
from .kernels import Kernels
from .model import JambaLM

ACTIVATIONS = ("mamba_out", "ffn_out")  # what the activation loss covers by default
SPECIAL_TOKENS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>")  # ids 0, 1, 2: Jamba's pad, bos, eos
TEXT_SUFFIXES = (".txt", ".md", ".rst")


# ---- losses ------------------------------------------------------------------------------------

def lm_loss(logits, input_ids, token_valid=None):
    """HF's causal-LM loss: logits ``[batch, seq, vocab]``, input_ids ``[batch, seq]``, token_valid
    ``[batch, seq]`` bool or None. Mean cross-entropy (fp32) of predicting token ``t + 1`` at ``t`` over
    the targets that are real tokens; 0 when there are none."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
    weight = jnp.ones_like(ce) if token_valid is None else token_valid[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def load_balancing_loss(router_logits: Sequence[jax.Array], token_valid, num_experts: int, top_k: int):
    """HF's ``load_balancing_loss_func``. ``router_logits``: one ``[..., tokens, experts]`` array per MoE
    layer or stack of layers (leading axes = layers), ``tokens = batch * seq`` in batch-major order;
    ``token_valid [batch, seq]`` bool or None. The assignment counts carry no gradient (as in HF)."""
    if not router_logits:
        return jnp.float32(0.0)
    counts = jnp.zeros(num_experts, jnp.float32)
    prob_sum = jnp.zeros(num_experts, jnp.float32)
    rows = jnp.float32(0.0)
    for logits in router_logits:
        tokens = logits.shape[-2]
        mask = (jnp.ones((tokens,), jnp.float32) if token_valid is None
                else token_valid.reshape(tokens).astype(jnp.float32))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, tokens, num_experts)
        _, chosen = jax.lax.top_k(probs, top_k)
        assigned = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=-2)  # [layers, tokens, E]
        counts = counts + jnp.einsum("lte,t->e", assigned, mask)
        prob_sum = prob_sum + jnp.einsum("lte,t->e", probs, mask)
        rows = rows + probs.shape[0] * jnp.sum(mask)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


def activation_loss(activations: Sequence[jax.Array], token_valid=None):
    """``mean(a ** 2)`` (fp32) over every element at real positions of the ``[..., batch, seq, hidden]``
    arrays (leading axes = layers); 0 when there are none."""
    total, count = jnp.float32(0.0), jnp.float32(0.0)
    for a in activations:
        a = a.astype(jnp.float32)
        batch, seq, hidden = a.shape[-3:]
        layers = a.size // (batch * seq * hidden)
        mask = jnp.ones((batch, seq), jnp.float32) if token_valid is None else token_valid.astype(jnp.float32)
        total = total + jnp.sum(jnp.square(a) * mask[..., None])
        count = count + layers * hidden * jnp.sum(mask)
    return total / jnp.maximum(count, 1.0)


def max_activation(activations: Sequence[jax.Array], token_valid=None):
    """``max |a|`` over real positions of the ``[..., batch, seq, hidden]`` arrays."""
    out = jnp.float32(0.0)
    for a in activations:
        valid = jnp.ones(a.shape[-3:-1], bool) if token_valid is None else token_valid
        out = jnp.maximum(out, jnp.max(jnp.where(valid[..., None], jnp.abs(a.astype(jnp.float32)), 0.0)))
    return out


def sown(intermediates, name: str) -> list[jax.Array]:
    """Every array the layers sowed under ``name`` (e.g. ``"router_logits"``, ``"mamba_out"``)."""
    found = []
    for path, value in sorted(traverse_util.flatten_dict(intermediates).items()):
        if path[-1] == name:
            found.extend(value)
    return found


# ---- the step ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``aux_loss_coef`` None = the model config's ``router_aux_loss_coef``;
    ``alpha`` scales the activation loss over ``activations`` (0 disables it); ``remat`` recomputes each
    block in the backward pass; ``kernels`` (``jamba_jax.Kernels``) picks the implementations the loss runs
    (the Pallas kernels have no backward pass: on GPU, training takes the XLA ones). The learning rate warms up linearly from 0 over ``warmup_steps``, then
    follows a cosine down to ``learning_rate * min_lr_ratio`` at ``steps``."""

    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    alpha: float = 0.0
    aux_loss_coef: float | None = None
    activations: tuple[str, ...] = ACTIVATIONS
    remat: bool = False
    kernels: Kernels = Kernels()

    def __post_init__(self):
        kernels = Kernels.named(self.kernels)
        object.__setattr__(self, "kernels", kernels)
        kernel = [f"{n}={v!r}" for n, v in dataclasses.asdict(kernels).items() if v.startswith("pallas")]
        if kernel and (jax.default_backend() == "gpu" or any("interpret" in k for k in kernel)):
            raise ValueError(f"TrainConfig: the Pallas kernels ({', '.join(kernel)}) have no backward pass; "
                             "train with Kernels() (XLA)")

    def schedule(self) -> optax.Schedule:
        warmup = min(self.warmup_steps, max(self.steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, max(self.steps, warmup + 1),
                                                  end_value=self.learning_rate * self.min_lr_ratio)


def _decays(path, leaf) -> bool:
    """Weight decay on matrices (kernels, expert weights, embedding, conv kernel); not on norms, biases,
    ``A_log`` or ``D``."""
    return leaf.ndim >= 2 and path[-1].key != "A_log"


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on ``tc.schedule()``."""
    mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(tc.schedule(), tc.beta1, tc.beta2, weight_decay=tc.weight_decay, mask=mask))


def compute_loss(params, batch, *, config: JambaConfig, tc: TrainConfig, dtype=jnp.float32):
    """``(loss, metrics)`` for one batch; metrics: ``loss``, ``lm_loss``, ``aux_loss`` and
    ``activation_loss`` (both unscaled), ``max_activation`` (over ``tc.activations``)."""
    ids, valid = batch["input_ids"], batch.get("attention_mask")
    valid = None if valid is None else valid.astype(bool)
    model = JambaLM(config, dtype, tc.kernels, remat=tc.remat)
    logits, state = model.apply({"params": params}, ids, valid, mutable=["intermediates"])
    inter = state["intermediates"]
    lm = lm_loss(logits, ids, valid)
    aux = load_balancing_loss(sown(inter, "router_logits"), valid, config.num_experts, config.num_experts_per_tok)
    coef = config.router_aux_loss_coef if tc.aux_loss_coef is None else tc.aux_loss_coef
    acts = [a for name in tc.activations for a in sown(inter, name)]
    act = activation_loss(acts, valid)
    loss = lm + coef * aux
    if tc.alpha:  # alpha = 0 leaves the activation loss out of the loss (and the gradient) entirely
        loss = loss + tc.alpha * act
    metrics = {"loss": loss, "lm_loss": lm, "aux_loss": aux, "activation_loss": act,
               "max_activation": jax.lax.stop_gradient(max_activation(acts, valid))}
    return loss, metrics


def data_mesh(devices=None) -> Mesh:
    """A one-axis (``"data"``) mesh over ``devices`` (default: all) for ``Trainer``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


class Trainer:
    """The jitted train step, eval step and state initialisation for one model config.

    With ``mesh`` (a ``jax.sharding.Mesh`` with ``Auto`` axes, e.g. ``data_mesh()``) the state is
    replicated on every device and each batch is split along ``data_axis`` (data parallelism: XLA
    all-reduces the gradients); the batch size must be a multiple of that axis' size."""

    def __init__(self, config: JambaConfig, tc: TrainConfig, *, mesh: Mesh | None = None,
                 data_axis: str = "data", dtype=jnp.float32):
        if mesh is not None and any(t != AxisType.Auto for t in mesh.axis_types):
            raise ValueError(f"the mesh's axes must be AxisType.Auto (see data_mesh), got {mesh.axis_types}")
        self.config, self.tc, self.mesh, self.dtype = config, tc, mesh, jnp.dtype(dtype)
        self.optimizer = make_optimizer(tc)
        loss = functools.partial(compute_loss, config=config, tc=tc, dtype=self.dtype)
        eval_tc = dataclasses.replace(tc, alpha=0.0, remat=False)
        eval_loss = functools.partial(compute_loss, config=config, tc=eval_tc, dtype=self.dtype)
        schedule = tc.schedule()

        def step(state, batch):
            grads, metrics = jax.grad(loss, has_aux=True)(state["params"], batch)
            updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
            return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

        def evaluate(params, batch):
            return eval_loss(params, batch)[1]

        if mesh is None:
            self.replicated = self.data_sharding = None
            self._step = jax.jit(step, donate_argnums=0)
            self._eval = jax.jit(evaluate)
        else:
            self.replicated = NamedSharding(mesh, P())
            self.data_sharding = NamedSharding(mesh, P(data_axis))
            self._step = jax.jit(step, donate_argnums=0, in_shardings=(self.replicated, self.data_sharding),
                                 out_shardings=(self.replicated, self.replicated))
            self._eval = jax.jit(evaluate, in_shardings=(self.replicated, self.data_sharding),
                                 out_shardings=self.replicated)

    def init_state(self, params) -> dict:
        """The train state at step 0 for a copy of ``params`` (placed on the mesh when there is one; the
        step donates the state, ``params`` stay usable)."""
        params = jax.tree.map(lambda a: jnp.array(a, self.dtype, copy=True), params)
        state = {"step": jnp.int32(0), "params": params, "opt_state": self.optimizer.init(params)}
        return state if self.mesh is None else jax.device_put(state, self.replicated)

    def _put(self, batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return batch if self.mesh is None else jax.device_put(batch, self.data_sharding)

    def step(self, state, batch) -> tuple[dict, dict]:
        """One optimizer step; ``state`` is donated. Returns ``(new_state, metrics)``."""
        return self._step(state, self._put(batch))

    def evaluate(self, params, batch) -> dict:
        """The metrics of ``compute_loss`` at ``alpha = 0`` for one batch (no step)."""
        return self._eval(params, self._put(batch))


# ---- train-state checkpoints -------------------------------------------------------------------

class TrainCheckpoints:
    """Orbax ``CheckpointManager`` over train states in ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, state, *, wait: bool = True) -> None:
        self.manager.save(int(state["step"]), args=self._ocp.args.StandardSave(state), force=True)
        if wait:
            self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, like, step: int | None = None) -> dict:
        """The state saved at ``step`` (default: the latest), with the structure, dtypes and shardings
        of ``like`` (a state or its ``jax.ShapeDtypeStruct``s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.manager.directory}: no train-state checkpoint")
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---- data --------------------------------------------------------------------------------------

def read_texts(path: str | Path) -> list[str]:
    """The documents under ``path``: one file, or every ``.txt``/``.md``/``.rst`` file below a directory
    (sorted by path)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not any(t.strip() for t in texts):
        raise ValueError(f"{path}: no text")
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (no added prefix space, no BOS/EOS added on encode)
    with ``SPECIAL_TOKENS`` at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_texts(tokenizer, texts: Sequence[str], eos_id: int) -> np.ndarray:
    """One int32 token stream: every document followed by ``eos_id``."""
    ids = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, np.int32)


def sample_batch(tokens: np.ndarray, step: int, batch: int, seq: int, seed: int) -> dict:
    """The batch of step ``step``: ``batch`` windows of ``seq`` tokens at offsets drawn from
    ``(seed, step)`` alone, so a resumed run sees exactly the batches of an uninterrupted one."""
    if len(tokens) < seq:
        raise ValueError(f"the training text has {len(tokens)} tokens, fewer than --seq {seq}")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq + 1, batch)
    ids = np.stack([tokens[s:s + seq] for s in starts])
    return {"input_ids": ids, "attention_mask": np.ones_like(ids, bool)}


def eval_batches(tokens: np.ndarray, batch: int, seq: int) -> Iterable[dict]:
    """Consecutive non-overlapping windows of ``seq`` tokens (the last one shorter, right-padded and
    masked), ``batch`` at a time (the last batch padded with masked rows)."""
    windows = [tokens[i:i + seq] for i in range(0, len(tokens) - 1, seq)]
    windows = [w for w in windows if len(w) > 1]
    for i in range(0, len(windows), batch):
        ids = np.zeros((batch, seq), np.int32)
        mask = np.zeros((batch, seq), bool)
        for row, w in enumerate(windows[i:i + batch]):
            ids[row, :len(w)] = w
            mask[row, :len(w)] = True
        yield {"input_ids": ids, "attention_mask": mask}


def evaluate_tokens(trainer: Trainer, params, tokens: np.ndarray, batch: int, seq: int) -> dict:
    """Held-out LM loss (token-weighted over all windows) and max activation over ``tokens``."""
    total, count, peak = 0.0, 0, 0.0
    for b in eval_batches(tokens, batch, seq):
        m = trainer.evaluate(params, b)
        n = int(np.sum(b["attention_mask"][:, 1:] & b["attention_mask"][:, :-1]))
        total += float(m["lm_loss"]) * n
        count += n
        peak = max(peak, float(m["max_activation"]))
    return {"lm_loss": total / max(count, 1), "tokens": count, "max_activation": peak}


# ---- HF export ---------------------------------------------------------------------------------

def save_pretrained(directory: str | Path, config: JambaConfig, params, tokenizer=None, *, dtype=None) -> Path:
    """Writes an HF checkpoint (``config.json``, ``model.safetensors``, ``generation_config.json`` and,
    with a tokenizer, ``tokenizer.json``) that ``jamba_jax.load`` and HF ``JambaForCausalLM`` both read.
    ``dtype`` defaults to the params' dtype."""
    from safetensors.numpy import save_file

    from .convert.hf_keys import checkpoint_entries

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(params).items()}
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else flat[("embed_tokens", "embedding")].dtype
    tensors = {e.hf_key: np.ascontiguousarray(e.layout.to_hf(flat[e.path][e.index]).astype(np_dtype))
               for e in checkpoint_entries(config)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = dataclasses.replace(config, dtype=np_dtype.name)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# ---- the training run --------------------------------------------------------------------------

def train(config: JambaConfig, data: str | Path, out: str | Path, tc: TrainConfig, *, batch: int = 8,
          seq: int = 256, seed: int = 0, tokenizer_file: str | Path | None = None, vocab_size: int | None = None,
          save_every: int = 200, keep: int = 3, eval_fraction: float = 0.05, save_dtype=None,
          mesh: Mesh | None = None, progress: bool = True, log=print) -> dict:
    """Trains ``config`` on the text at ``data`` and writes an HF checkpoint to ``out``.

    The tokenizer is ``tokenizer_file``, else ``out/tokenizer.json`` when present (a resumed run), else a
    byte-level BPE of ``vocab_size`` (default: the config's) trained on the training part of the text;
    the config's vocab size and pad/bos/eos ids follow the tokenizer. The last ``eval_fraction`` of the
    token stream is held out. Train states go to ``out/train_state`` every ``save_every`` steps (the last
    ``keep`` are kept) and a run resumes from the latest. Returns the run's summary (per-step metrics,
    tokens/s, held-out loss), also written to ``out/train_summary.json`` at every save."""
    import time

    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from .params import init_params

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_texts(data)
    if tokenizer_file is None and (out / "tokenizer.json").is_file():
        tokenizer_file = out / "tokenizer.json"
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        n_train_docs = max(1, math.floor(len(texts) * (1 - eval_fraction))) if len(texts) > 1 else 1
        tokenizer = train_tokenizer(texts[:n_train_docs], vocab_size or config.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = dataclasses.replace(config, vocab_size=tokenizer.get_vocab_size(), pad_token_id=ids["<|pad|>"],
                                 bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"],
                                 dtype="float32")
    tokens = encode_texts(tokenizer, texts, config.eos_token_id if config.eos_token_id is not None else 0)
    n_eval = int(len(tokens) * eval_fraction)
    train_tokens, eval_tokens = tokens[:len(tokens) - n_eval], tokens[len(tokens) - n_eval:]

    trainer = Trainer(config, tc, mesh=mesh)
    state = trainer.init_state(init_params(config, jax.random.key(seed)))
    checkpoints = TrainCheckpoints(out / "train_state", keep=keep)
    start = 0
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
        start = int(state["step"])
        log(f"resumed from step {start}")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
    log(f"{n_params:,} params; {len(train_tokens):,} training tokens, {len(eval_tokens):,} held out; "
        f"vocab {config.vocab_size}")

    summary_file = out / "train_summary.json"
    history = []
    if start and summary_file.is_file():  # the history of the earlier part of a resumed run
        history = [h for h in json.loads(summary_file.read_text()).get("history", []) if h["step"] <= start]
    timed = [0, 0.0]  # tokens, seconds (steps after the first, which compiles)

    def summary(held_out=None) -> dict:
        last = history[-20:]
        return {"steps": tc.steps, "batch": batch, "seq": seq, "seed": seed, "params": n_params,
                "train_tokens": len(train_tokens), "held_out_tokens": len(eval_tokens),
                "tokens_per_second": timed[0] / timed[1] if timed[1] else None,
                "final_train_loss": float(np.mean([h["lm_loss"] for h in last])) if last else None,  # last 20 steps
                "final_max_activation": last[-1]["max_activation"] if last else None,
                "held_out": held_out, "train_config": dataclasses.asdict(tc), "history": history}

    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="train", disable=not progress)
    for step in bar:
        b = sample_batch(train_tokens, step, batch, seq, seed)
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, b)
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        if step > start:
            timed[0] += batch * seq
            timed[1] += time.perf_counter() - t0
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{timed[0] / timed[1] if timed[1] else 0:,.0f}")
        history.append({"step": step + 1, **metrics})
        if (step + 1) % save_every == 0 or step + 1 == tc.steps:
            checkpoints.save(state)
            summary_file.write_text(json.dumps(summary(), indent=1) + "\n")
    bar.close()
    checkpoints.close()
    held_out = evaluate_tokens(trainer, state["params"], eval_tokens, batch, seq) if n_eval > seq // 4 else None
    save_pretrained(out, config, state["params"], tokenizer, dtype=save_dtype)
    result = summary(held_out)
    summary_file.write_text(json.dumps(result, indent=1) + "\n")
    return result
