"""The command line: argparse only. Each command parses, calls library functions, prints.

Bad input: one line on stderr and exit 2 (a traceback only with --debug). Compare/verify: exit 1 on divergence.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import HarnessError
from .runner import DEFAULT_PROMPT, DTYPES


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    make_tiny(Path(args.dir), seed=args.seed, variant=args.variant, fmt=args.format)
    print(f"wrote a tiny Llama-{args.variant} checkpoint ({args.format} format, seed {args.seed}) to {args.dir}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .runner import decode_token, trace_implementation

    ckpt = open_checkpoint(args.checkpoint)
    logits = trace_implementation(args.impl, ckpt, args.out, prompt=args.prompt, dtype=args.dtype, names=args.names,
                                  device=args.device, progress=sys.stderr.isatty())  # fmt: skip
    token = int(logits[-1].float().argmax())
    print(f"{args.impl} ({args.dtype}): next token {decode_token(ckpt, token)!r} (id {token}); trace written to {args.out}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text after <|begin_of_text|> (default: the notebook's)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="working dtype of the forward")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a deterministic tiny Llama-3 checkpoint")
    p.add_argument("dir", help="output directory (created; must be new or empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="3.0", choices=["3.0", "3.1", "3.2"])
    p.add_argument("--format", default="meta", choices=["meta", "hf"])
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("trace", help="run one implementation and record every intermediate to HDF5")
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--impl", default="scratch", choices=["scratch", "reference"])
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="record only names matching these globs")
    _add_run_options(p)
    p.set_defaults(func=cmd_trace)
    return parser


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so `finally:` blocks remove temporary files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return args.func(args)
    except HarnessError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; no output file was written", file=sys.stderr)
        return 130
