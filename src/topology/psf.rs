//! CHARMM/X-PLOR/NAMD PSF topology reader: the `!NATOM` section (bonds and the rest are not read).
//!
//! The header line `PSF` carries flags: `EXT` (extended widths), `CMAP`, `CHEQ` (two more numeric
//! columns per atom), `XPLOR` (atom types are names, not numbers), `NAMD` (space-separated), `DRUDE`.
//! Then `N !NTITLE` with N title lines, and `N !NATOM` with one line per atom:
//! id, segid, resid, resname, name, type, charge, mass, and more columns that are not read.
//!
//! Each atom line is read with CHARMM's fixed columns for the header's format when they fit (the
//! standard `(I8,1X,A4,1X,A4,1X,A4,1X,A4,1X,A4,1X,2G14.6)` or the `EXT`
//! `(I10,1X,A8,1X,A8,1X,A8,1X,A8,1X,A6,1X,2G14.6)`; fixed columns are the only way to read a blank
//! segid), else by splitting at whitespace (NAMD/VMD files, whose fields overflow the columns), as
//! MDAnalysis does. Numeric or alphabetic atom types (CHARMM vs X-PLOR) make no difference, since
//! types are not kept, and residue names stay text even when numeric.
//!
//! A residue number may carry an insertion letter (`10A`): the number is the resid, the letter the
//! insertion code. The chain is the segid. Masses come from the file and must be numbers of at
//! least 0 (0 for virtual sites and lone pairs; an error names the line otherwise); the element
//! is guessed from the mass and the name ([`super::element::guess`]).

use super::{
    check_atom_count, element, element_fields, numbered_lines, read_bytes, Atom, Topology,
};
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// Reads the atoms of a PSF file (gzipped or not). Errors name the file, the line and the atom.
pub fn read_psf(path: &Path) -> Result<Topology> {
    let data = read_bytes(path)?;
    parse(path, &data)
}

/// The fields of one atom line that are kept.
struct AtomFields {
    segid: String,
    resid: i32,
    icode: char,
    resname: String,
    name: String,
    charge: f32,
    mass: f32,
}

/// Fixed column layout: byte ranges of id, segid, resid, resname, name, type, charge, mass.
type Layout = [(usize, usize); 8];

/// CHARMM's standard layout.
const STANDARD: Layout = [
    (0, 8),
    (9, 13),
    (14, 18),
    (19, 23),
    (24, 28),
    (29, 33),
    (34, 48),
    (48, 62),
];

/// CHARMM's `EXT` layout.
const EXTENDED: Layout = [
    (0, 10),
    (11, 19),
    (20, 28),
    (29, 37),
    (38, 46),
    (47, 53),
    (54, 68),
    (68, 82),
];

/// Parses a Fortran real (`0.900000E-01`, `1.0D-01`).
fn real(s: &str) -> Option<f32> {
    let s = s.trim();
    let v = if s.contains(['D', 'd']) {
        s.replace(['D', 'd'], "E").parse::<f32>().ok()
    } else {
        s.parse::<f32>().ok()
    };
    v.filter(|x| x.is_finite())
}

/// Parses a residue number with an optional insertion letter (`10`, `-3`, `10A`).
fn resid_icode(s: &str) -> Option<(i32, char)> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Some((n, ' '));
    }
    let mut chars = s.chars();
    let last = chars.next_back()?;
    if !last.is_ascii_alphabetic() {
        return None;
    }
    let n = chars.as_str().parse::<i32>().ok()?;
    Some((n, last))
}

/// Reads an atom line with fixed columns; `None` if it does not fit them.
fn fixed(line: &[u8], layout: &Layout) -> Option<AtomFields> {
    let text = std::str::from_utf8(line).ok()?;
    let col = |k: usize| -> Option<&str> {
        let (a, b) = layout[k];
        text.get(a..b.min(text.len()))
    };
    // Separator columns must be blank, or the fields are not where the layout says.
    for &(_, b) in &layout[..6] {
        if text.as_bytes().get(b).is_some_and(|&c| c != b' ') {
            return None;
        }
    }
    col(0)?.trim().parse::<i64>().ok()?;
    let (resid, icode) = resid_icode(col(2)?)?;
    Some(AtomFields {
        segid: col(1)?.trim().to_string(),
        resid,
        icode,
        resname: col(3)?.trim().to_string(),
        name: col(4)?.trim().to_string(),
        charge: real(col(6)?)?,
        mass: real(col(7)?)?,
    })
}

