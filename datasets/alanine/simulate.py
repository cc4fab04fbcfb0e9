#!/usr/bin/env python3
"""Alanine dipeptide (ACE-ALA-NME) in implicit solvent with OpenMM, on the CPU platform.

Model (defaults): force field AMBER99SB-ILDN (`amber99sbildn.xml`) with the OBC2 generalized-Born
implicit solvent (`amber99_obc.xml`: OpenMM's native GBSAOBCForce with OBC-II parameters and the
ACE surface term), no cutoff, HBonds constraints, LangevinMiddleIntegrator at --temperature
(300 K) with --friction (1/ps) and a 2 fs step. `--solvent gbn2` uses amber14-all.xml with
implicit/gbn2.xml instead (a CustomGBForce, about 1.7x slower here). Coordinates are saved every
--interval-ps (1 ps) as XTC (OpenMM's XTCReporter, precision 0.001 nm) or DCD.

The starting structure is built here without any download: the ten heavy atoms are placed from
ideal internal coordinates (phi -80, psi 150, trans peptides, L-alanine), hydrogens are added by
`Modeller.addHydrogens` from the force field's hydrogen definitions, and the result is
energy-minimised on the Reference platform. It is written as `ala2.pdb` (22 atoms, standard PDB
with element columns and CONECT records) next to this script, and copied into --out.

Each replica r uses seed --seed + r (velocities and Langevin noise; Threads=1 on the CPU platform,
so a replica is deterministic for a given OpenMM build), is equilibrated for --equil-ps from the
built structure, then writes `ala2-rNN.xtc` into --out. The production runs in chunks of
--chunk-ns; after every chunk a checkpoint `ala2-rNN.chk` (state and random-number state) and a
record `ala2-rNN.json` are written, so `--extend` can continue the same replicas later (the
trajectory is first cut back to the checkpoint, so an interrupted run resumes cleanly and the
continued trajectory equals an uninterrupted one). `--first-replica` adds new replicas.
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import openmm
from openmm import app, unit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import trajio  # noqa: E402

FORCEFIELDS = {
    "obc2": ("amber99sbildn.xml", "amber99_obc.xml"),
    "gbn2": ("amber14-all.xml", "implicit/gbn2.xml"),
}
TIMESTEP_FS = 2.0
HEAVY = [  # (residue, atom name, element) in the written order
    ("ACE", "CH3", "C"), ("ACE", "C", "C"), ("ACE", "O", "O"),
    ("ALA", "N", "N"), ("ALA", "CA", "C"), ("ALA", "C", "C"), ("ALA", "O", "O"), ("ALA", "CB", "C"),
    ("NME", "N", "N"), ("NME", "C", "C"),
]


def place(a, b, c, bond, angle, torsion):
    """NeRF: position of d bonded to c with angle b-c-d and dihedral a-b-c-d (Angstrom, degrees)."""
    angle, torsion = math.radians(angle), math.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * math.cos(angle),
                   bond * math.sin(angle) * math.cos(torsion),
                   bond * math.sin(angle) * math.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def heavy_atoms(phi=-80.0, psi=150.0):
    """Heavy-atom coordinates (Angstrom) of ACE-ALA-NME with the given backbone dihedrals."""
    ch3 = np.array([0.0, 0.0, 0.0])
    c0 = np.array([1.52, 0.0, 0.0])
    n1 = c0 + 1.33 * np.array([-math.cos(math.radians(116.2)), math.sin(math.radians(116.2)), 0.0])
    ca = place(ch3, c0, n1, 1.458, 121.7, 180.0)         # omega(ACE) = 180
    c1 = place(c0, n1, ca, 1.525, 111.2, phi)             # phi = C0-N-CA-C
    n2 = place(n1, ca, c1, 1.329, 116.2, psi)             # psi = N-CA-C-N2
    cm = place(ca, c1, n2, 1.458, 121.7, 180.0)           # omega(NME) = 180
    o0 = place(ca, n1, c0, 1.229, 122.9, 0.0)             # carbonyl O cis to CA across C-N
    o1 = place(cm, n2, c1, 1.229, 122.9, 0.0)
    cb = place(n1, c1, ca, 1.53, 110.5, 122.686)          # L-alanine (PeptideBuilder convention)
    pos = {("ACE", "CH3"): ch3, ("ACE", "C"): c0, ("ACE", "O"): o0, ("ALA", "N"): n1,
           ("ALA", "CA"): ca, ("ALA", "C"): c1, ("ALA", "O"): o1, ("ALA", "CB"): cb,
           ("NME", "N"): n2, ("NME", "C"): cm}
    return [pos[(r, a)] for r, a, _ in HEAVY]


def make_forcefield(solvent):
    return app.ForceField(*FORCEFIELDS[solvent])


def build_structure(path, solvent):
    """Builds, protonates and minimises ACE-ALA-NME; writes the 22-atom PDB to `path`."""
    top = app.Topology()
    chain = top.addChain("A")
    residues = {}
    atoms = {}
    for i, name in enumerate(["ACE", "ALA", "NME"]):
        residues[name] = top.addResidue(name, chain, id=str(i + 1))
    for res, name, el in HEAVY:
        atoms[(res, name)] = top.addAtom(name, app.Element.getBySymbol(el), residues[res])
    for a, b in [(("ACE", "CH3"), ("ACE", "C")), (("ACE", "C"), ("ACE", "O")),
                 (("ACE", "C"), ("ALA", "N")), (("ALA", "N"), ("ALA", "CA")),
                 (("ALA", "CA"), ("ALA", "C")), (("ALA", "C"), ("ALA", "O")),
                 (("ALA", "CA"), ("ALA", "CB")), (("ALA", "C"), ("NME", "N")),
                 (("NME", "N"), ("NME", "C"))]:
        top.addBond(atoms[a], atoms[b])
    xyz = np.array(heavy_atoms()) * 0.1  # nm
    ff = make_forcefield(solvent)
    modeller = app.Modeller(top, [openmm.Vec3(*p) for p in xyz] * unit.nanometer)
    modeller.addHydrogens(ff)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff,
                             constraints=app.HBonds)
    integ = openmm.VerletIntegrator(0.001)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1e-3, 0)
    state = ctx.getState(getPositions=True, getEnergy=True)
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    pos = pos - pos.mean(axis=0) + 1.5  # keep coordinates positive and readable
    with open(path, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, pos * unit.nanometer, fh, keepIds=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    print(f"built {path}: {modeller.topology.getNumAtoms()} atoms, minimised energy {e:.1f} kJ/mol",
          file=sys.stderr)


def write_subset_pdb(src, dst, keep):
    """Copies the ATOM/HETATM records `keep` (0-based, in order) of PDB `src` to `dst`, renumbered."""
    out, i = [], 0
    with open(src) as fh:
        for line in fh:
            if line.startswith(("ATOM", "HETATM")):
                if i in keep:
                    out.append(line[:6] + f"{len(out) + 1:5d}" + line[11:])
                i += 1
    with open(dst, "w") as fh:
        fh.write("REMARK   1 HEAVY ATOMS OF ALA2.PDB (ACE-ALA-NME)\n")
        fh.writelines(out)
        fh.write("END\n")


def subset_indices(topology, atoms):
    if atoms == "all":
        return None
    return [a.index for a in topology.atoms() if a.element.symbol != "H"]


def cut_back(path, nframes):
    """Truncates trajectory `path` (XTC or DCD) to its first `nframes` frames."""
    if path.endswith(".xtc"):
        end, count = 0, 0
        if nframes > 0:
            for _, _, _, _, stop in trajio.xtc_frames(path):  # parses no frame after the last kept
                end, count = stop, count + 1
                if count == nframes:
                    break
        if count < nframes:
            raise RuntimeError(f"{path}: {count} frames, checkpoint expects {nframes}")
    else:  # DCD: fixed-size frames after the header
        import struct
        with open(path, "rb") as fh:
            head = fh.read(4096)
        has_cell = struct.unpack("<i", head[48:52])[0] != 0
        ntitle = struct.unpack("<i", head[92:96])[0]
        off = 92 + 4 + ntitle + 4
        natoms = struct.unpack("<i", head[off + 4:off + 8])[0]
        end = off + 12 + nframes * ((56 if has_cell else 0) + 3 * (8 + 4 * natoms))
        if os.path.getsize(path) < end:
            raise RuntimeError(f"{path}: fewer than the {nframes} frames the checkpoint expects")
    with open(path, "r+b") as fh:
        fh.truncate(end)


def run_replica(a, r):
    """Equilibrates (or resumes) replica r and runs its production; returns its record."""
    pdb = app.PDBFile(a.pdb)
    system = make_forcefield(a.solvent).createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                                     constraints=app.HBonds)
    interval = int(round(a.interval_ps * 1000 / TIMESTEP_FS))
    seed = a.seed + r
    integ = openmm.LangevinMiddleIntegrator(a.temperature * unit.kelvin, a.friction / unit.picosecond,
                                            TIMESTEP_FS * unit.femtosecond)
    integ.setRandomNumberSeed(seed)
    sim = app.Simulation(pdb.topology, system, integ, openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": str(a.threads)})
    base = os.path.join(a.out, f"ala2-r{r:02d}")
    traj, chk, rec_path = f"{base}.{a.format}", f"{base}.chk", f"{base}.json"
    if a.extend is not None:
        with open(rec_path) as fh:
            rec = json.load(fh)
        for key in ("seed", "temperature_K", "friction_per_ps", "solvent", "interval_ps", "atoms", "format"):
            want = {"seed": seed, "temperature_K": a.temperature, "friction_per_ps": a.friction,
                    "solvent": a.solvent, "interval_ps": a.interval_ps, "atoms": a.atoms,
                    "format": a.format}[key]
            if rec[key] != want:
                raise SystemExit(f"{rec_path}: {key} is {rec[key]}, this run asks for {want}")
        sim.loadCheckpoint(chk)
        cut_back(traj, rec["frames"])
        target = sim.currentStep + int(round(a.extend * 1e6 / TIMESTEP_FS / interval)) * interval
        append = True
    else:
        sim.context.setPositions(pdb.positions)
        sim.context.setVelocitiesToTemperature(a.temperature * unit.kelvin, seed)
        sim.step(int(round(a.equil_ps * 1000 / TIMESTEP_FS)))
        sim.currentStep = 0
        sim.context.setTime(0.0)
        target = int(round(a.ns * 1e6 / TIMESTEP_FS / interval)) * interval
        rec = {"replica": r, "seed": seed, "file": os.path.basename(traj),
               "temperature_K": a.temperature, "friction_per_ps": a.friction, "solvent": a.solvent,
               "interval_ps": a.interval_ps, "atoms": a.atoms, "format": a.format,
               "equil_ps": a.equil_ps, "ns": 0.0, "frames": 0, "wall_s": 0.0, "segments": []}
        append = False
    keep = subset_indices(pdb.topology, a.atoms)
    reporter = (app.XTCReporter if a.format == "xtc" else app.DCDReporter)(
        traj, interval, append=append, atomSubset=keep)
    sim.reporters.append(reporter)
    chunk = max(interval, int(round(a.chunk_ns * 1e6 / TIMESTEP_FS / interval)) * interval)
    seg_start, seg_wall = sim.currentStep, 0.0
    rec["segments"].append({"ns": 0.0, "wall_s": 0.0, "ns_per_day": None})
    while sim.currentStep < target:
        n = min(chunk, target - sim.currentStep)
        t0 = time.time()
        sim.step(n)
        seg_wall += time.time() - t0
        if a.format == "dcd":
            reporter._out.flush()
        sim.saveCheckpoint(chk)
        ns_seg = (sim.currentStep - seg_start) * TIMESTEP_FS * 1e-6
        rec["frames"] = sim.currentStep // interval
        rec["ns"] = round(sim.currentStep * TIMESTEP_FS * 1e-6, 6)
        seg = {"ns": round(ns_seg, 6), "wall_s": round(seg_wall, 1),
               "ns_per_day": round(ns_seg / (seg_wall / 86400.0), 1)}
        rec["segments"][-1] = seg
        rec["wall_s"] = round(sum(s["wall_s"] for s in rec["segments"]), 1)
        with open(rec_path + ".tmp", "w") as fh:
            json.dump(rec, fh, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        print(f"replica {r}: {rec['ns']:g} ns ({seg['ns_per_day']:.0f} ns/day)", file=sys.stderr, flush=True)
    del sim, reporter  # closes the trajectory file
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=float, default=250.0, help="production length per replica in ns (default 250)")
    p.add_argument("--replicas", type=int, default=4, help="number of independent replicas (default 4)")
    p.add_argument("--first-replica", type=int, default=0, help="index of the first replica (to add replicas)")
    p.add_argument("--extend", type=float, metavar="NS",
                   help="continue the replicas' checkpoints in --out by NS ns each (instead of starting)")
    p.add_argument("--seed", type=int, default=2024, help="base seed; replica r uses seed+r (default 2024)")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction in 1/ps (default 1)")
    p.add_argument("--solvent", choices=sorted(FORCEFIELDS), default="obc2",
                   help="obc2: amber99sbildn + amber99_obc (default); gbn2: amber14-all + implicit/gbn2")
    p.add_argument("--interval-ps", type=float, default=1.0, help="save interval in ps (default 1)")
    p.add_argument("--equil-ps", type=float, default=100.0, help="equilibration before saving, in ps (default 100)")
    p.add_argument("--chunk-ns", type=float, default=1.0, help="checkpoint interval in ns (default 1)")
    p.add_argument("--format", choices=["xtc", "dcd"], default="xtc")
    p.add_argument("--atoms", choices=["all", "heavy"], default="all",
                   help="atoms saved: all 22 (default) or the 10 heavy atoms (also writes ala2-heavy.pdb)")
    p.add_argument("--jobs", type=int, default=2, help="replicas run at once, one process each (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU platform threads per replica (default 1: for 22 atoms more threads only add "
                        "synchronisation cost, and 1 keeps a replica deterministic)")
    p.add_argument("--out", default=os.path.join(HERE, "data"), help="output folder (default datasets/alanine/data)")
    p.add_argument("--pdb", default=os.path.join(HERE, "ala2.pdb"),
                   help="starting structure; built when missing (default datasets/alanine/ala2.pdb)")
    p.add_argument("--rebuild", action="store_true", help="rebuild --pdb even when it exists")
    p.add_argument("--build-only", action="store_true", help="only build --pdb and exit")
    a = p.parse_args()

    if a.rebuild or a.build_only or not os.path.exists(a.pdb):
        build_structure(a.pdb, a.solvent)
    if a.build_only:
        return
    os.makedirs(a.out, exist_ok=True)
    out_pdb = os.path.join(a.out, "ala2.pdb")
    if os.path.abspath(out_pdb) != os.path.abspath(a.pdb):
        with open(a.pdb) as src, open(out_pdb, "w") as dst:
            dst.write(src.read())
    if a.atoms == "heavy":
        keep = subset_indices(app.PDBFile(a.pdb).topology, "heavy")
        write_subset_pdb(a.pdb, os.path.join(a.out, "ala2-heavy.pdb"), set(keep))

    jobs = [(a, r) for r in range(a.first_replica, a.first_replica + a.replicas)]
    t0 = time.time()
    if a.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(a.jobs, len(jobs))) as pool:
            runs = pool.starmap(run_replica, jobs)
    else:
        runs = [run_replica(*j) for j in jobs]
    wall = time.time() - t0
    ns = sum(r["ns"] for r in runs)
    meta = {"openmm": openmm.__version__, "forcefield": list(FORCEFIELDS[a.solvent]),
            "temperature_K": a.temperature, "friction_per_ps": a.friction, "timestep_fs": TIMESTEP_FS,
            "constraints": "HBonds", "nonbonded": "NoCutoff", "integrator": "LangevinMiddleIntegrator",
            "platform": "CPU", "threads": a.threads, "jobs": a.jobs, "interval_ps": a.interval_ps,
            "atoms": a.atoms, "format": a.format, "command": sys.argv[1:],
            "this_call": {"wall_s": round(wall, 1)}, "replicas": runs, "total_ns": round(ns, 6)}
    last = a.first_replica + a.replicas - 1
    name = f"run-{a.first_replica:02d}-{last:02d}.json"
    with open(os.path.join(a.out, name), "w") as fh:
        json.dump(meta, fh, indent=1)
    print(f"{len(runs)} replicas, {ns:g} ns in total; this call took {wall:.0f} s -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
