"""The ``humanline`` command line: train, validate, sample, label, eval, arena.

Exit codes: 0 success, 2 bad input or configuration (one line, no traceback unless ``--debug``), 1 anything
else.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from .errors import HumanlineError


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails before the heavy imports
    from .run import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(f"trained {result.step} steps; final model in {os.path.join(result.run_dir, 'final')}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails before the heavy imports
    from .run import validate

    print(validate(cfg))


def _cmd_sample(args: argparse.Namespace) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails before the heavy imports
    from .run import sample

    path = sample(cfg, args.output)
    print(f"wrote {path}")


def _cmd_label(args: argparse.Namespace) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails before the heavy imports
    from .run import label

    path = label(cfg, args.input, args.output, args.format)
    print(f"wrote {path}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails before the heavy imports
    from .run import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(cfg, args.checkpoint), indent=2))


def _cmd_arena(args: argparse.Namespace) -> None:
    from .arena.runner import run_arena

    preset = "quick" if args.quick else "full" if args.full else "default"
    run_arena(args.output, preset=preset, seeds=args.seeds, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="humanline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str, fn: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML recipe (e.g. recipes/dpo-humanline.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=5e-7")
        # SUPPRESS: an unset sub-command flag must not overwrite `humanline --debug <command>`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        p.set_defaults(fn=fn)
        return p

    with_config("train", "train a model from a recipe", _cmd_train)
    with_config("validate", "check a recipe and its data without training", _cmd_validate)
    p = with_config("sample", "sample completions for the recipe's prompts", _cmd_sample)
    p.add_argument("--output", "-o", required=True, help="JSONL file to write")
    p = with_config("label", "score completions with the recipe's rewards into pairs / binary / groups", _cmd_label)
    p.add_argument("--input", "-i", required=True, help="JSONL of samples (from `humanline sample`)")
    p.add_argument("--output", "-o", required=True, help="JSONL file to write")
    p.add_argument("--format", choices=["pairs", "binary", "groups"], default="pairs")
    p = with_config("eval", "generation-based evaluation of a checkpoint", _cmd_eval)
    p.add_argument("--checkpoint", required=True, help="a saved model folder")

    p = sub.add_parser("arena", help="reproduce the paper's claim in miniature on a CPU")
    p.add_argument("--output", "-o", default="arena-run", help="run directory (default: arena-run)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a pipeline check in under 3 minutes")
    g.add_argument("--full", action="store_true", help="more seeds and steps, for a serious run")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one torch thread each (default: one per core)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(fn=_cmd_arena)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except HumanlineError as err:
        if args.debug:
            traceback.print_exc()
        print(f"humanline: error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("humanline: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        else:
            print(f"humanline: {type(err).__name__}: {err} (run with --debug for the traceback)".replace("\n", " "),
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
