"""The command line: argparse only. Each command parses here, then runs in harness/commands.py.

Bad input: one line on stderr and exit 2 (a traceback only with --debug). Compare/verify: exit 1 on divergence.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__
from .commands import (
    EXAMPLES,
    cmd_compare,
    cmd_convert,
    cmd_example,
    cmd_gguf,
    cmd_golden,
    cmd_import,
    cmd_make_tiny,
    cmd_quantization,
    cmd_sweep,
    cmd_trace,
    cmd_verify,
)
from .errors import HarnessError
from .run import DEFAULT_PROMPT, DTYPES

DESCRIPTION = "Verify a hand-written Llama-3 against Hugging Face's, intermediate by intermediate."
EPILOG = (
    "`python -m harness COMMAND --help` lists a command's options. Exit codes: 0 pass (or done), 1 a divergence, "
    "2 bad input (one line on stderr; --debug for a traceback), 3 a bug of ours, 130 interrupted."
)


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


def _add_impl_options(p: argparse.ArgumentParser) -> None:
    """`trace` and `verify`: the implementation run."""
    p.add_argument("--impl", default="scratch", metavar="IMPL", help=IMPL_HELP + " (default: scratch)")
    p.add_argument(
        "--vectorized", action="store_true", help="scratch: all heads of a layer at once (default: one at a time)"
    )
    p.add_argument(
        "--attention",
        choices=["sdpa"],
        help="scratch: sdpa fuses the heads in torch's scaled_dot_product_attention (no scores or probs recorded)",
    )
    p.add_argument(
        "--weights-from",
        metavar="MODEL.gguf",
        help="every side (reference, oracle, implementation) on this GGUF's dequantized weights; the checkpoint gives "
        "the config and tokenizer (docs/quantized.md)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text after <|begin_of_text|> (default: the notebook's)"
    )
    prompt.add_argument(
        "--prompt-file", metavar="FILE", help="the prompt is this UTF-8 file's text, as it is (long prompts)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="working dtype of the forward (default: float32)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    """`trace` and `verify`: a batch of prompts, padded (harness/batch.py, docs/batches.md)."""
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a batch: one prompt per line, or a JSON list; run padded at once, each sequence judged against the "
        "reference on it alone (docs/batches.md)",
    )
    p.add_argument(
        "--padding", default="left", choices=["left", "right"], help="with --prompts: where pads go (default: left)"
    )


def _add_layers_option(p: argparse.ArgumentParser, help_text: str) -> None:
    """`trace` and `verify`: a range of decoder layers, A:B (checked against the model by harness.run.make_run)."""
    p.add_argument("--layers", metavar="A:B", help=help_text)


def _positive(text: str) -> int:
    """A number of things, 1 or more (`make-tiny --layers`)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    """A number of things, 0 or more (`--seed`)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (not usage + error) and exit code 2, and `--debug` accepted before or
    after the command (each command's parser has it too, and sets it only when given)."""

    def __init__(self, *args, top: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        default = False if top else argparse.SUPPRESS
        self.add_argument("--debug", action="store_true", default=default, help="show a traceback on errors")

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _make_tiny_parser(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a deterministic tiny Llama-3 checkpoint")
    p.add_argument("dir", help="output directory (created; must be new or empty)")
    p.add_argument("--seed", type=_count, default=0, help="seed of the random weights, 0 or more (default: 0)")
    p.add_argument(
        "--variant",
        default="3.0",
        choices=["3.0", "3.1", "3.2"],
        help="Llama 3.0, 3.1 (scaled RoPE) or 3.2 (tied embeddings) (default: 3.0)",
    )
    p.add_argument("--format", default="meta", choices=["meta", "hf"], help="Meta's or Hugging Face's (default: meta)")
    p.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", "8b-wide", "8b", "70b-wide", "405b-wide"],
        help="tiny (default), or the Llama-3-8B's width and vocabulary with 2 layers (8b-wide) or 32 (8b), or the "
        "70B's or 405B's width and vocabulary with 2 layers (70b-wide, 405b-wide), written a block of rows at a time",
    )
    p.add_argument(
        "--layers", type=_positive, metavar="N", help="N decoder layers instead of the shape's (default: the shape's)"
    )
    p.set_defaults(func=cmd_make_tiny)


def _trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="run one implementation and record every intermediate to HDF5")
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="record only names matching these globs")
    _add_layers_option(
        p,
        "record only decoder layers A .. B-1 (the embeddings with A = 0, norm and logits with B = "
        "the model's layers) and stop the forward after them",
    )
    _add_impl_options(p)
    _add_run_options(p)
    _add_batch_options(p)
    _add_generate_option(p)
    p.set_defaults(func=cmd_trace)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="write a checkpoint in the other format (Meta <-> Hugging Face)")
    p.add_argument("src", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--to", required=True, choices=["hf", "meta"], help="target format")
    p.set_defaults(func=cmd_convert)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare two traces; exit 1 if B diverges from A")
    p.add_argument("a", help="trace A: the reference side (its float64 oracle, if any, calibrates the bounds)")
    p.add_argument("b", help="trace B: the implementation judged")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--rtol", type=float, help="fixed relative L2 bound against A (instead of the oracle rule)")
    p.add_argument("--atol", type=float, help="fixed RMS absolute term against A (instead of the oracle rule)")
    p.set_defaults(func=cmd_compare)


def _verify_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="trace the reference and an implementation (the from-scratch forward by default), compare, write a report",
    )
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument(
        "--out",
        default="verify-out",
        help="folder for traces and report (default: ./verify-out); a previous verify's files in it are replaced",
    )
    p.add_argument(
        "--isolated", action="store_true", help="feed each layer of the implementation the reference's input to it"
    )
    _add_layers_option(
        p,
        "judge decoder layers A .. B-1 only, isolated: the reference runs from the embeddings to layer B-1, the "
        "float64 oracle and the implementation over the range alone (docs/any-size.md)",
    )
    _add_impl_options(p)
    _add_run_options(p)
    _add_batch_options(p)
    _add_generate_option(p)
    p.set_defaults(func=cmd_verify)


