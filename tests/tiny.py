"""Tiny random models and an offline tokenizer, built from a config inside the tests.

Nothing is downloaded: the tokenizer is character level over printable ASCII.
"""

import string
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = string.printable
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )


def tiny_llama(seed: int = 0, hidden_size: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5(seed: int = 0, d_model: int = 32, layers: int = 2) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    # Not a T5Config field since transformers 5.24, but kept and read by generate().
    start: dict[str, Any] = {"decoder_start_token_id": 0}
    config = T5Config(
        vocab_size=len(tiny_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        **start,
    )
    return T5ForConditionalGeneration(config).eval()
