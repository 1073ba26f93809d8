"""The ``jamba`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import FLOAT_DTYPES, ConfigError, JambaConfig, config_names
from .convert.cli import add_convert_parser
from .convert.hf_checkpoint import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, PermissionError, ValueError)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _size(n: int) -> str:
    """GiB, or MiB / KiB for what would print as 0.00 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale / 100:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 2**10:,.2f} KiB"


def cmd_info(args) -> int:
    from .info import model_info

    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be positive")
    if args.table:
        return print_kv_table(args)
    if args.config is None:
        raise ValueError("--config is required (or --table for the KV-cache table)")
    config = JambaConfig.named(args.config)
    if args.mesh is not None:
        return print_memory_plan(config, args)
    info = model_info(config, context=args.context, batch=args.batch, dtype=args.dtype,
                      cache_dtype=args.cache_dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    plan = "".join("A" if m == "attention" else "M" for m, _ in config.layer_plan)
    rows = [
        ("config", args.config),
        ("layers", f"{info['layers']} ({info['attention_layers']} attention, {info['mamba_layers']} Mamba, "
                   f"{info['moe_layers']} MoE)"),
        ("layer plan", plan),
        ("total params", f"{info['total_params'] / 1e9:,.2f}B ({info['total_params']:,})"),
        ("active params", f"{info['active_params'] / 1e9:,.2f}B ({info['active_params']:,})"),
        *((f"param bytes ({dt})", _gib(n)) for dt, n in info["param_bytes_by_dtype"].items()),
        (f"KV cache ({args.cache_dtype}, {args.batch} x {args.context:,} tokens)", _gib(info["kv_cache_bytes"])),
        ("Mamba state (conv + fp32 ssm)", _gib(info["mamba_state_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def print_memory_plan(config, args) -> int:
    """``--mesh N``: the per-device plan of ``jamba_jax.memory_plan``, compiled for N devices
    (``memory_plan.plan_devices``: attached or compile-only GPUs on a GPU machine, else fake CPU devices)."""
    from .memory_plan import memory_plan, plan_devices

    if args.mesh < 1 or args.expert < 1 or args.mesh % args.expert:
        raise ValueError(f"--mesh ({args.mesh}) must be a positive multiple of --expert ({args.expert})")
    from .sharding import make_mesh

    devices, found = plan_devices(args.mesh)  # before JAX starts: it may make fake CPU devices
    mesh = make_mesh(args.mesh, expert=args.expert, devices=devices)
    print(f"compiling the prefill chunk and decode step for {args.mesh} devices ({found}) ...", file=sys.stderr)
    plan = memory_plan(config, mesh, context=args.context, batch=args.batch, dtype=args.dtype,
                       quantize=args.quantize)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    weights = f"{args.dtype}" + (" + int8 experts/MLPs" if args.quantize else "")
    rows = [
        ("config", args.config),
        ("mesh", " x ".join(f"{k} {v}" for k, v in plan["mesh"].items())),
        ("compiled by", f"{plan['compiler']} ({plan['compiled_for']}, {found})"),
        (f"params per device ({weights})", _size(plan["params"])),
        (f"KV cache per device ({args.batch} x {args.context:,} tokens)", _size(plan["kv_cache"])),
        ("Mamba state per device", _size(plan["mamba_state"])),
        (f"prefill chunk scratch ({plan['prefill_chunk']} tokens, compiled)", _size(plan["prefill_temp"])),
        ("decode step scratch (compiled)", _size(plan["decode_temp"])),
        ("peak per device", _size(plan["peak"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def print_kv_table(args) -> int:
    """``jamba info --table``: the Jamba-1.5 paper's Table 1 (KV cache of one sequence of ``--context``
    tokens) from the Jamba configs and the other models' published architectures."""
    from .info import kv_cache_table

    rows = kv_cache_table(args.context, args.cache_dtype)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"KV cache, 1 x {args.context:,} tokens, {args.cache_dtype} "
          "(paper: Table 1 of Jamba-1.5, 256K tokens, 16-bit, GB = 2^30 bytes)")
    print(f"{'model':<17} {'source':<23} {'attn layers':>11} {'kv heads':>8} {'head dim':>8} {'KV cache':>11} "
          f"{'paper':>6}")
    for r in rows:
        print(f"{r['model']:<17} {r['source']:<23} {r['attention_layers']:>11} {r['kv_heads']:>8} "
              f"{r['head_dim']:>8} {_gib(r['kv_cache_bytes']):>11} {str(r['paper_gb']) + ' GB':>6}")
    return 0


def add_bench_parser(sub) -> None:
    """``jamba bench``: the paper's serving protocol (batch 1, prompt of L tokens, 512 output tokens) for
    jamba_jax, HF transformers on the same weights, and an all-attention baseline; JSON and PNG plots."""
    bench = sub.add_parser(
        "bench", help="latency and tokens/s vs context: jamba_jax, HF, all-attention baseline",
        description="The Jamba-1.5 paper's serving protocol (Figs. 3-4): batch 1, a prompt of L random tokens, "
                    "--new greedy output tokens, for jamba_jax and HF transformers on the same random weights and "
                    "for an all-attention baseline of matched parameter count. Writes OUT/bench.json and PNG "
                    "plots; compile and warm-up are not timed. See docs/benchmarks.md.")
    bench.add_argument("--config", default="jamba-small",
                       help=f"bundled name ({', '.join(config_names())}), config.json, or checkpoint dir "
                            "(random weights of its shapes)")
    bench.add_argument("--lengths", default="1K,2K,4K,8K", help="prompt lengths, comma-separated (1K = 1024)")
    bench.add_argument("--new", type=int, default=512, help="output tokens per run (the paper: 512)")
    bench.add_argument("--out", default="bench_results", help="directory for bench.json and the PNG plots")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bench.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    bench.add_argument("--no-baseline", action="store_true", help="skip the all-attention baseline")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=1,
                       help="runs per model and length; the fastest is kept (for a machine shared with other jobs)")

    def run(args) -> int:
        from .bench import parse_lengths, run_bench, summary, write_results

        lengths = parse_lengths(args.lengths)
        result = run_bench(args.config, lengths, args.new, hf=not args.no_hf, baseline=not args.no_baseline,
                           dtype=args.dtype, seed=args.seed, repeats=args.repeats,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
        written = write_results(result, args.out)
        print(summary(result))
        print(f"wrote {', '.join(str(p) for p in written)}")
        return 0

    bench.set_defaults(run=run)


def cmd_generate(args) -> int:
    if args.distributed:  # before any other JAX call: every host runs this same command
        from . import distributed

        distributed.initialize(name="jamba generate")
        distributed.route_native_output("jamba generate")  # native logs would mix into the generated text
        return distributed.run_job(lambda: _generate(args), lambda e: 130 if isinstance(e, KeyboardInterrupt)
                                   else 2 if isinstance(e, USER_ERRORS) else 1)
    return _generate(args)


def _generate(args) -> int:
    """``jamba generate`` in this process; with ``--distributed`` every process of the job runs it on
    process 0's inputs, and only process 0 prints."""
    from .api import load
    from .distributed import agree, is_primary
    from .generate import generate

    if args.distributed:
        (args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.stop) = agree(
            [args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.stop])
    show = print if is_primary() else (lambda *a, **k: None)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise ValueError(f"--prompt is not valid UTF-8 (at character {e.start}); pass UTF-8 text") from None
    if args.checkpoint is None:
        from .demo import DEMO_DIR

        args.checkpoint = DEMO_DIR
    from .compilation_cache import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache)
    mesh = None
    if args.mesh is not None:
        from .sharding import make_mesh

        mesh = make_mesh(None if args.mesh == 0 else args.mesh, expert=args.expert)
    model = load(args.checkpoint, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize, mesh=mesh)
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint}: no tokenizer.json; `jamba generate` needs one to read the prompt")
    stream = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None, stream=True)
    printed, tokens = "", []
    try:
        while True:
            token = next(stream)[0]
            if token is None:
                continue
            tokens.append(token)
            text = model.tokenizer.decode(tokens)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
                show(text[len(printed):], end="", flush=True)
                printed = text
    except StopIteration as done:
        result = done.value
    final = result.text[0]
    show(final[len(printed):] if final.startswith(printed) else "", flush=True)
    show(f"[{len(result.tokens[0])} tokens; compile {result.compile_seconds:.2f} s; "
          f"prefill {result.prefill_seconds:.2f} s "
          f"({result.prefill_tokens_per_second:,.0f} tok/s); decode {result.decode_tokens_per_second:,.1f} tok/s]",
          file=sys.stderr)
    return 0


def add_train_parser(sub) -> None:
    """``jamba train``: trains a config on a text file or directory into an HF checkpoint directory."""
    train = sub.add_parser("train", help="train a model on text (AdamW; LM + router aux + activation loss)")
    train.add_argument("--config", required=True,
                       help=f"bundled name ({', '.join(config_names())}), config.json, or checkpoint dir")
    train.add_argument("--data", required=True, help="a text file, or a directory of .txt/.md/.rst files")
    train.add_argument("--out", required=True, help="output directory: HF checkpoint + train_state/ (resumed)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--seq", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then cosine)")
    train.add_argument("--warmup", type=int, default=100, help="warmup steps")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="final / peak learning rate")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    train.add_argument("--alpha", type=float, default=0.0, help="activation-loss weight (0 = off; paper: 1e-5)")
    train.add_argument("--aux-coef", type=float, default=None, help="router aux-loss weight (default: config's)")
    train.add_argument("--remat", action="store_true", help="gradient checkpointing per block")
    train.add_argument("--scan", default="xla", choices=["xla", "associative", "sequential"],
                       help="selective scan, Kernels.scan (xla: sequential on CPU, associative elsewhere)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a byte-level BPE)")
    train.add_argument("--vocab-size", type=int, default=None, help="BPE vocab size (default: the config's)")
    train.add_argument("--eval-fraction", type=float, default=0.05, help="held-out tail of the token stream")
    train.add_argument("--save-every", type=int, default=200, help="train-state checkpoint interval (steps)")
    train.add_argument("--keep", type=int, default=3, help="train-state checkpoints kept")
    train.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16"],
                       help="dtype of model.safetensors (default float32)")
    train.add_argument("--data-parallel", action="store_true", help="shard batches over all local devices")

    def run(args) -> int:
        from .kernels import Kernels
        from .train import TrainConfig, data_mesh, train as train_model

        if min(args.steps, args.batch, args.seq - 1, args.save_every, args.keep) < 1:
            raise ValueError("--steps, --batch, --save-every and --keep must be positive and --seq at least 2")
        mesh = data_mesh() if args.data_parallel else None
        tc = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                         min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.clip,
                         alpha=args.alpha, aux_loss_coef=args.aux_coef, remat=args.remat,
                         kernels=Kernels(scan=args.scan))
        summary = train_model(JambaConfig.named(args.config), args.data, args.out, tc, batch=args.batch,
                              seq=args.seq, seed=args.seed, tokenizer_file=args.tokenizer,
                              vocab_size=args.vocab_size, save_every=args.save_every, keep=args.keep,
                              eval_fraction=args.eval_fraction, save_dtype=args.save_dtype, mesh=mesh,
                              log=lambda m: print(m, file=sys.stderr))
        held = summary["held_out"]
        loss = summary["final_train_loss"]
        print((f"final train loss {loss:.4f}; " if loss is not None else "")
              + (f"held-out loss {held['lm_loss']:.4f}; " if held else "")
              + f"{summary['tokens_per_second'] or 0:,.0f} tokens/s; checkpoint in {args.out}")
        return 0

    train.set_defaults(run=run)


def add_serve_parser(sub) -> None:
    """``jamba serve``: the continuous-batching engine behind an OpenAI-compatible HTTP API."""
    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serves a checkpoint over HTTP (POST /v1/completions, /v1/chat/completions, GET /v1/models, "
                    "/health): up to --max-batch requests decode together, a new one is prefilled in chunks "
                    "between their steps. See docs/serving.md.")
    serve.add_argument("--checkpoint", default=None,
                       help="HF or converted checkpoint directory with tokenizer.json (default: the bundled demo model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="decode slots (requests decoded together)")
    serve.add_argument("--max-length", type=int, default=2048, help="most tokens (prompt + new) of one request")
    serve.add_argument("--chunk", type=int, default=None, help="prompt tokens prefilled per step (default 128)")
    serve.add_argument("--prefill-rows", type=int, default=None,
                       help="prompts prefilled together in one step (default: --max-batch, at most 8)")
    serve.add_argument("--decode-steps", type=int, default=None,
                       help="decode steps per call while every slot is busy (default 4)")
    serve.add_argument("--queue-size", type=int, default=64, help="requests waiting for a slot before 429")
    serve.add_argument("--prefix-entries", type=int, default=8, help="snapshots kept for prefix reuse (0: none)")
    serve.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the directory's)")
    serve.add_argument("--dtype", default=None, choices=FLOAT_DTYPES, help="compute/param dtype")
    serve.add_argument("--kernels", default="xla", choices=["xla", "pallas"])
    serve.add_argument("--mesh", type=int, default=None, help="shard over this many devices (0: all)")
    serve.add_argument("--expert", type=int, default=1, help="with --mesh: the expert-parallel axis size")
    serve.add_argument("--quantize", default=None, choices=["experts-int8"])
    serve.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="JAX's persistent compilation cache (default ~/.cache/jamba_jax/xla; 'off')")

    def run(args) -> int:
        import socket
        import time
        from pathlib import Path

        from .api import load
        from .compilation_cache import enable_compilation_cache
        from .serve.engine import DEFAULT_CHUNK, DEFAULT_DECODE_STEPS, Engine
        from .serve.server import serve as run_server

        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65536), got {args.port}")
        for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-length", args.max_length, 2),
                                 ("--chunk", 1 if args.chunk is None else args.chunk, 1),
                                 ("--prefill-rows", 1 if args.prefill_rows is None else args.prefill_rows, 1),
                                 ("--decode-steps", 1 if args.decode_steps is None else args.decode_steps, 1),
                                 ("--queue-size", args.queue_size, 0),
                                 ("--prefix-entries", args.prefix_entries, 0)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            try:  # refuse a busy port before loading and compiling
                probe.bind((args.host, args.port))
            except OSError as e:
                raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; check --host and --port") from None
        enable_compilation_cache(args.compilation_cache)
        if args.checkpoint is None:
            from .demo import DEMO_DIR

            args.checkpoint = DEMO_DIR
        mesh = None
        if args.mesh is not None:
            from .sharding import make_mesh

            mesh = make_mesh(None if args.mesh == 0 else args.mesh, expert=args.expert)
        model = load(args.checkpoint, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize, mesh=mesh)
        engine = Engine(model, slots=args.max_batch, max_length=args.max_length,
                        chunk=args.chunk or DEFAULT_CHUNK, prefill_rows=args.prefill_rows,
                        decode_steps=args.decode_steps or DEFAULT_DECODE_STEPS, queue_size=args.queue_size,
                        prefix_entries=args.prefix_entries)
        start = time.perf_counter()
        engine.start()
        name = args.model_name or Path(args.checkpoint).resolve().name
        print(f"jamba serve: {name}, {args.max_batch} slots x {args.max_length} tokens, warm-up "
              f"{time.perf_counter() - start:.1f} s; http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        try:
            run_server(engine, name, args.host, args.port, log_level="warning")
        finally:
            engine.close()
        return 0

    serve.set_defaults(run=run)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported in one line (and exit 2) instead of the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jamba", description="Jamba-1.5 models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="parameter counts and memory sizes of a config (allocates nothing)")
    info.add_argument("--config", default=None,
                      help=f"bundled name ({', '.join(config_names())}), config.json, or checkpoint dir")
    info.add_argument("--table", action="store_true",
                      help="the KV-cache table of the Jamba-1.5 paper (Table 1) instead of one config")
    info.add_argument("--context", type=int, default=262144, help="tokens per sequence for the cache sizes")
    info.add_argument("--batch", type=int, default=1, help="sequences for the cache sizes")
    info.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="parameter dtype")
    info.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="KV-cache and conv-state dtype (the ssm state is always float32)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mesh", type=int, default=None,
                      help="per-device memory plan on this many devices (compiles the prefill and decode steps)")
    info.add_argument("--expert", type=int, default=1, help="with --mesh: the expert-parallel axis size")
    info.add_argument("--quantize", default=None, choices=["experts-int8"], help="with --mesh: int8 experts/MLPs")
    info.set_defaults(run=cmd_info)
    add_convert_parser(sub)
    add_train_parser(sub)
    add_bench_parser(sub)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    gen.add_argument("--checkpoint", default=None,
                     help="HF or converted checkpoint directory with tokenizer.json (default: the bundled demo model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default=None, choices=FLOAT_DTYPES,
                     help="compute/param dtype (default: the checkpoint's)")
    gen.add_argument("--kernels", default="xla", choices=["xla", "pallas"],
                     help="pallas: the Pallas scan, attention and int8 MoE kernels on GPU (XLA elsewhere)")
    gen.add_argument("--mesh", type=int, default=None,
                     help="shard over this many devices (0: all; tensor-parallel, see --expert)")
    gen.add_argument("--expert", type=int, default=1, help="with --mesh: the expert-parallel axis size")
    gen.add_argument("--distributed", action="store_true",
                     help="one job over several processes/hosts: run the same command on each, with "
                          "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set (docs/sharding.md)")
    gen.add_argument("--quantize", default=None, choices=["experts-int8"],
                     help="int8 expert and MLP weights (ExpertsInt8), quantized at load")
    gen.add_argument("--compilation-cache", default=None, metavar="DIR",
                     help="JAX's persistent compilation cache (default ~/.cache/jamba_jax/xla or "
                          "$JAMBA_COMPILATION_CACHE; 'off' to turn it off)")
    gen.set_defaults(run=cmd_generate)
    add_serve_parser(sub)
    return parser


TRACEBACK_VARIABLE = "JAMBA_TRACEBACK"  # set to 1 to see the traceback of an internal error


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"jamba {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jamba {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- an internal error: one line, the traceback on request
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"jamba {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              f"(set {TRACEBACK_VARIABLE}=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
