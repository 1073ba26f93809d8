"""The ``jamba`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, JambaConfig, config_names
from .convert.cli import add_convert_parser
from .convert.hf_checkpoint import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, PermissionError, ValueError)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def cmd_info(args) -> int:
    from .info import model_info

    config = JambaConfig.named(args.config)
    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be positive")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jamba", description="Jamba-1.5 models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and memory sizes of a config (allocates nothing)")
    info.add_argument("--config", required=True,
                      help=f"bundled name ({', '.join(config_names())}), config.json, or checkpoint dir")
    info.add_argument("--context", type=int, default=262144, help="tokens per sequence for the cache sizes")
    info.add_argument("--batch", type=int, default=1, help="sequences for the cache sizes")
    info.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="parameter dtype")
    info.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="KV-cache and conv-state dtype (the ssm state is always float32)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)
    add_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"jamba {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
