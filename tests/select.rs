//! Atom selections on the ADK topologies, against counts printed by MDAnalysis 2.11.0
//! (`u.select_atoms(expr).n_atoms`; MDAnalysis spells our `chain` as `chainID`), on systems with
//! virtual sites and coarse-grained beads (`datasets/interop/`), and the error messages for
//! malformed or too deeply nested expressions.

mod common;

use hiermd::select::{select, Selection};
use hiermd::topology::{read_gro, read_pdb, read_psf, read_topology, Topology};
use std::sync::OnceLock;

fn adk_psf() -> &'static Topology {
    static T: OnceLock<Topology> = OnceLock::new();
    T.get_or_init(|| read_psf(&common::adk_data().join("adk.psf")).unwrap())
}

fn count(top: &Topology, expr: &str) -> usize {
    Selection::parse(expr)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .evaluate(top)
        .len()
}

/// Checks each (expression, MDAnalysis count) pair.
fn check(top: &Topology, cases: &[(&str, usize)]) {
    for &(expr, want) in cases {
        assert_eq!(
            count(top, expr),
            want,
            "{expr:?} on {}",
            top.source.display()
        );
    }
}

#[test]
fn adk_psf_matches_mdanalysis() {
    check(
        adk_psf(),
        &[
            // heavy = not hydrogen (Z = 1 from the PSF masses); MDAnalysis `not name H*`.
            ("heavy", 1656),
            ("not name H*", 1656),
            ("hydrogen", 1685),
            ("name H*", 1685),
            ("all", 3341),
            ("protein", 3341),
            ("backbone", 855),
            ("name CA", 214),
            ("nucleic", 0),
            ("resid 10-20", 150),
            ("resid 10:20 and name CA", 11),
            ("(resid 1-5 or resid 200-214) and backbone", 79),
            ("protein and not name H*", 1656),
            ("resindex 0:9", 157),
            ("index 0:9", 10),
            ("name C*", 1040),
            ("name ?A", 408),
            ("resname HS*", 51),
            ("resname GLY ALA", 331),
            ("not name CA and resid 1 or resid 2", 42),
            ("not (name CA and resid 1) or resid 2", 3340),
            ("segid 4AKE", 3341),
            ("resid 10:20 and not backbone", 106),
            ("protein and not backbone and not name H*", 801),
            ("name CA and (resid 1-10 or resid 100:110)", 21),
            ("resname LYS ARG and name NZ NH1 NH2", 44),
            ("resid 214", 8),
            ("resid 1 214", 27),
            ("backbone or name CB", 1049),
            ("not all", 0),
        ],
    );
}

#[test]
fn adk_psf_extras() {
    let top = adk_psf();
    check(
        top,
        &[
            // Not in MDAnalysis: `element`, `chain` (= segid for PSF), `to` ranges, resindex.
            ("element C", 1040),
            ("element h", 1685),
            ("element C N O S", 1656),
            ("not element H", 1656),
            ("chain 4AKE", 3341),
            ("resid 10 to 20", 150),
            ("resid 10 to 20 and name CA", 11),
            ("resindex 0-9", 157),
            ("resindex 213", 8),
            ("((name CA))", 214),
            ("not not name CA", 214),
            ("name CA or name CA", 214),
            ("name CA and not heavy", 0),
            ("element X", 0),
        ],
    );
    let ca = select(top, "name CA").unwrap();
    assert_eq!(ca.len(), 214);
    assert!(ca.windows(2).all(|w| w[0] < w[1]), "sorted");
    assert_eq!(ca[0], 4);
    assert!(ca.iter().all(|&i| top.atoms[i].name == "CA"));
}

#[test]
fn adk_gro_and_pdb_match_mdanalysis() {
    let dir = common::adk_data();
    let gro = read_gro(&dir.join("adk_oplsaa.gro")).unwrap();
    check(
        &gro,
        &[
            ("not name H*", 23828),
            // MDAnalysis's `not name H*` keeps the 11084 TIP4P virtual sites MW; `heavy` leaves
            // them out (23828 - 11084), as does MDAnalysis's count by element.
            ("heavy", 12744),
            ("heavy and not name MW", 12744),
            ("element X", 11084),
            ("name MW", 11084),
            ("water", 44336),
            ("resname SOL", 44336),
            ("resname NA+", 4),
            ("element Na", 4),
            ("protein", 3341),
            ("protein and not name H*", 1656),
            ("backbone", 855),
            ("name CA", 214),
            ("name OW", 11084),
            ("resid 100-200", 1609),
            ("resid 10:20 and name CA", 11),
        ],
    );
    let pdb = read_pdb(&dir.join("adk_oplsaa.pdb")).unwrap();
    check(
        &pdb,
        &[
            // Names like `1HD1` (389) escape `name H*` (MDAnalysis: 24217 / 23464) but are
            // hydrogens for `heavy`/`hydrogen`, which use the element.
            ("not name H*", 24217),
            ("name H*", 23464),
            ("name 1H*", 147),
            ("heavy", 12744),
            ("hydrogen", 23853),
            ("water", 44336),
            ("protein", 3341),
        ],
    );
}

