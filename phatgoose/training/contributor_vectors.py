"""What a contributor computes for the baselines beside the gates (METHOD.md): each
module's average input activation, and (opt-in) retrieval embeddings of training inputs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phatgoose.data import IGNORE_INDEX, Example, collate_for_training, sample_examples
from phatgoose.embeddings import Embedder, embed_training_inputs
from phatgoose.models import forward_accepts
from phatgoose.precision import Precision, compute_in, resolve_precision
from phatgoose.training.plumbing import eval_mode, is_encoder_decoder, to_device
from protocol import MAX_RETRIEVAL_EXAMPLES

log = logging.getLogger(__name__)


def compute_average_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    paths: Sequence[str],
    examples: Sequence[Example],
    *,
    max_examples: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    precision: Precision = "auto",
) -> dict[str, Tensor]:
    """Mean input activation `u` of each module over the non-padding tokens of the examples.

    Computed on the *base* model (no LoRA), by the contributor (METHOD.md, "Average
    activation"), over up to `max_examples` examples (a seeded sample when there are more)
    formatted as in training: prompt + target + EOS. In an encoder-decoder, encoder modules
    average over prompt tokens, decoder modules over target tokens, and cross-attention
    key/value projections (which read the encoder's output) over prompt tokens. The
    forward runs in `precision` (`phatgoose.precision`); the sums are float64.
    """
    if not examples:
        raise ValueError("compute_average_activations needs at least one example")
    modules = dict(model.named_modules())
    for path in paths:
        if not isinstance(modules.get(path), nn.Linear):
            raise ValueError(f"{path!r} is not an nn.Linear of this model")
    chosen = sample_examples(examples, max_examples, seed=seed)
    enc_dec = is_encoder_decoder(model)
    # Sums stay on the model's device: a copy to the host per module and batch would make
    # a GPU wait hundreds of times per batch.
    device = next(model.parameters()).device
    sums = {
        p: torch.zeros(modules[p].in_features, dtype=torch.float64, device=device) for p in paths
    }
    counts = dict.fromkeys(paths, 0)
    # sequence length -> ([batch, length] float64 token mask on the device, its token count)
    masks: dict[int, tuple[Tensor, int]] = {}

    def hook_for(path: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            u = args[0]
            mask, tokens = masks[u.shape[-2]]
            sums[path] += (u.detach().double() * mask[..., None]).sum(dim=(0, 1))
            counts[path] += tokens

        return hook

    def set_mask(mask: Tensor) -> None:
        masks[mask.shape[1]] = (mask.to(device, torch.float64), int(mask.bool().sum()))

    # Unless the LM head is one of the modules, its output is not needed: a causal model
    # computes it for one position only.
    output_head = getattr(model, "get_output_embeddings", lambda: None)()
    head_averaged = any(modules[p] is output_head for p in paths)
    head = {}
    if not enc_dec and not head_averaged and forward_accepts(model, "logits_to_keep"):
        head = {"logits_to_keep": 1}
    handles = [modules[p].register_forward_pre_hook(hook_for(p)) for p in paths]
    compute = resolve_precision(precision, device)
    try:
        with eval_mode(model), torch.no_grad(), compute_in(compute, model):
            for start in range(0, len(chosen), batch_size):
                batch = collate_for_training(
                    tokenizer,
                    chosen[start : start + batch_size],
                    max_length=max_length,
                    is_encoder_decoder=enc_dec,
                )
                masks.clear()
                if enc_dec:
                    labels = batch["labels"]
                    if labels.shape[1] == batch["input_ids"].shape[1]:
                        # Encoder and decoder inputs are told apart by length: make them
                        # differ with one more (masked, causally invisible) decoder slot.
                        pad = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
                        labels = torch.cat([labels, pad], dim=1)
                    set_mask(batch["attention_mask"])
                    set_mask(labels != IGNORE_INDEX)
                    inputs = {**batch, "labels": labels}
                else:
                    set_mask(batch["attention_mask"])
                    inputs = {
                        "input_ids": batch["input_ids"],
                        "attention_mask": batch["attention_mask"],
                    }
                model(**to_device(inputs, model), use_cache=False, **head)
    finally:
        for handle in handles:
            handle.remove()
    return {p: (sums[p] / max(counts[p], 1)).to("cpu", torch.float32) for p in paths}


PRIVACY_WARNING = (
    "retrieval embeddings are sentence embeddings of your private training inputs; "
    "they leak information about that data (texts can be partly reconstructed or "
    "matched from them). Publish them only if that is acceptable."
)


def compute_retrieval_embeddings(
    examples: Sequence[Example],
    *,
    max_examples: int = MAX_RETRIEVAL_EXAMPLES,
    seed: int = 0,
    embedder: Embedder | None = None,
) -> Tensor:
    """`embeddings.embed_training_inputs` (MiniLM `[m, 384]` by default), after warning (and
    logging) that these embeddings leak information about the private data."""
    if not examples:
        raise ValueError("compute_retrieval_embeddings needs at least one example")
    warnings.warn(PRIVACY_WARNING, UserWarning, stacklevel=2)
    log.warning(PRIVACY_WARNING)
    return embed_training_inputs(examples, embedder=embedder, max_examples=max_examples, seed=seed)
