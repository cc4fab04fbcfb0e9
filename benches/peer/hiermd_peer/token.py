"""PyTorch peer of hiermd's token model (src/model/token.rs).

The same network written the way a PyTorch user would write it: ``nn.Module``s holding
``nn.Parameter``s under exactly the names of hiermd's ParamStore (``embed.s.weight``,
``block0.attn.q.bias``, ...), plain tensor ops, ``index_add`` for the residue graph aggregation,
``torch.cdist`` for the C-alpha radius graph, and attention either by
``torch.nn.functional.scaled_dot_product_attention`` ("sdpa") or by the materialised
``softmax(q k^T / sqrt(d_h)) @ values`` ("plain").

::

    (s, v) residue tokens [B, R, Hin], [B, R, 3, Hin]
      -> EquiLinear(Hin -> H)
      -> residue graph convolution on C-alpha positions (optional; cheap or gated)
      -> window merger (w residues per token: R -> ceil(R / w))
      -> sinusoidal position encoding on s
      -> N x [ x += EqSDPA(EqLN(x)); x += EqFFN(EqLN(x)) ]   (padding tokens zeroed after each)
      -> pool over tokens (mean over valid tokens, or the first) -> Linear + SiLU -> Linear

Vectors are laid out ``[..., 3, H]`` (xyz before channels); a Linear applied to them mixes channels
only, never components. Linear weights are ``[out, in]`` as in torch.

Check against a hiermd dump (``hiermd bench dump token --out DIR``)::

    cd benches/peer && .venv/bin/python -m hiermd_peer.token DIR [--attention sdpa|plain|both]
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TokenModel",
    "load_token_model",
    "crosscheck_token",
    "radius_graph",
    "edge_rbf",
    "position_encoding",
    "ATTENTION_KINDS",
]

ATTENTION_KINDS = ("sdpa", "plain")

# |v| = sqrt(sum_xyz v^2 + NORM_EPS) inside the attention head (hiermd: layers.rs NORM_EPS).
NORM_EPS = 1e-8

# TokenModelConfig's serde defaults (src/model/token.rs), for configs that leave fields out.
DEFAULT_CONFIG = {
    "input_channels": 64,
    "hidden": 64,
    "heads": 4,
    "attention": "fused",
    "blocks": 2,
    "window": 1,
    "graph_conv": None,
    "graph_cutoff": 8.0,
    "graph_rbf": 16,
    "pooling": "mean",
    "dropout": 0.0,
    "ffn_hidden": None,
    "mlp_hidden": None,
    "output": 4,
    "eps": 1e-5,
    "seed": 0,
}


# ------------------------------------------------------------------------------------------
# Helpers


def _dropout(x: torch.Tensor, p: float, training: bool, vector: bool) -> torch.Tensor:
    """Inverted dropout; a vector channel's three components are dropped together (hiermd's
    ``dropout(.., comps = 3)``), so a kept vector keeps its direction. The random stream differs
    from hiermd's, of course."""
    if not training or p == 0.0:
        return x
    if not vector:
        return F.dropout(x, p, True)
    keep = torch.empty_like(x[..., :1, :]).bernoulli_(1.0 - p) / (1.0 - p)
    return x * keep


_PE_CACHE: dict = {}


def position_encoding(t: int, h: int, device=None) -> torch.Tensor:
    """Sinusoidal position encoding ``[T, H]`` as hiermd computes it (ops/tokens.rs
    ``position_encoding_host``): angle = f32(t) * f32(10000^(-2i/H) in f64) (one f32 rounding),
    ``pe[t, 2i] = sin``, ``pe[t, 2i+1] = cos`` of that angle in f64, rounded to f32."""
    key = (t, h, str(device))
    pe = _PE_CACHE.get(key)
    if pe is None:
        k = np.arange(h)
        freq = (10000.0 ** (-(k & ~1).astype(np.float64) / h)).astype(np.float32)
        ang = np.arange(t, dtype=np.float32)[:, None] * freq[None, :]  # f32 product
        ang = ang.astype(np.float64)
        pe64 = np.where(k % 2 == 0, np.sin(ang), np.cos(ang))
        pe = torch.from_numpy(pe64.astype(np.float32)).to(device)
        _PE_CACHE[key] = pe
    return pe


