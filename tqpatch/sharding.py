"""Which attention heads this process computes, for models loaded with tensor parallelism.

transformers' tensor parallelism (``tp_plan="auto"`` under torchrun) turns each projection's
weight into a DTensor sharded on its output rows but leaves ``out_features`` at the full width.
With a ``colwise`` plan the projection's output is this rank's slice (its own heads); with
``colwise_gather_output`` (Phi3's fused ``qkv_proj``) it is gathered back to every head. The
width the attention forward sees is therefore measured by running the projection once on a
zero token (the same call on every rank, as everything under torchrun is), and the rows this
rank owns are read off the DTensor's placement.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["is_tensor_parallel", "output_width", "local_head_slice"]

logger = logging.getLogger(__name__)


def _dtensor_weight(proj: torch.nn.Module):
    w = getattr(proj, "weight", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return w if isinstance(w, DTensor) else None


def is_tensor_parallel(proj: torch.nn.Module) -> bool:
    """Whether ``proj``'s weight is a DTensor (tensor-parallel model)."""
    return _dtensor_weight(proj) is not None


def output_width(proj: torch.nn.Module) -> int:
    """Features ``proj`` outputs in this process: ``out_features``, or under tensor parallelism
    the width of its actual output (this rank's slice, or everything when gathered)."""
    w = _dtensor_weight(proj)
    if w is None:
        return int(proj.out_features)
    local = w.to_local()
    with torch.no_grad():
        out = proj(torch.zeros(1, 1, int(proj.in_features), dtype=local.dtype, device=local.device))
    if hasattr(out, "to_local"):
        out = out.to_local()
    return int(out.shape[-1])


def local_head_slice(proj: torch.nn.Module, head_dim: int) -> slice:
    """The heads (of ``out_features // head_dim``) whose outputs this process computes; all of
    them unless ``proj`` is a tensor-parallel projection with a sharded output."""
    total = int(proj.out_features) // head_dim
    width = output_width(proj)
    if width == int(proj.out_features):
        return slice(0, total)
    w = _dtensor_weight(proj)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    if shape[0] != width or offset[0] % head_dim or width % head_dim:
        raise ValueError(
            f"this rank computes {width} of {proj.out_features} output features of a projection starting at row "
            f"{offset[0]}, not whole heads of {head_dim}; use a tensor-parallel size that divides the KV heads"
        )
    return slice(offset[0] // head_dim, (offset[0] + width) // head_dim)
