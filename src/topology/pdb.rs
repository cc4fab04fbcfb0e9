//! PDB topology reader: ATOM/HETATM records of the first model, CRYST1, fixed columns.
//!
//! Columns (1-based, inclusive) as in the wwPDB format: serial 7-11 (not used), name 13-16,
//! altLoc 17, resName 18-21 (four characters for CHARMM's `TIP3`, `HSD`), chainID 22, resSeq
//! 23-26, iCode 27, x/y/z 31-54, occupancy and tempFactor (not used), segID 73-76, element 77-78,
//! charge 79-80 (not used). Lines may stop anywhere after the coordinates: missing columns read
//! as blank, as many programs do not pad to 80 columns.
//!
//! Conventions, compared with MDAnalysis 2.11's `PDBParser` (the reference of the tests):
//! - the topology is the first model: reading stops at the first `ENDMDL`, `END` or second
//!   `MODEL` record after an atom, as MDAnalysis stops at the first record starting with `END`;
//! - residue numbers: plain integers, hybrid-36 beyond 9999 (`A000` = 10000), and files that wrap
//!   numbering at 10000 (9999 followed by 0) are unwrapped as MDAnalysis does (add 10000 while the
//!   number drops by more than 5000), but only within one chain and segment, so that a chain
//!   starting again at 1 after a long chain is left alone (MDAnalysis unwraps it too);
//! - alternate locations: MDAnalysis keeps every alternate-location record as an atom of its own
//!   (a serine with `A`/`B` side chains has two CB); here only the first location of each residue
//!   is kept (blank-altLoc records always, plus those with the residue's first altLoc letter,
//!   usually `A`), see [`AltLocFilter`], so the topology holds one conformer;
//! - chain: the chainID column, else the segID; segment: as MDAnalysis, the segID column, or the
//!   chainID column when no atom of the file has a segID, or `SYSTEM` when none has either;
//! - element: the element column when it holds a symbol; unknown (`X`, Z = 0) when it holds
//!   something else (`X` for coarse-grained beads, `DU`), as MDAnalysis leaves such elements
//!   empty; guessed from the atom and residue names when it is blank
//!   ([`super::element::guess_from_name`]); mass: the element's standard mass (deuterium for an
//!   element column `D`, 0 for an unknown element);
//! - unit cell: the first CRYST1 before the first atom, or, in a file whose CRYST1 records
//!   follow their models (none before the first MODEL), the CRYST1 after the first ENDMDL; the
//!   1 Å cubic placeholder that wwPDB requires for structures without a crystal cell (cryo-EM,
//!   NMR) means no cell, as in MDAnalysis, and so do zero lengths.

use super::{
    check_atom_count, column, element, element_fields, numbered_lines, read_bytes, Atom, Topology,
    PLACEHOLDER_SEGID,
};
use crate::traj::UnitCell;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;

/// Reads the topology of a PDB file (gzipped or not): the atoms of its first model, their
/// coordinates, and the CRYST1 cell. Errors name the file, the line and the atom.
pub fn read_pdb(path: &Path) -> Result<Topology> {
    let data = read_bytes(path)?;
    parse(path, &data)
}

/// Decides which ATOM/HETATM records of a model to keep when a PDB file has alternate locations:
/// in each residue (chainID, resSeq, iCode, segID), records with a blank altLoc and those with the
/// first altLoc letter met in that residue; records with another letter are skipped.
///
/// The PDB topology reader uses it, and a PDB trajectory reader must use it too (one filter per
/// model, fed every ATOM/HETATM line of the model in order) so that its frames have the atoms of
/// the topology.
#[derive(Clone, Debug, Default)]
pub struct AltLocFilter {
    /// First altLoc letter of each residue that has one, keyed by columns 22-27 and 73-76.
    first: HashMap<Vec<u8>, u8>,
}

impl AltLocFilter {
    /// A filter for a new model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to keep this ATOM/HETATM line (the raw line, any length).
    pub fn keep(&mut self, line: &[u8]) -> bool {
        let alt = line.get(16).copied().unwrap_or(b' ');
        if alt == b' ' {
            return true;
        }
        let span = |a: usize, b: usize| {
            line.get(a.min(line.len())..b.min(line.len()))
                .unwrap_or(&[])
        };
        let mut key = span(21, 27).to_vec();
        key.push(b'|');
        key.extend_from_slice(span(72, 76));
        *self.first.entry(key).or_insert(alt) == alt
    }
}

/// Whether a record is an atom: `ATOM` or `HETATM` (serial numbers of 100000 and more run into the
/// record name, as in `HETATM13329`, which the fixed columns handle).
fn is_atom_record(line: &[u8]) -> bool {
    line.starts_with(b"ATOM") || line.starts_with(b"HETATM")
}

