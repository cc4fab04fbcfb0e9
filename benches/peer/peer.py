"""The PyTorch peer's benchmark runner: the same measurements as `hiermd bench token|atoms|attention`,
printed as one JSON line with the same field names, so benches/compare can put them side by side.

Run from anywhere with the peer's interpreter (benches/peer/venv.sh makes it):
    benches/peer/.venv/bin/python benches/peer/peer.py token --residues 214 --window 1 --batch 256 \
        --model DIR        # DIR: config.json + params.safetensors written by `hiermd bench token --save-model DIR`

Timing: median of --repeats runs after --warmup runs. Memory: the process's resident set; its
high-water mark is reset through /proc/self/clear_refs after the setup (model, optimiser, inputs),
exactly as hiermd measures itself, so "added_peak_mb" is what the measured work adds at its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from safetensors.torch import load_file  # noqa: E402


def memory_mb():
    """(VmRSS, VmHWM) in MB from /proc/self/status."""
    rss = hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = float(line.split()[1]) / 1024.0
            elif line.startswith("VmHWM:"):
                hwm = float(line.split()[1]) / 1024.0
    return rss, hwm


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(warmup: int, repeats: int, fn):
    """Runs fn warmup times, then repeats timed times; the peak covers exactly this work."""
    rss_before, _ = memory_mb()
    peak_reset = reset_peak()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    _, peak = memory_mb()
    s = sorted(times)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return {
        "median_s": med,
        "times_s": times,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "added_peak_mb": max(0.0, peak - rss_before),
        "peak_reset": peak_reset,
    }


def provenance():
    return {
        "impl": "pytorch",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
    }


def cmd_token(a):
    from hiermd_peer.token import load_token_model
    from hiermd_peer.vamp import vamp_train_step

    model = load_token_model(a.model, attention=a.attention)
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    h = cfg["input_channels"]
    g = torch.Generator().manual_seed(17)
    ca = load_file(os.path.join(a.model, "system.safetensors"))["ca"]
    if ca.shape[0] != a.residues:
        raise SystemExit(f"peer token: {a.model} holds a chain of {ca.shape[0]} residues, not {a.residues}")

    def batch():
        s = torch.randn(a.batch, a.residues, h, generator=g)
        v = torch.randn(a.batch, a.residues, 3, h, generator=g)
        c = ca[None] + 0.5 * torch.randn(a.batch, a.residues, 3, generator=g)
        return s, v, c

    s_t, v_t, ca_t = batch()
    s_l, v_l, ca_l = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
    last = {}

    def step():
        last["loss"] = vamp_train_step(model, opt, s_t, v_t, s_l, v_l, ca_t, ca_l)

    m = measure(a.warmup, a.repeats, step)
    row = provenance()
    w = cfg["window"]
    row.update({
        "what": "token_step", "residues": a.residues, "tokens": -(-a.residues // w), "window": w,
        "hidden": cfg["hidden"], "heads": cfg["heads"], "blocks": cfg["blocks"],
        "batch_pairs": a.batch, "graph_conv": cfg.get("graph_conv"), "attention": a.attention,
        "params": sum(p.numel() for p in model.parameters()),
        "pairs_per_s": a.batch / m["median_s"], "vamp2": -last.get("loss", float("nan")),
    })
    row.update(m)
    return row


def cmd_atoms(a):
    from hiermd_peer.atoms import load_atom_model

    model = load_atom_model(a.model)
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    sysd = load_file(os.path.join(a.model, "system.safetensors"))
    g = torch.Generator().manual_seed(4)
    base = sysd["atoms"]
    pos = base[None] + 0.3 * torch.randn(a.frames, base.shape[0], 3, generator=g)
    z = sysd["z"].long()
    tok = sysd["residue"].long()
    r = sysd["ca"].shape[0]

    def run():
        if a.backward:
            model.zero_grad(set_to_none=True)
            p = pos.clone().requires_grad_(True)
            s, _ = model.tokens(p, z, tok, r)
            s.sum().backward()
        else:
            with torch.no_grad():
                model.tokens(pos, z, tok, r)

    m = measure(a.warmup, a.repeats, run)
    row = provenance()
    row.update({
        "what": "atoms", "kind": cfg["backbone"]["kind"],
        "residues": r, "atoms": int(base.shape[0]), "frames": a.frames, "hidden": cfg["backbone"]["hidden"],
        "layers": cfg["backbone"]["layers"], "backward": a.backward, "frames_per_s": a.frames / m["median_s"],
    })
    row.update(m)
    return row


def cmd_attention(a):
    import math

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(23)
    bh = (a.batch, a.heads)
    q = torch.randn(*bh, a.tokens, a.dh, generator=g)
    k = torch.randn(*bh, a.tokens, a.dh, generator=g)
    v = torch.randn(*bh, a.tokens, 4 * a.dh, generator=g)
    dout = torch.randn(*bh, a.tokens, 4 * a.dh, generator=g)

    def run():
        if a.backward:
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        else:
            qq, kk, vv = q, k, v
        with torch.set_grad_enabled(a.backward):
            if a.attention == "sdpa":
                o = F.scaled_dot_product_attention(qq, kk, vv)
            else:
                p = torch.softmax(qq @ kk.transpose(-2, -1) / math.sqrt(a.dh), dim=-1)
                o = p @ vv
            if a.backward:
                o.backward(dout)

    m = measure(a.warmup, a.repeats, run)
    row = provenance()
    row.update({
        "what": "attention", "attention": a.attention, "tokens": a.tokens, "batch": a.batch,
        "heads": a.heads, "dh": a.dh, "backward": a.backward,
        "samples_per_s": a.batch / m["median_s"],
    })
    row.update(m)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("token", help="token-model VAMP training step")
    t.add_argument("--model", required=True,
                   help="folder from `hiermd bench token --save-model` (config, weights, chain)")
    t.add_argument("--residues", type=int, default=214)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--attention", default="sdpa", choices=["sdpa", "plain"])
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--repeats", type=int, default=3)

    at = sub.add_parser("atoms", help="atom-stage forward (and backward)")
    at.add_argument("--model", required=True,
                    help="folder from `hiermd bench atoms --save-model` (config, weights, structure)")
    at.add_argument("--frames", type=int, default=8)
    at.add_argument("--backward", action="store_true")
    at.add_argument("--warmup", type=int, default=1)
    at.add_argument("--repeats", type=int, default=3)

    an = sub.add_parser("attention", help="attention forward (and backward)")
    an.add_argument("--tokens", type=int, default=3200)
    an.add_argument("--batch", type=int, default=1)
    an.add_argument("--heads", type=int, default=8)
    an.add_argument("--dh", type=int, default=16)
    an.add_argument("--attention", default="sdpa", choices=["sdpa", "plain"])
    an.add_argument("--backward", action="store_true")
    an.add_argument("--warmup", type=int, default=1)
    an.add_argument("--repeats", type=int, default=3)

    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        row = {"token": cmd_token, "atoms": cmd_atoms, "attention": cmd_attention}[a.cmd](a)
    except (RuntimeError, MemoryError) as e:
        # Out of memory (a limit set by the caller) is a result, not a crash.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        row = {"impl": "pytorch", "what": a.cmd, "error": msg}
        print(json.dumps(row))
        return 3
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
