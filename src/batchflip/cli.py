"""The ``batchflip`` command line: one subcommand per workflow stage or study kind.

Each subcommand lives in its own module (a study kind's in ``batchflip.studies``), which
defines ``configure(parser)`` (add the arguments) and ``main(args) -> int``. Modules are
imported lazily, so ``batchflip score`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from batchflip.errors import BatchflipError
from batchflip.kinds import KINDS

# subcommand -> (module implementing configure/main, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "battery": ("batchflip.battery", "build a battery parquet from YAML"),
    "model": ("batchflip.model", "materialise a model directory"),
    "generate": ("batchflip.generate", "run one (study, model, condition) generation job"),
    "score": ("batchflip.scoring", "score a generation file"),
    "flips": ("batchflip.flips", "pair conditions against the baseline"),
    "repeat": ("batchflip.repeat", "each condition's changes beside the repeat control's"),
    "divergence": ("batchflip.divergence",
                   "where greedy paths diverge: margins and noise (needs logprobs)"),
    "screen": ("batchflip.screen", "rank a run's prompts by their minimum logprob margin"),
    # one group per study kind (batchflip.kinds)
    **{kind.name: (kind.module, kind.help) for kind in KINDS.values()},
    "enriched": ("batchflip.studies.enriched",
                 "enriched subset: select boundary prompts, compare rates"),
    "keyed": ("batchflip.keyed", "content-keyed generation: pick, check"),
    "paper": ("batchflip.paper", "assemble results/paper"),
    "fidelity": ("batchflip.fidelity", "recompute published statistics"),
    "adjudicate": ("batchflip.adjudication.cli", "blinded export / import of human review"),
    "archive": ("batchflip.archive", "pack generations for reviewer reproduction"),
    "doctor": ("batchflip.doctor", "what this machine offers and which config fits"),
}


def figure_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every figure action takes: ``--numbers N --png P --pdf Q``."""
    parser.add_argument("--numbers", required=True)
    parser.add_argument("--png", required=True)
    parser.add_argument("--pdf", required=True)
    return parser


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with the named subcommands (all by default)."""
    parser = argparse.ArgumentParser(prog="batchflip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in names or list(COMMANDS):
        module_name, help_text = COMMANDS[name]
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text)
        module.configure(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn a BatchflipError into a one-line message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv[:1] if a in COMMANDS]
    if not wanted:
        # help or an unknown command: list every command that imports
        names = [n for n in COMMANDS if importlib.util.find_spec(COMMANDS[n][0]) is not None]
        build_parser(names).parse_args(argv)
        return 2
    args = build_parser(wanted).parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except BatchflipError as exc:
        print(f"batchflip {args.command}: error: {exc}", file=sys.stderr)
        return 1