/// Decodes a hybrid-36 number of `width` characters (`A000` = 10000 for width 4, lower case after
/// upper case), as written beyond the decimal range by the PDB hybrid-36 convention.
fn hybrid36(s: &str, width: u32) -> Option<i64> {
    let first = s.bytes().next()?;
    if s.len() != width as usize || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let upper = first.is_ascii_uppercase();
    if !upper && !first.is_ascii_lowercase() {
        return None;
    }
    // Digits of one case only: upper-case numbers use 0-9A-Z, lower-case ones 0-9a-z.
    if s.bytes()
        .any(|b| b.is_ascii_alphabetic() && b.is_ascii_uppercase() != upper)
    {
        return None;
    }
    let v = i64::from_str_radix(s, 36).ok()?;
    let p = 36i64.pow(width - 1);
    let dec = 10i64.pow(width);
    Some(if upper {
        v - 10 * p + dec
    } else {
        v + 16 * p + dec
    })
}

/// Parses the residue number (columns 23-26): decimal or hybrid-36.
fn parse_resseq(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| hybrid36(s, 4))
}

/// Parses one coordinate field, which must be a finite number.
fn coord(line: &[u8], a: usize, b: usize) -> Option<f32> {
    column(line, a, b)
        .parse::<f32>()
        .ok()
        .filter(|x| x.is_finite())
}

/// Parses the CRYST1 record; `None` for the 1 Å placeholder or zero lengths.
fn parse_cryst1(path: &Path, ln: usize, line: &[u8]) -> Result<Option<UnitCell>> {
    let field = |a: usize, b: usize, what: &str, default: Option<f64>| -> Result<f64> {
        let s = column(line, a, b);
        if s.is_empty() {
            if let Some(d) = default {
                return Ok(d);
            }
        }
        match s.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => bail!("{}:{ln}: CRYST1: bad {what} {s:?}", path.display()),
        }
    };
    let a = field(6, 15, "a", None)?;
    let b = field(15, 24, "b", None)?;
    let c = field(24, 33, "c", None)?;
    // Angles are often left out when the box is rectangular.
    let alpha = field(33, 40, "alpha", Some(90.0))?;
    let beta = field(40, 47, "beta", Some(90.0))?;
    let gamma = field(47, 54, "gamma", Some(90.0))?;
    if a <= 0.0 || b <= 0.0 || c <= 0.0 || (a == 1.0 && b == 1.0 && c == 1.0) {
        return Ok(None);
    }
    for (name, x) in [("alpha", alpha), ("beta", beta), ("gamma", gamma)] {
        if !(x > 0.0 && x < 180.0) {
            bail!(
                "{}:{ln}: CRYST1: angle {name} = {x} is not between 0 and 180 degrees",
                path.display()
            );
        }
    }
    Ok(Some(UnitCell::from_lengths_angles(
        a, b, c, alpha, beta, gamma,
    )))
}

