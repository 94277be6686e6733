"""``glmkit lm-eval``: lm-evaluation-harness's own command line with glmkit's model registered as ``--model glmkit``.

lm-eval 0.4 finds models only in its own registry (no entry points are scanned), so a plain ``lm_eval --model
glmkit`` cannot see a third-party model; this command imports ``lm_eval_adapter`` (which registers it) and runs
lm-eval's CLI on the rest of the command line. It is a module of its own so that ``glmkit --help`` works without the
optional ``lm-eval`` package.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "lm-evaluation-harness with glmkit's model registered as --model glmkit: everything after the command is "
        "lm-eval's own command line, e.g. glmkit lm-eval run --model glmkit --model_args pretrained=PATH,prefix=DIR "
        "--tasks NAME --include_path DIR (needs the extra: pip install 'glmkit[lm-eval]')"
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's subcommand (run, ls, ...) and flags")


def run(args: argparse.Namespace) -> int:
    if not args.lm_eval_args:
        raise ValueError("give lm-eval's command after lm-eval, e.g. run --model glmkit --tasks NAME")
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise ValueError("the lm-eval package is not installed: pip install 'glmkit[lm-eval]'") from e
    from . import lm_eval_adapter  # noqa: F401  (registers --model glmkit)

    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
