//! Atom selections: a small MDAnalysis-like language evaluated over a [`Topology`].
//!
//! ```text
//! expr     := or
//! or       := and ("or" and)*
//! and      := not ("and" not)*
//! not      := "not" not | "(" expr ")" | keyword
//! keyword  := "all" | "heavy" | "hydrogen" | "protein" | "nucleic" | "backbone"
//!           | "nucleicbackbone" | "water"
//!           | ("name" | "resname" | "chain" | "chainID" | "segid") pattern+
//!           | "element" symbol+
//!           | ("resid" | "resindex" | "index") range+
//! pattern  := text, with `*` (any run) and `?` (any one character) wildcards; case-sensitive
//! range    := N | N-M | N:M | N to M (inclusive; N may be negative for resid)
//! ```
//!
//! Precedence: `not` binds tighter than `and`, which binds tighter than `or`; parentheses group.
//! Keywords and operators are lower case, as in MDAnalysis; value lists run until the next
//! keyword, operator or parenthesis. Parentheses and `not` may nest at most [`MAX_DEPTH`] deep
//! (an error says so, where a deeper expression would overflow the stack); chains of `and` and
//! `or` are flat and may be as long as wanted.
//!
//! Meanings (the residue lists are MDAnalysis 2.11's, so selections agree with it):
//! - `hydrogen`: atomic number 1, or element unknown (Z = 0) and the name starts with `H`;
//!   `heavy`: a known element other than hydrogen (Z >= 2), so neither virtual sites (TIP4P's
//!   `MW`, TIP5P's `LP`/`EP`) nor coarse-grained beads of unknown element (Martini's `GL1`):
//!   unlike MDAnalysis's `not name H*`, which keeps them; `all` keeps every atom;
//! - `protein`: residue names of MDAnalysis's `ProteinSelection` (the 20 amino acids, CHARMM
//!   `HSD`/`HSE`/`HSP`, Amber `HID`/`HIE`/`HIP`/`CYX`/`CYM`/`ASH`/`GLH`/`LYN` and N/C-terminal
//!   variants `NALA`/`CALA`..., GROMACS variants, `MSE`, caps `ACE`/`NME`; not `NMA`);
//! - `nucleic`: MDAnalysis's `NucleicSelection` (`ADE CYT GUA THY URA`, `DA DC DG DT`, `RA RC RG
//!   RU`, `A C G T U`, and the 5'/3' variants `DA5`, `RA3`, ...);
//! - `backbone`: atoms `N CA C O` of protein residues (not the C-terminal `OT1`/`OT2`/`OXT`), as
//!   MDAnalysis; the nucleic-acid backbone is the separate `nucleicbackbone`: `P O5' C5' C3' O3'`
//!   of nucleic residues;
//! - `water`: MDAnalysis's `WaterSelection` (`HOH WAT SOL TIP3 T3P H2O ...`);
//! - `resid`: residue numbers as in the file; `resindex`: 0-based consecutive residue index
//!   ([`Topology::residue_indices`]); `index`: 0-based atom index;
//! - `chain` (also `chainID`): the atom's chain; `segid`: its segment id;
//! - `element`: element symbols, case-insensitive (`X` selects atoms of unknown element).

use crate::topology::{element, Topology};
use anyhow::{bail, Result};
use std::fmt;

/// MDAnalysis 2.11 `ProteinSelection.prot_res`.
const PROTEIN: &[&str] = &[
    "ACE", "ALA", "ALAD", "ARG", "ARGN", "ASF", "ASH", "ASN", "ASN1", "ASP", "ASPH", "CALA",
    "CARG", "CASF", "CASN", "CASP", "CCYS", "CCYX", "CGLN", "CGLU", "CGLY", "CHID", "CHIE", "CHIP",
    "CILE", "CLEU", "CLYS", "CME", "CMET", "CPHE", "CPRO", "CSER", "CTHR", "CTRP", "CTYR", "CVAL",
    "CYM", "CYS", "CYS1", "CYS2", "CYSH", "CYX", "DAB", "GLH", "GLN", "GLU", "GLUH", "GLY", "HID",
    "HIE", "HIP", "HIS", "HIS1", "HIS2", "HISA", "HISB", "HISD", "HISE", "HISH", "HSD", "HSE",
    "HSP", "HYP", "ILE", "LEU", "LYN", "LYS", "LYSH", "MET", "MSE", "NALA", "NARG", "NASN", "NASP",
    "NCYS", "NCYX", "NGLN", "NGLU", "NGLY", "NHID", "NHIE", "NHIP", "NILE", "NLEU", "NLYS", "NME",
    "NMET", "NPHE", "NPRO", "NSER", "NTHR", "NTRP", "NTYR", "NVAL", "ORN", "PGLU", "PHE", "PRO",
    "QLN", "SER", "THR", "TRP", "TYR", "VAL",
];

