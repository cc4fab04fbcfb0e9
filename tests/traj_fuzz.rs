//! Fuzz tests of the trajectory readers: random byte mutations, word overwrites with boundary
//! values, insertions, deletions and truncations of valid files (crafted ones and the ADK files),
//! and random bytes, each fed to the reader of every format through a temp file.
//!
//! Property: opening and reading every frame returns `Ok` or an `Err` naming the file, never
//! panics (out-of-bounds reads, overflow in debug builds), and never makes a single allocation
//! out of proportion to the file size (a counting global allocator records the largest request).
//!
//! The default case counts keep the whole file under ~30 s in `cargo test --release` on 2 cores;
//! set `PROPTEST_CASES` for a longer run (it then applies to every test here).

mod common;
mod traj_write;

use hiermd::traj::{open_trajectory, Frame};
use proptest::prelude::*;
use proptest::sample::Index;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;
use traj_write::*;

/// Records the largest single allocation of each thread, so concurrent tests do not mix.
struct CountingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: no panic when called while the thread-local is being destroyed.
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Allowed largest allocation: the readers' fixed buffers (at most 4 MiB of read buffer) plus a
/// multiple of the file size (an XTC frame may decode to ~48 bytes per compressed byte).
fn allocation_limit(file_len: usize) -> usize {
    (8 << 20) + 64 * file_len
}

/// Cases per test: `PROPTEST_CASES` if set, else `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Opens and reads a file as format `ext`; checks the property.
fn exercise(ext: &str, bytes: &[u8]) {
    let file = TempFile::new(&format!("fuzz.{ext}"), bytes);
    LARGEST.with(|m| m.set(0));
    let result = (|| -> anyhow::Result<usize> {
        let mut r = open_trajectory(file.path())?;
        let mut frame = Frame::default();
        let mut n = 0;
        // Every frame consumes bytes, so this bound is never reached by a correct reader.
        while r.read_frame(&mut frame)? {
            assert_eq!(frame.coords.len(), 3 * r.natoms());
            assert!(frame.coords.iter().all(|x| x.is_finite()));
            n += 1;
            assert!(n <= bytes.len(), "more frames than bytes");
        }
        Ok(n)
    })();
    let largest = LARGEST.with(|m| m.get());
    assert!(
        largest <= allocation_limit(bytes.len()),
        "{ext}: allocated {largest} bytes at once for a {}-byte file",
        bytes.len()
    );
    if let Err(e) = result {
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&file.path().display().to_string()),
            "error does not name the file: {msg}"
        );
    }
}

