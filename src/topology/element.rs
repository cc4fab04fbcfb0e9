//! Elements: symbols, atomic numbers and standard masses, and guessing an atom's element from its
//! mass or its name.
//!
//! Guessing follows MDAnalysis's `DefaultGuesser.guess_atom_element` (MDAnalysis 2.11) with three
//! deliberate differences, all because the residue name is known here and not there:
//! - two-letter names that are also organic one-letter names (`CA`, `NA`, `HG`, `CD`, ...) are the
//!   metal only inside an ion residue (residue name equal to the atom name, as in `NA+`/`NA`,
//!   `CA`/`CA`, `SOD`/`SOD`, or the residue `ION`); MDAnalysis reads `NA` as sodium everywhere,
//!   which makes the heme nitrogen `NA` a sodium;
//! - `SE` is selenium (selenomethionine), where MDAnalysis says sulphur;
//! - virtual sites (`MW`, `LP*`, `EP*`, `DUM*`, massless PSF atoms) have no element, where
//!   MDAnalysis guesses `DUMMY` (and `LP` → phosphorus).

/// Symbols of Z = 1..=118, index Z - 1.
const SYMBOLS: [&str; 118] = [
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl",
    "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As",
    "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In",
    "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb",
    "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl",
    "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk",
    "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh",
    "Fl", "Mc", "Lv", "Ts", "Og",
];

/// Standard atomic weights (IUPAC conventional/abridged values, daltons) of Z = 1..=118, index
/// Z - 1; for elements without a stable isotope, the mass number of the longest-lived one.
/// H, C, N, O and S equal MDAnalysis's table, so masses of biomolecules agree with it exactly.
const MASSES: [f32; 118] = [
    1.008, 4.0026, 6.94, 9.0122, 10.81, 12.011, 14.007, 15.999, 18.998, 20.180, 22.990, 24.305,
    26.982, 28.085, 30.974, 32.06, 35.45, 39.948, 39.098, 40.078, 44.956, 47.867, 50.942, 51.996,
    54.938, 55.845, 58.933, 58.693, 63.546, 65.38, 69.723, 72.630, 74.922, 78.971, 79.904, 83.798,
    85.468, 87.62, 88.906, 91.224, 92.906, 95.95, 98.0, 101.07, 102.91, 106.42, 107.87, 112.41,
    114.82, 118.71, 121.76, 127.60, 126.90, 131.29, 132.91, 137.33, 138.91, 140.12, 140.91, 144.24,
    145.0, 150.36, 151.96, 157.25, 158.93, 162.50, 164.93, 167.26, 168.93, 173.05, 174.97, 178.49,
    180.95, 183.84, 186.21, 190.23, 192.22, 195.08, 196.97, 200.59, 204.38, 207.2, 208.98, 209.0,
    210.0, 222.0, 223.0, 226.0, 227.0, 232.04, 231.04, 238.03, 237.0, 244.0, 243.0, 247.0, 247.0,
    251.0, 252.0, 257.0, 258.0, 259.0, 266.0, 267.0, 268.0, 269.0, 270.0, 269.0, 278.0, 281.0,
    282.0, 285.0, 286.0, 289.0, 290.0, 293.0, 294.0, 294.0,
];

/// Mass of deuterium, used when a PDB element column says `D`.
pub const DEUTERIUM_MASS: f32 = 2.014;

/// Atomic number of an element symbol, case-insensitive and trimmed (`"FE"`, `"Fe"`, `" C"`).
/// The hydrogen isotopes `D` and `T` are hydrogen (Z = 1). `None` for anything else.
pub fn from_symbol(s: &str) -> Option<u8> {
    let s = s.trim();
    if s.is_empty() || s.len() > 2 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    if s.eq_ignore_ascii_case("D") || s.eq_ignore_ascii_case("T") {
        return Some(1);
    }
    SYMBOLS
        .iter()
        .position(|sym| sym.eq_ignore_ascii_case(s))
        .map(|i| (i + 1) as u8)
}

/// Symbol of atomic number `z` (`"C"`, `"Fe"`); `"X"` for 0 or anything above 118.
pub fn symbol(z: u8) -> &'static str {
    match z {
        1..=118 => SYMBOLS[z as usize - 1],
        _ => "X",
    }
}

