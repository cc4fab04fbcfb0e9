"""Large structures for memory/runtime scaling benchmarks, with SYNTHETIC trajectories.

Reads the compressed structures fetched by datasets/adk/fetch (3KPR.pdb.gz, 6msm.pdb.bz2,
1k5i_c36.pdb.gz + 1k5i_c36.psf.gz), decompresses them into datasets/large/data/, prints their
residue and heavy-atom counts, and writes for each a SYNTHETIC trajectory (CHARMM DCD, no unit
cell): the structure plus a smooth low-frequency collective displacement plus Gaussian noise.
It also tiles 3KPR (copies translated apart, chain ids renamed) to reach ~3,500 and ~5,300
residues, again with synthetic trajectories. The frames are not dynamics: they exist to measure
memory and run time against system size. Only numpy is used.
"""

import argparse
import bz2
import gzip
import os
import pathlib
import sys
import zlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE.parent / "adk" / "data"
OUT = HERE / "data"

AKMA_PS = 0.04888821  # one AKMA time unit in ps (CHARMM)
NOISE_A = 0.3  # Gaussian noise per coordinate, Angstrom
MODE_AMPLITUDE_A = 1.5  # amplitude of each collective displacement mode, Angstrom
N_MODES = 3
CHAIN_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
AMINO = set(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS HID HIE HIP HSD HSE HSP ILE LEU LYS MET MSE PHE PRO SER THR TRP TYR VAL".split()
)
NUCLEIC = set("A C G U DA DC DG DT ADE CYT GUA URA THY RA RC RG RU".split())
WATER = set("HOH WAT TIP3 TIP4 SOL SPC".split())


# ----------------------------------------------------------------------------------- reading


def decompress(name):
    src = SRC / name
    if not src.is_file():
        sys.exit(f"make_large: {src} missing; run datasets/adk/fetch")
    opener = gzip.open if name.endswith(".gz") else bz2.open
    dst = OUT / name.rsplit(".", 1)[0]
    data = opener(src).read()
    write_atomic(dst, data)
    return dst