/// Reads an atom line split at whitespace; `None` if it does not have the fields.
fn split(line: &[u8]) -> Option<AtomFields> {
    let text = String::from_utf8_lossy(line);
    let t: Vec<&str> = text.split_whitespace().collect();
    if t.len() < 8 {
        return None;
    }
    t[0].parse::<i64>().ok()?;
    let (resid, icode) = resid_icode(t[2])?;
    Some(AtomFields {
        segid: t[1].to_string(),
        resid,
        icode,
        resname: t[3].to_string(),
        name: t[4].to_string(),
        charge: real(t[6])?,
        mass: real(t[7])?,
    })
}

/// Says which field of an atom line that neither layout reads is wrong (by whitespace-separated
/// fields, the layout both fall back to).
fn diagnose(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let t: Vec<&str> = text.split_whitespace().collect();
    if t.len() < 8 {
        return format!(
            "{} fields where id, segid, resid, resname, name, type, charge, mass are expected",
            t.len()
        );
    }
    if t[0].parse::<i64>().is_err() {
        return format!("atom id {:?} is not an integer", t[0]);
    }
    if resid_icode(t[2]).is_none() {
        return format!("residue number {:?} is not an integer", t[2]);
    }
    if real(t[6]).is_none() {
        return format!("charge {:?} is not a finite number", t[6]);
    }
    if real(t[7]).is_none() {
        return format!("mass {:?} is not a finite number", t[7]);
    }
    "the fields do not fit the columns".to_string()
}

/// Whether a line is `<count> !<TAG>...`; returns the count.
fn section_count(line: &[u8], tag: &str) -> Option<Result<usize, String>> {
    let text = String::from_utf8_lossy(line);
    let pos = text.find(&format!("!{tag}"))?;
    let head = text[..pos].trim();
    // The count is the first number before the tag (NGRP lines carry two).
    let first = head.split_whitespace().next().unwrap_or("");
    Some(first.parse::<usize>().map_err(|_| first.to_string()))
}