/// MDAnalysis 2.11 `NucleicSelection.nucl_res`.
const NUCLEIC: &[&str] = &[
    "A", "ADE", "C", "CYT", "DA", "DA3", "DA5", "DC", "DC3", "DC5", "DG", "DG3", "DG5", "DT",
    "DT3", "DT5", "G", "GUA", "RA", "RA3", "RA5", "RC", "RC3", "RC5", "RG", "RG3", "RG5", "RU",
    "RU3", "RU5", "T", "THY", "U", "URA",
];

/// MDAnalysis 2.11 `WaterSelection.water_res`.
const WATER: &[&str] = &[
    "H2O", "HHO", "HOH", "OH2", "OHH", "SOL", "T3P", "T4P", "T5P", "TIP", "TIP2", "TIP3", "TIP4",
    "WAT",
];

/// Protein backbone atom names (MDAnalysis `BackboneSelection.bb_atoms`).
const BACKBONE: &[&str] = &["N", "CA", "C", "O"];

/// Nucleic-acid backbone atom names (MDAnalysis `NucleicBackboneSelection.bb_atoms`).
const NUCLEIC_BACKBONE: &[&str] = &["P", "O5'", "C5'", "C3'", "O3'"];

/// Keywords without values.
const FLAGS: &[&str] = &[
    "all",
    "heavy",
    "hydrogen",
    "protein",
    "nucleic",
    "backbone",
    "nucleicbackbone",
    "water",
];

/// Keywords taking values.
const VALUED: &[&str] = &[
    "name", "resname", "chain", "chainID", "segid", "element", "resid", "resindex", "index",
];

/// Deepest nesting of parentheses and `not` a selection may have: far beyond any hand-written
/// expression, and far below what would overflow the stack of the recursive parser.
pub const MAX_DEPTH: usize = 256;

/// Whether an atom is a hydrogen: Z = 1, or unknown element and a name starting with `H`.
pub fn is_hydrogen(atom: &crate::topology::Atom) -> bool {
    atom.atomic_number == 1 || (atom.atomic_number == 0 && atom.name.starts_with('H'))
}

/// A parsed selection; [`Display`](fmt::Display) gives back the expression verbatim (for
/// manifests), [`Selection::describe`] a fully parenthesised canonical form.
#[derive(Clone, Debug)]
pub struct Selection {
    text: String,
    expr: Expr,
}

/// Text fields a pattern keyword matches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Field {
    Name,
    Resname,
    Chain,
    Segid,
}

/// Number fields a range keyword matches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Number {
    Resid,
    Resindex,
    Index,
}

/// The syntax tree.
#[derive(Clone, Debug)]
enum Expr {
    Flag(&'static str),
    Patterns(Field, Vec<String>),
    Elements(Vec<u8>, Vec<String>),
    Ranges(Number, Vec<(i64, i64)>, Vec<String>),
    Not(Box<Expr>),
    /// Two or more terms: a chain of `and` is one node, so a long chain is no deep tree.
    And(Vec<Expr>),
    /// Two or more terms, as `And`.
    Or(Vec<Expr>),
}

/// A token with its byte offset in the expression.
#[derive(Clone, Debug)]
struct Token<'a> {
    text: &'a str,
    pos: usize,
}

