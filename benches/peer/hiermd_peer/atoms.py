"""The PyTorch peer of hiermd's atom stage: the PaiNN and TorchMD-ET backbones and the
atom -> residue token reduce, written as a torchmd-net / PyG user would write them.

Same math and the same parameter names as hiermd (src/model/atom.rs, src/nn/painn.rs,
src/nn/torchmd_et.rs, src/ops/{painn,torchmd_et,scatter}.rs), but plain torch:

* a radius graph from a chunked ``torch.cdist`` (open boundaries, self pairs excluded, distance
  strictly below the cutoff), the F frames batched as one disjoint graph of F*A nodes
  (``edge_index[0]`` = source j, ``edge_index[1]`` = destination i, flow source -> target);
* per-edge tensors (the basis ``[E, K]``, filters and messages ``[E, 3H]``) materialised, and
  aggregated with ``index_add_``;
* autograd for every gradient (positions included).

Edge e = (j -> i): ``vec = x_j - x_i``, ``r = |vec|``, ``u = vec / r`` (u = 0 and every derivative
through r and u taken as 0 at r = 0, as hiermd does for coincident atoms).

Parameters are loaded from hiermd's ``params.safetensors`` (f32, Linear weights ``[out, in]``).
Run ``python -m hiermd_peer.atoms DUMP_DIR`` from benches/peer to cross-check a dump written by
``hiermd bench dump atoms``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Rows of the atomic-number embedding (atomic numbers 0 to 99), as hiermd's ``ELEMENTS``.
ELEMENTS = 100
#: The eps inside the PaiNN update's vector norm, ``sqrt(|V v|^2 + eps)`` (hiermd's
#: ``VECTOR_NORM_EPS``, schnetpack's value).
VECTOR_NORM_EPS = 1e-8
#: The layer norms' eps (nn.LayerNorm's default, hiermd's ``LAYERNORM_EPS``).
LAYERNORM_EPS = 1e-5
#: hiermd's ``EXCLUDED`` token id (u32::MAX) as it reads back from an i32 array.
EXCLUDED = -1

#: The cross-check tolerance of the shared notes (normwise relative, f32 both sides).
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- the graph --


def radius_graph(pos: torch.Tensor, cutoff: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Radius graph of frames ``pos [F, A, 3]`` as one disjoint graph of ``F*A`` nodes.

    Returns ``edge_index [2, E]`` (long): row 0 the source j, row 1 the destination i (global node
    ids ``f*A + a``), pairs of the same frame with ``i != j`` and distance strictly below
    ``cutoff``, sorted by destination then source. The distances come from ``torch.cdist`` over
    chunks of destination rows (no gradient: the graph is a constant of the model).
    """
    frames, atoms, _ = pos.shape
    with torch.no_grad():
        p = pos.detach()
        rows = max(1, min(atoms, chunk_elems // max(1, frames * atoms)))
        out = []
        arange = torch.arange(atoms, device=p.device)
        for i0 in range(0, atoms, rows):
            i1 = min(atoms, i0 + rows)
            d = torch.cdist(p[:, i0:i1], p, compute_mode="donot_use_mm_for_euclid_dist")
            mask = d < cutoff
            # self exclusion: the (a, a) entries of this chunk
            idx = arange[i0:i1]
            mask[:, idx - i0, idx] = False
            f, i, j = mask.nonzero(as_tuple=True)
            base = f * atoms
            out.append(torch.stack([base + j, base + i0 + i]))
        if not out:
            return torch.zeros(2, 0, dtype=torch.long, device=p.device)
        ei = torch.cat(out, dim=1)
        # destination-major order (the CSR order of hiermd's list; sums do not depend on it
        # beyond rounding)
        order = torch.argsort(ei[1] * (frames * atoms) + ei[0])
        return ei[:, order]


def edge_geometry(pos: torch.Tensor, edge_index: torch.Tensor):
    """``(r [E], u [E, 3])`` of the edges ``j -> i``: ``vec = x_j - x_i``, ``u = vec / r``; at
    r = 0, u = 0 and r carries no gradient (hiermd's convention for coincident atoms)."""
    j, i = edge_index[0], edge_index[1]
    vec = pos[j] - pos[i]
    d2 = (vec * vec).sum(-1)
    nz = d2 > 0
    r_safe = torch.sqrt(torch.where(nz, d2, torch.ones_like(d2)))
    r = torch.where(nz, r_safe, torch.zeros_like(d2))
    u = torch.where(nz[:, None], vec / r_safe[:, None], torch.zeros_like(vec))
    return r, u


# ------------------------------------------------------------------------- radial basis --


class CosineCutoff(nn.Module):
    """``0.5 (cos(pi r / c) + 1)`` for ``r < c``, 0 from c on (torchmd-net's CosineCutoff)."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        c = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0)
        return c * (r < self.cutoff).to(r.dtype)


class ExpNormalSmearing(nn.Module):
    """``exp(-beta (exp(-alpha r) - mu_k)^2)``, ``alpha = 5 / c``, means evenly spaced on
    ``[exp(-c), 1]``, ``beta = (2 (1 - exp(-c)) / K)^-2`` (torchmd-net's initial values; fixed
    buffers, not trained, as in hiermd). Raw: the cutoff is applied by the caller."""

    def __init__(self, cutoff: float, num_rbf: int):
        super().__init__()
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        means = torch.linspace(start, 1.0, num_rbf, dtype=torch.float64)
        beta = (2.0 / num_rbf * (1.0 - start)) ** -2
        self.register_buffer("means", means.float(), persistent=False)
        self.register_buffer("betas", torch.full((num_rbf,), beta).float(), persistent=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        t = torch.exp(-self.alpha * r)[:, None]
        return torch.exp(-self.betas * (t - self.means) ** 2)


class GaussianSmearing(nn.Module):
    """``exp(-(r - mu_k)^2 / (2 spacing^2))``, centres ``linspace(0, c, K)`` (torchmd-net's
    GaussianSmearing; spacing c when K = 1, as hiermd). Raw: the cutoff is applied by the caller."""

    def __init__(self, cutoff: float, num_rbf: int):
        super().__init__()
        offset = torch.linspace(0.0, cutoff, num_rbf, dtype=torch.float64)
        spacing = cutoff / (num_rbf - 1) if num_rbf > 1 else cutoff
        self.coeff = -0.5 / spacing**2
        self.register_buffer("offset", offset.float(), persistent=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (r[:, None] - self.offset) ** 2)


def make_basis(kind: str, cutoff: float, num_rbf: int) -> nn.Module:
    if kind == "expnormal":
        return ExpNormalSmearing(cutoff, num_rbf)
    if kind == "gaussian":
        return GaussianSmearing(cutoff, num_rbf)
    raise ValueError(f"unknown rbf_kind {kind!r} (expected 'expnormal' or 'gaussian')")


# ------------------------------------------------------------------------------- PaiNN --


class PainnInteraction(nn.Module):
    """``phi = phi2(silu(phi1(s)))`` (3H), filter ``W = filter(rbf(r)) fcut(r)`` (3H, the cutoff on
    the whole filter, bias included); ``x = phi_j W`` split into ``(x_s, x_vv, x_vs)``;
    ``ds_i = sum x_s``, ``dv_i = sum x_vv v_j + x_vs u``; residual."""

    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        self.hidden = hidden
        self.phi1 = nn.Linear(hidden, hidden)
        self.phi2 = nn.Linear(hidden, 3 * hidden)
        self.filter = nn.Linear(num_rbf, 3 * hidden)

    def forward(self, s, v, edge_index, rbf, fcut, u):
        j, i = edge_index[0], edge_index[1]
        h = self.hidden
        phi = self.phi2(F.silu(self.phi1(s)))
        w = self.filter(rbf) * fcut[:, None]  # [E, 3H]
        x = phi[j] * w  # [E, 3H]
        x_s, x_vv, x_vs = torch.split(x, h, dim=-1)
        dv_e = x_vv[:, None, :] * v[j] + x_vs[:, None, :] * u[:, :, None]  # [E, 3, H]
        ds = torch.zeros_like(s).index_add_(0, i, x_s)
        dv = torch.zeros_like(v).index_add_(0, i, dv_e)
        return s + ds, v + dv


class PainnUpdate(nn.Module):
    """``U v``, ``V v`` (bias-free, per xyz); ``a = a2(silu(a1([s, |V v|])))`` split into
    ``(a_vv, a_sv, a_ss)``; ``v += a_vv U v``; ``s += a_sv <U v, V v> + a_ss``, with
    ``|V v| = sqrt(sum_xyz (V v)^2 + 1e-8)``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.u = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.a1 = nn.Linear(2 * hidden, hidden)
        self.a2 = nn.Linear(hidden, 3 * hidden)

    def forward(self, s, v):
        uv = self.u(v)  # [N, 3, H]
        vv = self.v(v)
        norm = torch.sqrt((vv * vv).sum(-2) + VECTOR_NORM_EPS)
        a = self.a2(F.silu(self.a1(torch.cat([s, norm], dim=-1))))
        a_vv, a_sv, a_ss = torch.split(a, self.hidden, dim=-1)
        v = v + a_vv[:, None, :] * uv
        s = s + a_sv * (uv * vv).sum(-2) + a_ss
        return s, v


class PainnLayer(nn.Module):
    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        self.interaction = PainnInteraction(hidden, num_rbf)
        self.update = PainnUpdate(hidden)

    def forward(self, s, v, edge_index, rbf, fcut, u):
        s, v = self.interaction(s, v, edge_index, rbf, fcut, u)
        return self.update(s, v)


# --------------------------------------------------------------------------- TorchMD-ET --


class EquivariantMultiHeadAttention(nn.Module):
    """One TorchMD-ET layer (torchmd-net's EquivariantMultiHeadAttention, hiermd's EtLayer):

    ``x = LN(s)``; ``q, k = q_proj x, k_proj x``; ``val = v_proj x`` (3H);
    ``vec1, vec2, vec3 = vec_proj v``; ``vec_dot = <vec1, vec2>``. Per edge j -> i with
    ``f = rbf(r) fcut(r)``: ``dk = silu(dk_proj f)``, ``dv = silu(dv_proj f)``;
    ``attn = silu(sum_head q_i k_j dk) fcut``; ``(x0, x1, x2) = val_j dv``;
    ``xmsg = attn x0``; ``vmsg = fcut (v_j x1 + x2 u)`` (the cutoff on the vector message is
    hiermd's, not torchmd-net's). ``(o1, o2, o3) = o_proj(sum xmsg)``;
    ``s += vec_dot o2 + o3``; ``v += vec3 o1 + sum vmsg``.
    """

    def __init__(self, hidden: int, heads: int, num_rbf: int):
        super().__init__()
        assert hidden % heads == 0, f"heads = {heads} must divide hidden = {hidden}"
        self.hidden, self.heads = hidden, heads
        self.layernorm = nn.LayerNorm(hidden, eps=LAYERNORM_EPS)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, 3 * hidden)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dk_proj = nn.Linear(num_rbf, hidden)
        self.dv_proj = nn.Linear(num_rbf, 3 * hidden)
        self.o_proj = nn.Linear(hidden, 3 * hidden)

    def forward(self, s, v, edge_index, f, fcut, u):
        j, i = edge_index[0], edge_index[1]
        h, heads = self.hidden, self.heads
        e = j.shape[0]
        x = self.layernorm(s)
        q = self.q_proj(x)
        k = self.k_proj(x)
        val = self.v_proj(x)
        vec1, vec2, vec3 = torch.split(self.vec_proj(v), h, dim=-1)
        vec_dot = (vec1 * vec2).sum(-2)  # [N, H]

        dk = F.silu(self.dk_proj(f))  # [E, H]
        dv = F.silu(self.dv_proj(f))  # [E, 3H]
        z = (q[i] * k[j] * dk).view(e, heads, h // heads).sum(-1)  # [E, heads]
        attn = F.silu(z) * fcut[:, None]
        x0, x1, x2 = torch.split(val[j] * dv, h, dim=-1)
        xmsg = (x0.view(e, heads, h // heads) * attn[:, :, None]).reshape(e, h)
        vmsg = fcut[:, None, None] * (v[j] * x1[:, None, :] + x2[:, None, :] * u[:, :, None])
        xagg = torch.zeros_like(s).index_add_(0, i, xmsg)
        vagg = torch.zeros_like(v).index_add_(0, i, vmsg)

        o1, o2, o3 = torch.split(self.o_proj(xagg), h, dim=-1)
        ds = vec_dot * o2 + o3
        dvec = vec3 * o1[:, None, :] + vagg
        return s + ds, v + dvec


class EtLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, num_rbf: int):
        super().__init__()
        self.attention = EquivariantMultiHeadAttention(hidden, heads, num_rbf)

    def forward(self, s, v, edge_index, f, fcut, u):
        return self.attention(s, v, edge_index, f, fcut, u)


# -------------------------------------------------------------------------- denoise head --


class DenoiseHead(nn.Module):
    """One vector per atom: ``proj(v)`` (bias-free ``H -> 1`` per xyz) times the scalar gate
    ``gate2(silu(gate1(s)))``: ``[N, 3]``. Not used by the features (pretraining only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate1 = nn.Linear(hidden, hidden)
        self.gate2 = nn.Linear(hidden, 1)
        self.proj = nn.Linear(hidden, 1, bias=False)

    def forward(self, s, v):
        g = self.gate2(F.silu(self.gate1(s)))  # [.., 1]
        p = self.proj(v)  # [.., 3, 1]
        return (g[..., None, :] * p).reshape(-1, 3)


# ------------------------------------------------------------------------------- model --


class AtomModel(nn.Module):
    """The atom stage: embedding -> L x (PaiNN interaction + update | TorchMD-ET attention)
    [-> out_norm for ET] -> per-atom ``(s, v)``; ``tokens`` adds the atom -> residue reduce.

    Parameter names are hiermd's: ``embedding.weight``, ``layer{l}.interaction.*`` and
    ``layer{l}.update.*`` (PaiNN) or ``layer{l}.attention.*`` and ``out_norm.*`` (ET),
    ``denoise.*``.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        bb = cfg.get("backbone", {})
        self.config = cfg
        self.kind = bb.get("kind", "painn")
        self.hidden = int(bb.get("hidden", 64))
        self.num_layers = int(bb.get("layers", 3))
        self.num_rbf = int(bb.get("rbf", 32))
        self.rbf_kind = bb.get("rbf_kind", "expnormal")
        self.basis_cutoff = float(bb.get("cutoff", 5.0))
        self.heads = int(bb.get("heads", 8))
        self.reduce = cfg.get("reduce", "mean")
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"unknown reduce {self.reduce!r}")
        nc = cfg.get("neighbor_cutoff")
        self.neighbor_cutoff = float(nc) if nc is not None else self.basis_cutoff
        if self.neighbor_cutoff < self.basis_cutoff:
            raise ValueError("neighbor_cutoff below the backbone cutoff")

        h = self.hidden
        self.embedding = nn.Embedding(ELEMENTS, h)
        self.rbf = make_basis(self.rbf_kind, self.basis_cutoff, self.num_rbf)
        self.cutoff_fn = CosineCutoff(self.basis_cutoff)
        for l in range(self.num_layers):
            if self.kind == "painn":
                layer = PainnLayer(h, self.num_rbf)
            elif self.kind == "et":
                layer = EtLayer(h, self.heads, self.num_rbf)
            else:
                raise ValueError(f"unknown backbone kind {self.kind!r}")
            self.add_module(f"layer{l}", layer)
        if self.kind == "et":
            self.out_norm = nn.LayerNorm(h, eps=LAYERNORM_EPS)
        self.denoise = DenoiseHead(h)

    @classmethod
    def from_config(cls, cfg: dict, params: dict[str, torch.Tensor], strict: bool = True) -> "AtomModel":
        """Builds the model and loads ``params`` (hiermd's names; every parameter must be there
        with its shape and no extra name is allowed, unless ``strict=False``: then the names
        present in both are loaded and the rest keep their initial values)."""
        m = cls(cfg)
        own = dict(m.named_parameters())
        missing = sorted(set(own) - set(params))
        extra = sorted(set(params) - set(own))
        if strict and (missing or extra):
            raise KeyError(f"parameter names differ: missing {missing}, extra {extra}")
        with torch.no_grad():
            for name, p in own.items():
                if name not in params:
                    continue
                t = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
        return m

    def layers(self):
        return [getattr(self, f"layer{l}") for l in range(self.num_layers)]

    def graph(self, positions: torch.Tensor) -> torch.Tensor:
        """The radius graph ``edge_index [2, E]`` of ``positions [F, A, 3]`` (neighbor cutoff)."""
        return radius_graph(positions, self.neighbor_cutoff)

    def forward(self, positions: torch.Tensor, z: torch.Tensor, edge_index: torch.Tensor | None = None):
        """``positions [F, A, 3]`` (Angstrom), ``z [A]`` (long) -> ``(s [F, A, H], v [F, A, 3, H])``.
        ``edge_index`` (from :meth:`graph`) may be passed to reuse a graph."""
        frames, atoms, _ = positions.shape
        h = self.hidden
        if edge_index is None:
            edge_index = self.graph(positions)
        pos = positions.reshape(frames * atoms, 3)
        zz = z.to(torch.long).repeat(frames)
        s = self.embedding(zz)  # [N, H]
        v = s.new_zeros(frames * atoms, 3, h)

        r, u = edge_geometry(pos, edge_index)
        fcut = self.cutoff_fn(r)
        rbf = self.rbf(r)  # [E, K], raw
        if self.kind == "painn":
            for layer in self.layers():
                s, v = layer(s, v, edge_index, rbf, fcut, u)
        else:
            f = rbf * fcut[:, None]  # the ET edge features: basis times cutoff
            for layer in self.layers():
                s, v = layer(s, v, edge_index, f, fcut, u)
            s = self.out_norm(s)
        return s.view(frames, atoms, h), v.view(frames, atoms, 3, h)

    def reduce_tokens(self, s, v, token_of_atom: torch.Tensor, n_tokens: int):
        """The atom -> token merge (sum or mean of each token's atoms; atoms with token -1 left
        out; a token without atoms gets 0): ``s [F, R, H]``, ``v [F, R, 3, H]``."""
        t = token_of_atom.to(device=s.device, dtype=torch.long)
        keep = t >= 0
        idx = t[keep]
        frames = s.shape[0]
        ts = s.new_zeros(frames, n_tokens, *s.shape[2:]).index_add_(1, idx, s[:, keep])
        tv = v.new_zeros(frames, n_tokens, *v.shape[2:]).index_add_(1, idx, v[:, keep])
        if self.reduce == "mean":
            count = torch.bincount(idx, minlength=n_tokens).clamp(min=1).to(s.dtype)
            ts = ts / count[None, :, None]
            tv = tv / count[None, :, None, None]
        return ts, tv

    def tokens(self, positions, z, token_of_atom, n_tokens: int, edge_index=None):
        """Residue tokens ``(s [F, R, H], v [F, R, 3, H])`` of ``positions [F, A, 3]``."""
        s, v = self.forward(positions, z, edge_index)
        return self.reduce_tokens(s, v, token_of_atom, n_tokens)

    def denoise_head(self, s, v):
        """The denoising head on per-atom output: ``[F A, 3]``."""
        return self.denoise(s, v)


# ------------------------------------------------------------------------------- loading --


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_atom_model(dump_dir, device=None) -> AtomModel:
    """``dump_dir/config.json`` + ``dump_dir/params.safetensors`` -> an :class:`AtomModel`."""
    d = Path(dump_dir)
    cfg = json.loads((d / "config.json").read_text())
    params = _load_safetensors(d / "params.safetensors")
    m = AtomModel.from_config(cfg, params)
    if device is not None:
        m = m.to(device)
    return m


# --------------------------------------------------------------------------- cross-check --


def _rel_err(peer: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|peer - ref| / max|ref|`` (the absolute difference when ref is all zeros)."""
    peer = peer.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if peer.shape != ref.shape:
        raise ValueError(f"shape {tuple(peer.shape)} vs hiermd {tuple(ref.shape)}")
    diff = (peer - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def crosscheck_atoms(dump_dir, dtype=torch.float32, device=None, verbose=False) -> dict:
    """Cross-checks the peer against a dump of ``hiermd bench dump atoms``.

    Runs the forward with ``positions.requires_grad_()``, ``L = sum(loss_ws*s) + sum(loss_wv*v)``
    and backward; returns ``{name: worst relative error}`` for ``s``, ``v``, ``tokens_s``,
    ``tokens_v``, ``grad.positions`` and every ``grad.<param>`` that hiermd wrote. ``denoise.*``
    get no gradient from this loss: the peer's is None and is compared as zeros (if hiermd wrote
    one; a nonzero one would show as a large absolute error). Extra keys under ``"_info"``:
    ``missing_params`` / ``extra_params`` (param names of the dump vs the peer),
    ``missing_grads`` (peer params with no ``grad.*`` in the dump), ``edges``, ``zero_grads``.
    ``dtype=torch.float64`` runs the peer in f64 (a diagnostic: then the error is hiermd's f32
    error alone).
    """
    d = Path(dump_dir)
    cfg = json.loads((d / "config.json").read_text())
    params = _load_safetensors(d / "params.safetensors")
    io = _load_safetensors(d / "io.safetensors")
    dev = torch.device(device) if device is not None else torch.device("cpu")

    info: dict = {}
    probe = AtomModel(cfg)
    own = set(n for n, _ in probe.named_parameters())
    info["missing_params"] = sorted(own - set(params))
    info["extra_params"] = sorted(set(params) - own)
    model = AtomModel.from_config(cfg, params, strict=False).to(device=dev, dtype=dtype)

    pos = io["positions"].to(device=dev, dtype=dtype).clone().requires_grad_(True)
    z = io["z"].to(device=dev, dtype=torch.long)
    tok = io["token_of_atom"].to(device=dev, dtype=torch.long)
    n_tokens = io["tokens_s"].shape[1]
    edge_index = model.graph(pos)
    info["edges"] = int(edge_index.shape[1])
    s, v = model(pos, z, edge_index)
    ts, tv = model.reduce_tokens(s, v, tok, n_tokens)
    loss = (io["loss_ws"].to(dev, dtype) * s).sum() + (io["loss_wv"].to(dev, dtype) * v).sum()
    loss.backward()

    res: dict = {}
    res["s"] = _rel_err(s, io["s"])
    res["v"] = _rel_err(v, io["v"])
    res["tokens_s"] = _rel_err(ts, io["tokens_s"])
    res["tokens_v"] = _rel_err(tv, io["tokens_v"])
    res["grad.positions"] = _rel_err(pos.grad, io["grad.positions"])
    missing_grads, zero_grads = [], []
    for name, p in model.named_parameters():
        key = f"grad.{name}"
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if p.grad is None:
            zero_grads.append(name)
        if key not in io:
            missing_grads.append(name)
            continue
        res[key] = _rel_err(g, io[key])
    extra_grads = sorted(
        k for k in io if k.startswith("grad.") and k != "grad.positions" and k[5:] not in own
    )
    info["missing_grads"] = missing_grads
    info["extra_grads"] = extra_grads
    info["zero_grads"] = zero_grads
    res["_info"] = info
    return res


def _print_table(res: dict, label: str = "") -> bool:
    info = res.get("_info", {})
    ok = True
    if label:
        print(label)
    for k, e in res.items():
        if k == "_info":
            continue
        bad = not (e <= TOLERANCE)
        ok &= not bad
        print(f"  {k:<48s} {e:10.3e}{'  FAIL' if bad else ''}")
    for k in ("missing_params", "extra_params", "missing_grads", "extra_grads"):
        if info.get(k):
            ok = False if k in ("missing_params", "extra_params", "extra_grads") else ok
            print(f"  {k}: {info[k]}")
    if info.get("zero_grads"):
        print(f"  no gradient from this loss (peer grad None, compared as zeros): {info['zero_grads']}")
    print(f"  edges: {info.get('edges')}")
    worst = max((e for k, e in res.items() if k != "_info"), default=0.0)
    print(f"  worst {worst:.3e}  {'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE:g})")
    return ok


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Cross-check the atom-stage peer against a hiermd dump")
    ap.add_argument("dump_dir")
    ap.add_argument("--f64", action="store_true", help="also run the peer in f64 (diagnostic)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HIERMD_PEER_THREADS", "2")))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ok = _print_table(crosscheck_atoms(a.dump_dir), f"{a.dump_dir} (peer f32)")
    if a.f64:
        _print_table(crosscheck_atoms(a.dump_dir, dtype=torch.float64), f"{a.dump_dir} (peer f64)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
