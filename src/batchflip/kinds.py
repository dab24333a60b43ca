"""The study kinds, listed once.

A config's study names one of :data:`KINDS` as its ``kind``. The CLI's groups
(:data:`batchflip.cli.COMMANDS`), the paper's figures (:data:`batchflip.layout.FIGURES_BY_KIND`)
and the report's headlines (:data:`batchflip.headlines.WRITERS`) are read from here;
``tests/test_kinds.py`` checks that the schema's ``kind`` enum, the rule files, the report
captions and the docs tables agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyKind:
    """One kind of study: its CLI group, its paper figures and its headline writer."""

    name: str  # the config's ``kind`` and the CLI group (``batchflip <name> ...``)
    letter: str  # the paper's study
    module: str  # defines configure(parser) and main(args)
    help: str  # the CLI group's one-line help
    figures: tuple[str, ...]  # each with its caption workflow/report/<figure>.rst
    headline: str  # the writer's name in batchflip.headlines

    @property
    def rule_file(self) -> str:
        """The rule file of the kind's rules (``<name>_<action>``)."""
        return f"workflow/rules/study_{self.name}.smk"


KINDS: dict[str, StudyKind] = {k.name: k for k in (
    StudyKind("discovery", "A", "batchflip.studies.discovery",
              "Study A: flip rates and output identity",
              ("flip_rates", "identity", "flip_agreement"), "discovery"),
    StudyKind("models", "B", "batchflip.studies.models",
              "Study B: fragility and instability across models", ("models",), "models"),
    StudyKind("composition", "C", "batchflip.studies.composition",
              "Study C: co-batch composition", ("composition",), "composition"),
    StudyKind("ablation", "D", "batchflip.studies.ablation",
              "Study D: kernel-mode ablation", ("ablation",), "ablation"),
)}
