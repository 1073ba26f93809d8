"""``jamba convert``: HF safetensors -> converted (Orbax) checkpoint, or back with ``--to-hf``."""

from __future__ import annotations

import argparse


def _size(text: str) -> int:
    from .to_hf import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_convert(args) -> int:
    if args.to_hf:
        if args.quantize is not None:
            raise ValueError("--quantize applies to HF -> converted only, not --to-hf")
        from .to_hf import orbax_to_hf

        out = orbax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                          overwrite=args.overwrite, verify=not args.no_verify)
    else:
        from .orbax_checkpoint import hf_to_orbax

        out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, quantize=args.quantize,
                          allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``convert`` on the ``jamba`` subcommand parsers."""
    p = subparsers.add_parser(
        "convert", help="convert an HF checkpoint to an Orbax one (one param leaf at a time), or back",
        description="Converts an HF safetensors checkpoint directory SRC into a jamba_jax checkpoint "
                    "(Orbax arrays + manifest, config and tokenizer files) at DST; with --to-hf, the reverse. "
                    "DST appears only when complete; one conversion into DST at a time.")
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (with --to-hf: a converted checkpoint)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to-hf", action="store_true", help="convert a converted checkpoint back to HF safetensors")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="stored dtype (default: the source's)")
    p.add_argument("--quantize", choices=["experts-int8"], default=None,
                   help="store MoE expert and dense MLP weights as int8 + fp32 per-output-channel scales "
                        "(ExpertsInt8); load() restores them quantized")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST, if it is empty or a previous conversion")
    p.add_argument("--no-verify", action="store_true",
                   help="with --to-hf: skip the per-leaf checksum check (shapes and dtypes are always checked)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert tensors holding NaN/Inf (refused by default, naming the tensor)")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="with --to-hf: largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.set_defaults(run=cmd_convert)
    return p
