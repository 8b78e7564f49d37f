"""PHATGOOSE as a library: LoRA experts, post-hoc gates, routers and evaluation."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_release"]


def __getattr__(name: str) -> object:
    # `phatgoose.load_release` without importing torch on `import phatgoose`.
    if name == "load_release":
        from phatgoose.release import load_release

        return load_release
    raise AttributeError(f"module 'phatgoose' has no attribute {name!r}")
