"""What a contributor computes: a LoRA expert (through PEFT), then its PHATGOOSE gates,
plus the contributor-side vectors of two baselines.

`lora.py` trains the LoRA and holds the loop and objective gate training shares,
`gates.py` trains the gates through the routing package's routed linear,
`contributor_vectors.py` computes average activations and retrieval embeddings, and
`peft_import.py` turns an existing PEFT adapter into an expert, and `privacy.py` makes
LoRA and gate training DP-SGD when asked. The caller's model is
always handed back exactly as it was (`plumbing.py`).
"""

from phatgoose.training.contributor_vectors import (
    PRIVACY_WARNING,
    compute_average_activations,
    compute_retrieval_embeddings,
)
from phatgoose.training.gates import gated_lora, train_gates
from phatgoose.training.lora import (
    TrainingConfig,
    mean_target_loss,
    packs_sequences,
    split_validation,
    target_loss,
    train_expert,
)
from phatgoose.training.peft_import import expert_from_peft
from phatgoose.training.privacy import DifferentialPrivacy

__all__ = [
    "PRIVACY_WARNING",
    "DifferentialPrivacy",
    "TrainingConfig",
    "compute_average_activations",
    "compute_retrieval_embeddings",
    "expert_from_peft",
    "gated_lora",
    "mean_target_loss",
    "packs_sequences",
    "split_validation",
    "target_loss",
    "train_expert",
    "train_gates",
]
