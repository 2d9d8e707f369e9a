"""Directional weight orthogonalisation, the core of the edit.

Every function works on the residual side of a weight, named by `residual_axis`, never
inferred from the shape: for nn.Linear weights [d, m] that is axis 0, and W' = W - alpha u u^T W
removes the component along u from every output W a. The same arithmetic (same dtype, same
contiguous layout, same operation order) is used by the in-memory and the streaming path, so
both produce bit-identical tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def compute_dtype(name: str) -> torch.dtype:
    """torch dtype for a `dtype_compute` config value."""
    if name not in _DTYPES:
        raise ValueError(f"dtype_compute must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def normalise(v: torch.Tensor) -> torch.Tensor:
    """v / ||v||; raises on a (numerically) zero vector instead of returning NaN."""
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm <= torch.finfo(v.dtype).tiny:
        raise ValueError("cannot normalise a zero or non-finite direction")
    return v / norm


def sandwich_direction(v: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """The direction to remove from a writer whose output passes a per-channel gain g.

    residual += g * (W a) / rms: v^T (g * W'a) = (g * v)^T W'a, so removing u = normalise(g * v)
    from W removes v from what reaches the residual, exactly.
    """
    return normalise(v if gain is None else gain.to(v.dtype) * v)


def gram_schmidt(vectors: Sequence[torch.Tensor], tol: float = 1e-6) -> list[torch.Tensor | None]:
    """Orthonormalise in the given (rank) order; entries already spanned by earlier ones -> None.

    Two passes of classical Gram-Schmidt keep the basis orthogonal to working precision.
    """
    basis: list[torch.Tensor] = []
    out: list[torch.Tensor | None] = []
    for v in vectors:
        w = normalise(v)
        for _ in range(2):
            for q in basis:
                w = w - (q @ w) * q
        norm = torch.linalg.vector_norm(w)
        if norm <= tol:
            out.append(None)
            continue
        q = w / norm
        basis.append(q)
        out.append(q)
    return out


def _to_residual_first(w: torch.Tensor, residual_axis: int) -> torch.Tensor:
    return w.movedim(residual_axis, 0).contiguous()


def project_out(
    weight: torch.Tensor,
    directions: Sequence[tuple[torch.Tensor, float]],
    residual_axis: int,
    *,
    norm_preserving: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Remove alpha_i q_i q_i^T from the residual side of a 1-D or 2-D weight.

    `directions` are (q, alpha) pairs with orthonormal q (see `gram_schmidt`); for orthonormal
    q, applying them one after another equals applying their sum. Norm-preserving mode rescales
    every residual-space column back to its original length (1-D tensors: the vector itself).
    Returns a new tensor in the weight's dtype.
    """
    if weight.dim() not in (1, 2):
        raise ValueError(f"project_out expects a 1-D or 2-D tensor, got shape {tuple(weight.shape)}")
    w = _to_residual_first(weight.to(dtype), residual_axis)
    vector = w.dim() == 1
    if vector:
        w = w.unsqueeze(1)
    original_norms = torch.linalg.vector_norm(w, dim=0) if norm_preserving else None
    active = [(q, alpha) for q, alpha in directions if alpha != 0.0]
    if active:
        # One pair of matrix products instead of k rank-1 updates: for orthonormal q_i,
        # prod_i (I - a_i q_i q_i^T) = I - Q^T diag(a) Q exactly.
        q = torch.stack([q.to(dtype) for q, _ in active])
        alphas = torch.tensor([alpha for _, alpha in active], dtype=dtype)
        # addmm fuses the subtraction into the product (one pass over W fewer; same bits here)
        w = torch.addmm(w, q.T * alphas, q @ w, alpha=-1)
    if original_norms is not None:
        new_norms = torch.linalg.vector_norm(w, dim=0)
        # a column reduced to exactly zero stays zero instead of becoming NaN
        scale = torch.where(new_norms > 0, original_norms / new_norms.clamp_min(torch.finfo(dtype).tiny), 0.0)
        w = w * scale.unsqueeze(0)
    if vector:
        w = w.squeeze(1)
    return w.movedim(0, residual_axis).contiguous().to(weight.dtype)


def subtract_low_rank(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, residual_axis: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W - left @ right on the residual side of a 2-D weight (a least-squares delta, saber.edit.lsq).

    left is [d, k] on the residual axis, right [k, m]; returns a new tensor in the weight's dtype.
    """
    w = _to_residual_first(weight.to(dtype), residual_axis)
    w = torch.addmm(w, left.to(device=w.device, dtype=dtype), right.to(device=w.device, dtype=dtype), alpha=-1)
    return w.movedim(0, residual_axis).contiguous().to(weight.dtype)


def orthogonalize(
    weight: torch.Tensor,
    u: torch.Tensor,
    alpha: float,
    residual_axis: int,
    *,
    norm_preserving: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W' = W - alpha u u^T W along `residual_axis` (u normalised here); bias: b' = b - alpha u (u^T b).

    Works for 1-D biases, 2-D linear weights and 3-D fused expert stacks (each expert sliced
    along axis 0, which must not be the residual axis).
    """
    q = normalise(u.to(dtype))
    return project_weight(weight, [(q, alpha)], residual_axis, norm_preserving=norm_preserving, dtype=dtype)


def project_weight(
    weight: torch.Tensor,
    directions: Sequence[tuple[torch.Tensor, float]],
    residual_axis: int,
    *,
    stacked: bool | None = None,
    norm_preserving: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`project_out` extended to expert stacks (axis 0 indexes experts), one expert at a time.

    `stacked` defaults to "the tensor is 3-D"; pass True for a fused per-expert bias
    [experts, d]. Slicing per expert is how checkpoints that store experts separately are
    edited, so both storage layouts give bit-identical results.
    """
    if stacked is None:
        stacked = weight.dim() == 3
    if not stacked:
        return project_out(weight, directions, residual_axis, norm_preserving=norm_preserving, dtype=dtype)
    if residual_axis == 0:
        raise ValueError("axis 0 of a fused expert tensor indexes experts, not the residual")
    experts = [
        project_out(weight[e], directions, residual_axis - 1, norm_preserving=norm_preserving, dtype=dtype)
        for e in range(weight.shape[0])
    ]
    return torch.stack(experts, dim=0)
