"""Writes tests/golden/adk_mdanalysis.json: what MDAnalysis reads from the ADK files of
MDAnalysisTests (datasets/adk/data/, fetched by datasets/adk/fetch), from a few other files of
MDAnalysisTests that once tripped hiermd (huge_box.gro, model_then_cryst.pdb,
cryst_then_model.pdb, martini_dppc_chol_bilayer.gro), and from the small synthetic files of
datasets/interop/ (keys `interop/...`: virtual sites, coarse-grained beads, segment ids, a
.pdb.gz trajectory). tests/adk_golden.rs reads the same files with hiermd's readers and compares.

Run through datasets/adk/make_golden, which makes the pinned virtual environment. The output is
deterministic for given MDAnalysis and numpy versions (recorded in the file).

Content (units: Angstrom, ps, degrees, daltons):
  topologies.<file>: n_atoms, n_residues, n_segments, heavy-atom counts, element counts, and an
      atom table (names, resnames, resids, segids, chainIDs/icodes for PDB, masses, elements,
      charges for PSF) for all atoms of the 3341-atom files and every 97th atom (plus the last)
      of the 47681-atom ones; plus the coordinates and box the file holds (first frame).
  trajectories.<file>: n_atoms, n_frames, and for chosen frames (first, second, middle, last)
      the positions of a strided atom subset (every 7th of 3341, every 97th of 47681, always
      with the first and last atom), dimensions [a, b, c, alpha, beta, gamma] or null, time,
      and step/has_positions where the format has them.
Positions and box values are MDAnalysis's float32 values, written with the shortest decimal
that reads back as the same float32.
"""

import json
import pathlib
import platform
import re
import sys
import warnings

import MDAnalysis as mda
import numpy as np
from MDAnalysis.guesser.tables import SYMB2Z

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE / "data"
INTEROP = HERE.parent / "interop"
OUT = HERE.parent.parent / "tests" / "golden" / "adk_mdanalysis.json"

SMALL_STRIDE = 7  # atoms of the 3341-atom files
LARGE_STRIDE = 97  # atoms of the 47681-atom solvated files
LARGE = 10000  # files with more atoms than this get a strided atom table
PLACEHOLDER_SEGID = "SYSTEM"  # what MDAnalysis puts where a file has no segment id

TOPOLOGIES = [
    "adk.psf", "adk_open.pdb", "adk_closed.pdb", "adk_oplsaa.gro", "adk_oplsaa.pdb",
    # Interop (issue 16): a box line whose numbers run together, CRYST1 records after or before
    # each model, a coarse-grained (Martini) system, and the synthetic files of datasets/interop.
    "huge_box.gro", "model_then_cryst.pdb", "cryst_then_model.pdb",
    "martini_dppc_chol_bilayer.gro",
    "interop/tip4p_water.pdb", "interop/tip5p_water.gro", "interop/martini.pdb",
    "interop/segid_nochain.pdb",
]
# Virtual-site names (TIP4P MW, lone pairs LP*, TIP5P EP*, dummies DUM*/VS*): hiermd gives them
# no element (X) and no mass, where MDAnalysis guesses DUMMY for MW but phosphorus for LP1 and
# EP1 (its name-based guesser sees a P). Their element and mass below follow hiermd's convention
# (DUMMY, 0 Da) and `virtual_sites` records what MDAnalysis guessed.
VIRTUAL_SITE = re.compile(r"^(MW|LP|EP|DUM|VS)")
TRAJECTORIES = [
    # (trajectory, topology MDAnalysis reads it with)
    ("adk_dims.dcd", "adk.psf"),
    ("adk_dims2.dcd", "adk.psf"),
    ("adk_oplsaa.xtc", "adk_oplsaa.gro"),
    ("adk_oplsaa.trr", "adk_oplsaa.gro"),
    # PDB files read as (multi-model) trajectories. adk_oplsaa.pdb holds a single MODEL record;
    # adk_open.pdb and adk_closed.pdb have no MODEL record (one frame).
    ("adk_oplsaa.pdb", None),
    ("adk_open.pdb", None),
    ("adk_closed.pdb", None),
    # CRYST1 after each ENDMDL (each model its own box), and before each MODEL.
    ("model_then_cryst.pdb", None),
    ("cryst_then_model.pdb", None),
    ("interop/tip4p_water.pdb", None),
    # A gzipped PDB trajectory of coarse-grained beads.
    ("interop/martini.pdb.gz", "interop/martini.pdb"),
]


def f32(x):
    """The float32 value of x as the Python float with the shortest decimal that reads back as
    the same float32."""
    v = np.float32(x)
    out = float(str(v))
    assert np.float32(out) == v, (x, out)
    return out