def write_atomic(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Pdb:
    """ATOM/HETATM records of the first model of a PDB file."""

    def __init__(self, path):
        self.path = path
        self.records, self.names, self.resnames, self.chains = [], [], [], []
        self.resids, self.icodes, self.segids, self.elements, self.tails = [], [], [], [], []
        xyz = []
        for line in open(path):
            if line.startswith("ENDMDL"):
                break
            if not line.startswith(("ATOM  ", "HETATM")):
                continue
            line = line.rstrip("\n").ljust(80)
            self.records.append(line[0:6])
            self.names.append(line[12:16])
            self.resnames.append(line[17:21].strip())
            self.chains.append(line[21])
            self.resids.append(int(line[22:26]))
            self.icodes.append(line[26])
            xyz.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
            self.tails.append(line[54:72])  # occupancy, B-factor (and spaces)
            self.segids.append(line[72:76].strip())
            self.elements.append(line[76:78].strip())
        self.xyz = np.array(xyz, dtype=np.float64)

    def residue_keys(self):
        return list(zip(self.segids, self.chains, self.resids, self.icodes, self.resnames))

    def element(self, i):
        if self.elements[i]:
            return self.elements[i].upper()
        name = self.names[i].strip().lstrip("0123456789")
        return name[:1].upper()


class Psf:
    """The !NATOM section of a (standard or EXT) PSF."""

    def __init__(self, path):
        self.segids, self.resids, self.resnames, self.names, self.masses = [], [], [], [], []
        with open(path) as fh:
            for line in fh:
                if "!NATOM" in line:
                    n = int(line.split()[0])
                    break
            else:
                sys.exit(f"make_large: {path}: no !NATOM section")
            for _ in range(n):
                f = next(fh).split()
                self.segids.append(f[1])
                self.resids.append(f[2])
                self.resnames.append(f[3])
                self.names.append(f[4])
                self.masses.append(float(f[7]))

    def residue_keys(self):
        return list(zip(self.segids, self.resids, self.resnames))


def count_residues(keys):
    """Residues as runs of atoms with equal (segment, chain, number, insertion code, name)."""
    starts = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return starts


def summary(label, keys, resnames, heavy):
    starts = count_residues(keys)
    kinds = [resnames[i] for i in starts]
    return {
        "structure": label,
        "atoms": len(keys),
        "residues": len(starts),
        "protein residues": sum(r in AMINO for r in kinds),
        "nucleic residues": sum(r in NUCLEIC for r in kinds),
        "waters": sum(r in WATER for r in kinds),
        "heavy atoms": int(heavy),
    }


# ------------------------------------------------------------------------------ DCD writing


def _record(payload):
    n = np.array([len(payload)], dtype="<i4").tobytes()
    return n + payload + n


def dcd_header(natoms, nframes, title_lines):
    icntrl = np.zeros(20, dtype="<i4")
    icntrl[0] = nframes  # NSET
    icntrl[1] = 0  # ISTART
    icntrl[2] = 1  # NSAVC: every step saved
    icntrl[3] = nframes  # NSTEP
    icntrl[8] = 0  # NAMNF: no fixed atoms
    icntrl[9] = np.array([1.0 / AKMA_PS], dtype="<f4").view("<i4")[0]  # DELTA: 1 ps per frame
    icntrl[10] = 0  # no unit-cell block
    icntrl[11] = 0  # no fourth dimension
    icntrl[19] = 24  # CHARMM version: CHARMM-style file
    first = b"CORD" + icntrl.tobytes()
    assert len(first) == 84
    titles = [t.encode("ascii")[:80].ljust(80) for t in title_lines]
    second = np.array([len(titles)], dtype="<i4").tobytes() + b"".join(titles)
    third = np.array([natoms], dtype="<i4").tobytes()
    return _record(first) + _record(second) + _record(third)


def dcd_frame(xyz):
    xyz = np.asarray(xyz, dtype="<f4")
    return b"".join(_record(np.ascontiguousarray(xyz[:, d]).tobytes()) for d in range(3))


def read_dcd(path):
    """Reads back a DCD written by dcd_header/dcd_frame: (natoms, nframes, first, middle frame)."""
    raw = np.fromfile(path, dtype=np.uint8)
    b = raw.tobytes()

    def i4(off):
        return int(np.frombuffer(b, "<i4", 1, off)[0])

    assert i4(0) == 84 and b[4:8] == b"CORD" and i4(88) == 84
    nset = i4(8)
    off = 92
    tlen = i4(off)
    off += 4 + tlen + 4
    assert i4(off) == 4
    natoms = i4(off + 4)
    off += 12
    frame_bytes = 3 * (8 + 4 * natoms)
    nframes = (len(b) - off) // frame_bytes
    assert off + nframes * frame_bytes == len(b), "trailing bytes"
    assert nframes == nset, (nframes, nset)

    def frame(k):
        o = off + k * frame_bytes
        cols = []
        for _ in range(3):
            assert i4(o) == 4 * natoms
            cols.append(np.frombuffer(b, "<f4", natoms, o + 4))
            o += 8 + 4 * natoms
        return np.stack(cols, axis=1)

    return natoms, nframes, frame(0), frame(nframes // 2)


# ---------------------------------------------------------------------- synthetic frames


def synthetic_frames(xyz, nframes, seed):
    """Yields nframes float32 (n, 3) arrays: the structure plus N_MODES smooth collective
    displacements (long-wavelength sine fields over the structure, each oscillating 1-3 times
    over the trajectory) plus independent Gaussian noise of NOISE_A per coordinate."""
    rng = np.random.default_rng(seed)
    center = xyz.mean(axis=0)
    rel = xyz - center
    extent = float(np.ptp(rel, axis=0).max()) or 1.0
    fields = []
    phases_t = []
    for k in range(N_MODES):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (rel @ u) / (2.0 * extent) + phase)  # half a wave across
        fields.append(MODE_AMPLITUDE_A * wave[:, None] * v[None, :])
        phases_t.append((k + 1, rng.uniform(0, 2 * np.pi)))
    for t in range(nframes):
        x = xyz.copy()
        for field, (cycles, psi) in zip(fields, phases_t):
            x += np.sin(2 * np.pi * cycles * t / nframes + psi) * field
        x += rng.normal(0.0, NOISE_A, size=x.shape)
        yield x.astype(np.float32)


def write_synthetic_dcd(path, xyz, nframes, source):
    seed = zlib.crc32(path.name.encode())
    title = [
        f"* SYNTHETIC trajectory of {source}: NOT molecular dynamics",
        f"* {nframes} frames = structure + {N_MODES} smooth collective modes ({MODE_AMPLITUDE_A} A)",
        f"* + Gaussian noise {NOISE_A} A; for memory/runtime scaling only (hiermd datasets/large)",
    ]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(dcd_header(len(xyz), nframes, title))
        for x in synthetic_frames(xyz, nframes, seed):
            fh.write(dcd_frame(x))
    os.replace(tmp, path)
    natoms, nf, first, mid = read_dcd(path)
    assert natoms == len(xyz) and nf == nframes
    rms0 = float(np.sqrt(((first - xyz) ** 2).sum(axis=1).mean()))
    rms_fm = float(np.sqrt(((mid - first) ** 2).sum(axis=1).mean()))
    return rms0, rms_fm


# ------------------------------------------------------------------------------- tiling


def tile_pdb(pdb, copies, path, gap=15.0):
    """Writes `copies` copies of a structure side by side along x (`gap` Angstrom between their
    bounding boxes), chains renamed so every copy has its own (A-J, K-T, ...). Segment ids
    (columns 73-76) record the original chain and copy number (A1, A2, ...). No CRYST1."""
    chains = list(dict.fromkeys(pdb.chains))
    if copies * len(chains) > len(CHAIN_IDS):
        sys.exit(f"make_large: {copies} copies of {len(chains)} chains exceed {len(CHAIN_IDS)} chain ids")
    width = float(np.ptp(pdb.xyz[:, 0])) + gap
    lines = [
        "REMARK   SYNTHETIC: {} copies of {} translated apart along x by {:.1f} A".format(
            copies, pdb.path.name, width
        ),
        "REMARK   for memory/runtime scaling only (hiermd datasets/large); chains renamed",
    ]
    serial = 0
    xyz = []
    for c in range(copies):
        shift = np.array([c * width, 0.0, 0.0])
        rename = {ch: CHAIN_IDS[c * len(chains) + i] for i, ch in enumerate(chains)}
        prev_chain = None
        for i in range(len(pdb.names)):
            if prev_chain is not None and pdb.chains[i] != prev_chain:
                lines.append("TER")
            prev_chain = pdb.chains[i]
            serial += 1
            p = pdb.xyz[i] + shift
            xyz.append(p)
            segid = f"{pdb.chains[i].strip()}{c + 1}"
            lines.append(
                f"{pdb.records[i]}{serial % 100000:5d} {pdb.names[i]} {pdb.resnames[i]:>3s}{'':1s}"
                f"{rename[pdb.chains[i]]}{pdb.resids[i]:4d}{pdb.icodes[i]}   "
                f"{p[0]:8.3f}{p[1]:8.3f}{p[2]:8.3f}{pdb.tails[i]}{segid:<4s}{pdb.elements[i]:>2s}"
            )
        lines.append("TER")
    lines.append("END")
    write_atomic(path, ("\n".join(lines) + "\n").encode("ascii"))
    return np.array(xyz)


# --------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200, help="frames per synthetic trajectory")
    ap.add_argument(
        "--tiles", default="2,3", help="copies of 3KPR to tile, comma-separated (default 2,3)"
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []

    def report(row, dcd, rms):
        row["synthetic DCD"] = dcd.name
        row["DCD MB"] = round(dcd.stat().st_size / 1e6, 1)
        row["rms(frame0 - structure) A"] = round(rms[0], 2)
        row["rms(middle - first frame) A"] = round(rms[1], 2)
        rows.append(row)
        print(row, flush=True)

    # 3KPR: crystal structure, 10 chains, no hydrogens.
    p = Pdb(decompress("3KPR.pdb.gz"))
    heavy = sum(p.element(i) != "H" for i in range(len(p.names)))
    dcd = OUT / "3KPR_synthetic.dcd"
    report(summary("3KPR.pdb", p.residue_keys(), p.resnames, heavy), dcd,
           write_synthetic_dcd(dcd, p.xyz, args.frames, "3KPR.pdb"))
    kpr = p

    # 6msm: cryo-EM structure of CFTR, no hydrogens.
    p = Pdb(decompress("6msm.pdb.bz2"))
    heavy = sum(p.element(i) != "H" for i in range(len(p.names)))
    dcd = OUT / "6msm_synthetic.dcd"
    report(summary("6msm.pdb", p.residue_keys(), p.resnames, heavy), dcd,
           write_synthetic_dcd(dcd, p.xyz, args.frames, "6msm.pdb"))

    # 1k5i_c36: RNA hairpin in CHARMM36 water with K+ ions; PSF gives segments and masses.
    p = Pdb(decompress("1k5i_c36.pdb.gz"))
    s = Psf(decompress("1k5i_c36.psf.gz"))
    if len(s.names) != len(p.names) or s.names != [n.strip() for n in p.names]:
        sys.exit("make_large: 1k5i_c36.psf and .pdb atoms differ")
    heavy = sum(m > 1.5 for m in s.masses)
    dcd = OUT / "1k5i_c36_synthetic.dcd"
    report(summary("1k5i_c36.psf+pdb", s.residue_keys(), s.resnames, heavy), dcd,
           write_synthetic_dcd(dcd, p.xyz, args.frames, "1k5i_c36.pdb"))

    # Tiled 3KPR: SYNTHETIC assemblies for the scaling curves.
    for copies in [int(c) for c in args.tiles.split(",") if c.strip()]:
        pdb_path = OUT / f"3KPR_x{copies}_synthetic.pdb"
        xyz = tile_pdb(kpr, copies, pdb_path)
        t = Pdb(pdb_path)
        assert len(t.names) == copies * len(kpr.names)
        assert np.allclose(t.xyz, xyz, atol=1e-3)
        heavy = sum(t.element(i) != "H" for i in range(len(t.names)))
        dcd = OUT / f"3KPR_x{copies}_synthetic.dcd"
        report(summary(pdb_path.name, t.residue_keys(), t.resnames, heavy), dcd,
               write_synthetic_dcd(dcd, t.xyz, args.frames, pdb_path.name))

    print("\nstructure                   atoms  residues  protein  nucleic  waters  heavy   DCD MB")
    for r in rows:
        print(
            f"{r['structure']:<26s}{r['atoms']:7d}{r['residues']:10d}{r['protein residues']:9d}"
            f"{r['nucleic residues']:9d}{r['waters']:8d}{r['heavy atoms']:7d}{r['DCD MB']:9.1f}"
        )
    print(f"\n{OUT}: frames in *_synthetic.dcd are SYNTHETIC ({args.frames} per file), not dynamics")


if __name__ == "__main__":
    main()
