"""Writes the small synthetic files of datasets/interop/ (committed; deterministic): systems that
MDAnalysis reads and hiermd once refused or read differently (issue 16, "Interop"). The golden
values come from MDAnalysis through datasets/adk/make_golden.py, which reads these files beside
the ADK ones.

  tip4p_water.pdb   alanine (chain A) and two TIP4P waters (chain W) with the massless virtual
                    site MW; no segID and no element column (MDAnalysis takes segids from the
                    chain IDs and guesses elements); two MODELs, each followed by its CRYST1.
  tip5p_water.gro   three TIP5P waters with lone pairs LP1/LP2, and EP1/EP2 as other force
                    fields name them; GRO has no segment (MDAnalysis: SYSTEM).
  martini.pdb       coarse-grained Martini beads (a lipid, a peptide, water) with the element
                    column X, as martinize/insane write it; segIDs MEMB/PROT/SOLV; two MODELs,
                    each after its CRYST1.
  martini.pdb.gz    the same, gzipped: a .pdb.gz trajectory.
  segid_nochain.pdb a peptide without chain IDs or segIDs: MDAnalysis's segid SYSTEM.

Run: python3 datasets/interop/make_files.py (plain Python 3, no packages).
"""

import gzip
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def atom(serial, name, resname, chain, resid, xyz, segid="", element=""):
    # Names of fewer than four characters start in column 14, as PDB writers align them.
    padded = name if len(name) == 4 else f" {name:<3}"
    x, y, z = xyz
    return (
        f"ATOM  {serial:5d} {padded} {resname:<4}{chain:1}{resid:4d}    "
        f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{0.0:6.2f}      {segid:<4}{element:>2}"
    ).rstrip() + "\n"


def cryst1(a, b, c, alpha=90.0, beta=90.0, gamma=90.0):
    return f"CRYST1{a:9.3f}{b:9.3f}{c:9.3f}{alpha:7.2f}{beta:7.2f}{gamma:7.2f} P 1           1\n"


def jitter(k, i, d):
    # Deterministic small displacement of atom i, axis d, in model k.
    return 0.01 * k * ((i * 7 + d * 3) % 5 - 2)


def tip4p_water():
    ala = [("N", (1.0, 2.0, 3.0)), ("H", (1.5, 2.7, 3.1)), ("CA", (1.9, 1.2, 3.8)),
           ("CB", (3.2, 1.9, 4.1)), ("C", (1.2, 0.9, 5.1)), ("O", (0.1, 0.4, 5.2))]
    waters = []
    for w, (ox, oy, oz) in enumerate([(6.0, 6.0, 6.0), (9.0, 7.5, 4.0)]):
        waters += [
            ("OW", "SOL", 2 + w, (ox, oy, oz)),
            ("HW1", "SOL", 2 + w, (ox + 0.957, oy, oz)),
            ("HW2", "SOL", 2 + w, (ox - 0.240, oy + 0.927, oz)),
            ("MW", "SOL", 2 + w, (ox + 0.106, oy + 0.103, oz)),
        ]
    out = ["REMARK tip4p_water.pdb: hiermd interop test (datasets/interop/make_files.py)\n"]
    for k, box in enumerate([30.0, 31.5]):
        out.append(f"MODEL     {k + 1:4d}\n")
        serial = 1
        for i, (n, xyz) in enumerate(ala):
            xyz = tuple(v + jitter(k, i, d) for d, v in enumerate(xyz))
            out.append(atom(serial, n, "ALA", "A", 1, xyz))
            serial += 1
        for i, (n, rn, rid, xyz) in enumerate(waters):
            xyz = tuple(v + jitter(k, i + 6, d) for d, v in enumerate(xyz))
            out.append(atom(serial, n, rn, "W", rid, xyz))
            serial += 1
        out.append("ENDMDL\n")
        # CRYST1 after ENDMDL: each model's own box (MDAnalysis gives model k this box).
        out.append(cryst1(box, box, box + 2.0))
    out.append("END\n")
    return "".join(out)


