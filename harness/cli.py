"""The command line: argparse only. Each command parses, calls library functions, prints.

Bad input: one line on stderr and exit 2 (a traceback only with --debug). Compare/verify: exit 1 on divergence.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import HarnessError
from .run import DEFAULT_PROMPT, DTYPES


def _prompt(args: argparse.Namespace) -> str:
    from .run import read_prompt_file

    return read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    make_tiny(Path(args.dir), seed=args.seed, variant=args.variant, fmt=args.format, shape=args.shape)
    print(
        f"wrote a {args.shape} Llama-{args.variant} checkpoint ({args.format} format, seed {args.seed}) to {args.dir}"
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .generation import trace_generation
    from .implementation import resolve
    from .run import make_run, trace

    if args.vectorized and args.impl != "scratch":
        raise HarnessError("--vectorized applies to --impl scratch only")
    impl = resolve(args.impl, vectorized=args.vectorized, progress=sys.stderr.isatty())
    run = make_run(
        args.checkpoint,
        prompt=_prompt(args),
        dtype=args.dtype,
        device=args.device,
        names=args.names,
        generate=args.generate,
    )
    logits = (trace_generation if args.generate else trace)(run, impl, args.out)
    if args.generate:
        generated = logits[len(run.tokens) - 1 :].float().argmax(-1).tolist()  # each step's greedy token
        print(
            f"{impl.name} ({args.dtype}, {len(run.tokens)} tokens + {args.generate} decode steps): generated "
            f"{''.join(map(run.text, generated))!r}; trace written to {args.out}"
        )
        return 0
    token = int(logits[-1].float().argmax())
    print(
        f"{impl.name} ({args.dtype}, {len(run.tokens)} tokens): next token {run.text(token)!r} (id {token}); "
        f"trace written to {args.out}"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(Path(args.src), Path(args.dst), to=args.to)
    print(f"wrote a {'Hugging Face' if args.to == 'hf' else 'Meta'} checkpoint to {args.dst}")
    return 0


def tokenizer_for(attrs: dict) -> Callable[[int], str] | None:
    """Token text from the checkpoint a trace names (attr `checkpoint_path`), when it is still there; else None."""
    path = attrs.get("checkpoint_path")
    if not isinstance(path, str) or not Path(path).is_dir():
        return None
    from .checkpoint import open_checkpoint
    from .tokenizer import load_tokenizer, token_text_of

    try:
        ckpt = open_checkpoint(path)
        return token_text_of(load_tokenizer(ckpt.tokenizer_path)) if ckpt.tokenizer_path else None
    except HarnessError:
        return None


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_traces, write_json
    from .report import text_report
    from .trace_file import load_trace

    with load_trace(args.a) as a:
        token_text = tokenizer_for(a.attrs)
    comparison = compare_traces(args.a, args.b, rtol=args.rtol, atol=args.atol, token_text=token_text)
    print(text_report(comparison))
    if args.json:
        write_json(comparison, args.json)
    return 0 if comparison.passed else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .report import text_report
    from .verify import verify

    result = verify(
        args.checkpoint,
        out=args.out,
        dtype=args.dtype,
        prompt=_prompt(args),
        isolated=args.isolated,
        device=args.device,
        progress=sys.stderr.isatty(),
        impl=args.impl,
        vectorized=args.vectorized,
        generate=args.generate,
    )
    print(text_report(result.comparison))
    if args.generate:
        from .report import generation_lines

        print("\n".join(generation_lines(result)))
        print(f"traces, comparison.json and report.html written to {result.out}")
        return 0 if result.passed else 1
    print(
        f"next token: reference {result.reference_text!r} (id {result.reference_token}), "
        f"{result.implementation} {result.implementation_text!r} (id {result.implementation_token})"
    )
    print(
        f"prompt: {len(result.comparison.tokens or [])} tokens; "
        f"traces, comparison.json and report.html written to {result.out}"
    )
    return 0 if result.passed else 1


def cmd_golden(args: argparse.Namespace) -> int:
    import tempfile

    from . import golden
    from .report import summary_line

    golden_dir = Path(args.golden_dir)
    if args.update:
        for path in golden.update(golden_dir):
            print(f"wrote {path}")
        print(f"wrote {golden_dir / 'manifest.json'}")
        return 0
    _, entries = golden.read_recipe(golden_dir)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            comparison = golden.check_entry(entry, Path(tmp), golden_dir)
            failed += not comparison.passed
            print(f"{entry.id}: {summary_line(comparison)}")
    return 1 if failed else 0


IMPL_HELP = (
    "scratch, reference, MODULE:ATTR or path/to/file.py:ATTR: a forward(checkpoint, tokens, *, dtype, device) "
    "or an Adapter"
)


def _add_generate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="a prefill, then N decode steps of one token with a KV cache, traced as steps.{s}.NAME",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text after <|begin_of_text|> (default: the notebook's)"
    )
    prompt.add_argument(
        "--prompt-file", metavar="FILE", help="the prompt is this UTF-8 file's text, as it is (long prompts)"
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="working dtype of the forward")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (not usage + error) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a deterministic tiny Llama-3 checkpoint")
    p.add_argument("dir", help="output directory (created; must be new or empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="3.0", choices=["3.0", "3.1", "3.2"])
    p.add_argument("--format", default="meta", choices=["meta", "hf"])
    p.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", "8b-wide", "8b"],
        help="tiny (default), or the Llama-3-8B's width and vocabulary with 2 layers (8b-wide) or 32 (8b)",
    )
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("trace", help="run one implementation and record every intermediate to HDF5")
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--impl", default="scratch", metavar="IMPL", help=IMPL_HELP + " (default: scratch)")
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="record only names matching these globs")
    p.add_argument(
        "--vectorized", action="store_true", help="scratch: all heads of a layer at once (default: one at a time)"
    )
    _add_run_options(p)
    _add_generate_option(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("convert", help="write a checkpoint in the other format (Meta <-> Hugging Face)")
    p.add_argument("src", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--to", required=True, choices=["hf", "meta"], help="target format")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compare", help="compare two traces; exit 1 if B diverges from A")
    p.add_argument("a", help="trace A: the reference side (its float64 oracle, if any, calibrates the bounds)")
    p.add_argument("b", help="trace B: the implementation judged")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--rtol", type=float, help="fixed relative L2 bound against A (instead of the oracle rule)")
    p.add_argument("--atol", type=float, help="fixed RMS absolute term against A (instead of the oracle rule)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "verify",
        help="trace the reference and an implementation (the from-scratch forward by default), compare, write a report",
    )
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--out", default="verify-out", help="folder for traces and report (default: ./verify-out)")
    p.add_argument("--impl", default="scratch", metavar="IMPL", help=IMPL_HELP + " (default: scratch)")
    p.add_argument(
        "--isolated", action="store_true", help="feed each layer of the implementation the reference's input to it"
    )
    p.add_argument(
        "--vectorized", action="store_true", help="scratch: all heads of a layer at once (default: one at a time)"
    )
    _add_run_options(p)
    _add_generate_option(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("golden", help="check today's scratch traces against golden/ (or rewrite them with --update)")
    p.add_argument("--update", action="store_true", help="rewrite the golden traces and manifest.json")
    p.add_argument(
        "--golden-dir",
        default=str(Path(__file__).resolve().parent.parent / "golden"),
        help="default: golden/ of this checkout",
    )
    p.set_defaults(func=cmd_golden)
    return parser


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so `finally:` blocks remove temporary files


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return the code, so main() can be called from Python
        return int(e.code or 0)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
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
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may be called from Python (tests); leave no handler behind
