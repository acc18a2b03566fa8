"""lrc: LRC-BERT distillation as an offline pipeline with cached teacher features."""

__version__ = "0.1.0"