/// Splits an expression into words and parentheses.
fn tokenize(s: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() || c == '(' || c == ')' {
            if let Some(a) = start.take() {
                out.push(Token {
                    text: &s[a..i],
                    pos: a,
                });
            }
            if c == '(' || c == ')' {
                out.push(Token {
                    text: &s[i..i + 1],
                    pos: i,
                });
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(a) = start {
        out.push(Token {
            text: &s[a..],
            pos: a,
        });
    }
    out
}

/// Whether a token ends a value list.
fn is_reserved(t: &str) -> bool {
    matches!(t, "and" | "or" | "not" | "(" | ")" | "to")
        || FLAGS.contains(&t)
        || VALUED.contains(&t)
}

/// Recursive-descent parser over the tokens.
struct Parser<'a> {
    src: &'a str,
    toks: Vec<Token<'a>>,
    i: usize,
    /// Parentheses and `not` open around the current token.
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&Token<'a>> {
        self.toks.get(self.i)
    }

    /// Byte offset of the current token, or the end of the expression.
    fn here(&self) -> usize {
        self.peek().map_or(self.src.len(), |t| t.pos)
    }

    /// An error at byte offset `pos`, with the expression and a caret under the place.
    fn error(&self, pos: usize, msg: &str) -> anyhow::Error {
        self.error_hint(pos, msg, "")
    }

    /// Like [`Parser::error`], with a hint on a last line.
    fn error_hint(&self, pos: usize, msg: &str, hint: &str) -> anyhow::Error {
        let col = self.src[..pos.min(self.src.len())].chars().count();
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!("\n{hint}")
        };
        anyhow::anyhow!(
            "bad selection {:?}: {msg} at column {}\n  {}\n  {}^{hint}",
            self.src,
            col + 1,
            self.src,
            " ".repeat(col)
        )
    }

    fn or(&mut self) -> Result<Expr> {
        let mut terms = vec![self.and()?];
        while self.peek().is_some_and(|t| t.text == "or") {
            self.i += 1;
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one term")
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr> {
        let mut terms = vec![self.not()?];
        while self.peek().is_some_and(|t| t.text == "and") {
            self.i += 1;
            terms.push(self.not()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one term")
        } else {
            Expr::And(terms)
        })
    }

    /// Enters one more level of parentheses or `not` at token `t`; an error past [`MAX_DEPTH`].
    fn deeper(&mut self, t: &Token<'a>) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(
                t.pos,
                &format!("parentheses and `not` nested more than {MAX_DEPTH} deep"),
            ));
        }
        Ok(())
    }

    fn not(&mut self) -> Result<Expr> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.error(self.here(), "expected a selection, found the end"));
        };
        match t.text {
            "not" => {
                self.deeper(&t)?;
                self.i += 1;
                let e = Expr::Not(Box::new(self.not()?));
                self.depth -= 1;
                Ok(e)
            }
            "(" => {
                self.deeper(&t)?;
                self.i += 1;
                let e = self.or()?;
                self.depth -= 1;
                match self.peek() {
                    Some(c) if c.text == ")" => {
                        self.i += 1;
                        Ok(e)
                    }
                    Some(c) => Err(self.error(c.pos, &format!("expected `)`, found {:?}", c.text))),
                    None => Err(self.error(t.pos, "unclosed `(`")),
                }
            }
            _ => self.keyword(),
        }
    }

    /// The values after a keyword, up to the next reserved word.
    fn values(&mut self, kw: &Token<'a>) -> Result<Vec<Token<'a>>> {
        let mut out = Vec::new();
        while let Some(t) = self.peek() {
            // `to` continues a range (`resid 1 to 5`) once a value was read.
            let continues_range = t.text == "to" && !out.is_empty();
            if is_reserved(t.text) && !continues_range {
                break;
            }
            out.push(t.clone());
            self.i += 1;
        }
        if out.is_empty() {
            return Err(self.error(
                self.here(),
                &format!("`{}` needs at least one value", kw.text),
            ));
        }
        Ok(out)
    }

    fn keyword(&mut self) -> Result<Expr> {
        let t = self.peek().cloned().expect("caller checked");
        self.i += 1;
        if let Some(f) = FLAGS.iter().find(|f| **f == t.text) {
            return Ok(Expr::Flag(f));
        }
        let field = match t.text {
            "name" => Some(Field::Name),
            "resname" => Some(Field::Resname),
            "chain" | "chainID" => Some(Field::Chain),
            "segid" => Some(Field::Segid),
            _ => None,
        };
        if let Some(field) = field {
            let vals = self.values(&t)?;
            return Ok(Expr::Patterns(
                field,
                vals.iter().map(|v| v.text.to_string()).collect(),
            ));
        }
        if t.text == "element" {
            let vals = self.values(&t)?;
            let mut zs = Vec::new();
            for v in &vals {
                if v.text.eq_ignore_ascii_case("X") {
                    zs.push(0);
                } else if let Some(z) = element::from_symbol(v.text).filter(|_| {
                    !v.text.eq_ignore_ascii_case("D") && !v.text.eq_ignore_ascii_case("T")
                }) {
                    zs.push(z);
                } else {
                    return Err(self.error(v.pos, &format!("unknown element {:?}", v.text)));
                }
            }
            return Ok(Expr::Elements(
                zs,
                vals.iter().map(|v| v.text.to_string()).collect(),
            ));
        }
        let number = match t.text {
            "resid" => Some(Number::Resid),
            "resindex" => Some(Number::Resindex),
            "index" => Some(Number::Index),
            _ => None,
        };
        if let Some(number) = number {
            let vals = self.values(&t)?;
            let mut ranges = Vec::new();
            let mut words = Vec::new();
            let mut k = 0;
            while k < vals.len() {
                let v = &vals[k];
                let mut r = parse_range(v.text).ok_or_else(|| {
                    self.error(
                        v.pos,
                        &format!("bad {} range {:?} (expected N, N-M or N:M)", t.text, v.text),
                    )
                })?;
                let mut word = v.text.to_string();
                // `N to M`
                if r.0 == r.1 && vals.get(k + 1).is_some_and(|x| x.text == "to") {
                    let end = vals
                        .get(k + 2)
                        .ok_or_else(|| self.error(self.here(), "expected a number after `to`"))?;
                    let m = parse_int(end.text).ok_or_else(|| {
                        self.error(end.pos, &format!("bad number {:?} after `to`", end.text))
                    })?;
                    r.1 = m;
                    word = format!("{}:{}", r.0, m);
                    k += 2;
                }
                if r.0 > r.1 {
                    return Err(
                        self.error(v.pos, &format!("empty range {:?}: start after end", v.text))
                    );
                }
                if number != Number::Resid && r.0 < 0 {
                    return Err(self.error(
                        v.pos,
                        &format!("{} values are 0-based, {:?} is negative", t.text, v.text),
                    ));
                }
                ranges.push(r);
                words.push(word);
                k += 1;
            }
            return Ok(Expr::Ranges(number, ranges, words));
        }
        let msg = match t.text {
            "and" | "or" => format!("`{}` needs a selection on its left", t.text),
            ")" => "expected a selection, found `)`".to_string(),
            "to" => "`to` outside a range".to_string(),
            w => {
                let hint = format!(
                    "keywords: {}, {}; operators: and, or, not, parentheses",
                    FLAGS.join(", "),
                    VALUED.join(", ")
                );
                return Err(self.error_hint(t.pos, &format!("unknown keyword {w:?}"), &hint));
            }
        };
        Err(self.error(t.pos, &msg))
    }
}

