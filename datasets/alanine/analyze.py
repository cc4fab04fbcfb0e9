#!/usr/bin/env python3
"""Backbone-dihedral analysis of alanine dipeptide trajectories: phi/psi, phi transitions, and a
reference Markov state model (MSM) of the slowest process.

Reads a folder holding `ala2.pdb` (or any PDB with ACE/ALA/NME, e.g. a heavy-atom subset) and the
trajectories `*.xtc` / `*.dcd` in it (each file is one independent trajectory), all with the PDB's
atoms. phi = C(ACE)-N-CA-C and psi = N-CA-C-N(NME), computed with numpy from the coordinates.

Transitions: the phi>0 basin (alpha_L / C7ax) has the core 0 < phi < 120 deg, the phi<0 basins
(C5/beta, PII, alpha_R) have the core phi < -30 or phi > 150 deg (the beta basin wraps around
+-180). A frame outside both cores keeps the previous core's label (core-to-core milestoning), so
recrossings of a single boundary are not counted. Each change of label is one transition.

MSMs, both with the reversible maximum-likelihood estimator on the largest connected set and
sliding-window counts:
  * grid: (phi, psi) on an N x N grid (default 12 x 12 bins of 30 deg);
  * cores: the two-state milestoned phi sequence above.
The implied timescale t_2 = -lag / ln|lambda_2| is printed per lag; the results go to
`analysis.json` and a Ramachandran free-energy picture `ramachandran.png` in the folder (or --json/--png).
"""
import argparse
import glob
import json
import os
import struct
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trajio  # noqa: E402  (numpy readers for XTC/DCD/PDB)

LAGS_PS = [1, 2, 5, 10, 20, 50, 100, 200]


def read_pdb_atoms(path):
    """[(resname, atomname)] in file order."""
    return [(r, a) for r, a, _ in trajio.read_pdb(path)[0]]


def dihedral(p0, p1, p2, p3):
    """Per-frame dihedral in degrees, inputs (nframes, 3)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1, axis=1, keepdims=True)
    v = b0 - np.sum(b0 * b1, axis=1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, axis=1, keepdims=True) * b1
    x = np.sum(v * w, axis=1)
    y = np.sum(np.cross(b1, v) * w, axis=1)
    return np.degrees(np.arctan2(y, x))


def phi_psi(xyz, atoms):
    idx = {a: i for i, a in enumerate(atoms)}
    c0, n, ca, c, n2 = (idx[k] for k in [("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "C"), ("NME", "N")])
    phi = dihedral(xyz[:, c0], xyz[:, n], xyz[:, ca], xyz[:, c])
    psi = dihedral(xyz[:, n], xyz[:, ca], xyz[:, c], xyz[:, n2])
    return phi, psi


def milestone(phi):
    """Core-to-core label per frame: 1 in the phi>0 basin, 0 in the phi<0 basins."""
    pos = (phi > 0) & (phi < 120)
    neg = (phi < -30) | (phi > 150)
    lab = np.empty(len(phi), dtype=np.int64)
    cur = 1 if phi[0] > 0 and phi[0] < 150 else 0
    for i in range(len(phi)):
        if pos[i]:
            cur = 1
        elif neg[i]:
            cur = 0
        lab[i] = cur
    return lab


def count_matrix(dtrajs, n, lag):
    c = np.zeros((n, n))
    for d in dtrajs:
        if len(d) > lag:
            np.add.at(c, (d[:-lag], d[lag:]), 1.0)
    return c


def largest_connected(c):
    """Indices of the largest strongly connected set of the count graph."""
    n = len(c)
    a = c > 0
    best = np.array([], dtype=int)
    seen = np.zeros(n, bool)
    for s in range(n):
        if seen[s] or c[s].sum() == 0:
            continue
        # forward and backward reachability from s
        def reach(m):
            r = np.zeros(n, bool)
            r[s] = True
            stack = [s]
            while stack:
                u = stack.pop()
                for v in np.nonzero(m[u])[0]:
                    if not r[v]:
                        r[v] = True
                        stack.append(v)
            return r
        comp = reach(a) & reach(a.T)
        seen |= comp
        if comp.sum() > len(best):
            best = np.nonzero(comp)[0]
    return best


def reversible_mle(c, iters=100000, tol=1e-12):
    """Reversible transition matrix maximising the likelihood of counts c (fixed-point iteration)."""
    if len(c) < 2:
        return np.ones((len(c), len(c))), np.ones(len(c))
    cs = c + c.T
    ci = c.sum(axis=1)
    x = cs / cs.sum()
    for _ in range(iters):
        pi = x.sum(axis=1)
        denom = ci[:, None] / pi[:, None] + ci[None, :] / pi[None, :]
        xn = np.where(cs > 0, cs / np.where(denom > 0, denom, 1.0), 0.0)
        xn /= xn.sum()
        if np.abs(xn - x).max() < tol:
            x = xn
            break
        x = xn
    return x / x.sum(axis=1, keepdims=True), x.sum(axis=1)


def timescales(dtrajs, n, lag, k=3):
    c = count_matrix(dtrajs, n, lag)
    cc = largest_connected(c)
    t, pi = reversible_mle(c[np.ix_(cc, cc)])
    # symmetrise with the stationary distribution for a stable real spectrum
    s = np.sqrt(pi)[:, None] * t / np.sqrt(pi)[None, :]
    ev = np.sort(np.linalg.eigvalsh(0.5 * (s + s.T)))[::-1]  # real spectrum, lambda_1 = 1
    ts = [float(-lag / np.log(l)) if 0 < l < 1 else float("nan") for l in ev[1:1 + k]]
    ts += [float("nan")] * (k - len(ts))  # fewer connected states than asked for
    return ts, len(cc), int(c.sum())


def write_png(path, img):
    """Greyscale 8-bit PNG from a 2-D uint8 array, with numpy and zlib only."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(h))
    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as fh:
        fh.write(png)


