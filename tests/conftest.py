import os

import pytest
import torch

from tests.tiny import tiny_llama, tiny_t5, tiny_tokenizer

# Tiny models are dominated by per-op overhead: one thread is several times faster than
# two, and keeps the suite's timing steady on a shared 2-core machine.
torch.set_num_threads(1)

# `auto` precision follows the CPU (bfloat16 where it has native units); the suite's
# results must not, so `auto` means float32 here, in this process and its subprocesses.
# Tests of bfloat16 ask for it explicitly.
os.environ["PHATGOOSE_PRECISION"] = "float32"
# Automatic credit (leave-one-out jobs queued with each evaluation of a small release) would
# add N jobs to every test that queues one; tests of credit turn it on in their settings.
os.environ["PHATGOOSE_AUTO_CREDIT_MAX_EXPERTS"] = "0"


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def t5():
    return tiny_t5()


@pytest.fixture(params=["llama", "t5"])
def tiny_model(request):
    """Each test using this runs on a causal and on an encoder-decoder model."""
    return tiny_llama() if request.param == "llama" else tiny_t5()
