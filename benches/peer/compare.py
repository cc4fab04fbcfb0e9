"""hiermd vs the PyTorch peer, side by side in one run (called by benches/compare).

Every measurement runs in a fresh process (hiermd's `bench` subcommands and peer.py), one after
the other, with the same thread count; each reports the median time of its repetitions after a
warm-up and the peak resident memory its work added (VmHWM reset after the setup, see
peer.py). The peer loads the weights, configuration and structure hiermd wrote (--save-model).
Peer processes run under an address-space limit (--peer-memory-gb) so that running out of memory
is a recorded result, not a crash of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_json(cmd, env=None, limit_gb=None, timeout=None):
    """Runs cmd; returns the JSON object of its last stdout line (or an error row)."""

    def limit():
        if limit_gb:
            b = int(limit_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    row = None
    if lines:
        try:
            row = json.loads(lines[-1])
        except json.JSONDecodeError:
            row = None
    if row is None:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        row = {"error": f"exit {p.returncode}: {err}"}
    elif p.returncode != 0 and "error" not in row:
        row["error"] = f"exit {p.returncode}"
    row["wall_s"] = time.time() - t0
    return row


class Runner:
    def __init__(self, a):
        self.a = a
        self.env = dict(os.environ)
        self.env["RAYON_NUM_THREADS"] = str(a.threads)
        self.env["OMP_NUM_THREADS"] = str(a.threads)
        self.peer = [sys.executable, os.path.join(HERE, "peer.py"), "--threads", str(a.threads)]
        self.ours = [a.hiermd, "--device", a.device, "bench"]
        self.models = os.path.join(a.out, "models")
        os.makedirs(self.models, exist_ok=True)

    def hiermd(self, args, timeout=None):
        row = run_json(self.ours + args, env=self.env, timeout=timeout)
        self.show("hiermd", args, row)
        return row

    def pytorch(self, args, timeout=None):
        row = run_json(self.peer + args, env=self.env, limit_gb=self.a.peer_memory_gb,
                       timeout=timeout)
        self.show("pytorch", args, row)
        return row

    @staticmethod
    def show(who, args, row):
        if "error" in row:
            log(f"  {who:8} {' '.join(args[:6])}: no result ({row['error']})")
        else:
            log(f"  {who:8} {' '.join(args[:6])}: {row['median_s']:.3f} s, +{row['added_peak_mb']:.0f} MB")


def ratio(a, b, key):
    try:
        return a[key] / b[key]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def section_token(r, a, out):
    """The issue's target: 214 tokens, H = 64, 4 blocks, 8 heads, batch 256 pairs, every w."""
    log(f"token-model VAMP training step, {a.residues} residues, batch {a.batch} pairs")
    for w in a.windows:
        d = os.path.join(r.models, f"token_w{w}")
        common = ["--residues", str(a.residues), "--batch", str(a.batch),
                  "--warmup", "1", "--repeats", str(a.repeats)]
        ours = r.hiermd(["token", "--window", str(w), "--save-model", d] + common)
        peer = r.pytorch(["token", "--model", d] + common)
        out.append({
            "section": "token", "window": w, "residues": a.residues, "batch_pairs": a.batch,
            "hiermd": ours, "pytorch": peer,
            "speed_ratio": ratio(ours, peer, "pairs_per_s"),
            "memory_ratio": ratio(ours, peer, "added_peak_mb"),
        })


def section_atoms(r, a, out):
    log(f"atom stage, {a.residues} residues (~{round(a.residues * 7.7)} heavy atoms)")
    for kind in ["painn", "et"]:
        for backward in [False, True]:
            d = os.path.join(r.models, f"atoms_{kind}")
            common = ["--frames", str(a.frames), "--warmup", "1", "--repeats", str(a.repeats)]
            if backward:
                common.append("--backward")
            ours = r.hiermd(["atoms", "--residues", str(a.residues), "--kind", kind,
                             "--save-model", d] + common)
            peer = r.pytorch(["atoms", "--model", d] + common)
            out.append({
                "section": "atoms", "kind": kind, "backward": backward,
                "atoms": ours.get("atoms"), "frames": a.frames, "hiermd": ours, "pytorch": peer,
                "speed_ratio": ratio(ours, peer, "frames_per_s"),
                "memory_ratio": ratio(ours, peer, "added_peak_mb"),
            })


