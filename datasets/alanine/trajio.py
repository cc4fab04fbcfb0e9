"""Small numpy readers for the files the alanine recipe writes: PDB atoms, XTC (GROMACS compressed,
as written by OpenMM's XTCReporter) and CHARMM/OpenMM DCD. No MDAnalysis/mdtraj needed.

The XTC decoder is a pure-Python port of xdrfile's `xdrfile_decompress_coord_float` (GROMACS
libxdrf): per frame an XDR header (magic 1995, natoms, step, time, 3x3 box, natoms), then either
raw floats (natoms <= 9) or precision, min/max integer coordinates, a small-index and a byte
count, and a bit stream of integer coordinates (first atom of a group in full range, then runs
of small differences). Coordinates come back in Angstrom as float64.
"""
import struct

import numpy as np

MAGICINTS = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64,
    80, 101, 128, 161, 203, 256, 322, 406, 512, 645, 812, 1024, 1290,
    1625, 2048, 2580, 3250, 4096, 5060, 6501, 8192, 10321, 13003,
    16384, 20642, 26007, 32768, 41285, 52015, 65536, 82570, 104031,
    131072, 165140, 208063, 262144, 330280, 416127, 524287, 660561,
    832255, 1048576, 1321122, 1664510, 2097152, 2642245, 3329021,
    4194304, 5284491, 6658042, 8388607, 10568983, 13316085, 16777216,
]
FIRSTIDX = 9


def read_pdb(path):
    """(atoms, xyz): atoms = [(resname, atomname, element)] in file order, xyz (natoms, 3) Angstrom."""
    atoms, xyz = [], []
    with open(path) as fh:
        for line in fh:
            if line.startswith(("ATOM", "HETATM")):
                atoms.append((line[17:20].strip(), line[12:16].strip(), line[76:78].strip()))
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            elif line.startswith("ENDMDL"):
                break
    return atoms, np.array(xyz)


class _Bits:
    """MSB-first bit reader over a byte string (the order xdrfile's sendbits writes)."""

    def __init__(self, data):
        self.val = int.from_bytes(data, "big")
        self.left = 8 * len(data)

    def get(self, n):
        if n > self.left:
            raise ValueError("XTC: compressed coordinates run past their byte count")
        self.left -= n
        return (self.val >> self.left) & ((1 << n) - 1)

    def ints(self, nbits, sizes):
        """xdrfile receiveints: a mixed-radix number of nbits bits, read as little-endian 8-bit
        chunks, split into len(sizes) integers (the first is the most significant)."""
        big, shift = 0, 0
        while nbits > 8:
            big |= self.get(8) << shift
            shift += 8
            nbits -= 8
        if nbits > 0:
            big |= self.get(nbits) << shift
        out = [0] * len(sizes)
        for i in range(len(sizes) - 1, 0, -1):
            big, out[i] = divmod(big, sizes[i])
        out[0] = big
        return out


def _decompress(natoms, minint, maxint, smallidx, data):
    sizeint = [maxint[k] - minint[k] + 1 for k in range(3)]
    if any(s > 0xFFFFFF for s in sizeint):
        bitsizeint = [int(s).bit_length() for s in sizeint]  # xdrfile sizeofint
        bitsize = 0
    else:
        bitsizeint = None
        bitsize = (sizeint[0] * sizeint[1] * sizeint[2]).bit_length()  # xdrfile sizeofints
    smaller = MAGICINTS[max(FIRSTIDX, smallidx - 1)] // 2
    smallnum = MAGICINTS[smallidx] // 2
    sizesmall = [MAGICINTS[smallidx]] * 3
    bits = _Bits(data)
    out = []
    i = 0
    run = 0  # persists over groups until a flag bit replaces it
    while i < natoms:
        if bitsize == 0:
            this = [bits.get(bitsizeint[k]) for k in range(3)]
        else:
            this = bits.ints(bitsize, sizeint)
        i += 1
        this = [this[k] + minint[k] for k in range(3)]
        prev = this
        is_smaller = 0
        if bits.get(1):
            run = bits.get(5)
            is_smaller = run % 3
            run -= is_smaller
            is_smaller -= 1
        if run > 0:
            for k in range(0, run, 3):
                d = bits.ints(smallidx, sizesmall)
                i += 1
                cur = [d[m] + prev[m] - smallnum for m in range(3)]
                if k == 0:  # the first two atoms of a run are stored swapped
                    out.append(cur)
                    out.append(prev)
                    prev = cur
                else:
                    out.append(cur)
                    prev = cur
        else:
            out.append(this)
        smallidx += is_smaller
        if is_smaller < 0:
            smallnum = smaller
            smaller = MAGICINTS[smallidx - 1] // 2 if smallidx > FIRSTIDX else 0
        elif is_smaller > 0:
            smaller = smallnum
            smallnum = MAGICINTS[smallidx] // 2
        sizesmall = [MAGICINTS[smallidx]] * 3
    if len(out) != natoms:
        raise ValueError(f"XTC: decoded {len(out)} atoms, header says {natoms}")
    return out


