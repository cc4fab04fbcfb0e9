//! GROMACS GRO topology reader (first frame).
//!
//! Layout: a title line, the number of atoms, one fixed-width line per atom (residue number 5,
//! residue name 5, atom name 5, atom number 5, then x, y, z in nm and optionally velocities), and
//! a box line of 3 or 9 numbers in nm. The coordinate field width is found as GROMACS's own reader
//! finds it: the distance between the first two decimal points after column 20 of the first atom
//! line (8 for the usual `%8.3f`, more for higher precision); velocities are not read.
//!
//! Residue and atom numbers wrap at 100000 in large systems; residues stay separate because
//! [`Topology::residue_indices`] starts a residue at every change of number or name. Elements are
//! guessed from the atom and residue names (GRO has neither elements nor masses), masses are the
//! elements' standard ones; the chain is empty and the segment is MDAnalysis's `SYSTEM`.
//!
//! The box line is read as whitespace-separated numbers or, when the numbers run together
//! because they overflow GROMACS's `%10.5f` (`40000.0000040000.0000040000.00000`, a box of
//! 400 um), as numbers of five decimals each, as MDAnalysis reads it.

use super::{
    check_atom_count, column, element, element_fields, numbered_lines, read_bytes, Atom, Topology,
    PLACEHOLDER_SEGID,
};
use crate::traj::UnitCell;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// Reads the topology of a GRO file (gzipped or not): atoms, coordinates (converted to Angstrom)
/// and box of the first frame. Errors name the file, the line and the atom.
pub fn read_gro(path: &Path) -> Result<Topology> {
    let data = read_bytes(path)?;
    parse(path, &data)
}

/// Width of the coordinate fields from the decimal points of the first atom line (GROMACS's
/// `get_w_conf` rule); `None` when the line has fewer than two decimal points after column 20.
fn field_width(line: &[u8]) -> Option<usize> {
    let tail = line.get(20..)?;
    let mut dots = tail
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'.')
        .map(|(i, _)| i);
    let p1 = dots.next()?;
    let p2 = dots.next()?;
    let w = p2 - p1;
    // A field holds at least the sign, one digit, the point and one decimal.
    (4..=30).contains(&w).then_some(w)
}

/// Splits a box line whose numbers run together (each written with GROMACS's `%10.5f` but too
/// wide for 10 columns) into numbers of exactly five decimals; `None` unless the whole line
/// (blanks aside) is such numbers.
fn run_together(text: &str) -> Option<Vec<f64>> {
    let b: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        if b[i] == b'-' {
            i += 1;
        }
        let int = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == int || b.get(i) != Some(&b'.') {
            return None;
        }
        i += 1;
        let decimals = b.get(i..i + 5)?;
        if !decimals.iter().all(u8::is_ascii_digit) {
            return None;
        }
        i += 5;
        out.push(std::str::from_utf8(&b[start..i]).ok()?.parse().ok()?);
    }
    Some(out)
}