def section_attention(r, a, out):
    log("equivariant attention alone (8 heads, dh 16, values 4 dh wide)")
    for t in a.attention_tokens:
        for backward in [False, True]:
            common = ["--tokens", str(t), "--heads", "8", "--dh", "16", "--batch", "1",
                      "--warmup", "1", "--repeats", str(a.repeats)]
            if backward:
                common.append("--backward")
            ours = r.hiermd(["attention", "--attention", "fused"] + common)
            mat = r.hiermd(["attention", "--attention", "materialised"] + common)
            sdpa = r.pytorch(["attention", "--attention", "sdpa"] + common)
            plain = r.pytorch(["attention", "--attention", "plain"] + common)
            out.append({
                "section": "attention", "tokens": t, "backward": backward,
                "hiermd": ours, "hiermd_materialised": mat, "pytorch": sdpa,
                "pytorch_plain": plain,
                "speed_ratio": ratio(ours, sdpa, "samples_per_s"),
                "memory_ratio": ratio(ours, sdpa, "added_peak_mb"),
            })


def section_big(r, a, out):
    """3,200 tokens, batch 8 + 8 frames: hiermd trains; the peer's materialised attention."""
    log(f"{a.big_residues} residues (tokens at w = 1), batch {a.big_batch} pairs")
    d = os.path.join(r.models, "token_big")
    common = ["--residues", str(a.big_residues), "--batch", str(a.big_batch), "--warmup", "0",
              "--repeats", "1"]
    ours = r.hiermd(["token", "--window", "1", "--save-model", d] + common)
    peer = r.pytorch(["token", "--model", d] + common, timeout=a.big_timeout)
    plain = r.pytorch(["token", "--model", d, "--attention", "plain"] + common,
                      timeout=a.big_timeout)
    out.append({"section": "big", "residues": a.big_residues, "batch_pairs": a.big_batch,
                "peer_memory_limit_gb": a.peer_memory_gb, "hiermd": ours, "pytorch": peer,
                "pytorch_plain": plain,
                "speed_ratio": ratio(ours, peer, "pairs_per_s"),
                "memory_ratio": ratio(ours, peer, "added_peak_mb")})


def section_curves(r, a, out):
    """Attention memory vs tokens, forward + backward: hiermd fused vs the peer's plain."""
    log("attention memory vs tokens (forward + backward, 1 frame x 8 heads)")
    for t in a.curve_tokens:
        common = ["--tokens", str(t), "--heads", "8", "--dh", "16", "--batch", "1",
                  "--warmup", "0", "--repeats", "1", "--backward"]
        ours = r.hiermd(["attention", "--attention", "fused"] + common)
        plain = r.pytorch(["attention", "--attention", "plain"] + common, timeout=a.big_timeout)
        sdpa = r.pytorch(["attention", "--attention", "sdpa"] + common, timeout=a.big_timeout)
        out.append({"section": "curves", "tokens": t, "hiermd": ours, "pytorch_plain": plain,
                    "pytorch_sdpa": sdpa, "memory_ratio": ratio(ours, plain, "added_peak_mb")})


def section_scaling(r, a, out):
    """Training iteration vs residues at w = 1 and 8 (no graph conv), both implementations."""
    log(f"scaling: token-model iteration vs residues, batch {a.scaling_batch} pairs")
    for w in (1, 8):
        for res in a.scaling_residues:
            d = os.path.join(r.models, f"scaling_{res}_w{w}")
            common = ["--residues", str(res), "--batch", str(a.scaling_batch), "--warmup", "1",
                      "--repeats", "1"]
            ours = r.hiermd(["token", "--window", str(w), "--save-model", d] + common)
            peer = r.pytorch(["token", "--model", d] + common, timeout=a.big_timeout)
            out.append({"section": "scaling", "residues": res, "window": w,
                        "batch_pairs": a.scaling_batch, "hiermd": ours, "pytorch": peer,
                        "speed_ratio": ratio(ours, peer, "pairs_per_s"),
                        "memory_ratio": ratio(ours, peer, "added_peak_mb")})


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def why(row):
    """A short reason for a missing result."""
    e = row.get("error", "")
    if "allocate memory" in e or "MemoryError" in e:
        return "out of memory"
    if "timed out" in e:
        return e
    return "fails: " + e[:60]