def xtc_frames(path):
    """Yields (step, time_ps, xyz (natoms, 3) Angstrom float64, start_offset, end_offset) per frame."""
    with open(path, "rb") as fh:
        buf = fh.read()
    off = 0
    while off < len(buf):
        start = off
        if len(buf) - off < 92:
            raise ValueError(f"{path}: truncated frame header at byte {off}")
        magic, natoms, step = struct.unpack_from(">iii", buf, off)
        if magic != 1995:
            raise ValueError(f"{path}: bad XTC magic {magic} at byte {off}")
        (time,) = struct.unpack_from(">f", buf, off + 12)
        off += 16 + 36  # header + box
        (lsize,) = struct.unpack_from(">i", buf, off)
        off += 4
        if lsize != natoms:
            raise ValueError(f"{path}: natoms {natoms} != {lsize}")
        if natoms <= 9:
            xyz = np.frombuffer(buf, ">f4", 3 * natoms, off).reshape(natoms, 3).astype(np.float64)
            off += 12 * natoms
        else:
            (precision,) = struct.unpack_from(">f", buf, off)
            vals = struct.unpack_from(">8i", buf, off + 4)
            minint, maxint, smallidx, nbytes = list(vals[0:3]), list(vals[3:6]), vals[6], vals[7]
            off += 36
            end = off + nbytes
            if end > len(buf):
                raise ValueError(f"{path}: truncated compressed frame at byte {start}")
            ints = _decompress(natoms, minint, maxint, smallidx, buf[off:end])
            off = end + (-nbytes) % 4
            xyz = np.array(ints, dtype=np.float64) / precision
        yield step, float(time), xyz * 10.0, start, off


def read_xtc(path):
    """(xyz (nframes, natoms, 3) Angstrom, steps, times_ps)."""
    steps, times, frames = [], [], []
    for step, t, xyz, _, _ in xtc_frames(path):
        steps.append(step)
        times.append(t)
        frames.append(xyz)
    return np.array(frames), np.array(steps), np.array(times)


def read_dcd(path):
    """CHARMM/OpenMM DCD, with or without unit cell, either endianness: (nframes, natoms, 3) Angstrom."""
    data = open(path, "rb").read()
    end = "<" if struct.unpack("<i", data[:4])[0] == 84 else ">"
    i4 = lambda off: struct.unpack(end + "i", data[off:off + 4])[0]
    has_cell = struct.unpack(end + "i", data[4 + 44:4 + 48])[0] != 0
    off = 4 + 84 + 4
    n = i4(off)
    off += 4 + n + 4
    if i4(off) != 4:
        raise ValueError(f"{path}: bad natoms record")
    natoms = i4(off + 4)
    off += 12
    frames = []
    while off < len(data):
        if has_cell:
            off += 4 + i4(off) + 4
        xyz = []
        for _ in range(3):
            nb = i4(off)
            xyz.append(np.frombuffer(data, dtype=end + "f4", count=natoms, offset=off + 4))
            off += 4 + nb + 4
        frames.append(np.stack(xyz, axis=1))
    return np.array(frames, dtype=np.float64)


def read_traj(path):
    """(nframes, natoms, 3) Angstrom."""
    if path.endswith(".xtc"):
        return read_xtc(path)[0]
    return read_dcd(path)