/// Standard atomic mass of `z` in daltons; 0 for 0 or anything above 118.
pub fn mass(z: u8) -> f32 {
    match z {
        1..=118 => MASSES[z as usize - 1],
        _ => 0.0,
    }
}

/// The element whose standard mass is nearest to `m`, if within 0.5 Da. Anything from 0.5 to
/// 3.5 Da is hydrogen (protium, deuterium, tritium, and hydrogen-mass-repartitioned hydrogens of
/// 3.024 Da), never helium, which does not occur in biomolecular simulations.
pub fn from_mass(m: f32) -> Option<u8> {
    if !m.is_finite() || m <= 0.0 {
        return None;
    }
    if (0.5..3.5).contains(&m) {
        return Some(1);
    }
    let (mut best, mut best_d) = (0u8, f32::INFINITY);
    for z in 1..=118u8 {
        let d = (mass(z) - m).abs();
        if d < best_d {
            best = z;
            best_d = d;
        }
    }
    (best_d <= 0.5).then_some(best)
}

/// Guesses the element of an atom from its mass (when the file has masses) and its name, in the
/// residue `resname`.
///
/// Without a mass, the element comes from the name (see [`guess_from_name`]). With one:
/// - a zero mass is a virtual site: `None`;
/// - the name's reading wins when its standard mass lies within 0.5 Da of the mass, or when the
///   mass is what hydrogen-mass repartitioning makes of it (a hydrogen of 0.5-4.6 Da, a heavy atom
///   lighter by less than 10 Da): an HMR nitrogen of 11.99 Da stays nitrogen rather than carbon;
/// - else the name's one- or two-letter alternative (`CA` → C or Ca) whose standard mass lies
///   within 0.5 Da wins (`CA` of mass 40.08 outside an ion residue is calcium);
/// - else the element nearest to the mass within 0.5 Da (`C1` of mass 35.45 is chlorine;
///   1.5-3.5 Da, deuterium included, is hydrogen);
/// - else the name's reading.
pub fn guess(name: &str, resname: &str, mass_da: Option<f32>) -> Option<u8> {
    let from_name = guess_from_name(name, resname);
    let Some(m) = mass_da else {
        return from_name;
    };
    if !m.is_finite() || m < 0.0 {
        return from_name;
    }
    if m == 0.0 {
        return None;
    }
    let near = |z: u8| (mass(z) - m).abs();
    if let Some(p) = from_name {
        // The name's reading agrees with the mass, or the mass is what hydrogen-mass
        // repartitioning makes of it (checked before the alternatives, so that an HMR hydrogen of
        // 4.03 Da named HE1 is not helium).
        let hmr = if p == 1 {
            (0.5..4.6).contains(&m)
        } else {
            m < mass(p) && mass(p) - m < 10.0
        };
        if near(p) <= 0.5 || hmr {
            return Some(p);
        }
    }
    let letters = clean(name);
    let alternatives = [letters.get(..1), letters.get(..2)];
    if let Some(z) = alternatives
        .into_iter()
        .flatten()
        .filter_map(strict_symbol)
        .filter(|&z| near(z) <= 0.5)
        .min_by(|&a, &b| near(a).total_cmp(&near(b)))
    {
        return Some(z);
    }
    from_mass(m).or(from_name)
}

/// Upper-case letters of a name, without digits and symbols (`"1HD1"` → `"HD"`, `"O5'"` → `"O"`).
fn clean(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// MDAnalysis's table of special atom names (`tables.TABLE_ATOMELEMENTS`), less `NA` (see the
/// module docs), looked up on the upper-cased name as written and then on its letters.
fn special_name(n: &str) -> Option<&'static str> {
    Some(match n {
        "BR" => "Br",
        "CAL" | "C0" | "CA2+" => "Ca",
        "CES" | "CS" | "CS+" => "Cs",
        "CLA" | "CLAL" | "CL" | "CL-" => "Cl",
        "IOD" => "I",
        "FE" | "FE2" => "Fe",
        "LIT" | "LI" | "LI+" | "QL" => "Li",
        "MG" | "MG2+" => "Mg",
        "K" | "POT" | "K+" | "QK" => "K",
        "SOD" | "NA+" | "QN" => "Na",
        "ZN" => "Zn",
        "CU" => "Cu",
        "QC" => "Ce",
        "RB" | "QR" => "Rb",
        "BC" | "AC" => "C",
        _ => return None,
    })
}