def cell(row, key, spec=".2f"):
    if "error" in row:
        return why(row)
    return fmt(row.get(key), spec)


def report(rows, a, meta):
    md = [f"# hiermd vs PyTorch peer ({meta['date']})", "",
          f"Machine: {meta['machine']}; {a.threads} threads each; device {a.device}; "
          f"torch {meta['torch']}. Command: `{meta['command']}`.", ""]
    tok = [x for x in rows if x["section"] == "token"]
    if tok:
        md += ["## Token-model VAMP training step", "",
               f"{a.residues} residues, H = 64, 4 blocks, 8 heads, {a.batch} pairs per step "
               "(2 x as many frames), AdamW; same weights and inputs.", "",
               "| w | tokens | hiermd pairs/s | peer pairs/s | speed ratio | hiermd MB | peer MB | memory ratio |",
               "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for x in tok:
            h, p = x["hiermd"], x["pytorch"]
            md.append(f"| {x['window']} | {h.get('tokens', 'n/a')} | {cell(h, 'pairs_per_s')} | "
                      f"{cell(p, 'pairs_per_s')} | {fmt(x['speed_ratio'])}x | "
                      f"{cell(h, 'added_peak_mb', '.0f')} | {cell(p, 'added_peak_mb', '.0f')} | "
                      f"{fmt(x['memory_ratio'], '.3f')} |")
        md.append("")
    at = [x for x in rows if x["section"] == "atoms"]
    if at:
        md += ["## Atom stage", "", f"{a.frames} frames per batch, H = 64, 3 layers, cutoff 5 A.", "",
               "| backbone | pass | atoms | hiermd frames/s | peer frames/s | speed ratio | hiermd MB | peer MB | memory ratio |",
               "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for x in at:
            h, p = x["hiermd"], x["pytorch"]
            md.append(f"| {x['kind']} | {'fwd+bwd' if x['backward'] else 'fwd'} | {x['atoms']} | "
                      f"{cell(h, 'frames_per_s')} | {cell(p, 'frames_per_s')} | "
                      f"{fmt(x['speed_ratio'])}x | {cell(h, 'added_peak_mb', '.0f')} | "
                      f"{cell(p, 'added_peak_mb', '.0f')} | {fmt(x['memory_ratio'], '.3f')} |")
        md.append("")
    an = [x for x in rows if x["section"] == "attention"]
    if an:
        md += ["## Equivariant attention", "", "1 frame x 8 heads, dh = 16, values 64 wide.", "",
               "| tokens | pass | hiermd fused ms | hiermd materialised ms | peer SDPA ms | peer plain ms | speed ratio (fused / SDPA) | fused MB | peer SDPA MB |",
               "|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
        for x in an:
            ms = lambda r: "fails" if "error" in r else f"{1e3 * r['median_s']:.1f}"
            md.append(f"| {x['tokens']} | {'fwd+bwd' if x['backward'] else 'fwd'} | "
                      f"{ms(x['hiermd'])} | {ms(x['hiermd_materialised'])} | {ms(x['pytorch'])} | "
                      f"{ms(x['pytorch_plain'])} | {fmt(x['speed_ratio'])}x | "
                      f"{cell(x['hiermd'], 'added_peak_mb', '.0f')} | "
                      f"{cell(x['pytorch'], 'added_peak_mb', '.0f')} |")
        md.append("")
    big = [x for x in rows if x["section"] == "big"]
    def peer_cell(p):
        return (f"**{why(p)}** ({p['error'][:120]})" if "error" in p else
                f"{p['median_s']:.1f} s per step, peak +{p['added_peak_mb']:.0f} MB "
                f"(resident peak {p['peak_rss_mb']:.0f} MB)")

    for x in big:
        h = x["hiermd"]
        md += [f"## {x['residues']} tokens, {x['batch_pairs']} + {x['batch_pairs']} frames", "",
               f"- hiermd (fused EqSDPA): {cell(h, 'median_s', '.1f')} s per step, peak "
               f"+{cell(h, 'added_peak_mb', '.0f')} MB (resident peak "
               f"{cell(h, 'peak_rss_mb', '.0f')} MB).",
               f"- PyTorch peer, SDPA (address space limited to {x['peer_memory_limit_gb']} GB): "
               + peer_cell(x["pytorch"]) + "."]
        if "pytorch_plain" in x:
            md.append("- PyTorch peer, materialised attention (same limit): "
                      + peer_cell(x["pytorch_plain"]) + ".")
        md.append("")
    sc = [x for x in rows if x["section"] == "scaling"]
    if sc:
        md += ["## Training iteration vs residues (no graph conv)", "",
               f"Batch {a.scaling_batch} pairs, H = 64, 4 blocks, 8 heads.", "",
               "| w | residues | hiermd s | peer s | speed ratio | hiermd MB | peer MB |",
               "|--:|--:|--:|--:|--:|--:|--:|"]
        for x in sc:
            h, p = x["hiermd"], x["pytorch"]
            md.append(f"| {x['window']} | {x['residues']} | {cell(h, 'median_s')} | "
                      f"{cell(p, 'median_s')} | {fmt(x['speed_ratio'])}x | "
                      f"{cell(h, 'added_peak_mb', '.0f')} | {cell(p, 'added_peak_mb', '.0f')} |")
        md.append("")
    cu = [x for x in rows if x["section"] == "curves"]
    if cu:
        md += ["## Attention memory vs tokens (forward + backward)", "",
               "1 frame x 8 heads, dh = 16, values 64 wide; peak memory added (MB) and time (s).", "",
               "| tokens | hiermd fused MB | peer plain MB | peer SDPA MB | hiermd fused s | peer plain s | peer SDPA s |",
               "|--:|--:|--:|--:|--:|--:|--:|"]
        for x in cu:
            sd = x.get("pytorch_sdpa", {"error": "not run"})
            md.append(f"| {x['tokens']} | {cell(x['hiermd'], 'added_peak_mb', '.0f')} | "
                      f"{cell(x['pytorch_plain'], 'added_peak_mb', '.0f')} | "
                      f"{cell(sd, 'added_peak_mb', '.0f')} | {cell(x['hiermd'], 'median_s')} | "
                      f"{cell(x['pytorch_plain'], 'median_s')} | {cell(sd, 'median_s')} |")
        md.append("")
    return "\n".join(md)


def plots(rows, out, scaling_json=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG plots")
        return
    cu = [x for x in rows if x["section"] == "curves"]
    if cu:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in [("hiermd", "hiermd fused EqSDPA"),
                           ("pytorch_plain", "PyTorch plain attention"),
                           ("pytorch_sdpa", "PyTorch SDPA")]:
            if not any(key in x for x in cu):
                continue
            pts = [(x["tokens"], x[key]["added_peak_mb"]) for x in cu
                   if key in x and "error" not in x[key]]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
            fails = [x["tokens"] for x in cu if "error" in x.get(key, {})]
            for t in fails:
                ax.axvline(t, color="C3", ls=":", lw=1)
                ax.annotate(f"{label}:\n{why(next(x[key] for x in cu if x['tokens'] == t))}",
                            (t, ax.get_ylim()[0]), xytext=(-4, 6), textcoords="offset points",
                            ha="right", va="bottom", fontsize=7, color="C3")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("peak memory added, forward + backward (MB)")
        ax.set_title("Attention memory vs tokens (1 frame x 8 heads, CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "attention_memory.png"), dpi=120)
        plt.close(fig)
    sc = [x for x in rows if x["section"] == "scaling"]
    full = []
    if scaling_json and os.path.exists(scaling_json):
        with open(scaling_json) as f:
            full = [x for x in json.load(f) if "error" not in x]
    if sc or full:
        fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, yl in [(axs[0], "median_s", "seconds per training iteration"),
                            (axs[1], "added_peak_mb", "peak memory of an iteration (MB)")]:
            for gi, g in enumerate(["none", "cheap", "gated"]):
                for wi, w in enumerate([1, 2, 4, 8]):
                    pts = sorted((x["residues"], x[key]) for x in full
                                 if x["window"] == w and (x.get("graph_conv") or "none") == g)
                    if pts:
                        ax.plot(*zip(*pts), "o-" if g == "none" else "s--", color=f"C{wi}",
                                label=f"hiermd w = {w}" + ("" if g == "none" else f", graph conv {g}"))
            for wi, w in [(0, 1), (3, 8)]:
                pts = sorted((x["residues"], x["pytorch"][key]) for x in sc
                             if x["window"] == w and "error" not in x["pytorch"])
                if pts:
                    ax.plot(*zip(*pts), "x:", color=f"C{wi}", ms=9, label=f"PyTorch peer w = {w}")
                if not full:
                    pts = sorted((x["residues"], x["hiermd"][key]) for x in sc
                                 if x["window"] == w and "error" not in x["hiermd"])
                    if pts:
                        ax.plot(*zip(*pts), "o-", color=f"C{wi}", label=f"hiermd w = {w}")
                for x in sc:
                    if x["window"] == w and "error" in x["pytorch"]:
                        ax.axvline(x["residues"], color=f"C{wi}", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("residues")
            ax.set_ylabel(yl)
        axs[1].legend(fontsize=7, ncol=2)
        fig.suptitle("Token-model training iteration vs residues (CPU; dotted verticals: peer out of memory/time)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scaling.png"), dpi=120)
        plt.close(fig)
    tok = [x for x in rows if x["section"] == "token" and "error" not in x["hiermd"] and "error" not in x["pytorch"]]
    if tok:
        fig, axs = plt.subplots(1, 2, figsize=(10, 4))
        ws = [x["window"] for x in tok]
        for key, label in [("hiermd", "hiermd"), ("pytorch", "PyTorch peer")]:
            axs[0].plot(ws, [x[key]["pairs_per_s"] for x in tok], "o-", label=label)
            axs[1].plot(ws, [x[key]["added_peak_mb"] for x in tok], "o-", label=label)
        for ax, yl in zip(axs, ["training pairs / s", "peak memory added (MB)"]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ws, [str(w) for w in ws])
            ax.set_xlabel("window w")
            ax.set_ylabel(yl)
            ax.legend()
        fig.suptitle("Token-model VAMP training step (214 residues, CPU)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "token_step.png"), dpi=120)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hiermd", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="target/bench/compare")
    p.add_argument("--only", default="token,atoms,attention,big,curves,scaling")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing only")
    p.add_argument("--residues", type=int, default=214)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--windows", default="1,2,4,8")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-tokens", default="1024,3200")
    p.add_argument("--curve-tokens", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--big-residues", type=int, default=3200)
    p.add_argument("--big-batch", type=int, default=8)
    p.add_argument("--big-timeout", type=int, default=1800)
    p.add_argument("--peer-memory-gb", type=float, default=20.0)
    p.add_argument("--scaling-residues", default="200,400,800,1600,3200,5000")
    p.add_argument("--scaling-batch", type=int, default=4)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite compare.md and the plots from OUT/compare.json, measuring nothing")
    p.add_argument("--scaling-json", default=None,
                   help="scaling.json of `hiermd bench scaling` to plot with the peer's points")
    a = p.parse_args(argv)
    if a.quick:
        a.residues, a.batch, a.frames, a.repeats = 40, 4, 2, 1
        a.attention_tokens, a.curve_tokens = "256", "128,256"
        a.big_residues, a.big_batch = 200, 2
        a.scaling_residues = "50,100"
    a.windows = [int(x) for x in a.windows.split(",")]
    a.attention_tokens = [int(x) for x in a.attention_tokens.split(",")]
    a.curve_tokens = [int(x) for x in a.curve_tokens.split(",")]
    a.scaling_residues = [int(x) for x in a.scaling_residues.split(",")]
    os.makedirs(a.out, exist_ok=True)
    import torch

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "torch": torch.__version__, "threads": a.threads,
        "command": "benches/compare " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if a.report_only:
        # Tables and plots again from a finished run's compare.json (nothing is measured).
        with open(os.path.join(a.out, "compare.json")) as f:
            saved = json.load(f)
        md = report(saved["rows"], a, saved["meta"])
        with open(os.path.join(a.out, "compare.md"), "w") as f:
            f.write(md + "\n")
        plots(saved["rows"], a.out, a.scaling_json)
        print(md)
        return 0
    r = Runner(a)
    rows = []
    sections = {"token": section_token, "atoms": section_atoms, "attention": section_attention,
                "big": section_big, "curves": section_curves, "scaling": section_scaling}
    for name in a.only.split(","):
        sections[name](r, a, rows)
        with open(os.path.join(a.out, "compare.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = report(rows, a, meta)
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write(md + "\n")
    plots(rows, a.out, a.scaling_json)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