def _example_parser(sub) -> None:
    p = sub.add_parser("example", help="write a starter file: my_llama.py, a whole Llama-3 forward with its KV cache")
    p.add_argument("name", choices=EXAMPLES, help="the example to write")
    p.add_argument("--out", help="where to write it (default: ./NAME; never over an existing file)")
    p.set_defaults(func=cmd_example)


def _token_ids(text: str) -> list[int]:
    """`--tokens`: token ids separated by commas or spaces."""
    ids = text.replace(",", " ").split()
    if not ids or not all(t.isdigit() for t in ids):
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas, e.g. 128000,1820,4320, got {text!r}")
    return [int(t) for t in ids]


def _import_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="record a port's dumped tensors (.safetensors, .npz, a folder of .npy) as a trace (docs/ports.md)",
    )
    p.add_argument("dump", help="a .safetensors or .npz file, or a folder of NAME.npy files")
    p.add_argument("--checkpoint", required=True, help="the Meta or Hugging Face checkpoint directory the port ran")
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument(
        "--map", metavar="MAP", help="a .toml or .json map of the port's names to canonical names (default: none)"
    )
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="the text after <|begin_of_text|> the port ran (default: the dump's tokens)")
    given.add_argument("--prompt-file", metavar="FILE", help="the prompt is this UTF-8 file's text, as it is")
    given.add_argument("--tokens", type=_token_ids, metavar="IDS", help="the token ids the port ran: 128000,1820,...")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="what the port computed in (default: float32); bfloat16 for a bfloat16 port's float32 values",
    )
    p.set_defaults(func=cmd_import)


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="verify a grid (checkpoint x impl x dtype x prompt x layers x generate) as Ray tasks (docs/sweep.md)",
    )
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="Meta or Hugging Face checkpoint directories")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder; a rerun into it skips done jobs")
    p.add_argument("--spec", metavar="FILE", help="the grid from a .toml or .json file instead (docs/sweep.md)")
    p.add_argument("--impl", metavar="X,Y", help="implementations, comma-separated (default: scratch)")
    p.add_argument("--dtype", metavar="X,Y", help="dtypes, comma-separated (default: float32)")
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt; repeat for more (default: the notebook's)"
    )
    p.add_argument("--prompt-file", action="append", metavar="FILE", help="a prompt file (UTF-8); repeat for more")
    p.add_argument(
        "--layers", metavar="auto|A:B,C:D", help="layer ranges, or auto: ranges sized to fit each node (default: all)"
    )
    p.add_argument("--generate", metavar="N,M", help="decode steps, comma-separated (default: 0)")
    p.add_argument(
        "--address", help="a Ray cluster, HOST:PORT, ray://HOST:PORT or auto (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.set_defaults(func=cmd_sweep)


def _quantization_parser(sub) -> None:
    p = sub.add_parser(
        "quantization",
        help="measure a GGUF's quantization end to end: the reference (float32) on its dequantized weights against "
        "the checkpoint's own; a report, not a verdict (docs/quantized.md)",
    )
    p.add_argument("checkpoint", help="the Meta or Hugging Face checkpoint the GGUF was converted from")
    p.add_argument("--gguf", required=True, metavar="MODEL.gguf", help="the quantized model")
    p.add_argument(
        "--out", default="quantization-out", help="folder for the report and traces (default: ./quantization-out)"
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text after <|begin_of_text|> (default: the notebook's)"
    )
    prompt.add_argument("--prompt-file", metavar="FILE", help="the prompt is this UTF-8 file's text, as it is")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_quantization)


def _gguf_parser(sub) -> None:
    p = sub.add_parser(
        "gguf", help="write a checkpoint as a GGUF with llama.cpp's converter, for --impl llamacpp:MODEL.gguf"
    )
    p.add_argument("checkpoint", help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, metavar="MODEL.gguf", help="the GGUF to write (a new file)")
    p.add_argument(
        "--outtype",
        default="f32",
        choices=["f32", "bf16", "f16", "q8_0", "q4_k_m"],
        help="its weights' type (default: f32); judge it with --dtype float32, bfloat16, float16, or bfloat16 "
        "for the quantized ones",
    )
    p.add_argument(
        "--converter",
        metavar="PATH",
        help="llama.cpp's convert_hf_to_gguf.py, a llama.cpp clone, or llama-cpp-python's sdist .tar.gz "
        "(default: $LLAMA_CPP_CONVERTER)",
    )
    p.set_defaults(func=cmd_gguf)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=DESCRIPTION, epilog=EPILOG, top=True)
    parser.add_argument("--version", action="version", version=f"llama3-harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_make_tiny_parser, _trace_parser, _convert_parser, _compare_parser, _verify_parser):
        add(sub)

    p = sub.add_parser(
        "golden",
        help="golden sets: `record`/`check` one of your implementation (docs/golden.md); with no action, check "
        "the harness's own scratch traces against golden/ (or rewrite them with --update)",
    )
    p.add_argument("--update", action="store_true", help="rewrite the golden traces and manifest.json")
    p.add_argument(
        "--golden-dir",
        default=str(Path(__file__).resolve().parent.parent / "golden"),
        help="default: golden/ of this checkout",
    )
    p.set_defaults(func=cmd_golden)
    actions = p.add_subparsers(dest="action", metavar="{record,check}")
    a = actions.add_parser(
        "record", help="verify an implementation against the reference, then write its trace as a golden set"
    )
    a.add_argument("--impl", required=True, metavar="IMPL", help=IMPL_HELP)
    a.add_argument("--checkpoint", required=True, help="Meta or Hugging Face checkpoint directory (make-tiny's too)")
    a.add_argument("--out", required=True, metavar="GOLDEN_DIR", help="the golden set's folder (new, or a set)")
    _add_run_options(a)
    a = actions.add_parser(
        "check", help="today's implementation against a golden set, without the reference (exit 1: a divergence)"
    )
    a.add_argument("golden_set", metavar="GOLDEN_DIR", help="a folder written by `golden record`")
    a.add_argument("--impl", metavar="IMPL", help=IMPL_HELP + " (default: the one the set was recorded with)")
    a.add_argument(
        "--checkpoint", help="where the set's checkpoint is now (default: where it was recorded, or a tiny remade)"
    )
    a.add_argument("--work-dir", metavar="DIR", help="keep today's trace, comparison.json and a remade tiny here")
    _example_parser(sub)
    _import_parser(sub)
    _sweep_parser(sub)
    _quantization_parser(sub)
    _gguf_parser(sub)
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