#[test]
fn chains_and_segments_3kpr_6msm_1k5i() {
    let dir = common::adk_data();
    let kpr = read_topology(&dir.join("3KPR.pdb.gz")).unwrap();
    check(
        &kpr,
        &[
            ("chain A", 2278),
            ("chain A B", 3111),
            ("chain C and name CA", 9),
            ("water", 116),
            ("protein and chain D E", 3486),
            ("resid 1:10 and chain A", 87),
            ("protein", 13318),
            ("backbone", 6608),
            ("name CA", 1652),
            ("heavy", 13434),
            // No segID in this file: the segid is the chain ID, as MDAnalysis has it.
            ("segid A", 2278),
            ("segid A B", 3111),
        ],
    );
    let psf = read_topology(&dir.join("1k5i_c36.psf.gz")).unwrap();
    check(
        &psf,
        &[
            ("segid RNAA", 739),
            ("segid SOLV", 17166),
            ("segid POT", 22),
            ("chain RNAA", 739),
            ("water", 17166),
            ("nucleic", 739),
            ("nucleicbackbone", 114),
            ("nucleic and not name H*", 487),
            ("nucleic and heavy", 487),
            ("resname POT", 22),
            ("element K", 22),
            ("resid 10-20", 396),
        ],
    );
    let pdb = read_topology(&dir.join("1k5i_c36.pdb.gz")).unwrap();
    check(
        &pdb,
        &[
            ("water", 17166),
            ("nucleic and not name H*", 487),
            ("nucleicbackbone", 114),
            ("resname POT", 22),
            ("resid 10-20", 352),
            ("name O5'", 23),
            ("name P", 22),
        ],
    );
}

/// The error for `expr`, which must fail to parse.
fn parse_err(expr: &str) -> String {
    format!("{:#}", Selection::parse(expr).unwrap_err())
}

#[test]
fn errors_say_what_and_where() {
    let cases: &[(&str, &str)] = &[
        ("", "empty selection expression"),
        ("   ", "empty selection expression"),
        ("name", "`name` needs at least one value at column 5"),
        (
            "name CA and",
            "expected a selection, found the end at column 12",
        ),
        (
            "name CA and or resid 1",
            "`or` needs a selection on its left at column 13",
        ),
        ("(name CA", "unclosed `(` at column 1"),
        ("name CA)", "unmatched `)` at column 8"),
        ("(name CA or resid 1", "unclosed `(`"),
        ("nmae CA", "unknown keyword \"nmae\" at column 1"),
        ("nmae CA", "keywords: all, heavy, hydrogen, protein"),
        (
            "name CA resid 5",
            "expected `and`, `or` or the end, found \"resid\" at column 9",
        ),
        (
            "resid 5-x",
            "bad resid range \"5-x\" (expected N, N-M or N:M) at column 7",
        ),
        (
            "resid 20-10",
            "empty range \"20-10\": start after end at column 7",
        ),
        (
            "resindex -1",
            "resindex values are 0-based, \"-1\" is negative at column 10",
        ),
        ("resid 1 to", "expected a number after `to`"),
        ("resid to 5", "`resid` needs at least one value at column 7"),
        ("element Qq", "unknown element \"Qq\" at column 9"),
        ("not", "expected a selection, found the end at column 4"),
        ("()", "expected a selection, found `)` at column 2"),
        (
            "name CA and )",
            "expected a selection, found `)` at column 13",
        ),
        ("protein backbone", "found \"backbone\" at column 9"),
    ];
    for &(expr, want) in cases {
        let e = parse_err(expr);
        assert!(e.contains(want), "{expr:?}: {e}");
        if !expr.trim().is_empty() {
            assert!(
                e.contains(&format!("{expr:?}")),
                "names the expression: {e}"
            );
        }
    }
    // The caret points at the place.
    let e = parse_err("name CA and resid x");
    assert!(
        e.ends_with("at column 19\n  name CA and resid x\n                    ^"),
        "{e}"
    );
    let e = parse_err("name CA and nmae CB");
    assert!(
        e.contains("at column 13\n  name CA and nmae CB\n              ^\nkeywords:"),
        "{e}"
    );
}