/// Parses a decimal integer.
fn parse_int(s: &str) -> Option<i64> {
    s.parse::<i64>().ok()
}

/// Parses `N`, `N-M` or `N:M` (N and M may be negative: `-5--1`, `-5:-1`).
fn parse_range(s: &str) -> Option<(i64, i64)> {
    if let Some(n) = parse_int(s) {
        return Some((n, n));
    }
    // The separator is the first `:` or `-` after the first character (a leading `-` is a sign).
    let sep = s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == ':' || c == '-')
        .map(|(i, _)| i)?;
    let a = parse_int(&s[..sep])?;
    let b = parse_int(&s[sep + 1..])?;
    Some((a, b))
}

/// Glob match with `*` and `?`.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Selection {
    /// Parses an expression; errors say what is wrong and where (column and caret).
    pub fn parse(text: &str) -> Result<Self> {
        let mut p = Parser {
            src: text,
            toks: tokenize(text),
            i: 0,
            depth: 0,
        };
        if p.toks.is_empty() {
            bail!("empty selection expression");
        }
        let expr = p.or()?;
        if let Some(t) = p.peek() {
            let msg = match t.text {
                ")" => "unmatched `)`".to_string(),
                w => format!("expected `and`, `or` or the end, found {w:?}"),
            };
            return Err(p.error(t.pos, &msg));
        }
        Ok(Self {
            text: text.to_string(),
            expr,
        })
    }

    /// The expression as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A fully parenthesised canonical form (`(name CA) and (not (resid 1-5))`), showing how the
    /// expression was understood.
    pub fn describe(&self) -> String {
        fn go(e: &Expr) -> String {
            match e {
                Expr::Flag(f) => f.to_string(),
                Expr::Patterns(f, v) => {
                    let kw = match f {
                        Field::Name => "name",
                        Field::Resname => "resname",
                        Field::Chain => "chain",
                        Field::Segid => "segid",
                    };
                    format!("{kw} {}", v.join(" "))
                }
                Expr::Elements(_, v) => format!("element {}", v.join(" ")),
                Expr::Ranges(n, _, v) => {
                    let kw = match n {
                        Number::Resid => "resid",
                        Number::Resindex => "resindex",
                        Number::Index => "index",
                    };
                    format!("{kw} {}", v.join(" "))
                }
                Expr::Not(a) => format!("not ({})", go(a)),
                Expr::And(terms) => chain(terms, "and"),
                Expr::Or(terms) => chain(terms, "or"),
            }
        }
        // Left-nested, as the binary operators associate: `((a) and (b)) and (c)`.
        fn chain(terms: &[Expr], op: &str) -> String {
            let mut out = go(&terms[0]);
            for t in &terms[1..] {
                out = format!("({out}) {op} ({})", go(t));
            }
            out
        }
        go(&self.expr)
    }

    /// Indices (sorted, 0-based) of the atoms of `top` selected; may be empty.
    pub fn evaluate(&self, top: &Topology) -> Vec<usize> {
        let mut residx: Option<Vec<u32>> = None;
        let mask = eval(&self.expr, top, &mut residx);
        mask.iter()
            .enumerate()
            .filter_map(|(i, &m)| m.then_some(i))
            .collect()
    }
}

