"""The one device-and-precision rule of inference: generate, serving, evaluation and the registered model.

- ``device: auto`` is the accelerator when there is one (CUDA), else the CPU;
- ``dtype: auto`` is bfloat16 on an accelerator and float32 on the CPU (half precision on the CPU is slow
  and gains no memory that matters); a config that says ``float16`` gets float16 (a VAE whose config
  sets ``force_upcast`` still runs in float32, see :mod:`mmdiff.zoo.diffusion`);
- a process that reserved GPUs (a Serve replica, a Ray actor with ``num_gpus``) and would compute on the
  CPU stops with an error that says so, instead of holding the GPUs idle while CPU threads generate.

This rule is apart from how training loads the base: a training config may load it on the CPU in
float32 for DeepSpeed to move and cast, and the registered model records ``auto``, not that.
Importing this module does not import torch (config loaders use it).
"""

from __future__ import annotations

from typing import Literal

from mmdiff.configuration import ConfigModel

__all__ = ["AUTO", "DTYPES", "Placement", "PlacementError", "accelerator", "resolve_placement"]

AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


class PlacementError(ValueError):
    """A device or dtype that cannot be used here, or GPUs reserved for a computation on the CPU."""


class Placement(ConfigModel):
    """Where a model computes and in which precision; ``auto`` follows the rule of this module.

    ``None`` in a config means "the model's recorded rule" (``auto`` unless the model says otherwise).
    """

    device: str | None = None
    dtype: DtypeName | None = None

    def over(self, recorded: "Placement") -> "Placement":
        """This placement's settings where given, ``recorded``'s elsewhere."""
        return Placement(device=self.device or recorded.device, dtype=self.dtype or recorded.dtype)


def accelerator() -> str | None:
    """The accelerator this process can compute on ("cuda"), or None."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def resolve_placement(device: str | None = AUTO, dtype: str | None = AUTO, reserved_gpus: float = 0,
                      who: str = "this process") -> tuple[str, str]:
    """(device, dtype) for a model placed by this rule: ``auto``/None resolved, explicit values checked.

    ``reserved_gpus``: the GPUs the calling replica or actor holds; if it holds any and the model would
    compute on the CPU, :class:`PlacementError` names ``who`` and why.
    """
    import torch

    requested = device or AUTO
    if requested == AUTO:
        resolved = accelerator() or "cpu"
    else:
        try:
            kind = torch.device(requested).type
        except (RuntimeError, TypeError) as exc:
            raise PlacementError(f"{who}: device {requested!r} is not a device torch knows ({exc})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise PlacementError(f"{who}: device {requested!r} asked for, but no CUDA device is visible "
                                 "(use device 'auto' to compute where this machine can)")
        resolved = requested
    if reserved_gpus and torch.device(resolved).type == "cpu":
        reason = "no CUDA device is visible to it" if requested == AUTO else f"its device is set to {requested!r}"
        raise PlacementError(f"{who} reserves {reserved_gpus:g} GPU(s) but would compute on the CPU ({reason}); "
                             "set the device to 'auto' or 'cuda' on a GPU node, or reserve no GPU (num_gpus: 0)")
    name = dtype or AUTO
    if name == AUTO:
        name = "float32" if torch.device(resolved).type == "cpu" else "bfloat16"
    elif name not in DTYPES:
        raise PlacementError(f"{who}: dtype {name!r} is not one of {', '.join(DTYPES)} or auto")
    return resolved, name