/// Parses PSF text (already decompressed); `path` is for messages.
fn parse(path: &Path, data: &[u8]) -> Result<Topology> {
    let p = path.display();
    let mut lines = numbered_lines(data).filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace));
    let (ln, header) = lines
        .next()
        .ok_or_else(|| anyhow!("{p}: empty file (expected a PSF header)"))?;
    if !header.starts_with(b"PSF") {
        bail!(
            "{p}:{ln}: not a PSF file: the first line {:?} does not start with PSF",
            String::from_utf8_lossy(header).trim()
        );
    }
    let flags: Vec<String> = String::from_utf8_lossy(&header[3..])
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let layout = if has("NAMD") {
        None
    } else if has("EXT") {
        Some(&EXTENDED)
    } else {
        Some(&STANDARD)
    };

    let (ln, line) = lines
        .next()
        .ok_or_else(|| anyhow!("{p}: truncated after the header (expected !NTITLE)"))?;
    let ntitle = match section_count(line, "NTITLE") {
        Some(Ok(n)) => n,
        Some(Err(s)) => bail!("{p}:{ln}: bad title count {s:?}"),
        None => bail!("{p}:{ln}: expected the `N !NTITLE` line"),
    };
    for k in 0..ntitle {
        lines
            .next()
            .ok_or_else(|| anyhow!("{p}: truncated in the title ({k} of {ntitle} title lines)"))?;
    }
    let (ln, line) = lines
        .next()
        .ok_or_else(|| anyhow!("{p}: truncated after the title (expected !NATOM)"))?;
    let natoms = match section_count(line, "NATOM") {
        Some(Ok(n)) => n,
        Some(Err(s)) => bail!("{p}:{ln}: bad atom count {s:?}"),
        None => bail!(
            "{p}:{ln}: expected the `N !NATOM` line, found {:?}",
            String::from_utf8_lossy(line).trim()
        ),
    };
    if natoms == 0 {
        bail!("{p}:{ln}: the file declares 0 atoms");
    }
    check_atom_count(path, natoms)?;
    // Capacity bounded by the file size, so a corrupt count cannot exhaust memory.
    let mut atoms = Vec::with_capacity(natoms.min(data.len() / 40 + 1));
    for index in 1..=natoms {
        let (ln, line) = lines.next().ok_or_else(|| {
            anyhow!(
                "{p}: truncated: the file declares {natoms} atoms but ends after {}",
                index - 1
            )
        })?;
        if line.contains(&b'!') {
            bail!(
                "{p}:{ln}: the file declares {natoms} atoms but the !NATOM section ends after {}",
                index - 1
            );
        }
        let f = layout
            .and_then(|l| fixed(line, l))
            .or_else(|| split(line))
            .ok_or_else(|| {
                anyhow!(
                    "{p}:{ln}: atom {index}: {}: cannot read {:?} (expected id, segid, resid, resname, name, type, charge, mass)",
                    diagnose(line),
                    String::from_utf8_lossy(line).trim()
                )
            })?;
        if f.mass < 0.0 {
            bail!(
                "{p}:{ln}: atom {index} ({} of residue {} {}): mass {} is negative",
                f.name,
                f.resname,
                f.resid,
                f.mass
            );
        }
        let z = element::guess(&f.name, &f.resname, Some(f.mass));
        let (element, atomic_number, mass) = element_fields(z, Some(f.mass));
        atoms.push(Atom {
            name: f.name,
            resname: f.resname,
            resid: f.resid,
            icode: f.icode,
            chain: f.segid.clone(),
            segid: f.segid,
            element,
            atomic_number,
            mass,
            charge: f.charge,
        });
    }
    Ok(Topology {
        source: path.to_path_buf(),
        atoms,
        coords: None,
        unit_cell: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let std = b"       1 4AKE 1    MET  N      56  -0.300000       14.0070           0   0.00000     -0.301140E-02";
        let f = fixed(std, &STANDARD).unwrap();
        assert_eq!(
            (f.segid.as_str(), f.resid, f.name.as_str()),
            ("4AKE", 1, "N")
        );
        assert_eq!((f.charge, f.mass), (-0.3, 14.007));
        let ext = b"         2 RNAA     1        GUA      O5'      ON5     -0.660000       15.9994           0   0.00000     -0.301140E-02";
        let f = fixed(ext, &EXTENDED).unwrap();
        assert_eq!(
            (f.resname.as_str(), f.name.as_str(), f.mass),
            ("GUA", "O5'", 15.9994)
        );
        // Blank segid: only the fixed columns can read it.
        let blank = b"       1      12A  MET  N      56  -0.300000       14.0070           0";
        let f = fixed(blank, &STANDARD).unwrap();
        assert_eq!((f.segid.as_str(), f.resid, f.icode), ("", 12, 'A'));
        // NAMD-style overflowing fields fall back to splitting.
        let namd = b"1 PROTEIN 1 MET N NH3LONGTYPE -0.300000 14.0070 0";
        assert!(fixed(namd, &STANDARD).is_none());
        let f = split(namd).unwrap();
        assert_eq!((f.segid.as_str(), f.mass), ("PROTEIN", 14.007));
    }

    #[test]
    fn reals_and_resids() {
        assert_eq!(real("0.900000E-01"), Some(0.09));
        assert_eq!(real("1.0D-01"), Some(0.1));
        assert_eq!(real("nan"), None);
        assert_eq!(resid_icode("10A"), Some((10, 'A')));
        assert_eq!(resid_icode("-3"), Some((-3, ' ')));
        assert_eq!(resid_icode("A"), None);
        assert_eq!(resid_icode("1AB"), None);
    }
}