def tip5p_water():
    lines = ["tip5p_water.gro: hiermd interop test (TIP5P, lone pairs LP and EP)\n"]
    atoms = []
    names = [("OW", 0.0, 0.0, 0.0), ("HW1", 0.0957, 0.0, 0.0), ("HW2", -0.024, 0.0927, 0.0),
             ("LP1", -0.04, -0.04, 0.05), ("LP2", -0.04, -0.04, -0.05)]
    for w, (ox, oy, oz) in enumerate([(1.0, 1.0, 1.0), (1.5, 1.2, 0.8), (0.6, 1.7, 1.3)]):
        for n, dx, dy, dz in names:
            if w == 2:
                n = n.replace("LP", "EP")
            atoms.append((w + 1, "SOL", n, ox + dx, oy + dy, oz + dz))
    lines.append(f"{len(atoms):5d}\n")
    for i, (rid, rn, n, x, y, z) in enumerate(atoms, start=1):
        lines.append(f"{rid:5d}{rn:<5}{n:>5}{i:5d}{x:8.3f}{y:8.3f}{z:8.3f}\n")
    lines.append(f"{3.0:10.5f}{3.0:10.5f}{3.0:10.5f}\n")
    return "".join(lines)


def martini():
    beads = [
        # A POPC-like lipid.
        ("NC3", "POPC", 1, "MEMB"), ("PO4", "POPC", 1, "MEMB"), ("GL1", "POPC", 1, "MEMB"),
        ("GL2", "POPC", 1, "MEMB"), ("C1A", "POPC", 1, "MEMB"), ("D2A", "POPC", 1, "MEMB"),
        ("C1B", "POPC", 1, "MEMB"), ("C2B", "POPC", 1, "MEMB"),
        # A peptide: backbone and side-chain beads.
        ("BB", "LYS", 2, "PROT"), ("SC1", "LYS", 2, "PROT"), ("SC2", "LYS", 2, "PROT"),
        ("BB", "ALA", 3, "PROT"), ("BB", "PHE", 4, "PROT"), ("SC1", "PHE", 4, "PROT"),
        # Water and an ion.
        ("W", "W", 5, "SOLV"), ("W", "W", 6, "SOLV"), ("NA", "ION", 7, "SOLV"),
    ]
    out = ["REMARK martini.pdb: hiermd interop test, coarse-grained (element X)\n"]
    for k in range(2):
        # A CRYST1 before each MODEL: each model's own box.
        out.append(cryst1(50.0 + k, 50.0 + k, 60.0))
        out.append(f"MODEL     {k + 1:4d}\n")
        for i, (n, rn, rid, seg) in enumerate(beads, start=1):
            xyz = (2.0 + 4.1 * i + jitter(k, i, 0), 3.0 + 2.3 * (i % 4) + jitter(k, i, 1),
                   10.0 + 1.7 * (i % 3) + jitter(k, i, 2))
            out.append(atom(i, n, rn, " ", rid, xyz, segid=seg, element="X"))
        out.append("ENDMDL\n")
    out.append("END\n")
    return "".join(out)


def segid_nochain():
    out = ["REMARK segid_nochain.pdb: hiermd interop test (no chain, no segID: SYSTEM)\n"]
    names = ["N", "CA", "C", "O", "CB"]
    serial = 1
    for r, rn in enumerate(["GLY", "SER"], start=1):
        for i, n in enumerate(names):
            if rn == "GLY" and n == "CB":
                continue
            out.append(atom(serial, n, rn, " ", r, (1.0 * serial, 0.5 * i, 0.25 * r), element=""))
            serial += 1
    out.append("END\n")
    return "".join(out)


def main():
    files = {
        "tip4p_water.pdb": tip4p_water(),
        "tip5p_water.gro": tip5p_water(),
        "martini.pdb": martini(),
        "segid_nochain.pdb": segid_nochain(),
    }
    for name, text in files.items():
        (HERE / name).write_text(text)
    # mtime=0: the same bytes on every run.
    with open(HERE / "martini.pdb.gz", "wb") as fh:
        with gzip.GzipFile(filename="martini.pdb", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(files["martini.pdb"].encode())
    print(f"{HERE}: wrote {', '.join(list(files) + ['martini.pdb.gz'])}")


if __name__ == "__main__":
    main()