def radius_graph(ca: torch.Tensor, mask: torch.Tensor | None, cutoff: float):
    """The residue radius graph of hiermd's ``ResidueGraph::build``: every ordered pair (i, j),
    i != j, of the same frame with |r_i - r_j| < cutoff (distances in f64 from the f32
    coordinates), padding residues (mask 0) without edges. Returns ``dst``, ``src`` (flat indices
    ``b * R + t``, edges grouped by destination, sources ascending, as hiermd's CSR) and the edge
    lengths ``dist`` in f32."""
    b, r, _ = ca.shape
    x = ca.detach().to(torch.float64)
    if mask is not None:
        valid = mask.to(torch.bool)
        x = torch.where(valid[..., None], x, torch.zeros_like(x))  # padding may hold NaN
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [B, R, R]
    adj = d < float(np.float32(cutoff))
    adj &= ~torch.eye(r, dtype=torch.bool, device=ca.device)
    if mask is not None:
        adj &= valid[:, :, None] & valid[:, None, :]
    fb, fi, fj = adj.nonzero(as_tuple=True)
    dst = fb * r + fi
    src = fb * r + fj
    return dst, src, d[fb, fi, fj].to(torch.float32)


def edge_rbf(dist: torch.Tensor, cutoff: float, centres: int) -> torch.Tensor:
    """Radial edge features ``[E, K]`` of the gated convolution (ops/graph_conv.rs
    ``edge_rbf_forward``): Gaussians at ``k * spacing``, spacing = cutoff / (K - 1) (cutoff for
    K = 1), gamma = 1 / (2 spacing^2), times the cosine cutoff 0.5 (cos(pi d / cutoff) + 1),
    zero from the cutoff on. Computed in f32 like hiermd; no gradient (the positions are data)."""
    c64 = float(np.float32(cutoff))
    spacing64 = c64 / (centres - 1) if centres > 1 else c64
    gamma64 = 1.0 / (2.0 * spacing64 * spacing64)
    dt = torch.float32
    c = torch.tensor(c64, dtype=dt)
    spacing = torch.tensor(spacing64, dtype=dt)
    gamma = torch.tensor(gamma64, dtype=dt)
    pi = torch.tensor(math.pi, dtype=dt)
    d = dist.to(dt)
    env = torch.where(d < c, 0.5 * (torch.cos(pi * (d / c)) + 1.0), torch.zeros_like(d))
    ks = torch.arange(centres, dtype=dt, device=d.device)
    rr = d[:, None] - ks[None, :] * spacing
    return torch.exp(-(gamma * rr * rr)) * env[:, None]


# ------------------------------------------------------------------------------------------
# Layers (attribute names = hiermd parameter names)