def f32_list(a):
    return [f32(x) for x in np.asarray(a, dtype=np.float32).ravel()]


def strided(n):
    stride = LARGE_STRIDE if n > LARGE else SMALL_STRIDE
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return stride, idx


def dims(ts):
    d = ts.dimensions
    return None if d is None else f32_list(d)


def path_of(f):
    """Interop files live in datasets/interop/, the others in datasets/adk/data/."""
    return INTEROP / f.removeprefix("interop/") if f.startswith("interop/") else DATA / f


def universe(*files):
    return mda.Universe(*[str(path_of(f)) for f in files])


def is_element(e):
    """Whether MDAnalysis's element string is an element (its guesser also returns letters such
    as G for a Martini bead GL1, and DUMMY or '' for none)."""
    return e.capitalize() in SYMB2Z


def pdb_raw_fields(path):
    """Chain (column 22) and segment id (columns 73-76) as written, for the first model."""
    chains, segs = [], []
    with open(path) as fh:
        for line in fh:
            if line.startswith("ENDMDL"):
                break
            if line.startswith(("ATOM  ", "HETATM")):
                chains.append(line[21:22].strip())
                segs.append(line[72:76].strip())
    return chains, segs


def mass_by_element(elements, masses):
    """Element -> the one mass MDAnalysis guessed for it (over all atoms)."""
    out = {}
    for e, m in zip(elements, masses):
        assert out.setdefault(e, float(m)) == float(m), (e, m)
    return dict(sorted(out.items()))


def topology(name):
    u = universe(name)
    atoms = u.atoms
    n = atoms.n_atoms
    present = {a.attrname for a in u._topology.read_attributes}
    if "elements" in present:
        element_source = "file"
    else:
        u.guess_TopologyAttrs(context="default", to_guess=["elements"])
        element_source = "guessed by MDAnalysis (default guesser, from atom names)"
    mass_source = (
        "file" if "masses" in present else "guessed by MDAnalysis (default guesser, from atom types guessed from names)"
    )
    elements = [str(e) for e in atoms.elements]
    masses = [float(m) for m in atoms.masses]
    virtual_sites = {}
    for i, nm in enumerate(atoms.names):
        if VIRTUAL_SITE.match(str(nm)) and (elements[i] != "DUMMY" or masses[i] != 0.0):
            virtual_sites[i] = {"name": str(nm), "element": elements[i], "mass": masses[i]}
            elements[i], masses[i] = "DUMMY", 0.0
    counts = {}
    for e in elements:
        counts[e] = counts.get(e, 0) + 1
    if name.endswith(".gro"):
        segid_in_file = False
    elif name.endswith(".pdb"):
        chains, segs = pdb_raw_fields(path_of(name))
        assert len(chains) == n
        segid_in_file = any(segs) or any(chains)
    else:
        segid_in_file = True
    if not segid_in_file:
        assert set(atoms.segids) == {PLACEHOLDER_SEGID}
    stride, idx = (1, list(range(n))) if n <= LARGE else strided(n)
    sel = atoms[idx]
    table = {
        "stride": stride,
        "indices": idx,
        "names": [str(x) for x in sel.names],
        "resnames": [str(x) for x in sel.resnames],
        "resids": [int(x) for x in sel.resids],
        "segids": [str(x) for x in sel.segids],
    }
    if "chainIDs" in present:
        table["chainIDs"] = [str(x) for x in sel.chainIDs]
    if "icodes" in present:
        table["icodes"] = [str(x) for x in sel.icodes]
    table["masses"] = [masses[i] for i in idx]
    table["elements"] = [elements[i] for i in idx]
    if "charges" in present:
        table["charges"] = f32_list(sel.charges)
    out = {
        "n_atoms": n,
        "n_residues": int(atoms.n_residues),
        "n_segments": int(atoms.n_segments),
        "segid_in_file": segid_in_file,
        "element_source": element_source,
        "mass_source": mass_source,
        "element_counts": dict(sorted(counts.items())),
        "n_not_name_H": len(u.select_atoms("not name H*")),
        "n_heavy_by_element": sum(1 for e in elements if is_element(e) and e.upper() != "H"),
        "total_mass": float(np.sum(masses)),
        "mass_by_element": mass_by_element(elements, masses) if "masses" not in present else None,
        "virtual_sites": {str(i): v for i, v in virtual_sites.items()},
        "table": table,
        "coordinates": None,
    }
    if hasattr(u, "trajectory") and u.trajectory is not None and len(u.trajectory) > 0 and not name.endswith(".psf"):
        ts = u.trajectory[0]
        _, cidx = strided(n)
        out["coordinates"] = {
            "dimensions": dims(ts),
            "indices": cidx,
            "positions": f32_list(ts.positions[cidx]),
        }
    return out


