"""The studies, one module per config ``kind``, each with its CLI group and rule file.

========  ===========  =====================================  =====================
study     kind         module (``batchflip.studies.``)        rule file
========  ===========  =====================================  =====================
A         discovery    discovery (+ quantization: phase 3's   study_discovery.smk
                       quantization x concurrency section)
B         models       models                                 study_models.smk
C         composition  composition (+ composition_base,       study_composition.smk
                       composition_stats, composition_verify)
D         ablation     ablation (+ ablation_runs)             study_ablation.smk
enriched  discovery    enriched (studies with                 study_enriched.smk
                       ``subset_from``)
========  ===========  =====================================  =====================

Rule files are in ``workflow/rules/``. Each module defines ``configure(parser)`` and
``main(args)`` for its CLI group: ``batchflip discovery numbers|figure``, ``batchflip models
numbers|figure``, ``batchflip composition numbers|figure``, ``batchflip ablation
candidates|generate|numbers|figure``, ``batchflip enriched select|compare``; its rules are
named ``<kind>_<action>`` (``discovery_numbers``, ``ablation_generate``, ...). The stages
every study shares (battery, model, generate, score, flips, paper) live in ``batchflip``
itself; so do the record API (:mod:`batchflip.numbers`) and the plot helpers
(:mod:`batchflip.plotting`). This package imports nothing: the CLI imports the one study
module it runs.
"""