/// Parses PDB text (already decompressed); `path` is for messages.
fn parse(path: &Path, data: &[u8]) -> Result<Topology> {
    let mut atoms: Vec<Atom> = Vec::new();
    let mut coords: Vec<[f32; 3]> = Vec::new();
    let mut cell: Option<Option<UnitCell>> = None;
    let mut altlocs = AltLocFilter::new();
    let mut seen_model = false;
    // The chainID column of every atom, for segment ids taken from chains.
    let mut chain_cols: Vec<u8> = Vec::new();
    // Previous atom's (unwrapped) residue number with its chainID and segID columns.
    let mut prev: Option<(i64, u8, String)> = None;
    let mut lines = numbered_lines(data);
    // Whether the first model ended at its ENDMDL (rather than at END, a MODEL or the end).
    let mut closed_model = false;
    for (ln, line) in lines.by_ref() {
        if line.starts_with(b"MODEL") {
            if !atoms.is_empty() || seen_model {
                break;
            }
            seen_model = true;
            continue;
        }
        if line.starts_with(b"END") {
            // ENDMDL and END close the first model; an END before any atom closes nothing.
            if !atoms.is_empty() {
                closed_model = seen_model && line.starts_with(b"ENDMDL");
                break;
            }
            continue;
        }
        if line.starts_with(b"CRYST1") {
            if cell.is_none() && atoms.is_empty() {
                cell = Some(parse_cryst1(path, ln, line)?);
            }
            continue;
        }
        if !is_atom_record(line) || !altlocs.keep(line) {
            continue;
        }
        let index = atoms.len() + 1;
        check_atom_count(path, index)?;
        let err = |msg: String| -> anyhow::Error {
            anyhow::anyhow!("{}:{ln}: atom {index}: {msg}", path.display())
        };
        let name = column(line, 12, 16).into_owned();
        let resname = column(line, 17, 21).into_owned();
        let chain_col = line.get(21).copied().unwrap_or(b' ');
        chain_cols.push(chain_col);
        let segid = column(line, 72, 76).into_owned();
        let resseq = column(line, 22, 26);
        let mut resid = parse_resseq(&resseq)
            .ok_or_else(|| err(format!("bad residue number {resseq:?} (columns 23-26)")))?;
        if let Some((p, pchain, pseg)) = &prev {
            if *pchain == chain_col && *pseg == segid && p - resid > 5000 {
                // Numbering wrapped at 10000: add as many 10000s as MDAnalysis would.
                resid += (p - resid - 5000 + 9999) / 10000 * 10000;
            }
        }
        let resid_i32 = i32::try_from(resid)
            .map_err(|_| err(format!("residue number {resid} out of range")))?;
        prev = Some((resid, chain_col, segid.clone()));
        let icode = match line.get(26) {
            Some(&c) if c.is_ascii_graphic() => c as char,
            _ => ' ',
        };
        let mut xyz = [0f32; 3];
        for (k, x) in xyz.iter_mut().enumerate() {
            let (a, b) = (30 + 8 * k, 38 + 8 * k);
            *x = coord(line, a, b).ok_or_else(|| {
                err(format!(
                    "bad {} coordinate {:?} (columns {}-{})",
                    ["x", "y", "z"][k],
                    column(line, a, b),
                    a + 1,
                    b
                ))
            })?;
        }
        let element_col = column(line, 76, 78);
        let (z, file_mass) = match element::from_symbol(&element_col) {
            Some(z) if element_col.eq_ignore_ascii_case("D") => {
                (Some(z), Some(element::DEUTERIUM_MASS))
            }
            Some(z) => (Some(z), None),
            // A blank column says nothing: guess. Anything else that is no element (`X` of
            // coarse-grained beads, `DU`) says the element is unknown, as MDAnalysis reads it.
            None if element_col.is_empty() => (element::guess_from_name(&name, &resname), None),
            None => (None, None),
        };
        let (element, atomic_number, mass) = element_fields(z, file_mass);
        let chain = if chain_col.is_ascii_graphic() {
            (chain_col as char).to_string()
        } else {
            segid.clone()
        };
        atoms.push(Atom {
            name,
            resname,
            resid: resid_i32,
            icode,
            chain,
            segid,
            element,
            atomic_number,
            mass,
            charge: 0.0,
        });
        coords.push(xyz);
    }
    if atoms.is_empty() {
        bail!("{}: no ATOM or HETATM record", path.display());
    }
    if cell.is_none() && closed_model {
        // CRYST1 records that follow their models: the first model's box comes after its
        // ENDMDL, before the next model.
        for (ln, line) in lines {
            if line.starts_with(b"MODEL") || is_atom_record(line) {
                break;
            }
            if line.starts_with(b"CRYST1") {
                cell = Some(parse_cryst1(path, ln, line)?);
            }
        }
    }
    // Segment ids as MDAnalysis fills them: the chain IDs when no atom has a segID, and its
    // placeholder when no atom has either.
    if atoms.iter().all(|a| a.segid.is_empty()) {
        for (a, &c) in atoms.iter_mut().zip(&chain_cols) {
            a.segid = if c.is_ascii_graphic() {
                (c as char).to_string()
            } else {
                String::new()
            };
        }
        if atoms.iter().all(|a| a.segid.is_empty()) {
            for a in &mut atoms {
                a.segid = PLACEHOLDER_SEGID.to_string();
            }
        }
    }
    Ok(Topology {
        source: path.to_path_buf(),
        atoms,
        coords: Some(coords),
        unit_cell: cell.flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid36_numbers() {
        assert_eq!(parse_resseq("9999"), Some(9999));
        assert_eq!(parse_resseq("A000"), Some(10000));
        assert_eq!(parse_resseq("A001"), Some(10001));
        assert_eq!(parse_resseq("ZZZZ"), Some(10000 + 26 * 36i64.pow(3) - 1));
        assert_eq!(parse_resseq("a000"), Some(10000 + 26 * 36i64.pow(3)));
        assert_eq!(parse_resseq("-12"), Some(-12));
        assert_eq!(parse_resseq("A0b0"), None);
        assert_eq!(parse_resseq("****"), None);
        assert_eq!(parse_resseq(""), None);
    }

    #[test]
    fn altloc_filter_keeps_first_letter_per_residue() {
        let mut f = AltLocFilter::new();
        let l = |alt: char, res: &str| {
            format!("ATOM      1  CB {alt}SER A{res}       0.000   0.000   0.000")
        };
        assert!(f.keep(l(' ', "   1").as_bytes()));
        assert!(f.keep(l('A', "   1").as_bytes()));
        assert!(!f.keep(l('B', "   1").as_bytes()));
        assert!(f.keep(l('A', "   1").as_bytes()));
        // Another residue whose first letter is B.
        assert!(f.keep(l('B', "   2").as_bytes()));
        assert!(!f.keep(l('C', "   2").as_bytes()));
    }
}