/// Converts the GRO box line (nm; `v1x v2y v3z [v1y v1z v2x v2z v3x v3y]`) to a unit cell in
/// Angstrom; `None` for an all-zero box.
fn parse_box(path: &Path, ln: usize, line: &[u8]) -> Result<Option<UnitCell>> {
    let text = String::from_utf8_lossy(line);
    let split: Option<Vec<f64>> = text
        .split_whitespace()
        .map(|t| t.parse::<f64>().ok())
        .collect();
    let counted = |v: &Vec<f64>| matches!(v.len(), 3 | 9);
    // Whitespace-separated first; numbers that run together only when that fails to give 3 or
    // 9 numbers, so that a box line of the wrong length keeps its own message below.
    let vals = split
        .clone()
        .filter(counted)
        .or_else(|| run_together(&text).filter(counted))
        .or(split)
        .filter(|v| v.iter().all(|x| x.is_finite()))
        .ok_or_else(|| anyhow!("{}:{ln}: bad box line {:?}", path.display(), text.trim()))?;
    let v = match vals.len() {
        3 => [vals[0], vals[1], vals[2], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        9 => std::array::from_fn(|i| vals[i]),
        n => bail!(
            "{}:{ln}: box line has {n} numbers, expected 3 or 9 (is the atom count on line 2 right?)",
            path.display()
        ),
    };
    if v.iter().all(|&x| x == 0.0) {
        return Ok(None);
    }
    let a = |x: f64| (x * 10.0) as f32;
    Ok(Some(UnitCell {
        vectors: [
            [a(v[0]), a(v[3]), a(v[4])],
            [a(v[5]), a(v[1]), a(v[6])],
            [a(v[7]), a(v[8]), a(v[2])],
        ],
    }))
}

/// Parses GRO text (already decompressed); `path` is for messages.
fn parse(path: &Path, data: &[u8]) -> Result<Topology> {
    let mut lines = numbered_lines(data);
    let p = path.display();
    lines
        .next()
        .ok_or_else(|| anyhow!("{p}: empty file (expected a title line)"))?;
    let (ln, count_line) = lines
        .next()
        .ok_or_else(|| anyhow!("{p}: truncated after the title (expected the atom count)"))?;
    let count_text = String::from_utf8_lossy(count_line);
    let natoms: usize = count_text
        .trim()
        .parse()
        .map_err(|_| anyhow!("{p}:{ln}: bad atom count {:?}", count_text.trim()))?;
    if natoms == 0 {
        bail!("{p}:{ln}: the file declares 0 atoms");
    }
    check_atom_count(path, natoms)?;
    // Capacity from the file size, not the declared count, so a corrupt count cannot exhaust
    // memory before the truncation is found.
    let cap = natoms.min(data.len() / 20 + 1);
    let mut atoms = Vec::with_capacity(cap);
    let mut coords = Vec::with_capacity(cap);
    let mut width: Option<usize> = None;
    for index in 1..=natoms {
        let (ln, line) = lines.next().ok_or_else(|| {
            anyhow!(
                "{p}: truncated: the file declares {natoms} atoms but ends after {} atom lines",
                index - 1
            )
        })?;
        let err = |msg: String| anyhow!("{p}:{ln}: atom {index}: {msg}");
        let w = match width {
            Some(w) => w,
            None => {
                let w = field_width(line).ok_or_else(|| {
                    err("cannot find the coordinate fields (expected x, y, z with decimal points after column 20)".into())
                })?;
                *width.insert(w)
            }
        };
        let resnr = column(line, 0, 5);
        let resid: i32 = resnr
            .parse()
            .map_err(|_| err(format!("bad residue number {resnr:?} (columns 1-5)")))?;
        let resname = column(line, 5, 10).into_owned();
        let name = column(line, 10, 15).into_owned();
        let mut xyz = [0f32; 3];
        for (k, x) in xyz.iter_mut().enumerate() {
            let (a, b) = (20 + w * k, 20 + w * (k + 1));
            let s = column(line, a, b);
            // Parsed as f64 and scaled before rounding to f32: the nearest f32 to 10 x, as
            // MDAnalysis has it.
            let v: f64 = s
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| {
                    err(format!(
                        "bad {} coordinate {s:?} (columns {}-{b})",
                        ["x", "y", "z"][k],
                        a + 1
                    ))
                })?;
            *x = (v * 10.0) as f32;
        }
        let z = element::guess_from_name(&name, &resname);
        let (element, atomic_number, mass) = element_fields(z, None);
        atoms.push(Atom {
            name,
            resname,
            resid,
            icode: ' ',
            chain: String::new(),
            segid: PLACEHOLDER_SEGID.to_string(),
            element,
            atomic_number,
            mass,
            charge: 0.0,
        });
        coords.push(xyz);
    }
    let (ln, box_line) = lines
        .next()
        .ok_or_else(|| anyhow!("{p}: truncated: no box line after the {natoms} atoms"))?;
    let unit_cell = parse_box(path, ln, box_line)?;
    Ok(Topology {
        source: path.to_path_buf(),
        atoms,
        coords: Some(coords),
        unit_cell,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        assert_eq!(
            field_width(b"    1MET      N    1   5.202   4.356   3.155"),
            Some(8)
        );
        assert_eq!(
            field_width(b"    1MET      N    1   5.20212   4.35612   3.15512"),
            Some(10)
        );
        assert_eq!(field_width(b"    1MET      N    1"), None);
    }

    #[test]
    fn triclinic_box() {
        let c = parse_box(
            Path::new("x.gro"),
            3,
            b"   8.00170   8.00170   5.65806   0.00000   0.00000   0.00000   0.00000   4.00085   4.00085",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.vectors[0], [80.017, 0.0, 0.0]);
        assert_eq!(c.vectors[1], [0.0, 80.017, 0.0]);
        assert_eq!(c.vectors[2], [40.0085, 40.0085, 56.5806]);
        assert!(parse_box(Path::new("x.gro"), 3, b"1 2").is_err());
        assert!(parse_box(Path::new("x.gro"), 3, b"0 0 0")
            .unwrap()
            .is_none());
    }

    #[test]
    fn run_together_box() {
        // MDAnalysisTests' huge_box.gro: three %10.5f fields of 11 characters each.
        let c = parse_box(Path::new("x.gro"), 3, b"40000.0000040000.0000040000.00000")
            .unwrap()
            .unwrap();
        assert_eq!(c.vectors[0], [400000.0, 0.0, 0.0]);
        assert_eq!(c.vectors[2], [0.0, 0.0, 400000.0]);
        assert_eq!(
            run_together("12345.12345-1.50000 3.00000"),
            Some(vec![12345.12345, -1.5, 3.0])
        );
        assert_eq!(run_together("1.5 2.5 3.5"), None);
        assert_eq!(run_together("1.50000x"), None);
        assert!(parse_box(Path::new("x.gro"), 3, b"40000.000004000").is_err());
    }
}