/// Atomic number of an element symbol proper: like [`from_symbol`] but without the hydrogen
/// isotopes, since an atom name starting with `D` or `T` is no hydrogen.
fn strict_symbol(s: &str) -> Option<u8> {
    match s {
        "D" | "T" | "d" | "t" => None,
        _ => from_symbol(s),
    }
}

/// Whether a residue holds an ion: one-atom ion residues carry the ion's name as residue name
/// (`NA+`/`NA`, `CLA`/`CLA`, `ZN`/`ZN`, `CA`/`CA`), CHARMM ion residue names (`SOD`, `POT`, `CLA`,
/// `CAL`, ...) may hold differently named atoms, and old GROMACS files put all ions in `ION`.
fn is_ion_residue(resname_letters: &str, name_letters: &str) -> bool {
    resname_letters == "ION"
        || (!resname_letters.is_empty() && resname_letters == name_letters)
        || special_name(resname_letters).is_some_and(|s| s != "C")
}

/// Whether an atom is a massless virtual site rather than an atom: no element, no mass, and a
/// virtual-site name.
pub fn is_virtual_site_atom(atom: &super::Atom) -> bool {
    atom.atomic_number == 0
        && atom.mass == 0.0
        && is_virtual_site(&clean(&atom.name.trim().to_ascii_uppercase()))
}

/// Virtual sites: TIP4P `MW`, lone pairs `LP*`, TIP5P `EP*`, dummies `DUM*`/`VS*`.
fn is_virtual_site(letters: &str) -> bool {
    letters == "MW"
        || letters.starts_with("LP")
        || letters.starts_with("EP")
        || letters.starts_with("DUM")
        || letters.starts_with("VS")
}

/// Guesses the element from the atom name alone (with its residue name), following MDAnalysis's
/// `guess_atom_element` conventions: digits and symbols are stripped (`1HD1` → H, `OW` → O,
/// `O5'` → O), special ion names are looked up (`SOD` → Na, `POT` → K, `CLA` → Cl, `CAL` → Ca),
/// and otherwise the first letter decides (`CA` → C, `HG1` → H, `NE2` → N, `SD` → S), except:
/// in an ion residue (see module docs) a two-letter element symbol is the metal (`CA` in `CA` is
/// calcium, `NA` in `NA+` sodium, `HG` in `HG` mercury); names whose first letter is no element
/// take two letters (`MG`, `ZN`, `MN`); `BR`, `CL`, `FE`, `SE` are always those elements.
/// `None` when nothing fits.
pub fn guess_from_name(name: &str, resname: &str) -> Option<u8> {
    let raw = name.trim().to_ascii_uppercase();
    let letters = clean(&raw);
    if letters.is_empty() || is_virtual_site(&letters) {
        return None;
    }
    let res_letters = clean(resname);
    if is_ion_residue(&res_letters, &letters) {
        if let Some(s) = special_name(&raw).or_else(|| special_name(&letters)) {
            return from_symbol(s);
        }
        if letters == "NA" {
            return Some(11);
        }
        if let Some(z) = from_symbol(&letters) {
            return Some(z);
        }
    }
    if let Some(s) = special_name(&raw).or_else(|| special_name(&letters)) {
        return from_symbol(s);
    }
    if letters.starts_with("SE") {
        return Some(34);
    }
    if strict_symbol(&letters[..1]).is_none() {
        // `M`, `Z`, `A`, `G`, `L`, `R`, `E`, ... are no element: the symbol must be two letters.
        if let Some(z) = letters.get(..2).and_then(from_symbol) {
            return Some(z);
        }
    }
    mda_loop(&letters)
}

