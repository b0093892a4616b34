"""The command line: argparse only. Each command parses, calls library functions, prints.

Bad input: one line on stderr and exit 2 (a traceback only with --debug). Compare/verify: exit 1 on divergence.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import HarnessError
from .run import DEFAULT_PROMPT, DTYPES

DESCRIPTION = "Verify a hand-written Llama-3 against Hugging Face's, intermediate by intermediate."
EPILOG = (
    "`python -m harness COMMAND --help` lists a command's options. Exit codes: 0 pass (or done), 1 a divergence, "
    "2 bad input (one line on stderr; --debug for a traceback), 3 a bug of ours, 130 interrupted."
)


def _prompt(args: argparse.Namespace) -> str:
    from .run import read_prompt_file

    return read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    make_tiny(
        Path(args.dir), seed=args.seed, variant=args.variant, fmt=args.format, shape=args.shape, layers=args.layers
    )
    article = "an" if args.shape.startswith("8") else "a"  # "an 8b-wide": eight begins with a vowel sound
    depth = "" if args.layers is None else f" of {args.layers} layers"
    print(
        f"wrote {article} {args.shape}{depth} Llama-{args.variant} checkpoint ({args.format} format, seed {args.seed}) "
        f"to {args.dir}"
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    import contextlib

    from .generation import trace_generation
    from .implementation import resolve
    from .progress import quiet_transformers, wanted
    from .run import make_run, trace

    if args.vectorized and args.impl != "scratch":
        raise HarnessError("--vectorized applies to --impl scratch only")
    impl = resolve(args.impl, vectorized=args.vectorized, progress=wanted())
    run = make_run(
        args.checkpoint,
        prompt=_prompt(args),
        dtype=args.dtype,
        device=args.device,
        names=args.names,
        generate=args.generate,
        layers=args.layers,
    )
    with quiet_transformers() if impl.name == "reference" else contextlib.nullcontext():
        logits = (trace_generation if args.generate else trace)(run, impl, args.out)
    if args.generate:
        generated = logits[len(run.tokens) - 1 :].float().argmax(-1).tolist()  # each step's greedy token
        print(
            f"{impl.name} ({args.dtype}, {len(run.tokens)} tokens + {args.generate} decode steps): generated "
            f"{''.join(map(run.text, generated))!r}; trace written to {args.out}"
        )
        return 0
    if logits is None:  # a --layers range that ends before the logits
        print(f"{impl.name} ({args.dtype}, {len(run.tokens)} tokens, layers {run.layers}): trace written to {args.out}")
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
    from .progress import wanted
    from .report import generation_lines, next_token_lines, run_mode, text_report
    from .verify import verify

    result = verify(
        args.checkpoint,
        out=args.out,
        dtype=args.dtype,
        prompt=_prompt(args),
        isolated=args.isolated,
        device=args.device,
        progress=wanted(),
        impl=args.impl,
        vectorized=args.vectorized,
        generate=args.generate,
        layers=args.layers,
    )
    print(text_report(result.comparison))
    n_tokens = len(result.comparison.tokens or []) - args.generate  # the prompt's (the comparison's: and the decoded)
    if args.generate:
        print("\n".join(generation_lines(result)))
        prompt = f"prompt: {n_tokens} tokens + {args.generate} decode steps"
    elif result.reference_token is None:  # a --layers range that ends before the logits
        print(f"next token: none (--layers {args.layers} ends before the logits)")
        prompt = f"prompt: {n_tokens} tokens"
    else:
        print(
            f"next token: reference {result.reference_text!r} (id {result.reference_token}), "
            f"{result.implementation} {result.implementation_text!r} (id {result.implementation_token})"
        )
        for line in next_token_lines(result):  # a near tie, or not, and why
            print(line)
        prompt = f"prompt: {n_tokens} tokens"
    print(
        run_mode(
            isolated=args.isolated or args.layers is not None,
            vectorized=args.vectorized,
            generate=args.generate,
            implementation=result.implementation,
        )
    )
    spots = getattr(result, "blind_spots", None)  # the RoPE-scaling bugs this dtype and prompt cannot see
    if spots is not None and spots.line():
        print(spots.line())
    if result.replaced:
        print(f"{result.out} held a previous verify's files: replaced ({', '.join(result.replaced)})")
    print(f"{prompt}; traces, comparison.json and report.html written to {result.out}")
    return 0 if result.passed else 1


EXAMPLES = ("my_llama.py",)  # package data in harness/data, copies of examples/ (tests/test_findings.py checks)


def cmd_example(args: argparse.Namespace) -> int:
    from importlib import resources

    out = Path(args.out or args.name)
    if out.exists():
        raise HarnessError(f"{out}: already exists; remove it or write elsewhere with --out")
    out.write_text((resources.files("harness") / "data" / args.name).read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {out}; try it: python -m harness verify CHECKPOINT --impl {out}:forward")
    return 0


def cmd_golden(args: argparse.Namespace) -> int:
    import tempfile

    from . import golden
    from .report import summary_line

    if args.action and args.update:
        raise HarnessError(f"golden --update rewrites the harness's own golden/; with `golden {args.action}` drop it")
    if args.action == "record":
        return _golden_record(args)
    if args.action == "check":
        return _golden_check(args)
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


def _golden_record(args: argparse.Namespace) -> int:
    from . import golden_set

    recorded = golden_set.record(
        args.out,
        args.impl,
        args.checkpoint,
        dtype=args.dtype,
        prompt=_prompt(args),
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    print("\n".join(golden_set.record_lines(recorded)))
    return 0 if recorded.golden is not None else 1


def _golden_check(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile
    import time

    from . import golden_set

    start = time.perf_counter()
    impl = args.impl or golden_set.read(args.golden_set).implementation
    work = contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory()
    with work as work_dir:
        result = golden_set.check(args.golden_set, impl, checkpoint=args.checkpoint, work_dir=work_dir)
        print("\n".join(golden_set.check_lines(result)))
    imported = "imported by the implementation" if "transformers" in sys.modules else "not imported"
    print(f"golden check: {time.perf_counter() - start:.1f} s, without the reference (transformers {imported})")
    return 0 if result.passed else 1


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
    _add_generate_option(p)
    p.set_defaults(func=cmd_verify)


def _example_parser(sub) -> None:
    p = sub.add_parser("example", help="write a starter file: my_llama.py, a whole Llama-3 forward with its KV cache")
    p.add_argument("name", choices=EXAMPLES, help="the example to write")
    p.add_argument("--out", help="where to write it (default: ./NAME; never over an existing file)")
    p.set_defaults(func=cmd_example)


def cmd_import(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .dump import import_dump
    from .run import prompt_tokens

    ckpt = open_checkpoint(args.checkpoint)
    prompt = _prompt(args) if args.prompt is not None or args.prompt_file else None
    tokens = prompt_tokens(ckpt, prompt) if prompt is not None else args.tokens
    imported = import_dump(args.dump, ckpt, args.out, map_path=args.map, tokens=tokens, prompt=prompt, dtype=args.dtype)
    whence = "the prompt's" if prompt is not None else ("given" if args.tokens else "the dump's")
    print(
        f"imported {len(imported.names)} of the model's {imported.n_model_names} names from {args.dump} "
        f"({args.dtype}, {len(imported.tokens)} tokens: {whence}) into {args.out}"
    )
    if left := imported.not_canonical:
        shown = ", ".join(left[:10]) + (", ..." if len(left) > 10 else "")
        print(f"not imported, neither canonical nor in the map ({len(left)}): {shown}")
    return 0


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


def cmd_sweep(args: argparse.Namespace) -> int:
    from .progress import wanted
    from .sweep import grid_jobs, read_spec, sweep
    from .sweep_report import line, summary, table

    grid = dict(checkpoint=args.checkpoints or None, impl=args.impl, dtype=args.dtype, prompt=args.prompt)
    grid.update(prompt_file=args.prompt_file, layers=args.layers, generate=args.generate)
    given = {key: value for key, value in grid.items() if value is not None}
    if args.spec and given:
        raise HarnessError(f"--spec {args.spec}: give the grid in the spec or on the command line, not both")
    flag = lambda key: "CKPT" if key == "checkpoint" else "--" + key.replace("_", "-")  # noqa: E731
    jobs = read_spec(args.spec) if args.spec else grid_jobs(given, flag, Path.cwd())
    bar = None
    if wanted():
        from tqdm import tqdm

        bar = tqdm(desc="sweep", unit="job", file=sys.stderr, leave=False)

    def show(record: dict, finished: int, total: int) -> None:
        if bar is None:
            return print(line(record, finished, total), flush=True)
        bar.total = total
        bar.update(1)
        bar.write(line(record, finished, total), file=sys.stdout)

    try:
        result = sweep(jobs, args.out, address=args.address, on_record=show)
    except KeyboardInterrupt:
        print(f"interrupted: finished jobs are kept in {args.out}; the same command runs the rest", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(table(result.records, result.merged))
    for note in result.notes:
        print(f"note: {note}")
    print(f"{summary(result.records)}; sweep.json and sweep.html written to {args.out} ({result.seconds:.0f} s)")
    return result.exit_code


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
