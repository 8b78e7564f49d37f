"""PHATGOOSE as a library: LoRA experts, post-hoc gates, routers and evaluation."""

__version__ = "0.1.0"
