"""``glmkit <command>``: one dispatcher over plain functions.

Each command lives in its own module, which defines ``configure(parser)`` (its arguments) and ``run(args)``
(turns parsed arguments into a call of the module's typed Python function). Modules are imported only when
their command runs, so ``glmkit --help`` stays fast.

A failure the user can cause and fix (bad input, a wrong or unreadable path, a broken file) is raised as a
``ValueError`` (``ConfigError``, ``CheckpointError``, ...) or an ``OSError`` naming the file and the problem, where it
arises; it becomes one line ``glmkit CMD: error: ...`` and exit code 2. Any other exception is a bug and keeps its
traceback, and ``--debug`` shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("glmkit.explain", "show Part A / Part B, 2D positions and the attention mask of a text with blanks"),
    "pretrain": ("glmkit.train.pretrain", "pretrain a GLM with autoregressive blank infilling (torchrun-ready)"),
    "eval-cloze": ("glmkit.cloze", "zero-shot single-word cloze accuracy on held-out data vs a unigram baseline"),
    "finetune": ("glmkit.finetune.cli", "fine-tune on a task (cloze, SuperGLUE, seq2seq, ...): full, LoRA or prefix"),
    "evaluate": ("glmkit.finetune.evaluate", "evaluate a model on a task: metrics.json, predictions.jsonl and a table"),
    "prepare-data": ("glmkit.data.prepare", "tokenize .txt/.jsonl/.parquet corpora into memory-mapped token shards"),
    "train-tokenizer": ("glmkit.train_tokenizer", "train a byte-level BPE tokenizer with the GLM special tokens"),
    "serve": ("glmkit.serve.server", "serve over the Triton (KServe v2) and OpenAI HTTP APIs, continuous batching"),
    "export-triton": ("glmkit.serve.export", "write a Triton model repository (Python backend) that runs glmkit"),
    "quantize": ("glmkit.quantize.convert", "write a weight-only INT8 / INT4 copy of a checkpoint (smaller, faster)"),
    "generate": ("glmkit.generate.cli", "fill the [MASK]/[sMASK]/[gMASK] blanks of a text, or continue it"),
    "compare-decoding": ("glmkit.generate.compare", "greedy, beam, top-k, top-p, temperature: quality and speed"),
    "chat": ("glmkit.chat", "chat in the terminal (streamed; ChatGLM templates), locally or with a glmkit serve"),
    "prompt-eval": (
        "glmkit.prompting.cli",
        "evaluate prompting methods on a question file: report, predictions, plots",
    ),
    "lm-eval": ("glmkit.prompting.lm_eval_cli", "lm-evaluation-harness with --model glmkit (its CLI after this)"),
}


# FloatingPointError: training diverged (loop.fit says so, with the step and a remedy)
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of a failure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit", description="GLM-family language models: train, run, serve.")
    _add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).configure(p)
        p.set_defaults(_module=module)
    return parser


def error_message(e: BaseException) -> str:
    """``e`` as one line: the file and the OS's reason for an ``OSError``, else its message."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}" + (f" (and {e.filename2})" if e.filename2 is not None else "")
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(argv) and argv[0] == "--debug"
    rest = argv[1:] if debug else argv
    # build only the chosen command's parser so one command's imports never slow another
    if rest and rest[0] in COMMANDS:
        command = rest[0]
        parser = argparse.ArgumentParser(prog=f"glmkit {command}", description=COMMANDS[command][1])
        module = importlib.import_module(COMMANDS[command][0])
        module.configure(parser)
        _add_debug_flag(parser)
        args = parser.parse_args(rest[1:])
    else:
        args = build_parser().parse_args(argv)
        command, module = args.command, importlib.import_module(args._module)
    debug = debug or args.debug
    try:
        return int(module.run(args) or 0)
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        print(f"glmkit {command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"glmkit {command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
