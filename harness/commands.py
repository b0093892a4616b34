"""The commands of `python -m harness`: each takes the parsed arguments, calls library functions, prints, and returns
the exit code (harness/cli.py parses and turns a HarnessError into one line and exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import HarnessError


def _prompt(args: argparse.Namespace) -> str:
    from .run import read_prompt_file

    return read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """`--prompts FILE`: the batch's prompts (None without it)."""
    if getattr(args, "prompts", None) is None:
        return None
    if args.prompt_file:
        raise HarnessError("--prompts with --prompt-file: give one of the two (a batch, or one prompt)")
    from .batch import read_prompts

    return read_prompts(args.prompts)


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
    if args.attention and args.impl != "scratch":
        raise HarnessError(f"--attention {args.attention} applies to --impl scratch only")
    impl = resolve(args.impl, vectorized=args.vectorized, progress=wanted(), attention=args.attention)
    run = make_run(
        args.checkpoint,
        prompt=_prompt(args),
        dtype=args.dtype,
        device=args.device,
        names=args.names,
        generate=args.generate,
        layers=args.layers,
        weights_from=args.weights_from,
        prompts=_prompts(args),
        padding=args.padding,
    )
    if run.batch is not None:
        return _trace_batch(run, impl, args)
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


def _trace_batch(run, impl, args: argparse.Namespace) -> int:
    """`trace --prompts`: the implementation on the padded batch (`--generate` needs the truth: use verify)."""
    from .batch_run import trace_batched
    from .progress import quiet_transformers

    if args.generate:
        raise HarnessError(
            "trace --prompts --generate: a batch's decode steps are fed each sequence's reference tokens; run "
            "`verify --prompts FILE --generate N`"
        )
    with quiet_transformers():
        logits = trace_batched(run, impl, args.out)  # [B, T, V]
    nexts = [run.text(int(logits[b, run.batch.real_columns(b)[-1]].float().argmax())) for b in range(run.batch.size)]
    print(
        f"{impl.name} ({args.dtype}, {run.batch.size} sequences {args.padding}-padded to {run.batch.width} tokens): "
        f"next tokens {nexts!r}; trace written to {args.out}"
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
        attention=args.attention,
        generate=args.generate,
        layers=args.layers,
        weights_from=args.weights_from,
        prompts=_prompts(args),
        padding=args.padding,
    )
    print(text_report(result.comparison))
    if getattr(result, "batch", None) is not None:  # --prompts: each sequence's verdict, the reference's own check
        return _print_batch(result, args)
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
    if args.weights_from:  # --weights-from MODEL.gguf: what every side ran on
        from .gguf_weights import weights_line

        print(weights_line(result.trace_path))
    if result.replaced:
        print(f"{result.out} held a previous verify's files: replaced ({', '.join(result.replaced)})")
    print(f"{prompt}; traces, comparison.json and report.html written to {result.out}")
    return 0 if result.passed else 1


def _print_batch(result, args: argparse.Namespace) -> int:
    print("\n".join(result.batch_lines))
    if args.weights_from:  # --weights-from MODEL.gguf: what every side ran on
        from .gguf_weights import weights_line

        print(weights_line(result.trace_path))
    print(f"traces, comparison.json and report.html written to {result.out}")
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


def cmd_gguf(args: argparse.Namespace) -> int:
    from .gguf_convert import judged_with, write_gguf

    out = write_gguf(args.checkpoint, args.out, outtype=args.outtype, converter=args.converter)
    dtype = judged_with(args.outtype)
    print(f"wrote {out}; judge it: python -m harness verify {args.checkpoint} --dtype {dtype} --impl llamacpp:{out}")
    return 0


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


def cmd_quantization(args: argparse.Namespace) -> int:
    from .quantization import quantization_report

    report = quantization_report(args.checkpoint, args.gguf, args.out, prompt=_prompt(args), device=args.device)
    print("\n".join(report.lines()))
    print(f"quantization.json, quantization.html and both traces (original.h5, quantized.h5) written to {args.out}")
    return 0
