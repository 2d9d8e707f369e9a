"""SABER: refusal ablation for open-weight chat models with measured, bounded drift."""

__version__ = "0.1.0"