#[test]
fn empty_selection_is_an_error() {
    let top = adk_psf();
    let e = format!("{:#}", select(top, "resname HOH").unwrap_err());
    assert!(e.contains("\"resname HOH\" selects no atom"), "{e}");
    assert!(e.contains("adk.psf"), "{e}");
    // A parse error comes through select too.
    let e = format!("{:#}", select(top, "name CA and").unwrap_err());
    assert!(e.contains("bad selection"), "{e}");
}

#[test]
fn display_is_verbatim_and_describe_canonical() {
    let expr = "not name H* and (resid 1-10  or resname GLY)";
    let s = Selection::parse(expr).unwrap();
    assert_eq!(s.to_string(), expr);
    assert_eq!(s.text(), expr);
    assert_eq!(
        s.describe(),
        "(not (name H*)) and ((resid 1-10) or (resname GLY))"
    );
    // The canonical form selects the same atoms.
    let top = adk_psf();
    let again = Selection::parse(&s.describe()).unwrap();
    assert_eq!(again.evaluate(top), s.evaluate(top));
    assert_eq!(again.describe(), s.describe());
}

/// A file of `datasets/interop/` (committed).
fn interop(name: &str) -> Topology {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/interop")
        .join(name);
    read_topology(&path).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn virtual_sites_and_beads_are_element_x() {
    // TIP4P: `all`, `water` and `resname SOL` keep the virtual sites MW (MDAnalysis: 14, 8, 8);
    // `heavy` leaves them out (N CA CB C O and two OW), `not name H*` keeps them (MDAnalysis 9).
    let tip4p = interop("tip4p_water.pdb");
    check(
        &tip4p,
        &[
            ("all", 14),
            ("water", 8),
            ("resname SOL", 8),
            ("heavy", 7),
            ("not name H*", 9),
            ("element X", 2),
            ("name MW", 2),
            ("hydrogen", 5),
            ("segid W", 8),
            ("segid A", 6),
        ],
    );
    // TIP5P: lone pairs LP/EP are virtual sites too (MDAnalysis guesses phosphorus for them).
    let tip5p = interop("tip5p_water.gro");
    check(
        &tip5p,
        &[
            ("all", 15),
            ("water", 15),
            ("heavy", 3),
            ("element X", 6),
            ("segid SYSTEM", 15),
        ],
    );
    // Martini beads with element X: `all` and segments select them, `heavy` finds none, and
    // select() says why.
    let cg = interop("martini.pdb");
    check(
        &cg,
        &[
            ("all", 17),
            ("element X", 17),
            ("heavy", 0),
            ("segid MEMB", 8),
            ("segid PROT and name BB", 3),
            ("resname W", 2),
        ],
    );
    let e = format!("{:#}", select(&cg, "heavy").unwrap_err());
    assert!(
        e.contains("17 of them have no element") && e.contains("`all` keeps"),
        "{e}"
    );
    // A Martini GRO (MDAnalysisTests): GL1/GL2 and the cholesterol beads R1-R5 have no element;
    // the others are guessed from their names as MDAnalysis does (NC3 N, PO4 P, C1A C, ROH O).
    let dppc = read_gro(&common::adk_data().join("martini_dppc_chol_bilayer.gro")).unwrap();
    check(
        &dppc,
        &[
            ("all", 5040),
            ("element X", 1170),
            ("heavy", 3870),
            ("resname CHOL", 720),
        ],
    );
}

#[test]
fn nesting_is_limited_not_a_stack_overflow() {
    // 10,000 nested parentheses and 30,000 `not`: a clean error, not an abort.
    let parens = format!("{}all{}", "(".repeat(10_000), ")".repeat(10_000));
    let e = parse_err(&parens);
    assert!(
        e.contains("nested more than 256 deep"),
        "{}",
        &e[e.len() - 200..]
    );
    let nots = format!("{}all", "not ".repeat(30_000));
    let e = parse_err(&nots);
    assert!(
        e.contains("nested more than 256 deep"),
        "{}",
        &e[e.len() - 200..]
    );
    // Within the limit they parse and mean what they say.
    let top = adk_psf();
    let ok = format!("{}name CA{}", "(".repeat(256), ")".repeat(256));
    assert_eq!(count(top, &ok), 214);
    let even = format!("{}name CA", "not ".repeat(256));
    assert_eq!(count(top, &even), 214);
    // Long flat chains of `or` and `and` are no nesting: 100,000 terms evaluate (as a binary
    // tree they were 100,000 deep, past the stack of a test thread).
    let chain = (0..100_000)
        .map(|i| format!("index {}", i % 10))
        .collect::<Vec<_>>()
        .join(" or ");
    assert_eq!(count(top, &chain), 10);
    let chain = vec!["all"; 100_000].join(" and ");
    assert_eq!(count(top, &chain), 3341);
}
