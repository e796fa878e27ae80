"""UNet speed options shared by training and serving: channels-last memory format and ``torch.compile``.

Both leave the weights, their names and the results (within floating-point tolerance) as they are:

- ``channels_last`` stores the UNet's 4-d weights as NHWC, the layout cuDNN's convolution kernels for
  tensor cores read without a transpose. Activations follow the weights' layout.
- ``compile`` compiles the UNet in place (``nn.Module.compile``): the module object, its parameter names
  and hooks (LoRA, attention processors, DeepSpeed's ZeRO hooks) stay, only its forward goes through
  TorchDynamo and Inductor. The first calls of each new input shape pay the compilation.

Measured in benchmarks/bench_speed_options.py; what they buy on a GPU needs a GPU to measure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["apply_speed_options"]


def apply_speed_options(unet: nn.Module, channels_last: bool = False, compile: bool = False,
                        compile_options: dict[str, Any] | None = None) -> nn.Module:
    """Apply the speed options to ``unet`` in place and return it.

    ``compile_options`` are passed to ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``); the
    default compiles with ``dynamic=False``: a training run or a serving replica sees few distinct shapes
    (one per aspect bucket / requested size), each compiled once.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile(**{"dynamic": False, **(compile_options or {})})
    return unet
