"""PHATGOOSE as a library: LoRA experts, post-hoc gates, routers and evaluation.

The public API is importable from here; each name loads its module on first use, so
`import phatgoose` stays light (no torch) for code that only needs the version.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_base_model": "phatgoose.models",
    "model_fingerprint": "phatgoose.models",
    "base_model_spec": "phatgoose.models",
    "Example": "phatgoose.data",
    "load_examples": "phatgoose.data",
    "load_bigbench_task": "phatgoose.bigbench",
    "Expert": "phatgoose.expert",
    "TrainingConfig": "phatgoose.training",
    "train_expert": "phatgoose.training",
    "train_gates": "phatgoose.training",
    "expert_from_peft": "phatgoose.training",
    "build_routed_model": "phatgoose.routing",
    "unroute_model": "phatgoose.routing",
    "capture_routing": "phatgoose.routing",
    "evaluate_task": "phatgoose.evaluation",
    "load_release": "phatgoose.release",
}

__all__ = [
    "Example",
    "Expert",
    "TrainingConfig",
    "__version__",
    "base_model_spec",
    "build_routed_model",
    "capture_routing",
    "evaluate_task",
    "expert_from_peft",
    "load_base_model",
    "load_bigbench_task",
    "load_examples",
    "load_release",
    "model_fingerprint",
    "train_expert",
    "train_gates",
    "unroute_model",
]

if TYPE_CHECKING:
    from phatgoose.bigbench import load_bigbench_task
    from phatgoose.data import Example, load_examples
    from phatgoose.evaluation import evaluate_task
    from phatgoose.expert import Expert
    from phatgoose.models import base_model_spec, load_base_model, model_fingerprint
    from phatgoose.release import load_release
    from phatgoose.routing import build_routed_model, capture_routing, unroute_model
    from phatgoose.training import TrainingConfig, expert_from_peft, train_expert, train_gates


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'phatgoose' has no attribute {name!r}")