/// MDAnalysis's fallback: try the name, then without its last or first letter, shortening from
/// the right, against its short list of elements (`tables.elements`, less `NA`, see module docs).
fn mda_loop(letters: &str) -> Option<u8> {
    const ELEMENTS: [&str; 15] = [
        "H", "LI", "BE", "B", "C", "N", "O", "F", "MG", "AL", "P", "SI", "S", "CL", "K",
    ];
    let known = |s: &str| ELEMENTS.contains(&s);
    let mut name = letters;
    while !name.is_empty() {
        if known(name) {
            return from_symbol(name);
        }
        let head = &name[..name.len() - 1];
        if known(head) {
            return from_symbol(head);
        }
        let tail = &name[1..];
        if known(tail) {
            return from_symbol(tail);
        }
        if name.len() <= 2 {
            return from_symbol(&name[..1]);
        }
        name = head;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips() {
        for z in 1..=118u8 {
            assert_eq!(from_symbol(symbol(z)), Some(z), "{}", symbol(z));
            assert!(mass(z) > 0.0);
        }
        assert_eq!(symbol(0), "X");
        assert_eq!(from_symbol("fe"), Some(26));
        assert_eq!(from_symbol("D"), Some(1));
        assert_eq!(from_symbol("Xx"), None);
        assert_eq!(from_symbol(""), None);
    }

    #[test]
    fn names() {
        let g = |n: &str, r: &str| guess_from_name(n, r).map(symbol);
        assert_eq!(g("CA", "ALA"), Some("C"));
        assert_eq!(g("CA", "CA"), Some("Ca"));
        assert_eq!(g("CAL", "CAL"), Some("Ca"));
        assert_eq!(g("NA", "NA+"), Some("Na"));
        assert_eq!(g("NA", "HEM"), Some("N"));
        assert_eq!(g("Na+", "Na+"), Some("Na"));
        assert_eq!(g("SOD", "SOD"), Some("Na"));
        assert_eq!(g("POT", "POT"), Some("K"));
        assert_eq!(g("CLA", "CLA"), Some("Cl"));
        assert_eq!(g("CL", "CL-"), Some("Cl"));
        assert_eq!(g("CL1", "LIG"), Some("Cl"));
        assert_eq!(g("HG1", "THR"), Some("H"));
        assert_eq!(g("HG", "HG"), Some("Hg"));
        assert_eq!(g("1HD1", "LEU"), Some("H"));
        assert_eq!(g("HO2'", "U"), Some("H"));
        assert_eq!(g("O5'", "GUA"), Some("O"));
        assert_eq!(g("NE2", "GLN"), Some("N"));
        assert_eq!(g("SD", "MET"), Some("S"));
        assert_eq!(g("SE", "MSE"), Some("Se"));
        assert_eq!(g("OW", "SOL"), Some("O"));
        assert_eq!(g("OH2", "TIP3"), Some("O"));
        assert_eq!(g("MG", "MG"), Some("Mg"));
        assert_eq!(g("ZN", "ZN2"), Some("Zn"));
        assert_eq!(g("FE", "HEM"), Some("Fe"));
        assert_eq!(g("MN1", "LIG"), Some("Mn"));
        assert_eq!(g("MW", "SOL"), None);
        assert_eq!(g("LP1", "CLB"), None);
        assert_eq!(g("", "ALA"), None);
        assert_eq!(g("123", "ALA"), None);
    }

    #[test]
    fn masses() {
        let g = |n: &str, r: &str, m: f32| guess(n, r, Some(m)).map(symbol);
        assert_eq!(g("CA", "ALA", 12.011), Some("C"));
        assert_eq!(g("CA", "CAL", 40.08), Some("Ca"));
        assert_eq!(g("CL1", "LIG", 35.45), Some("Cl"));
        assert_eq!(g("C1", "LIG", 35.45), Some("Cl"));
        assert_eq!(g("HT1", "MET", 1.008), Some("H"));
        assert_eq!(g("D1", "LIG", 2.014), Some("H"));
        // Hydrogen mass repartitioning: heavy hydrogens, lighter heavy atoms.
        assert_eq!(g("HN", "ALA", 3.024), Some("H"));
        assert_eq!(g("HE1", "TRP", 4.032), Some("H"));
        assert_eq!(g("N", "ALA", 11.991), Some("N"));
        assert_eq!(g("OG", "SER", 13.983), Some("O"));
        assert_eq!(g("X1", "LIG", 12.011), Some("C"));
        assert_eq!(g("LP", "LIG", 0.0), None);
        assert_eq!(g("POT", "POT", 39.0983), Some("K"));
    }
}