class EquiLinear(nn.Module):
    """Linear with bias on scalars, bias-free Linear shared by the xyz components of vectors."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.s = nn.Linear(in_f, out_f, bias=True)
        self.v = nn.Linear(in_f, out_f, bias=False)

    def forward(self, s, v):
        return self.s(s), self.v(v)


class EqLayerNorm(nn.Module):
    """s: layer norm with gamma_s, beta_s; v: divided by sqrt(sum_{xyz,h} v^2 / H + eps) per token,
    times gamma_v per channel."""

    def __init__(self, h: int, eps: float):
        super().__init__()
        self.gamma_s = nn.Parameter(torch.ones(h))
        self.beta_s = nn.Parameter(torch.zeros(h))
        self.gamma_v = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, s, v):
        h = s.shape[-1]
        s_out = F.layer_norm(s, (h,), self.gamma_s, self.beta_s, self.eps)
        msv = v.square().sum(dim=(-2, -1), keepdim=True) / h
        v_out = v * torch.rsqrt(msv + self.eps) * self.gamma_v
        return s_out, v_out


class EqFfn(nn.Module):
    """v' = v_out(sigmoid(gate(s)) * v_in(v)); s' = s_out(SiLU(hidden(s)))."""

    def __init__(self, h: int, hidden: int, dropout: float):
        super().__init__()
        self.gate = nn.Linear(h, hidden, bias=True)
        self.hidden = nn.Linear(h, hidden, bias=True)
        self.v_in = nn.Linear(h, hidden, bias=False)
        self.s_out = nn.Linear(hidden, h, bias=True)
        self.v_out = nn.Linear(hidden, h, bias=False)
        self.p = dropout

    def forward(self, s, v):
        g = torch.sigmoid(self.gate(s))
        vh = g.unsqueeze(-2) * self.v_in(v)
        sh = F.silu(self.hidden(s))
        sh = _dropout(sh, self.p, self.training, vector=False)
        vh = _dropout(vh, self.p, self.training, vector=True)
        return self.s_out(sh), self.v_out(vh)


class EqAttention(nn.Module):
    """Equivariant scaled dot-product attention. Per head the value row is
    ``[vs (dh) | v_x (dh) | v_y (dh) | v_z (dh)]`` (hiermd's ``head_values``); one softmax weighs
    all 4 dh columns. Then ``s_out = vdot * o1 + |v_attn| * o2 + o3`` and
    ``v_out = sigmoid(gate([vdot, |v_attn|])) * v_attn + v``."""

    def __init__(self, h: int, heads: int, attention: str = "sdpa"):
        super().__init__()
        if h % heads:
            raise ValueError(f"{h} channels do not split into {heads} heads")
        self.q = nn.Linear(h, h, bias=True)
        self.k = nn.Linear(h, h, bias=True)
        self.v = nn.Linear(h, h, bias=True)
        self.vec_proj = nn.Linear(h, 2 * h, bias=False)
        self.o_proj = nn.Linear(h, 3 * h, bias=True)
        self.gate = nn.Linear(2 * h, h, bias=True)
        self.heads = heads
        self.h = h
        self.attention = attention

    def _attend(self, q, k, values, mask):
        """softmax(q k^T / sqrt(dh), padding keys masked) @ values; a frame whose keys are all
        padding gets 0 (hiermd's softmax / eqsdpa) instead of NaN."""
        empty = None
        attn_mask = None
        if mask is not None:
            valid = mask.to(torch.bool)  # [B, T]
            empty = ~valid.any(dim=1)  # frames without a valid key
            if bool(empty.any()):
                # Let those frames attend to everything (finite values and gradients), then zero.
                valid = valid | empty[:, None]
            else:
                empty = None
            attn_mask = valid[:, None, None, :]  # [B, 1, 1, T], True = attend
        dh = q.shape[-1]
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, values, attn_mask=attn_mask)
        elif self.attention == "plain":
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            raise ValueError(f"attention {self.attention!r}: expected one of {ATTENTION_KINDS}")
        if empty is not None:
            o = o * (~empty).to(o.dtype)[:, None, None, None]
        return o

    def forward(self, s, v, mask=None):
        b, t, h = s.shape
        nh, dh = self.heads, h // self.heads
        q = self.q(s).view(b, t, nh, dh).transpose(1, 2)  # [B, nh, T, dh]
        k = self.k(s).view(b, t, nh, dh).transpose(1, 2)
        vs = self.v(s).view(b, t, nh, dh).transpose(1, 2)
        vv = v.view(b, t, 3, nh, dh).permute(0, 3, 1, 2, 4).reshape(b, nh, t, 3 * dh)
        values = torch.cat([vs, vv], dim=-1)  # [B, nh, T, 4 dh]
        o = self._attend(q, k, values, mask)
        attn_s = o[..., :dh].transpose(1, 2).reshape(b, t, h)
        v_attn = o[..., dh:].reshape(b, nh, t, 3, dh).permute(0, 2, 3, 1, 4).reshape(b, t, 3, h)
        return self.head(attn_s, v_attn, v)

    def head(self, attn_s, v_attn, v):
        h = self.h
        ab = self.vec_proj(v_attn)  # [B, T, 3, 2H]
        vdot = (ab[..., :h] * ab[..., h:]).sum(dim=-2)
        vnorm = torch.sqrt(v_attn.square().sum(dim=-2) + NORM_EPS)
        o1, o2, o3 = self.o_proj(attn_s).split(h, dim=-1)
        s_out = vdot * o1 + vnorm * o2 + o3
        g = torch.sigmoid(self.gate(torch.cat([vdot, vnorm], dim=-1)))
        v_out = g.unsqueeze(-2) * v_attn + v
        return s_out, v_out


class EqBlock(nn.Module):
    """x += EqSDPA(EqLN(x)); x += EqFFN(EqLN(x)); padding tokens zeroed on the way out."""

    def __init__(self, h, heads, ffn_hidden, dropout, eps, attention="sdpa"):
        super().__init__()
        self.ln1 = EqLayerNorm(h, eps)
        self.attn = EqAttention(h, heads, attention)
        self.ln2 = EqLayerNorm(h, eps)
        self.ffn = EqFfn(h, ffn_hidden, dropout)
        self.p = dropout

    def forward(self, s, v, mask=None):
        sn, vn = self.ln1(s, v)
        sa, va = self.attn(sn, vn, mask)
        s = s + _dropout(sa, self.p, self.training, vector=False)
        v = v + _dropout(va, self.p, self.training, vector=True)
        sn, vn = self.ln2(s, v)
        sf, vf = self.ffn(sn, vn)
        s = s + _dropout(sf, self.p, self.training, vector=False)
        v = v + _dropout(vf, self.p, self.training, vector=True)
        if mask is not None:
            m = mask.to(s.dtype)
            s = s * m[..., None]
            v = v * m[..., None, None]
        return s, v


class ResidueGraphConv(nn.Module):
    """Cheap: ``s' = root(s) + rel_s(sum_j s_j)``; gated: ``s' = root(s) + sum_j
    filter(rbf(r_ij)) * rel_s(s_j)`` (a linear, unsquashed per-channel gate); vectors alike per
    xyz component, bias-free."""

    def __init__(self, h: int, kind: str, rbf: int, cutoff: float):
        super().__init__()
        if kind not in ("cheap", "gated"):
            raise ValueError(f"graph_conv {kind!r}: expected 'cheap' or 'gated'")
        self.kind = kind
        self.root = EquiLinear(h, h)
        self.rel_s = nn.Linear(h, h, bias=False)
        self.rel_v = nn.Linear(h, h, bias=False)
        self.filter = nn.Linear(rbf, h, bias=False) if kind == "gated" else None
        self.rbf = rbf
        self.cutoff = cutoff

    def forward(self, s, v, ca, mask=None):
        b, r, h = s.shape
        rs, rv = self.root(s, v)
        dst, src, dist = radius_graph(ca, mask, self.cutoff)
        sf = s.reshape(b * r, h)
        vf = v.reshape(b * r, 3, h)
        if self.kind == "cheap":
            a_s = torch.zeros_like(sf).index_add(0, dst, sf[src])
            a_v = torch.zeros_like(vf).index_add(0, dst, vf[src])
            ms, mv = self.rel_s(a_s), self.rel_v(a_v)
        else:
            gate = self.filter(edge_rbf(dist, self.cutoff, self.rbf))  # [E, H]
            ps, pv = self.rel_s(sf), self.rel_v(vf)
            ms = torch.zeros_like(ps).index_add(0, dst, gate * ps[src])
            mv = torch.zeros_like(pv).index_add(0, dst, gate[:, None, :] * pv[src])
        return rs + ms.view(b, r, h), rv + mv.view(b, r, 3, h)


class WindowMerger(nn.Module):
    """w consecutive tokens (last window zero-padded) side by side, then Linear(w H -> H) (bias on
    scalars, none on vectors, per xyz component). The model zeroes padding residues before it
    (as hiermd does), so a window mixing real and padding residues sees only the real ones."""

    def __init__(self, h: int, w: int):
        super().__init__()
        self.w = w
        self.s = nn.Linear(w * h, h, bias=True)
        self.v = nn.Linear(w * h, h, bias=False)

    def forward(self, s, v):
        b, r, h = s.shape
        w = self.w
        tw = -(-r // w)
        pad = tw * w - r
        if pad:
            s = F.pad(s, (0, 0, 0, pad))
            v = F.pad(v, (0, 0, 0, 0, 0, pad))
        gs = s.reshape(b, tw, w * h)  # column j*H + h = token t'*w + j
        gv = v.reshape(b, tw, w, 3, h).transpose(2, 3).reshape(b, tw, 3, w * h)
        return self.s(gs), self.v(gv)


def merged_mask(mask: torch.Tensor, w: int) -> torch.Tensor:
    """A merged token is valid if any residue of its window is."""
    b, r = mask.shape
    tw = -(-r // w)
    m = F.pad(mask.to(torch.bool), (0, tw * w - r))
    return m.view(b, tw, w).any(dim=-1)


# ------------------------------------------------------------------------------------------
# The model


class TokenModel(nn.Module):
    """hiermd's token model; ``state_dict()`` keys are hiermd's parameter names."""

    def __init__(self, cfg: Mapping, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {attention!r}: expected one of {ATTENTION_KINDS}")
        c = {**DEFAULT_CONFIG, **dict(cfg)}
        self.config = c
        self.attention = attention
        h = c["hidden"]
        self.embed = EquiLinear(c["input_channels"], h)
        self.graph_conv = (
            ResidueGraphConv(h, c["graph_conv"], c["graph_rbf"], c["graph_cutoff"])
            if c["graph_conv"]
            else None
        )
        self.window = c["window"]
        self.merge = WindowMerger(h, c["window"]) if c["window"] > 1 else None
        ffn_hidden = c["ffn_hidden"] or h
        self.n_blocks = c["blocks"]
        for i in range(self.n_blocks):
            self.add_module(
                f"block{i}",
                EqBlock(h, c["heads"], ffn_hidden, c["dropout"], c["eps"], attention),
            )
        mh = c["mlp_hidden"] or h
        self.mlp = nn.Linear(h, mh, bias=True)
        self.out = nn.Linear(mh, c["output"], bias=True)
        if c["pooling"] not in ("mean", "first"):
            raise ValueError(f"pooling {c['pooling']!r}: expected 'mean' or 'first'")
        self.pooling = c["pooling"]

    @classmethod
    def from_config(
        cls,
        cfg: Mapping,
        params: Mapping[str, torch.Tensor] | None = None,
        attention: str = "sdpa",
    ) -> "TokenModel":
        """The model of a TokenModelConfig dict, with hiermd's parameters when given (every name
        must match: a missing or extra name, or a shape mismatch, raises)."""
        m = cls(cfg, attention)
        if params is not None:
            m.load_hiermd_params(params)
        return m

    def load_hiermd_params(self, params: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(params))
        extra = sorted(set(params) - set(own))
        if missing or extra:
            raise KeyError(f"parameter names differ: missing {missing}, extra {extra}")
        for name, t in params.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{name}: hiermd shape {tuple(t.shape)}, peer {tuple(own[name].shape)}"
                )
        self.load_state_dict({k: v.to(torch.float32) for k, v in params.items()}, strict=True)

    def blocks(self):
        return [getattr(self, f"block{i}") for i in range(self.n_blocks)]

    def set_attention(self, attention: str) -> None:
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {attention!r}: expected one of {ATTENTION_KINDS}")
        self.attention = attention
        for b in self.blocks():
            b.attn.attention = attention

    def forward(self, s, v, ca=None, mask=None):
        """s [B, R, Hin], v [B, R, 3, Hin], ca [B, R, 3] (Angstrom; needed with a graph
        convolution), mask [B, R] (nonzero = valid residue) -> out [B, output]."""
        b, r, _ = s.shape
        if mask is not None:
            mask = mask.to(torch.bool)
        s, v = self.embed(s, v)
        if self.graph_conv is not None:
            if ca is None:
                raise ValueError("token model: the residue graph convolution needs C-alpha positions")
            s, v = self.graph_conv(s, v, ca, mask)
        tmask = mask
        if self.merge is not None:
            if mask is not None:
                # Padding residues are zeroed before merging (only real residues enter a window).
                m = mask.to(s.dtype)
                s = s * m[..., None]
                v = v * m[..., None, None]
            s, v = self.merge(s, v)
            if tmask is not None:
                tmask = merged_mask(tmask, self.window)
        t, h = s.shape[1], s.shape[2]
        s = s + position_encoding(t, h, s.device).to(s.dtype)
        for blk in self.blocks():
            s, v = blk(s, v, tmask)
        if self.pooling == "mean":
            if tmask is None:
                pooled = s.mean(dim=1)
            else:
                m = tmask.to(s.dtype)
                count = m.sum(dim=1, keepdim=True).clamp(min=1.0)
                pooled = (s * m[..., None]).sum(dim=1) / count
        else:
            pooled = s[:, 0]
            if tmask is not None:
                pooled = pooled * tmask[:, :1].to(s.dtype)
        return self.out(F.silu(self.mlp(pooled)))


# ------------------------------------------------------------------------------------------
# Loading and cross-checking


def _read_safetensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _paths(dump_dir_or_paths):
    """(config.json, params.safetensors) from a dump directory or a (config, params) pair."""
    if isinstance(dump_dir_or_paths, (str, os.PathLike)):
        d = Path(dump_dir_or_paths)
        return d / "config.json", d / "params.safetensors"
    cfg, params = dump_dir_or_paths
    return Path(cfg), Path(params)


def load_token_model(dump_dir_or_paths, attention: str = "sdpa") -> TokenModel:
    """TokenModel from a dump directory (config.json, params.safetensors) or a pair of paths
    (config.json, params.safetensors)."""
    cfg_path, params_path = _paths(dump_dir_or_paths)
    cfg = json.loads(Path(cfg_path).read_text())
    return TokenModel.from_config(cfg, _read_safetensors(params_path), attention)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (absolute when want is all zero), in f64."""
    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} against hiermd's {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def crosscheck_token(dump_dir, attention: str = "sdpa", strict: bool = True) -> dict:
    """Runs the peer on a dump's inputs, L = sum(loss_w * out), backward, and returns
    ``{name: max|peer - hiermd| / max|hiermd|}`` for ``out``, ``grad.s``, ``grad.v`` and every
    ``grad.<param>``. Exception: the key bias gradients ``grad.block*.attn.k.bias`` are zero in
    exact arithmetic (a softmax ignores a per-row shift of its scores), so both sides are rounding
    noise; their error is divided by max|hiermd's grad of the same layer's k.weight| instead. Raises when parameter names of params.safetensors, the model and the
    dump's ``grad.*`` disagree (with ``strict=False`` the problem is reported under the key
    ``"_names"`` instead, as a string)."""
    d = Path(dump_dir)
    model = load_token_model(d, attention)
    model.eval()
    io = _read_safetensors(d / "io.safetensors")
    s = io["s"].to(torch.float32).clone().requires_grad_(True)
    v = io["v"].to(torch.float32).clone().requires_grad_(True)
    ca = io.get("ca")
    mask = io.get("mask")
    out = model(s, v, ca, mask)
    loss = (io["loss_w"].to(torch.float32) * out).sum()
    loss.backward()

    res = {"out": rel_err(out, io["out"])}
    res["grad.s"] = rel_err(s.grad, io["grad.s"])
    res["grad.v"] = rel_err(v.grad, io["grad.v"])
    params = dict(model.named_parameters())
    dumped = {k[len("grad."):] for k in io if k.startswith("grad.")} - {"s", "v"}
    missing = sorted(set(params) - dumped)
    extra = sorted(dumped - set(params))
    problems = []
    if missing or extra:
        problems.append(f"grad names differ: no hiermd grad for {missing}, unknown grads {extra}")
    for name, p in params.items():
        key = "grad." + name
        if key not in io:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.endswith(".attn.k.bias"):
            # Analytically zero: q.(k_j + b) shifts every score of a row by the same q.b, which
            # the softmax ignores. Both sides hold rounding noise (~1e-8), so max|hiermd| is no
            # scale; the same layer's key-weight gradient is.
            wkey = key[: -len("bias")] + "weight"
            scale = io[wkey].abs().max().item() if wkey in io else 0.0
            diff = (g.detach().double() - io[key].double()).abs().max().item()
            res[key] = diff / scale if scale > 0 else diff
        else:
            res[key] = rel_err(g, io[key])
    if problems:
        if strict:
            raise KeyError("; ".join(problems))
        res["_names"] = "; ".join(problems)
    return res


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dumps", nargs="+", help="dump directories (hiermd bench dump token --out DIR)")
    ap.add_argument("--attention", default="both", choices=[*ATTENTION_KINDS, "both"])
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", "-v", action="store_true", help="print every tensor's error")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kinds = ATTENTION_KINDS if a.attention == "both" else (a.attention,)
    failed = False
    for dump in a.dumps:
        for kind in kinds:
            res = crosscheck_token(dump, kind)
            worst_name = max(res, key=res.get)
            bad = {k: e for k, e in res.items() if not e <= a.tol}
            failed |= bool(bad)
            status = "FAIL" if bad else "ok"
            print(
                f"{status} {dump} [{kind}]: {len(res)} tensors, out {res['out']:.2e}, "
                f"grad.s {res['grad.s']:.2e}, grad.v {res['grad.v']:.2e}, "
                f"worst {worst_name} {res[worst_name]:.2e}"
            )
            for k, e in sorted(res.items()) if a.verbose else sorted(bad.items()):
                print(f"    {k}: {e:.3e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
