"""VAMP-2 loss and one VAMPnet training step in PyTorch, the peer of hiermd's
src/objectives/vamp.rs (training score) and src/workflow/train.rs (VAMP objective).

The score follows deeptime's VAMPnet ``vamp_score`` (0.4.4) as hiermd defines it: in float64,
mean-free covariances C00, C0t, Ctt with 1/(N-1) (C00 and Ctt symmetrised), inverse square roots
by a symmetric eigendecomposition in mode 'regularize' (eigenvalues of C + epsilon I, in absolute
value), K = C00^{-1/2} C0t Ctt^{-1/2}, VAMP-2 = ||K||_F^2 + 1; the loss is its negative.
Gradients come from autograd through ``torch.linalg.eigh`` (hiermd uses the analytic
Daleckii-Krein form, which stays finite for (near-)degenerate eigenvalues where eigh's backward
divides by their difference).
"""

from __future__ import annotations

import torch

__all__ = ["vamp2_score", "vamp2_loss", "vamp_train_step"]


def _covariances(x: torch.Tensor, y: torch.Tensor):
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"vamp: need at least 2 pairs (chi_t, chi_lag), got {n}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    f = 1.0 / (n - 1)
    c00 = f * (x.T @ x)
    c0t = f * (x.T @ y)
    ctt = f * (y.T @ y)
    return 0.5 * (c00 + c00.T), c0t, 0.5 * (ctt + ctt.T)


def _sym_inverse_sqrt(c: torch.Tensor, epsilon: float) -> torch.Tensor:
    """deeptime's ``sym_inverse(.., return_sqrt=True, mode='regularize')``."""
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam, vecs = torch.linalg.eigh(c + epsilon * eye)
    lam = lam.abs()
    return vecs @ torch.diag(lam.rsqrt()) @ vecs.T


def vamp2_score(chi_t: torch.Tensor, chi_lag: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """VAMP-2 = 1 + ||C00^{-1/2} C0t Ctt^{-1/2}||_F^2 of ``[N, k]`` outputs, in float64."""
    if chi_t.shape != chi_lag.shape or chi_t.dim() != 2:
        raise ValueError(
            f"vamp: chi_t {tuple(chi_t.shape)} and chi_lag {tuple(chi_lag.shape)} must both be [N, k]"
        )
    x = chi_t.to(torch.float64)
    y = chi_lag.to(torch.float64)
    c00, c0t, ctt = _covariances(x, y)
    k = _sym_inverse_sqrt(c00, epsilon) @ c0t @ _sym_inverse_sqrt(ctt, epsilon)
    return 1.0 + k.square().sum()


def vamp2_loss(chi_t: torch.Tensor, chi_lag: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """-VAMP-2 (a float64 scalar; ``.backward()`` reaches f32 inputs through the cast)."""
    return -vamp2_score(chi_t, chi_lag, epsilon)


def vamp_train_step(
    model,
    optimizer,
    s_t,
    v_t,
    s_lag,
    v_lag,
    ca_t=None,
    ca_lag=None,
    mask_t=None,
    mask_lag=None,
    epsilon: float = 1e-6,
) -> float:
    """One VAMPnet step: one forward of the t and lag frames as a single batch, split, softmax
    over the outputs (hiermd's chi), -VAMP-2, backward, ``optimizer.step()``, ``zero_grad``.
    Returns the loss (-score) as a float. The model is put in training mode (dropout on)."""
    model.train()
    n = s_t.shape[0]
    s = torch.cat([s_t, s_lag], dim=0)
    v = torch.cat([v_t, v_lag], dim=0)
    ca = None if ca_t is None else torch.cat([ca_t, ca_lag], dim=0)
    if (mask_t is None) != (mask_lag is None):
        raise ValueError("vamp_train_step: give both masks or neither")
    mask = None if mask_t is None else torch.cat([mask_t, mask_lag], dim=0)
    out = model(s, v, ca, mask)
    chi = torch.softmax(out, dim=-1)
    loss = vamp2_loss(chi[:n], chi[n:], epsilon)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
