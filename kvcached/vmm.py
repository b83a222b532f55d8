"""The Python face of the compiled core: pick a backend, view mapped ranges as tensors.

``kvcached._vmm`` is torch-free; this module adds the one thing that needs torch —
zero-copy tensors over reserved virtual memory — and imports torch only when a
tensor is asked for.

A tensor made here aliases the arena's address range: ``tensor.data_ptr()`` is the
range address. Reading or writing a page that is not mapped faults (SIGSEGV on the
host, an illegal-address error that kills the CUDA context on a GPU), so callers
must keep every page a kernel may touch mapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvcached import _vmm, envs

if TYPE_CHECKING:
    import torch

__all__ = [
    "Arena",
    "Backend",
    "OutOfMemoryError",
    "VmmError",
    "backend_status",
    "make_backend",
    "tensor_from_range",
]

Arena = _vmm.Arena
Backend = _vmm.Backend
OutOfMemoryError = _vmm.OutOfMemoryError
VmmError = _vmm.VmmError


def backend_status() -> dict[str, str]:
    """``{"host": "ok", "cuda": "ok" | reason}``: what this build can use on this machine."""
    return dict(_vmm.backend_status())


def make_backend(kind: str | None = None, device: int = 0, host_cap_bytes: int | None = None) -> _vmm.Backend:
    """Create a VMM backend.

    Args:
        kind: ``"cuda"``, ``"host"`` or ``"auto"`` (cuda where usable, else host);
            default from ``KVCACHED_BACKEND``.
        device: CUDA ordinal as this process sees it (ignored for host).
        host_cap_bytes: physical cap of the host backend; default ``KVCACHED_HOST_CAP``.

    Raises:
        ValueError: unknown ``kind``.
        VmmError: ``kind="cuda"`` but the CUDA backend is unusable here (the text says why).
    """
    kind = kind or envs.get("KVCACHED_BACKEND")
    if kind == "auto":
        kind = "cuda" if _vmm.backend_status()["cuda"] == "ok" else "host"
    if kind == "cuda":
        return _vmm.CudaBackend(device)
    if kind == "host":
        cap = host_cap_bytes if host_cap_bytes is not None else envs.get("KVCACHED_HOST_CAP")
        return _vmm.HostBackend(cap)
    raise ValueError(f"backend kind must be 'auto', 'cuda' or 'host', got {kind!r}")


def torch_device(backend: _vmm.Backend) -> torch.device:
    """The torch device whose memory ``backend`` maps (``cpu`` for the host backend)."""
    import torch

    return torch.device("cuda", backend.device) if backend.name == "cuda" else torch.device("cpu")


def tensor_from_range(
    backend: _vmm.Backend,
    addr: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    strides: Sequence[int] | None = None,
    owner: Any = None,
) -> torch.Tensor:
    """A zero-copy tensor over virtual memory starting at ``addr``.

    Args:
        backend: the backend whose reservation holds ``addr``.
        addr: first byte of the tensor (``data_ptr()`` of the result).
        shape: tensor shape.
        dtype: element type.
        strides: element strides; contiguous when omitted.
        owner: an object kept alive as long as the tensor (typically the arena).

    Raises:
        ValueError: negative sizes or strides.
    """
    import torch

    if any(d < 0 for d in shape) or (strides is not None and any(s < 0 for s in strides)):
        raise ValueError(f"shape and strides must be >= 0, got shape={tuple(shape)} strides={strides}")
    if strides is None:
        strides = _contiguous_strides(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    num_elems = 1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)) if math.prod(shape) else 0
    num_bytes = max(num_elems * itemsize, itemsize)
    device = "cuda" if backend.name == "cuda" else "cpu"
    raw = torch.from_dlpack(_vmm.dlpack_bytes(addr, num_bytes, device, backend.device, owner))
    return raw.view(dtype).as_strided(tuple(shape), tuple(strides))


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return strides
