"""lrc: LRC-BERT distillation as an offline pipeline with cached teacher features.

One package per stage (docs/DESIGN.md §5): core (shared by all), cache (the contract between the stages),
teacher (teacher -> cache), negatives (cache -> negatives file), student (cache -> student) and apps (tools over
the whole pipeline). This module holds only the version and imports nothing.
"""

__version__ = "0.1.0"
