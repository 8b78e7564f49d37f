"""Compute precision names shared by the library, the client, the Flower messages and results.

`phatgoose.precision` decides what `auto` means on a machine; results record what ran.
"""

from typing import Literal, get_args

# What a caller asks for: `auto` is bfloat16 where the hardware multiplies it natively.
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# What a model computed in (recorded in manifests, evaluation results and benchmark JSON).
ComputePrecisionName = Literal["float32", "bfloat16"]
