#!/usr/bin/env python3
"""Long trajectories with known two-state kinetics: Langevin dynamics of adenylate kinase (ADK) on a
two-state ("plastic") elastic network model (Maragakis & Karplus, J. Mol. Biol. 352, 807 (2005)).

Model. Atoms: the 1656 heavy atoms (atom name not starting with H) of adk_open.pdb (4AKE-based,
open) and adk_closed.pdb (1AKE-based, closed) from MDAnalysisTests (datasets/adk/fetch), same
atoms in the same order; the closed structure is first superposed onto the open one (Kabsch, all
heavy atoms). Each reference R in {open, closed} defines a network: every pair (i, j) whose
reference distance d_ij^R is below --cutoff gets a spring, and
    E_R(x) = sum_{(i,j) in R} k_ij^R / 2 (|x_i - x_j| - d_ij^R)^2.
The two are mixed as
    E(x) = -1/beta_m ln( exp(-beta_m E_open(x)) + exp(-beta_m (E_closed(x) + eps)) ),
so the force is a softmax-weighted mix of the two network forces. beta_m (--beta-m) sets how
much the mixing lowers the barrier between the basins (smaller = lower barrier), eps (--eps)
shifts the closed basin up (positive) or down.

Spring constants. With one constant k for every spring (--tol 0 --plastic-scale 1
--plastic-scale-closed 1, the plain model) the two networks differ in ~35 000 springs, the
energy of one network at the other structure is 2.7e4 / 2.6e5 kT (k = 1 kT/A^2), and the
minimum-energy crossing of the two is ~5800 kT above both basins: no beta_m gives a barrier of a
few kT without merging the basins, and a k small enough for that lets the protein fall apart
(RMSD ~19 A at k = 0.02). So the default splits the springs:
  * conserved contacts, in both networks with |d_open - d_closed| <= --tol (0.5 A; 41 122 of
    69 999), get the consensus rest length (d_open + d_closed)/2 and constant k (1 kT/A^2) in
    both networks; they add the same energy to E_open and E_closed, cancel in the mixing and
    keep every domain intact (a common scaffold);
  * all other springs (contacts that form, break or change by more than tol) are "plastic":
    constant --plastic-scale * k in the open network and --plastic-scale-closed * k in the closed
    one. These weak springs decide open vs closed, and set the barrier with beta_m and eps.

Units are reduced: length Angstrom, energy kT = 1, unit mass for every atom, time unit
tau = Angstrom * sqrt(m / kT). The dynamics is underdamped Langevin, integrated with BAOAB
(Leimkuhler & Matthews) with step --dt and friction --gamma. The spring sum runs in a numba
kernel over the union of both networks' springs (one distance per spring, both forces); a
vectorised numpy kernel (--engine numpy) computes the same and is used to check it.

Output (--out, default datasets/adk-two-state/data/):
  adk_heavy.pdb  the open reference, heavy atoms only, standard PDB with element column;
  adk2s_sNNNN.dcd  CHARMM DCD (little-endian, CHARMM version 24, no unit cell), one frame every
      --stride steps, coordinates superposed onto the open reference (the model is invariant to
      rigid motions, so this only removes the overall tumbling from the output);
  adk2s_sNNNN.npz  per-frame E_open, E_closed, RMSD to both references, state;
  truth.json     the ground truth: state per frame, transitions, dwell times, rates, timescale.

State rule: with D = E_closed + eps - E_open (per saved frame; the scaffold cancels), a frame is
"open" (0) when D > +h, "closed" (1) when D < -h, and otherwise keeps the previous frame's state
(hysteresis --hysteresis h, default 8 kT; the first frame is labelled by the sign of D). Rates per frame:
k_open->closed = (open->closed transitions) / (frames labelled open), likewise closed->open;
the two-state implied timescale is 1 / (k_oc + k_co) frames.

Deterministic for a given seed (numpy PCG64 noise, fixed summation order).
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ADK_DATA = os.path.join(os.path.dirname(HERE), "adk", "data")


# ----------------------------------------------------------------------------- structures

def read_charmm_pdb(path):
    """ATOM/HETATM records: list of dicts (serial, name, resname, chain, resid, segid) and xyz."""
    recs, xyz = [], []
    with open(path) as fh:
        for line in fh:
            if line.startswith(("ATOM", "HETATM")):
                recs.append({"name": line[12:16].strip(), "resname": line[17:21].strip(),
                             "resid": int(line[22:26]), "segid": line[72:76].strip(),
                             "element": line[76:78].strip() if len(line) >= 78 else ""})
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
    return recs, np.array(xyz)


def element_of(rec):
    if rec["element"]:
        return rec["element"].upper()
    return rec["name"][0].upper()  # CHARMM protein names: C*, N*, O*, S*, H*


def heavy(recs, xyz):
    keep = [i for i, r in enumerate(recs) if element_of(r) != "H" and not r["name"].startswith("H")]
    return [recs[i] for i in keep], xyz[keep]


def kabsch(mobile, ref):
    """Rotation R and translation t with mobile @ R.T + t best fitting ref (least squares)."""
    mc, rc = mobile.mean(axis=0), ref.mean(axis=0)
    h = (mobile - mc).T @ (ref - rc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, rc - mc @ r.T


def superpose(mobile, ref):
    r, t = kabsch(mobile, ref)
    return mobile @ r.T + t


def rmsd(a, b):
    return float(np.sqrt(((a - b) ** 2).sum(axis=1).mean()))


def write_pdb(path, recs, xyz, title):
    with open(path, "w") as fh:
        fh.write(f"REMARK   1 {title}\n")
        for i, (r, p) in enumerate(zip(recs, xyz)):
            name = r["name"]
            el = element_of(r)
            name_f = f" {name:<3s}" if len(name) < 4 and len(el) == 1 else f"{name:<4s}"
            fh.write(f"ATOM  {i + 1:5d} {name_f} {r['resname']:<4s}A{r['resid']:4d}    "
                     f"{p[0]:8.3f}{p[1]:8.3f}{p[2]:8.3f}{1.0:6.2f}{0.0:6.2f}      "
                     f"{r['segid']:<4s}{el:>2s}  \n")
        fh.write("TER\nEND\n")


# ----------------------------------------------------------------------------- DCD

class DCDWriter:
    """CHARMM DCD: little-endian Fortran records, 84-byte header starting with 'CORD' (ICNTRL:
    NSET, ISTART, NSAVC, NSTEP, ..., NAMNF, DELTA, no unit cell, CHARMM version 24), a title
    record, a natoms record, then X, Y, Z float32 records per frame. NSET and NSTEP are patched
    on close."""

    def __init__(self, path, natoms, nsavc, delta, title):
        self.fh = open(path, "wb")
        self.natoms, self.nsavc, self.nframes = natoms, nsavc, 0
        self.delta = delta
        self._header()
        titles = [t.encode("ascii")[:80].ljust(80) for t in title]
        self._rec(struct.pack("<i", len(titles)) + b"".join(titles))
        self._rec(struct.pack("<i", natoms))

    def _rec(self, payload):
        n = struct.pack("<i", len(payload))
        self.fh.write(n + payload + n)

    def _header(self):
        icntrl = [0] * 20
        icntrl[0] = self.nframes            # NSET
        icntrl[1] = self.nsavc              # ISTART (first saved step)
        icntrl[2] = self.nsavc              # NSAVC
        icntrl[3] = self.nframes * self.nsavc  # NSTEP
        icntrl[8] = 0                       # NAMNF (no fixed atoms)
        icntrl[10] = 0                      # no unit cell
        icntrl[19] = 24                     # CHARMM version
        payload = b"CORD" + struct.pack("<9i", *icntrl[:9]) + struct.pack("<f", self.delta) \
            + struct.pack("<10i", *icntrl[10:])
        assert len(payload) == 84
        self._rec(payload)

    def write(self, xyz):
        x = np.ascontiguousarray(xyz, dtype="<f4")
        for k in range(3):
            self._rec(np.ascontiguousarray(x[:, k]).tobytes())
        self.nframes += 1

    def close(self):
        self.fh.seek(0)
        self._header()
        self.fh.close()


def read_dcd(path):
    """Reader for the files written above (and other unit-cell-free little-endian DCDs)."""
    data = open(path, "rb").read()
    assert struct.unpack("<i", data[:4])[0] == 84 and data[4:8] == b"CORD"
    has_cell = struct.unpack("<i", data[48:52])[0]
    off = 92
    n = struct.unpack("<i", data[off:off + 4])[0]
    off += 8 + n
    natoms = struct.unpack("<i", data[off + 4:off + 8])[0]
    off += 12
    frames = []
    while off < len(data):
        if has_cell:
            off += 56
        f = []
        for _ in range(3):
            f.append(np.frombuffer(data, "<f4", natoms, off + 4))
            off += 8 + 4 * natoms
        frames.append(np.stack(f, axis=1))
    return np.array(frames)


# ----------------------------------------------------------------------------- model

def build_network(x_open, x_closed, cutoff):
    """Union of both networks: i, j, d_open, d_closed, in_open, in_closed (sorted by i, j)."""
    def pairs(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        i, j = np.nonzero(np.triu(d < cutoff, 1))
        return set(zip(i.tolist(), j.tolist()))
    po, pc = pairs(x_open), pairs(x_closed)
    allp = np.array(sorted(po | pc), dtype=np.int64)
    i, j = allp[:, 0], allp[:, 1]
    d_o = np.linalg.norm(x_open[i] - x_open[j], axis=1)
    d_c = np.linalg.norm(x_closed[i] - x_closed[j], axis=1)
    in_o = np.array([(a, b) in po for a, b in allp.tolist()])
    in_c = np.array([(a, b) in pc for a, b in allp.tolist()])
    return i, j, d_o, d_c, in_o, in_c


class Model:
    """Per-spring constants and rest lengths of both networks (union of springs).

    Conserved contacts (in both networks, |d_open - d_closed| <= tol) get the consensus rest length
    (d_open + d_closed) / 2 and constant k in both networks, so they add the same energy to E_open
    and E_closed and cancel in the mixing (a common scaffold). All other springs of a network
    (contacts that form, break or change by more than tol) get constant plastic_scale * k.
    tol = 0 and plastic_scale = 1 is the plain two-state ENM."""

    def __init__(self, net, k, beta_m, eps, engine, tol=0.0, plastic_scale=1.0, plastic_scale_closed=None):
        i, j, d_o, d_c, in_o, in_c = net
        self.i, self.j = i, j
        cons = in_o & in_c & (np.abs(d_o - d_c) <= tol)
        self.conserved = cons
        mean = 0.5 * (d_o + d_c)
        self.d_o = np.where(cons, mean, d_o)
        self.d_c = np.where(cons, mean, d_c)
        kp_o = plastic_scale * k
        kp_c = (plastic_scale if plastic_scale_closed is None else plastic_scale_closed) * k
        self.k_o = np.where(cons, k, np.where(in_o, kp_o, 0.0))  # 0 where the spring is absent
        self.k_c = np.where(cons, k, np.where(in_c, kp_c, 0.0))
        self.beta_m, self.eps = beta_m, eps
        self.engine = engine

    def network_forces(self, x, fo, fc):
        """Fills fo, fc with -grad E_open, -grad E_closed; returns (E_open, E_closed)."""
        if self.engine == "numba":
            return _springs_numba(x, self.i, self.j, self.d_o, self.d_c, self.k_o, self.k_c, fo, fc)
        return _springs_numpy(x, self.i, self.j, self.d_o, self.d_c, self.k_o, self.k_c, fo, fc)

    def mix(self, e_o, e_c):
        """Mixed energy and the weight of the open network."""
        a, b = e_o, e_c + self.eps
        m = min(a, b)
        wa, wb = np.exp(-self.beta_m * (a - m)), np.exp(-self.beta_m * (b - m))
        return m - np.log(wa + wb) / self.beta_m, wa / (wa + wb)


def _springs_numpy(x, i, j, d_o, d_c, k_o, k_c, fo, fc):
    dx = x[i] - x[j]
    r = np.sqrt((dx * dx).sum(axis=1))
    so, sc = k_o * (r - d_o), k_c * (r - d_c)
    e_o, e_c = 0.5 * float(np.dot(so, r - d_o)), 0.5 * float(np.dot(sc, r - d_c))
    n = len(x)
    for f, s in ((fo, so), (fc, sc)):
        g = (s / r)[:, None] * dx  # dE/dx_i for each spring
        for c in range(3):
            f[:, c] = np.bincount(j, g[:, c], n) - np.bincount(i, g[:, c], n)
    return e_o, e_c


try:
    import numba

    @numba.njit(cache=False, fastmath=False)
    def _springs_numba(x, i, j, d_o, d_c, k_o, k_c, fo, fc):
        fo[:] = 0.0
        fc[:] = 0.0
        e_o = 0.0
        e_c = 0.0
        for s in range(len(i)):
            a, b = i[s], j[s]
            dx = x[a, 0] - x[b, 0]
            dy = x[a, 1] - x[b, 1]
            dz = x[a, 2] - x[b, 2]
            r = np.sqrt(dx * dx + dy * dy + dz * dz)
            uo = r - d_o[s]
            uc = r - d_c[s]
            e_o += 0.5 * k_o[s] * uo * uo
            e_c += 0.5 * k_c[s] * uc * uc
            go = k_o[s] * uo / r
            gc = k_c[s] * uc / r
            fo[a, 0] -= go * dx
            fo[a, 1] -= go * dy
            fo[a, 2] -= go * dz
            fo[b, 0] += go * dx
            fo[b, 1] += go * dy
            fo[b, 2] += go * dz
            fc[a, 0] -= gc * dx
            fc[a, 1] -= gc * dy
            fc[a, 2] -= gc * dz
            fc[b, 0] += gc * dx
            fc[b, 1] += gc * dy
            fc[b, 2] += gc * dz
        return e_o, e_c

    @numba.njit(cache=False)
    def _baoab_numba(x, v, f, noise, dt, c1, c2, i, j, d_o, d_c, k_o, k_c, beta_m, eps, fo, fc):
        """len(noise) BAOAB steps in place; f holds the mixed force at x on entry and exit."""
        e_o = 0.0
        e_c = 0.0
        for step in range(noise.shape[0]):
            for p in range(x.shape[0]):
                for c in range(3):
                    v[p, c] += 0.5 * dt * f[p, c]
                    x[p, c] += 0.5 * dt * v[p, c]
                    v[p, c] = c1 * v[p, c] + c2 * noise[step, p, c]
                    x[p, c] += 0.5 * dt * v[p, c]
            e_o, e_c = _springs_numba(x, i, j, d_o, d_c, k_o, k_c, fo, fc)
            a = e_o
            b = e_c + eps
            m = min(a, b)
            wa = np.exp(-beta_m * (a - m))
            wb = np.exp(-beta_m * (b - m))
            w = wa / (wa + wb)
            for p in range(x.shape[0]):
                for c in range(3):
                    f[p, c] = w * fo[p, c] + (1.0 - w) * fc[p, c]
                    v[p, c] += 0.5 * dt * f[p, c]
        return e_o, e_c
except ImportError:  # numpy engine only
    numba = None


def run_block(model, x, v, f, noise, dt, c1, c2, fo, fc):
    """BAOAB steps for each row of noise (unit masses, kT = 1)."""
    if model.engine == "numba":
        return _baoab_numba(x, v, f, noise, dt, c1, c2, model.i, model.j, model.d_o, model.d_c,
                            model.k_o, model.k_c, model.beta_m, model.eps, fo, fc)
    e_o = e_c = 0.0
    for xi in noise:
        v += 0.5 * dt * f
        x += 0.5 * dt * v
        v *= c1
        v += c2 * xi
        x += 0.5 * dt * v
        e_o, e_c = model.network_forces(x, fo, fc)
        _, w = model.mix(e_o, e_c)
        np.multiply(fo, w, out=f)
        f += (1.0 - w) * fc
        v += 0.5 * dt * f
    return e_o, e_c


# ----------------------------------------------------------------------------- ground truth

def label_states(diff, h):
    """0 open / 1 closed with hysteresis on D = E_closed + eps - E_open."""
    s = np.empty(len(diff), dtype=np.int8)
    cur = 0 if diff[0] > 0 else 1
    for t, d in enumerate(diff):
        if d > h:
            cur = 0
        elif d < -h:
            cur = 1
        s[t] = cur
    return s


def ground_truth(states):
    ch = np.nonzero(np.diff(states))[0]  # last frame before each change
    n_oc = int(((states[ch] == 0) & (states[ch + 1] == 1)).sum())
    n_co = int(((states[ch] == 1) & (states[ch + 1] == 0)).sum())
    dwell = {0: [], 1: []}
    bounds = np.concatenate([[-1], ch, [len(states) - 1]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a >= 0 and b < len(states) - 1:  # complete dwells only (both ends observed)
            dwell[int(states[b])].append(int(b - a))
    # transitions counted between consecutive frames: time at risk is the frames that have a
    # successor
    n_open = int((states[:-1] == 0).sum())
    n_closed = int((states[:-1] == 1).sum())
    k_oc = n_oc / n_open if n_open else float("nan")
    k_co = n_co / n_closed if n_closed else float("nan")
    tau = 1.0 / (k_oc + k_co) if (k_oc + k_co) > 0 else float("inf")
    # the same from a two-state MSM at lag 1 frame (for comparison): 1 - k_oc - k_co = lambda_2
    return {
        "frames": int(len(states)),
        "fraction_closed": float(states.mean()),
        "transitions_open_to_closed": n_oc,
        "transitions_closed_to_open": n_co,
        "transitions_total": n_oc + n_co,
        "complete_dwells": {"open": len(dwell[0]), "closed": len(dwell[1])},
        "mean_dwell_frames": {"open": float(np.mean(dwell[0])) if dwell[0] else None,
                              "closed": float(np.mean(dwell[1])) if dwell[1] else None},
        "k_open_to_closed_per_frame": k_oc,
        "k_closed_to_open_per_frame": k_co,
        "implied_timescale_frames": tau,
        "implied_timescale_lag1_msm_frames": float(-1.0 / np.log(1.0 - k_oc - k_co))
        if 0 < k_oc + k_co < 1 else None,
    }


def rle(states):
    """[[state, first_frame, length], ...]"""
    ch = np.concatenate([[0], np.nonzero(np.diff(states))[0] + 1, [len(states)]])
    return [[int(states[a]), int(a), int(b - a)] for a, b in zip(ch[:-1], ch[1:])]


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--frames", type=int, default=10000, help="saved frames (default 10000)")
    p.add_argument("--stride", type=int, default=50, help="BAOAB steps per saved frame (default 50)")
    p.add_argument("--dt", type=float, default=0.08, help="time step in tau (default 0.08)")
    p.add_argument("--gamma", type=float, default=0.5, help="Langevin friction in 1/tau (default 0.5)")
    p.add_argument("--k", type=float, default=1.0, help="spring constant of conserved contacts in kT/A^2 (default 1)")
    p.add_argument("--tol", type=float, default=0.5,
                   help="conserved contact: in both networks with |d_open - d_closed| <= tol A (default 0.5; 0 = none)")
    p.add_argument("--plastic-scale", type=float, default=0.002,
                   help="constant of the other open-network springs, in units of k (default 0.002)")
    p.add_argument("--plastic-scale-closed", type=float, default=0.0007,
                   help="constant of the other closed-network springs, in units of k (default 0.0007)")
    p.add_argument("--cutoff", type=float, default=8.0, help="network cutoff in A (default 8)")
    p.add_argument("--beta-m", type=float, default=1 / 12, help="mixing inverse temperature in 1/kT (default 1/12)")
    p.add_argument("--eps", type=float, default=-1.5, help="offset of the closed network in kT (default -1.5)")
    p.add_argument("--hysteresis", type=float, default=8.0, help="state-rule margin h in kT (default 8)")
    p.add_argument("--start", choices=["open", "closed"], default="open", help="starting structure (default open)")
    p.add_argument("--equil-steps", type=int, default=2000, help="unsaved steps before the first frame (default 2000)")
    p.add_argument("--engine", choices=["numba", "numpy"], default="numba")
    p.add_argument("--no-align", action="store_true", help="write raw coordinates (not superposed)")
    p.add_argument("--open-pdb", default=os.path.join(ADK_DATA, "adk_open.pdb"))
    p.add_argument("--closed-pdb", default=os.path.join(ADK_DATA, "adk_closed.pdb"))
    p.add_argument("--out", default=os.path.join(HERE, "data"))
    p.add_argument("--check-forces", action="store_true",
                   help="compare the numba and numpy kernels and a finite difference, then exit")
    a = p.parse_args()
    if a.engine == "numba" and numba is None:
        sys.exit("numba is not installed; use --engine numpy")
    h = a.hysteresis

    t_start = time.time()
    ro, xo = read_charmm_pdb(a.open_pdb)
    rc, xc = read_charmm_pdb(a.closed_pdb)
    ro, xo = heavy(ro, xo)
    rc, xc = heavy(rc, xc)
    if [(r["name"], r["resname"], r["resid"]) for r in ro] != [(r["name"], r["resname"], r["resid"]) for r in rc]:
        sys.exit("open and closed PDBs do not have the same heavy atoms in the same order")
    rmsd_raw = rmsd(xo, xc)
    xc = superpose(xc, xo)
    rmsd_oc = rmsd(xo, xc)
    net = build_network(xo, xc, a.cutoff)
    model = Model(net, a.k, a.beta_m, a.eps, a.engine, tol=a.tol, plastic_scale=a.plastic_scale,
                  plastic_scale_closed=a.plastic_scale_closed)
    n = len(xo)
    info = {"atoms": n, "springs_open": int(net[4].sum()), "springs_closed": int(net[5].sum()),
            "springs_union": int(len(net[0])), "springs_conserved": int(model.conserved.sum()), "rmsd_open_closed_A": round(rmsd_oc, 3),
            "rmsd_open_closed_unsuperposed_A": round(rmsd_raw, 3)}
    fo, fc = np.zeros((n, 3)), np.zeros((n, 3))
    e_oc = model.network_forces(xc, fo, fc)[0]
    e_co = model.network_forces(xo, fo, fc)[1]
    info["E_open_at_closed_kT"] = round(e_oc, 2)
    info["E_closed_at_open_kT"] = round(e_co, 2)
    print(json.dumps(info), file=sys.stderr)

    if a.check_forces:
        rng = np.random.default_rng(0)
        x = xo + 0.3 * rng.standard_normal(xo.shape)
        res = {}
        for eng in ("numpy",) + (("numba",) if numba else ()):
            model.engine = eng
            f1, f2 = np.zeros((n, 3)), np.zeros((n, 3))
            res[eng] = (model.network_forces(x, f1, f2), f1.copy(), f2.copy())
        if "numba" in res:
            print("numba vs numpy: energies", res["numba"][0], res["numpy"][0], "max |dF|",
                  max(np.abs(res["numba"][1] - res["numpy"][1]).max(), np.abs(res["numba"][2] - res["numpy"][2]).max()))
        model.engine = "numpy"
        hstep = 1e-5
        worst = 0.0
        for atom in (0, n // 2, n - 1):
            for c in range(3):
                xp, xm = x.copy(), x.copy()
                xp[atom, c] += hstep
                xm[atom, c] -= hstep
                ep, em = model.network_forces(xp, fo, fc), model.network_forces(xm, fo, fc)
                for net_k in range(2):
                    fd = -(ep[net_k] - em[net_k]) / (2 * hstep)
                    worst = max(worst, abs(fd - res["numpy"][1 + net_k][atom, c]))
        print("finite-difference max |dF|", worst)
        return

    os.makedirs(a.out, exist_ok=True)
    write_pdb(os.path.join(a.out, "adk_heavy.pdb"), ro, xo,
              "ADK HEAVY ATOMS, OPEN REFERENCE (ADK_OPEN.PDB, MDANALYSISTESTS); ORDER OF THE DCD FILES")
    tag = f"adk2s_s{a.seed:04d}"
    dcd_path, npz_path = os.path.join(a.out, tag + ".dcd"), os.path.join(a.out, tag + ".npz")

    rng = np.random.default_rng(a.seed)
    x = (xo if a.start == "open" else xc).copy()
    v = rng.standard_normal((n, 3))
    v -= v.mean(axis=0)
    f = np.zeros((n, 3))
    e_o, e_c = model.network_forces(x, fo, fc)
    _, w = model.mix(e_o, e_c)
    f[:] = w * fo + (1 - w) * fc
    c1 = float(np.exp(-a.gamma * a.dt))
    c2 = float(np.sqrt(1.0 - c1 * c1))
    # compile outside the timed loop
    t0 = time.time()
    run_block(model, x.copy(), v.copy(), f.copy(), np.zeros((1, n, 3)), a.dt, c1, c2, fo, fc)
    t_compile = time.time() - t0
    if a.equil_steps:
        run_block(model, x, v, f, rng.standard_normal((a.equil_steps, n, 3)), a.dt, c1, c2, fo, fc)

    writer = DCDWriter(dcd_path, n, a.stride, a.dt,
                       [f"hiermd two-state ENM of ADK, seed {a.seed}",
                        f"k {a.k} tol {a.tol} ps {a.plastic_scale}/{a.plastic_scale_closed} cutoff {a.cutoff} "
                        f"beta_m {a.beta_m:.5g} eps {a.eps} dt {a.dt} gamma {a.gamma}",
                        f"stride {a.stride} steps per frame; reduced units (A, kT, unit mass)"])
    e_open = np.empty(a.frames)
    e_closed = np.empty(a.frames)
    rms = np.empty((a.frames, 2))
    t0 = time.time()
    last_print = t0
    for fr in range(a.frames):
        noise = rng.standard_normal((a.stride, n, 3))
        e_o, e_c = run_block(model, x, v, f, noise, a.dt, c1, c2, fo, fc)
        e_open[fr], e_closed[fr] = e_o, e_c
        y = x if a.no_align else superpose(x, xo)
        rms[fr] = rmsd(superpose(x, xo), xo), rmsd(superpose(x, xc), xc)
        writer.write(y)
        if time.time() - last_print > 30 or fr == a.frames - 1:
            last_print = time.time()
            print(f"frame {fr + 1}/{a.frames}: E_open {e_o:.0f} E_closed+eps {e_c + a.eps:.0f} "
                  f"rmsd open/closed {rms[fr, 0]:.2f}/{rms[fr, 1]:.2f} A, "
                  f"{(time.time() - t0) / (fr + 1) / a.stride * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
    writer.close()
    t_run = time.time() - t0

    diff = e_closed + a.eps - e_open
    states = label_states(diff, h)
    truth = ground_truth(states)
    np.savez_compressed(npz_path, E_open=e_open, E_closed=e_closed, rmsd_open=rms[:, 0],
                        rmsd_closed=rms[:, 1], state=states)
    result = {
        "model": "two-state (plastic) elastic network, Maragakis & Karplus 2005; heavy atoms of ADK",
        "inputs": {"open": os.path.basename(a.open_pdb), "closed": os.path.basename(a.closed_pdb),
                   "closed superposed onto open": True},
        "network": info,
        "parameters": {"seed": a.seed, "frames": a.frames, "stride_steps": a.stride, "dt_tau": a.dt,
                       "gamma_per_tau": a.gamma, "k_kT_per_A2": a.k, "cutoff_A": a.cutoff, "tol_A": a.tol,
                       "plastic_scale_open": a.plastic_scale, "plastic_scale_closed": a.plastic_scale_closed,
                       "beta_m_per_kT": a.beta_m, "eps_kT": a.eps, "kT": 1.0, "mass": 1.0,
                       "start": a.start, "equil_steps": a.equil_steps, "engine": a.engine,
                       "integrator": "BAOAB Langevin", "aligned_output": not a.no_align},
        "files": {"pdb": "adk_heavy.pdb", "dcd": os.path.basename(dcd_path), "npz": os.path.basename(npz_path)},
        "time_per_frame_tau": a.dt * a.stride,
        "state_rule": {"D": "E_closed + eps - E_open (per saved frame)",
                       "open (0)": f"D > +{h:g} kT", "closed (1)": f"D < -{h:g} kT",
                       "otherwise": "previous frame's state; first frame by the sign of D",
                       "hysteresis_kT": h},
        "truth": truth,
        "mean_rmsd_A": {"open_state_to_open_ref": float(rms[states == 0, 0].mean()) if (states == 0).any() else None,
                        "closed_state_to_closed_ref": float(rms[states == 1, 1].mean()) if (states == 1).any() else None},
        "runtime_s": {"total": round(time.time() - t_start, 1), "compile": round(t_compile, 1),
                      "production": round(t_run, 1),
                      "ms_per_step": round(t_run / (a.frames * a.stride) * 1e3, 3)},
        "states_rle": rle(states),
        "states": "".join("oc"[s] for s in states),
    }
    with open(os.path.join(a.out, "truth.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    t = truth
    print(f"{a.frames} frames, {t['transitions_total']} transitions (o->c {t['transitions_open_to_closed']}, "
          f"c->o {t['transitions_closed_to_open']}), closed fraction {t['fraction_closed']:.3f}, "
          f"mean dwell open/closed {t['mean_dwell_frames']['open']}/{t['mean_dwell_frames']['closed']} frames, "
          f"implied timescale {t['implied_timescale_frames']:.1f} frames; {time.time() - t_start:.0f} s -> {a.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