/// Valid seed files per format: small crafted ones of every layout variant, and prefixes of the
/// ADK files (whole frames, for real compression streams and headers).
fn seeds() -> &'static [(&'static str, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut s = Vec::new();
        let dcd_frames = |natoms: usize| -> Vec<DcdFrame> {
            (0..3)
                .map(|k| DcdFrame {
                    coords: pseudo_random(3 * natoms, k, -20.0, 20.0),
                    cell: [30.0, 0.0, 31.0, 0.1, -0.2, 32.0],
                })
                .collect()
        };
        let spec = |big_endian, charmm, with_cell, four_dims, free: Option<Vec<i32>>| DcdSpec {
            big_endian,
            charmm,
            with_cell,
            four_dims,
            free,
            istart: 5,
            nsavc: 2,
            ..Default::default()
        };
        s.push((
            "dcd",
            dcd_bytes(&spec(false, true, true, false, None), 4, &dcd_frames(4)),
        ));
        s.push((
            "dcd",
            dcd_bytes(&spec(true, false, false, false, None), 3, &dcd_frames(3)),
        ));
        s.push((
            "dcd",
            dcd_bytes(
                &spec(true, true, true, true, Some(vec![1, 3])),
                4,
                &dcd_frames(4),
            ),
        ));
        let trr = |natoms: usize| -> Vec<TrrFrame> {
            let v = |seed| {
                Some(
                    pseudo_random(3 * natoms, seed, 0.0, 3.0)
                        .into_iter()
                        .map(f64::from)
                        .collect::<Vec<_>>(),
                )
            };
            vec![
                TrrFrame {
                    step: 1,
                    time: 0.5,
                    natoms,
                    box_nm: Some([3.0, 0.0, 0.0, 0.0, 3.0, 0.0, 1.0, 1.0, 2.5]),
                    x: v(1),
                    v: v(2),
                    ..Default::default()
                },
                TrrFrame {
                    step: 2,
                    natoms,
                    f: v(3),
                    vir: true,
                    ..Default::default()
                },
                TrrFrame {
                    step: 3,
                    natoms,
                    pres: true,
                    x: v(4),
                    ..Default::default()
                },
            ]
        };
        s.push(("trr", trr_bytes(&trr(3), false)));
        s.push(("trr", trr_bytes(&trr(2), true)));
        let xtc = |natoms: usize| -> Vec<XtcFrame> {
            (0..2)
                .map(|k| {
                    let mut c = pseudo_random(3 * natoms, 50 + k, 0.0, 4.0);
                    for a in (0..natoms.saturating_sub(1)).step_by(3) {
                        for d in 0..3 {
                            c[3 * (a + 1) + d] = c[3 * a + d] + 0.005;
                        }
                    }
                    XtcFrame {
                        step: k as i32,
                        time: k as f32,
                        box_nm: [4.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 4.0],
                        coords_nm: c,
                    }
                })
                .collect()
        };
        s.push(("xtc", xtc_bytes(&xtc(14), 1000.0, false)));
        s.push(("xtc", xtc_bytes(&xtc(12), 1.0e6, true)));
        s.push(("xtc", xtc_bytes(&xtc(2), 1000.0, false)));
        let frames: Vec<Vec<f32>> = (0..3)
            .map(|k| pseudo_random(9, 60 + k, -9.0, 9.0))
            .collect();
        let cells = [[40.0, 40.0, 40.0, 90.0, 90.0, 90.0]; 3];
        s.push(("pdb", pdb_models(&frames, Some(&cells)).into_bytes()));

        let dir = common::adk_data();
        let read = |f: &str| std::fs::read(dir.join(f)).expect("read ADK file");
        // adk_dims.dcd: header and the first two frames.
        let dcd = read("adk_dims.dcd");
        let frame = 3 * (4 * 3341 + 8);
        let header = dcd.len() - 98 * frame;
        s.push(("dcd", dcd[..header + 2 * frame].to_vec()));
        // adk_oplsaa.xtc: the first frame (its byte count sits at offset 88).
        let xtc_real = read("adk_oplsaa.xtc");
        let nbytes = u32::from_be_bytes(xtc_real[88..92].try_into().unwrap()) as usize;
        s.push(("xtc", xtc_real[..92 + nbytes.div_ceil(4) * 4].to_vec()));
        // adk_open.pdb: header records and the first 40 atoms.
        let pdb = String::from_utf8(read("adk_open.pdb")).unwrap();
        let head: String = pdb.lines().take(45).map(|l| format!("{l}\n")).collect();
        s.push(("pdb", head.into_bytes()));
        s
    })
}

