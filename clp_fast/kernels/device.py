"""The device properties a launcher's choices depend on, as plain values.

The launchers (:func:`clp_fast.kernels.fused_heads._config`, :func:`clp_fast.kernels.kv_commit._config`) take a
:class:`DeviceProps` rather than a ``torch.device``, so that the grid, tiles, warps and stages a GPU run
would use can be computed on a machine without one (``tests/test_kernels_compile.py`` compiles exactly
those for sm_80 / sm_90). A live launch reads its device through :func:`props_of`: one code path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["DeviceProps", "INTERPRETER", "props_of"]


@dataclass(frozen=True)
class DeviceProps:
    """A CUDA device as a launcher sees it.

    Attributes:
        sm_count: streaming multiprocessors; 0 means no GPU (the Triton interpreter on CPU).
        smem_per_block: shared memory one block may opt into, bytes (the limit Triton checks at load).
        capability: compute capability ``(major, minor)``, e.g. ``(9, 0)`` for an H100.
        name: for messages and reports only.
    """

    sm_count: int
    smem_per_block: int
    capability: tuple[int, int]
    name: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.sm_count > 0

    @property
    def arch(self) -> int:
        """``capability`` as Triton's target number: (9, 0) -> 90."""
        return 10 * self.capability[0] + self.capability[1]


INTERPRETER = DeviceProps(sm_count=0, smem_per_block=0, capability=(0, 0), name="cpu (interpreter)")


@functools.cache
def _cuda_props(index: int) -> DeviceProps:
    # Triton's own driver query: max_shared_mem is the opt-in limit its loader checks a kernel against.
    from triton.runtime import driver

    p = driver.active.utils.get_device_properties(index)
    return DeviceProps(p["multiprocessor_count"], p["max_shared_mem"], torch.cuda.get_device_capability(index),
                       torch.cuda.get_device_name(index))  # fmt: skip


def props_of(device: torch.device | str) -> DeviceProps:
    """The properties of a live ``device``; :data:`INTERPRETER` for anything but CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
