"""``medgen <stage> --config C [section.key=value ...]``: the command line is the typed config."""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from medgen.errors import ConfigError, TryAgain, UserError
from medgen.logs import logging_for

STAGE_HELP = {
    "prepare": "CSV -> cleaned, deduplicated, split, tokenized Parquet shards + manifest",
    "train": "LoRA SFT (TRL SFTTrainer + peft), streaming the shards",
    "evaluate": "exact perplexity of base and tuned model on the test split",
    "generate": "batched generation for a prompts file -> JSONL",
    "report": "markdown report with plots from the run directory",
    "run": "all stages in order (--executor slurm: a SLURM job chain)",
    "sweep": "a grid of runs over one prepared dataset, then a comparison report (--executor slurm: job arrays)",
    "validate": "check a config and print it fully resolved",
    "config": "print the configuration reference (--doc)",
}
# the commands that run a model in this process: their malloc is run.allocator's (medgen/allocator.py)
MODEL_COMMANDS = ("train", "evaluate", "generate", "run", "sweep")
STATUS_HELP = ("state of each stage of a SLURM chain (sacct), of each point and stage of a sweep, or of a run.dir run on "
               "this machine; the failed one, its error and its log")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="YAML", help="run config (YAML); defaults apply where it is silent")
    common.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    common.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    common.add_argument("--debug", action="store_true", help="debug logs and full tracebacks")
    p = argparse.ArgumentParser(prog="medgen", description="Fine-tune GPT-2 with LoRA on Medium articles, as a batch job.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in STAGE_HELP.items():
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        if name == "generate":
            sp.add_argument("--prompt", metavar="TEXT",
                            help="complete this one prompt and print it (no files written); '-' reads prompts "
                                 "from stdin: a conversation on a terminal, else JSONL records on stdout")
        if name == "sweep":
            sp.add_argument("--grid", action="append", default=[], metavar="section.key=V1,V2",
                            help="values of one key (YAML); repeat for more keys; adds to the config's sweep.grid")
        if name in ("run", "sweep"):
            sp.add_argument("--executor", choices=["local", "slurm"], default="local",
                            help="local: this machine, in order; slurm: a job chain, job arrays for a sweep "
                                 "(see docs/slurm.md, docs/sweep.md)")
            sp.add_argument("--dry-run", action="store_true",
                            help="with --executor slurm: print the sbatch scripts, submit nothing")
        if name == "config":
            sp.add_argument("--doc", action="store_true", help="markdown table of every key")
            sp.add_argument("--update", metavar="FILE", help="rewrite the reference between the markers in FILE")
    sp = sub.add_parser("status", help=STATUS_HELP, description=STATUS_HELP + "; exit code 1 if one failed")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="the run.dir the chain or sweep was submitted for")
    sp.add_argument("--quiet", "-q", action="store_true", help=argparse.SUPPRESS)
    sp.add_argument("--debug", action="store_true", help="full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse stops filling a nargs='*' positional at the first option, so overrides placed after an
    # option (`generate --prompt X a.b=c`) come back unparsed: accept them, reject anything else
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    args.own_process = argv is None  # the medgen command itself, not main([...]) called in someone else's process
    try:
        with logging_for(args.quiet, args.debug):
            return _dispatch(args)
    except ConfigError as e:
        if args.debug:
            raise
        for problem in e.problems:
            print(f"medgen: {e.label}: {problem}", file=sys.stderr)
        return 2
    except TryAgain as e:  # preempted, or a store that stayed away: the rerun resumes
        if args.debug:
            traceback.print_exc()  # and still the exit code a launcher requeues on
        print(f"{e.prefix}{e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if args.debug:
            raise
        print(f"medgen: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from medgen.data.storage import is_no_space

        if is_no_space(e) and not args.debug:  # a write no stage maps itself (a log, a record): still one line
            print(f"medgen: error: {getattr(e, 'filename', None) or 'a write'}: no space left on device; "
                  "free space and rerun", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("medgen: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from medgen import config

    if args.command == "config":
        if args.update:
            print(f"{args.update}: {'updated' if config.update_doc(args.update) else 'already current'}")
        else:
            print(config.config_doc() if args.doc else config.dump_yaml(config.Config()), end="")
        return 0
    if args.command == "status":
        from medgen import sweep
        from medgen.launch import local, records, slurm, sweep as sweep_launch

        if sweep.is_sweep(args.run_dir):
            text, code = sweep_launch.status(args.run_dir)
        elif records.read_jobs(args.run_dir) is not None:
            text, code = slurm.status(args.run_dir)
        else:
            text, code = local.status(args.run_dir)
        print(text)
        return code
    cfg = config.load_config(args.config, args.overrides)
    if args.own_process and args.command in MODEL_COMMANDS and getattr(args, "executor", "local") == "local" \
            and not getattr(args, "dry_run", False):
        from medgen import allocator

        allocator.ensure(cfg.run.allocator)  # may start this command again with jemalloc preloaded
    if args.command == "sweep":
        return _sweep(cfg, args)
    if args.command == "validate":
        print(config.dump_yaml(cfg), end="")
        return 0
    if args.command == "generate" and (args.prompt is not None or cfg.generate.prompts == "-"):
        return _generate_direct(cfg, args.prompt)
    from medgen.launch import local

    if args.command == "run":
        if args.executor == "slurm":
            return _run_slurm(cfg, args.dry_run)
        if args.dry_run:
            raise UserError("--dry-run prints SLURM scripts: use it with --executor slurm")
        results = local.run_all(cfg)
        print(f"report: {results['report']['report']}")
        return 0
    result = local.run_stage(args.command, cfg)
    if args.command == "prepare":
        from medgen.prepare import print_report

        print(print_report(result))
    elif result:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _generate_direct(cfg, prompt: str | None) -> int:
    """`--prompt TEXT` prints its completion(s); `--prompt -` or generate.prompts=- reads stdin."""
    from medgen import generate

    from medgen import preflight

    problems = preflight.adapter_problems(cfg, ["generate"])
    if problems:
        raise UserError(problems[0])
    if prompt is None or prompt == generate.STDIN:
        generate.from_stdin(cfg)
        return 0
    completions = generate.one(cfg, prompt)
    for i, text in enumerate(completions):
        print(f"--- sample {i}\n{text}" if len(completions) > 1 else text)
    return 0


def _run_slurm(cfg, dry_run: bool) -> int:
    from medgen import preflight
    from medgen.launch import slurm

    preflight.check(cfg, cfg.slurm.stages, stores=False)  # a bad prompts file now, not after the training job
    if dry_run:
        for stage, script in slurm.scripts(cfg):
            print(f"# ---- {stage}: sbatch script (runs jobs/{stage}.py) ----\n{script}")
        return 0
    print(slurm.describe(slurm.submit(cfg)))
    return 0


def _sweep(cfg, args) -> int:
    """--grid adds to (and for the same key replaces) the config's sweep.grid; every point is checked first."""
    from medgen import sweep
    from medgen.launch import sweep as launch

    cfg.sweep.grid = {**sweep.flat_grid(cfg.sweep.grid), **sweep.parse_grid(args.grid)}
    if args.executor == "local":
        if args.dry_run:
            raise UserError("--dry-run prints SLURM scripts: use it with --executor slurm")
        result = launch.run_local(cfg)
        print(f"comparison: {result['report']}" + (f" (failed points: {', '.join(result['failed'])})"
                                                   if result["failed"] else ""))
        return 0
    if args.dry_run:
        for stage, script in launch.scripts(cfg):
            print(f"# ---- {stage}: sbatch script (runs jobs/{stage}.py) ----\n{script}")
        return 0
    print(launch.describe(launch.submit(cfg)))
    return 0