def ramachandran_png(path, phi, psi, bins=90, scale=4):
    h, _, _ = np.histogram2d(psi, phi, bins=bins, range=[[-180, 180], [-180, 180]])
    h = h[::-1]  # psi up
    f = np.full(h.shape, np.nan)
    f[h > 0] = -np.log(h[h > 0] / h.max())  # free energy in kT
    img = np.full(h.shape, 255, dtype=np.uint8)
    ok = ~np.isnan(f)
    img[ok] = (np.clip(f[ok] / 8.0, 0, 1) * 220).astype(np.uint8)  # dark = low free energy
    img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    mid = img.shape[0] // 2
    img[mid, :] = np.minimum(img[mid, :], 160)  # axes psi = 0, phi = 0
    img[:, mid] = np.minimum(img[:, mid], 160)
    write_png(path, img)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    p.add_argument("--pdb", help="topology (default FOLDER/ala2.pdb)")
    p.add_argument("--dt-ps", type=float, default=1.0, help="time between saved frames in ps (default 1)")
    p.add_argument("--grid", type=int, default=12, help="grid bins per dihedral for the grid MSM (default 12)")
    p.add_argument("--ref-lag-ps", type=float, default=20.0,
                   help="lag of the reported reference timescale (default 20 ps)")
    p.add_argument("--json", help="output JSON (default FOLDER/analysis.json)")
    p.add_argument("--png", help="output picture (default FOLDER/ramachandran.png)")
    a = p.parse_args()
    pdb = a.pdb or os.path.join(a.folder, "ala2.pdb")
    atoms = read_pdb_atoms(pdb)
    files = sorted(glob.glob(os.path.join(a.folder, "*.xtc")) + glob.glob(os.path.join(a.folder, "*.dcd")))
    if not files:
        sys.exit(f"no .xtc/.dcd in {a.folder}")
    res = {"pdb": os.path.basename(pdb), "dt_ps": a.dt_ps, "trajectories": []}
    phis, psis, grid_d, core_d = [], [], [], []
    tot_in = tot_out = 0
    for f in files:
        xyz = trajio.read_traj(f)
        if xyz.shape[1] != len(atoms):
            sys.exit(f"{f}: {xyz.shape[1]} atoms, {pdb}: {len(atoms)}")
        phi, psi = phi_psi(xyz, atoms)
        lab = milestone(phi)
        d = np.diff(lab)
        n_in, n_out = int((d == 1).sum()), int((d == -1).sum())
        tot_in += n_in
        tot_out += n_out
        g = a.grid
        gphi = np.clip(((phi + 180) / 360 * g).astype(int), 0, g - 1)
        gpsi = np.clip(((psi + 180) / 360 * g).astype(int), 0, g - 1)
        grid_d.append(gphi * g + gpsi)
        core_d.append(lab)
        phis.append(phi)
        psis.append(psi)
        rec = {"file": os.path.basename(f), "frames": len(phi), "ns": len(phi) * a.dt_ps / 1000,
               "transitions_into_phi_pos": n_in, "transitions_out_of_phi_pos": n_out,
               "fraction_phi_pos": float(lab.mean()),
               "bytes": os.path.getsize(f)}
        res["trajectories"].append(rec)
        print(f"{rec['file']}: {rec['frames']} frames ({rec['ns']:g} ns), phi>0 fraction "
              f"{rec['fraction_phi_pos']:.3f}, transitions in {n_in} out {n_out}")
    phi, psi = np.concatenate(phis), np.concatenate(psis)
    lab = np.concatenate(core_d)
    total_ns = len(phi) * a.dt_ps / 1000
    res.update({"total_frames": int(len(phi)), "total_ns": total_ns,
                "transitions_into_phi_pos": tot_in, "transitions_out_of_phi_pos": tot_out,
                "transitions_total": tot_in + tot_out, "fraction_phi_pos": float(lab.mean())})
    # mean dwell times in the two cores from the milestoned labels (whole dwells only)
    dw = {0: [], 1: []}
    for l in core_d:
        ch = np.nonzero(np.diff(l))[0]
        for s0, s1 in zip(ch[:-1], ch[1:]):
            dw[int(l[s1])].append(s1 - s0)
    res["mean_dwell_ps"] = {"phi_neg": float(np.mean(dw[0]) * a.dt_ps) if dw[0] else None,
                            "phi_pos": float(np.mean(dw[1]) * a.dt_ps) if dw[1] else None}
    print(f"total {len(phi)} frames = {total_ns:g} ns; transitions into phi>0 {tot_in}, out {tot_out}, "
          f"total {tot_in + tot_out}; phi>0 fraction {lab.mean():.4f}; mean dwell (ps) {res['mean_dwell_ps']}")
    res["msm"] = {"grid": a.grid, "estimator": "reversible MLE, sliding-window counts, largest connected set",
                  "grid_its_ps": {}, "cores_its_ps": {}}
    print(f"{'lag/ps':>7} {'grid t2/ps':>11} {'grid t3/ps':>11} {'states':>6} {'cores t2/ps':>12}")
    for lag_ps in sorted(set(LAGS_PS) | {a.ref_lag_ps}):
        lag = int(round(lag_ps / a.dt_ps))
        if lag < 1 or lag >= min(len(x) for x in grid_d):
            continue
        ts, nst, _ = timescales(grid_d, a.grid * a.grid, lag)
        tc, _, _ = timescales(core_d, 2, lag, k=1)
        ts_ps = [t * a.dt_ps for t in ts]
        tc_ps = tc[0] * a.dt_ps
        res["msm"]["grid_its_ps"][f"{lag_ps:g}"] = {"states": nst, "its": ts_ps}
        res["msm"]["cores_its_ps"][f"{lag_ps:g}"] = tc_ps
        print(f"{lag_ps:7g} {ts_ps[0]:11.1f} {ts_ps[1]:11.1f} {nst:6d} {tc_ps:12.1f}")
    ref = res["msm"]["grid_its_ps"].get(f"{a.ref_lag_ps:g}")
    if ref is not None:
        res["reference"] = {"model": f"grid MSM {a.grid}x{a.grid} on (phi, psi), reversible MLE",
                            "lag_ps": a.ref_lag_ps, "slowest_its_ps": ref["its"][0],
                            "two_state_cores_its_ps": res["msm"]["cores_its_ps"].get(f"{a.ref_lag_ps:g}")}
        print(f"reference: slowest implied timescale {ref['its'][0]:.1f} ps (grid MSM, lag {a.ref_lag_ps:g} ps)")
    if len(files) > 1:  # per-trajectory spread of the grid MSM's slowest timescale at lag 50 ps
        lag = int(round(50 / a.dt_ps))
        per = []
        for d in grid_d:
            try:
                per.append(timescales([d], a.grid * a.grid, lag)[0][0] * a.dt_ps)
            except Exception:  # a trajectory without transitions has no finite t2
                per.append(float("nan"))
        res["msm"]["grid_its_ps_lag50_per_trajectory"] = per
        print("grid t2 at lag 50 ps per trajectory (ps):", " ".join(f"{t:.0f}" for t in per))
    js = a.json or os.path.join(a.folder, "analysis.json")
    with open(js, "w") as fh:
        json.dump(res, fh, indent=1)
    png = a.png or os.path.join(a.folder, "ramachandran.png")
    ramachandran_png(png, phi, psi)
    print(f"wrote {js} and {png}")


if __name__ == "__main__":
    main()