/// One edit of a seed file.
#[derive(Clone, Debug)]
enum Edit {
    /// Overwrite one byte.
    Byte(Index, u8),
    /// Overwrite an aligned 4-byte word with a boundary value, in either byte order.
    Word(Index, i32, bool),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Delete up to n bytes.
    Delete(Index, usize),
    /// Cut the file.
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let words = prop_oneof![
        Just(0i32),
        Just(1),
        Just(-1),
        Just(4),
        Just(9),
        Just(10),
        Just(12),
        Just(48),
        Just(80),
        Just(84),
        Just(1993),
        Just(1995),
        Just(2023),
        Just(100_000_001),
        Just(i32::MAX),
        Just(i32::MIN),
        Just(f32::NAN.to_bits() as i32),
        Just(f32::INFINITY.to_bits() as i32),
        any::<i32>(),
    ];
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        4 => (any::<Index>(), words, any::<bool>()).prop_map(|(i, w, be)| Edit::Word(i, w, be)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    let len = bytes.len();
    if len == 0 {
        return;
    }
    match e {
        Edit::Byte(i, b) => bytes[i.index(len)] = *b,
        Edit::Word(i, w, be) => {
            if len >= 4 {
                let at = i.index(len / 4) * 4;
                let b = if *be {
                    w.to_be_bytes()
                } else {
                    w.to_le_bytes()
                };
                bytes[at..at + 4].copy_from_slice(&b);
            }
        }
        Edit::Insert(i, v) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Edit::Delete(i, n) => {
            let at = i.index(len);
            bytes.drain(at..(at + n).min(len));
        }
        Edit::Truncate(i) => bytes.truncate(i.index(len)),
    }
}

proptest! {
    #![proptest_config(config(20000))]

    /// Edited seed files, read as their own format.
    #[test]
    fn edited_files_never_panic(seed in any::<Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let seeds = seeds();
        let (ext, bytes) = &seeds[seed.index(seeds.len())];
        let mut bytes = bytes.clone();
        for e in &edits {
            apply(&mut bytes, e);
        }
        exercise(ext, &bytes);
    }
}

proptest! {
    #![proptest_config(config(6000))]

    /// Seed files of one format read as another (wrong-magic paths) and random bytes, read as
    /// every format.
    #[test]
    fn foreign_and_random_bytes_never_panic(
        seed in any::<Index>(),
        cut in any::<Index>(),
        random in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let seeds = seeds();
        let (_, bytes) = &seeds[seed.index(seeds.len())];
        let prefix = &bytes[..cut.index(bytes.len() + 1)];
        for ext in ["dcd", "xtc", "trr", "pdb"] {
            exercise(ext, prefix);
            exercise(ext, &random);
        }
    }
}

/// Atom counts: small, large but accepted, just over the limit, and absurd.
fn natoms_value() -> impl Strategy<Value = i32> {
    prop_oneof![
        4 => 0i32..40,
        1 => Just(1_000_000),
        1 => Just(60_000_000),
        1 => Just(100_000_000),
        1 => Just(100_000_001),
        1 => Just(i32::MAX),
        1 => Just(-5),
        1 => any::<i32>(),
    ]
}

fn be(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

proptest! {
    #![proptest_config(config(15000))]

    /// Well-formed headers with random counts, flags and sizes, followed by random bytes, so the
    /// parsers get past their first checks with every atom count from 0 to absurd.
    #[test]
    fn structured_headers_never_panic(
        natoms in natoms_value(),
        natoms_again in prop_oneof![3 => Just(None), 1 => natoms_value().prop_map(Some)],
        small in prop::collection::vec(-2i32..300, 16),
        flags in any::<[bool; 6]>(),
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let natoms2 = natoms_again.unwrap_or(natoms);
        let pick = |k: usize, big: i32| if flags[k % 6] { big } else { small[k] };

        // XTC: header, compression parameters, byte count, stream.
        let magic = if flags[0] { 1995 } else { 2023 };
        let mut xtc = be(&[magic, natoms, 7, 0]);
        xtc.extend(be(&[pick(0, 3.0f32.to_bits() as i32); 9]));
        xtc.extend(be(&[natoms2, 1000.0f32.to_bits() as i32]));
        xtc.extend(be(&small[1..7]));
        xtc.extend(be(&[small[7].rem_euclid(80)]));
        let nbytes = pick(8, body.len() as i32);
        if magic == 2023 {
            xtc.extend((nbytes as i64).to_be_bytes());
        } else {
            xtc.extend(be(&[nbytes]));
        }
        xtc.extend_from_slice(&body);
        exercise("xtc", &xtc);

        // TRR: sizes consistent with natoms or random.
        let real = if flags[1] { 8 } else { 4 };
        let vec_size = |k: usize| if flags[k % 6] { natoms.wrapping_mul(3 * real) } else { small[k] };
        let mut trr = be(&[1993, 13, 12]);
        trr.extend_from_slice(b"GMX_trn_file");
        trr.extend(be(&[0, 0, pick(2, 9 * real), pick(3, 9 * real), pick(4, 9 * real), 0, 0]));
        trr.extend(be(&[vec_size(5), vec_size(6), vec_size(7), natoms, 12, 0]));
        trr.extend_from_slice(&body);
        exercise("trr", &trr);

        // DCD: valid records around random counts and flags, either byte order.
        let big = flags[2];
        let enc = |v: &[i32]| -> Vec<u8> {
            v.iter().flat_map(|x| if big { x.to_be_bytes() } else { x.to_le_bytes() }).collect()
        };
        let mut icntrl = [0i32; 20];
        icntrl[0] = small[9];
        icntrl[8] = if flags[3] { small[10].rem_euclid(4) } else { 0 };
        icntrl[10] = flags[4] as i32;
        icntrl[11] = flags[5] as i32;
        icntrl[19] = if flags[0] { 24 } else { 0 };
        let mut dcd = enc(&[84]);
        dcd.extend_from_slice(b"CORD");
        dcd.extend(enc(&icntrl));
        let ntitle = small[11].rem_euclid(3);
        dcd.extend(enc(&[84, 4 + 80 * ntitle, ntitle]));
        dcd.extend(std::iter::repeat_n(b' ', 80 * ntitle as usize));
        dcd.extend(enc(&[4 + 80 * ntitle, 4, natoms, 4]));
        if icntrl[8] > 0 {
            let nfree = natoms.wrapping_sub(icntrl[8]);
            dcd.extend(enc(&[nfree.wrapping_mul(4)]));
            dcd.extend(enc(&small[12..16]));
        }
        dcd.extend_from_slice(&body);
        exercise("dcd", &dcd);

        let mut pdb = b"MODEL        1\nATOM      1  CA  ALA A   1    ".to_vec();
        pdb.extend_from_slice(&body);
        exercise("pdb", &pdb);
    }
}