def trajectory(traj, top):
    u = universe(top, traj) if top else universe(traj)
    n = u.atoms.n_atoms
    nf = len(u.trajectory)
    chosen = sorted({0, min(1, nf - 1), nf // 2, nf - 1})
    stride, idx = strided(n)
    frames = []
    for i in chosen:
        ts = u.trajectory[i]
        assert ts.frame == i
        fr = {"frame": i, "time": float(ts.time), "dimensions": dims(ts)}
        if "step" in ts.data and traj.endswith((".xtc", ".trr")):
            fr["step"] = int(ts.data["step"])
        if traj.endswith(".trr"):
            fr["has_positions"] = bool(ts.has_positions)
            fr["has_velocities"] = bool(ts.has_velocities)
            fr["has_forces"] = bool(ts.has_forces)
        fr["positions"] = f32_list(ts.positions[idx]) if ts.has_positions else None
        frames.append(fr)
    out = {
        "topology": top,
        "n_atoms": n,
        "n_frames": nf,
        "dt": float(u.trajectory.dt),
        "stride": stride,
        "indices": idx,
        "frames": frames,
    }
    if traj.endswith(".trr"):
        out["frames_with_positions"] = [ts.frame for ts in u.trajectory if ts.has_positions]
    if traj.endswith(".dcd"):
        out["time_convention"] = (
            "MDAnalysis: time = (istart + frame * nsavc) * delta, delta converted from AKMA to ps"
        )
    return out


def dump(o, indent=0, width=100):
    """JSON with dicts indented and lists of scalars packed into lines of about `width`."""
    pad = " " * indent
    inner = " " * (indent + 1)
    if isinstance(o, dict):
        if not o:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dump(v, indent + 1, width)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(o, list):
        if any(isinstance(x, (dict, list)) for x in o):
            items = [inner + dump(x, indent + 1, width) for x in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        parts = [json.dumps(x) for x in o]
        one = "[" + ",".join(parts) + "]"
        if len(one) + indent <= width:
            return one
        lines, cur = [], ""
        for p in parts:
            if cur and len(cur) + len(p) + 1 > width:
                lines.append(cur)
                cur = ""
            cur = f"{cur},{p}" if cur else p
        lines.append(cur)
        return "[\n" + ",\n".join(inner + line for line in lines) + "\n" + pad + "]"
    return json.dumps(o)


def main():
    warnings.simplefilter("ignore")
    for f in TOPOLOGIES + [t for t, _ in TRAJECTORIES]:
        if not path_of(f).is_file():
            sys.exit(f"make_golden: {path_of(f)} missing; run datasets/adk/fetch")
    golden = {
        "generator": "datasets/adk/make_golden.py",
        "mdanalysis_version": mda.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "units": {"length": "angstrom", "time": "ps", "angle": "degree", "mass": "dalton"},
        "notes": [
            "positions: flat [x0, y0, z0, x1, ...] of the atoms listed in `indices` (0-based)",
            "dimensions: MDAnalysis [a, b, c, alpha, beta, gamma], null when the frame has no box",
            "segids equal to 'SYSTEM' where segid_in_file is false are MDAnalysis's placeholder: the file has no segment id",
            "elements are MDAnalysis's guesses from atom names where element_source says so; 'DUMMY' is a massless virtual site (TIP4P MW)",
            "resids of adk_oplsaa.pdb above 9999 are MDAnalysis's unwrapping of the 4-column field (file: 9999 -> 0 -> 1 ...)",
            "n_not_name_H: select_atoms('not name H*'); n_heavy_by_element: atoms whose element is an element other than H (not DUMMY, '', or a guess such as G for a Martini bead GL1)",
            "keys interop/...: synthetic files of datasets/interop/ (datasets/interop/make_files.py)",
            "virtual_sites: atoms named MW, LP*, EP*, DUM*, VS* whose MDAnalysis guess (listed) was replaced by DUMMY and 0 Da, hiermd's convention for virtual sites",
            "elements '' (an element column such as X that MDAnalysis does not accept) and guesses that are no element (G, R) are hiermd's unknown element X",
        ],
        "topologies": {name: topology(name) for name in TOPOLOGIES},
        "trajectories": {t: trajectory(t, top) for t, top in TRAJECTORIES},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = dump(golden) + "\n"
    json.loads(text)  # well-formed
    OUT.write_text(text)
    print(f"{OUT}: {len(text.encode())} bytes (MDAnalysis {mda.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