impl fmt::Display for Selection {
    /// The expression verbatim.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Evaluates a node to a mask over the atoms; residue indices are computed once, when needed.
fn eval(e: &Expr, top: &Topology, residx: &mut Option<Vec<u32>>) -> Vec<bool> {
    let atoms = &top.atoms;
    let by = |f: &dyn Fn(usize) -> bool| (0..atoms.len()).map(f).collect::<Vec<bool>>();
    match e {
        Expr::Flag(flag) => match *flag {
            "all" => vec![true; atoms.len()],
            "hydrogen" => by(&|i| is_hydrogen(&atoms[i])),
            // Atoms of unknown element (virtual sites such as TIP4P MW, coarse-grained beads)
            // are not heavy atoms.
            "heavy" => by(&|i| atoms[i].atomic_number >= 2),
            "protein" => by(&|i| PROTEIN.contains(&atoms[i].resname.as_str())),
            "nucleic" => by(&|i| NUCLEIC.contains(&atoms[i].resname.as_str())),
            "water" => by(&|i| WATER.contains(&atoms[i].resname.as_str())),
            "backbone" => by(&|i| {
                PROTEIN.contains(&atoms[i].resname.as_str())
                    && BACKBONE.contains(&atoms[i].name.as_str())
            }),
            "nucleicbackbone" => by(&|i| {
                NUCLEIC.contains(&atoms[i].resname.as_str())
                    && NUCLEIC_BACKBONE.contains(&atoms[i].name.as_str())
            }),
            other => unreachable!("flag {other} is in FLAGS"),
        },
        Expr::Patterns(field, pats) => by(&|i| {
            let a = &atoms[i];
            let v = match field {
                Field::Name => &a.name,
                Field::Resname => &a.resname,
                Field::Chain => &a.chain,
                Field::Segid => &a.segid,
            };
            pats.iter().any(|p| glob(p, v))
        }),
        Expr::Elements(zs, _) => by(&|i| zs.contains(&atoms[i].atomic_number)),
        Expr::Ranges(number, ranges, _) => {
            if *number == Number::Resindex && residx.is_none() {
                *residx = Some(top.residue_indices());
            }
            let ri = residx.as_deref();
            by(&|i| {
                let v = match number {
                    Number::Resid => atoms[i].resid as i64,
                    Number::Resindex => ri.map_or(0, |r| r[i] as i64),
                    Number::Index => i as i64,
                };
                ranges.iter().any(|&(a, b)| a <= v && v <= b)
            })
        }
        Expr::Not(a) => eval(a, top, residx).into_iter().map(|m| !m).collect(),
        Expr::And(terms) => {
            let mut mask = eval(&terms[0], top, residx);
            for t in &terms[1..] {
                for (m, x) in mask.iter_mut().zip(eval(t, top, residx)) {
                    *m &= x;
                }
            }
            mask
        }
        Expr::Or(terms) => {
            let mut mask = eval(&terms[0], top, residx);
            for t in &terms[1..] {
                for (m, x) in mask.iter_mut().zip(eval(t, top, residx)) {
                    *m |= x;
                }
            }
            mask
        }
    }
}

/// Selects atoms of `top` with an expression (see the module docs): sorted 0-based indices.
/// Errors on a malformed expression (saying what and where) and on an empty selection (naming
/// the expression).
pub fn select(top: &Topology, expr: &str) -> Result<Vec<usize>> {
    let sel = Selection::parse(expr)?;
    let idx = sel.evaluate(top);
    if idx.is_empty() {
        // A coarse-grained system has no atom of known element: say why `heavy` found nothing.
        let unknown = top.atoms.iter().filter(|a| a.atomic_number == 0).count();
        let hint = if unknown > 0 {
            format!(
                "; {unknown} of them have no element (X: virtual sites or coarse-grained beads), \
                 which `heavy` leaves out and `all` keeps"
            )
        } else {
            String::new()
        };
        bail!(
            "selection {expr:?} selects no atom of the {} atoms of {}{hint}",
            top.len(),
            top.source.display()
        );
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("H*", "HT1"));
        assert!(glob("H*", "H"));
        assert!(!glob("H*", "CA"));
        assert!(glob("C?", "CA"));
        assert!(!glob("C?", "C"));
        assert!(glob("*1", "HT1"));
        assert!(glob("*", ""));
        assert!(glob("O5'", "O5'"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("10"), Some((10, 10)));
        assert_eq!(parse_range("10-20"), Some((10, 20)));
        assert_eq!(parse_range("10:20"), Some((10, 20)));
        assert_eq!(parse_range("-5--1"), Some((-5, -1)));
        assert_eq!(parse_range("-5:3"), Some((-5, 3)));
        assert_eq!(parse_range("a-b"), None);
        assert_eq!(parse_range("-"), None);
    }

    #[test]
    fn depth_is_limited_and_chains_are_flat() {
        let deep = |n: usize| format!("{}all{}", "(".repeat(n), ")".repeat(n));
        assert!(Selection::parse(&deep(MAX_DEPTH)).is_ok());
        let e = Selection::parse(&deep(MAX_DEPTH + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nested more than 256 deep"), "{e}");
        let nots = format!("{}all", "not ".repeat(MAX_DEPTH + 1));
        assert!(Selection::parse(&nots).is_err());
        // A long flat chain is one node: no recursion per term.
        let chain = vec!["name CA"; 100_000].join(" or ");
        let s = Selection::parse(&chain).unwrap();
        assert!(matches!(&s.expr, Expr::Or(t) if t.len() == 100_000));
    }

    #[test]
    fn precedence() {
        let s = Selection::parse("not name CA and resid 1 or resid 2").unwrap();
        assert_eq!(s.describe(), "((not (name CA)) and (resid 1)) or (resid 2)");
        let s = Selection::parse("resid 1 to 5 10").unwrap();
        assert_eq!(s.describe(), "resid 1:5 10");
        assert_eq!(s.to_string(), "resid 1 to 5 10");
    }
}
