//! `.npy` files (src/npy.rs) and pictures (src/plot.rs): round trips, files as NumPy writes them,
//! errors that name the file, PNGs decoded here from scratch (chunks, CRCs, filters, pixels), and
//! SVGs checked for well-formedness, escaping, finite numbers and the embedded PNGs.

use hiermd::npy::{self, Dtype, NpyWriter};
use hiermd::plot::{
    self, category_color, coolwarm, nice_ticks, viridis, Colormap, Heatmap, LinePlot, ScatterPlot,
    Series,
};
use std::io::Read;
use std::path::PathBuf;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-plot-npy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes a test's folder, unless `HIERMD_KEEP_PLOTS` is set (to look at the pictures).
fn done(dir: PathBuf) {
    if std::env::var_os("HIERMD_KEEP_PLOTS").is_some() {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A small deterministic generator (xorshift), so the tests need no extra crates.
struct Xs(u64);

impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

// ------------------------------------------------------------------------------------------------
// npy

const SHAPES: [&[usize]; 6] = [&[7], &[3, 5], &[2, 3, 4], &[2, 1, 3, 2], &[0, 3], &[1]];

fn data_offset(bytes: &[u8]) -> usize {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "magic and version 1.0");
    10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize
}

#[test]
fn npy_round_trips_every_dtype_and_rank() {
    let dir = tmp_dir("roundtrip");
    let mut rng = Xs(0x9e3779b97f4a7c15);
    for (k, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let f32s: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let f64s: Vec<f64> = (0..n).map(|_| rng.normal() * 1e-7).collect();
        let i32s: Vec<i32> = (0..n).map(|_| rng.next() as i32).collect();
        let u8s: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();

        let p = dir.join(format!("a{k}_f32.npy"));
        npy::write_f32(&p, shape, &f32s).unwrap();
        assert_eq!(npy::read_f32(&p).unwrap(), (shape.to_vec(), f32s.clone()));
        let p = dir.join(format!("a{k}_f64.npy"));
        npy::write_f64(&p, shape, &f64s).unwrap();
        assert_eq!(npy::read_f64(&p).unwrap(), (shape.to_vec(), f64s.clone()));
        let p = dir.join(format!("a{k}_i32.npy"));
        npy::write_i32(&p, shape, &i32s).unwrap();
        assert_eq!(npy::read_i32(&p).unwrap(), (shape.to_vec(), i32s.clone()));
        let p = dir.join(format!("a{k}_u8.npy"));
        npy::write_u8(&p, shape, &u8s).unwrap();
        assert_eq!(npy::read_u8(&p).unwrap(), (shape.to_vec(), u8s.clone()));

        for (suffix, dtype) in [
            ("f32", Dtype::F32),
            ("f64", Dtype::F64),
            ("i32", Dtype::I32),
            ("u8", Dtype::U8),
        ] {
            let p = dir.join(format!("a{k}_{suffix}.npy"));
            let bytes = std::fs::read(&p).unwrap();
            let off = data_offset(&bytes);
            assert_eq!(off % 64, 0, "{suffix} {shape:?}: data 64-byte aligned");
            assert_eq!(bytes[off - 1], b'\n', "header ends with a newline");
            assert_eq!(bytes.len(), off + n * dtype.size());
            let h = npy::read_header(&p).unwrap();
            assert_eq!(h.descr, dtype.descr());
            assert_eq!(h.dtype(), Some(dtype));
            assert_eq!(h.shape, shape.to_vec());
            assert_eq!(h.data_offset, off);
            assert!(!h.fortran_order);
            assert_eq!(h.len().unwrap(), n);
            assert_eq!(npy::parse_header(&bytes).unwrap(), h);
            // The header is the one `npy::header` gives for streaming.
            assert_eq!(&bytes[..off], &npy::header(dtype, shape)[..]);
        }
    }
    // Python's tuple spelling: one-element tuples keep their comma; 0-d arrays work too.
    assert!(String::from_utf8_lossy(&npy::header(Dtype::F32, &[7])).contains("'shape': (7,), }"));
    let p = dir.join("scalar.npy");
    npy::write_f64(&p, &[], &[2.5]).unwrap();
    assert!(String::from_utf8_lossy(&std::fs::read(&p).unwrap()).contains("'shape': (), }"));
    assert_eq!(npy::read_f64(&p).unwrap(), (vec![], vec![2.5]));
    // Shape and data must agree.
    let e = npy::write_f32(dir.join("bad.npy"), &[2, 3], &[1.0; 5]).unwrap_err();
    assert!(format!("{e:#}").contains("bad.npy"), "{e:#}");
    assert!(!dir.join("bad.npy").exists());
    done(dir);
}

/// The exact bytes NumPy writes for `np.arange(6, dtype='<f4').reshape(2, 3)`: header dictionary
/// padded with spaces to 117 bytes plus a newline (header length 118 = 0x76, data at 128).
fn numpy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
    let mut h = dict.as_bytes().to_vec();
    h.resize(117, b' ');
    h.push(b'\n');
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

#[test]
fn npy_reads_numpy_files_and_rejects_bad_ones_naming_the_file() {
    let dir = tmp_dir("numpy");
    let f32_data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let good = numpy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        &f32_data,
    );
    assert_eq!(good.len(), 152, "as numpy.save writes it");
    let p = dir.join("from_numpy.npy");
    std::fs::write(&p, &good).unwrap();
    assert_eq!(
        npy::read_f32(&p).unwrap(),
        (vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    );
    // NumPy's u8 spelling and 1-d tuple.
    let p = dir.join("u8.npy");
    std::fs::write(
        &p,
        numpy_bytes(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }",
            &[1, 2, 3],
        ),
    )
    .unwrap();
    assert_eq!(npy::read_u8(&p).unwrap(), (vec![3], vec![1, 2, 3]));

    let err = |name: &str, bytes: &[u8], read_f64: bool| -> String {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = if read_f64 {
            npy::read_f64(&p).map(|_| ()).unwrap_err()
        } else {
            npy::read_f32(&p).map(|_| ()).unwrap_err()
        };
        let msg = format!("{e}");
        assert!(msg.contains(name), "error names the file: {msg}");
        msg
    };
    // Truncated data, truncated header, trailing bytes.
    let m = err("short.npy", &good[..good.len() - 3], false);
    assert!(m.contains("truncated") && m.contains("(2, 3)"), "{m}");
    let m = err("short_header.npy", &good[..60], false);
    assert!(m.contains("truncated"), "{m}");
    let m = err("tiny.npy", &good[..5], false);
    assert!(m.contains("not a .npy"), "{m}");
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    let m = err("long.npy", &long, false);
    assert!(m.contains("4 bytes after"), "{m}");
    // Wrong dtype: f32 file read as f64, and NumPy's default int64.
    let m = err("as_f64.npy", &good, true);
    assert!(
        m.contains("dtype") && m.contains("<f4") && m.contains("<f8"),
        "{m}"
    );
    let i8s: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
    let m = err(
        "int64.npy",
        &numpy_bytes(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
            &i8s,
        ),
        false,
    );
    assert!(m.contains("<i8"), "{m}");
    // Big-endian is another dtype.
    let m = err(
        "big_endian.npy",
        &numpy_bytes(
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }",
            &f32_data,
        ),
        false,
    );
    assert!(m.contains(">f4"), "{m}");
    // Fortran order, as numpy.save writes np.asfortranarray(...).
    let f64_data: Vec<u8> = (0..6).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let m = err(
        "fortran.npy",
        &numpy_bytes(
            "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }",
            &f64_data,
        ),
        true,
    );
    assert!(m.contains("Fortran"), "{m}");
    // A broken dictionary.
    let m = err(
        "garbled.npy",
        &numpy_bytes("{'descr': '<f4', 'shape': (2, x), }", &f32_data),
        false,
    );
    assert!(m.contains("header"), "{m}");
    // A missing file.
    let e = npy::read_f32(dir.join("absent.npy")).unwrap_err();
    assert!(format!("{e}").contains("absent.npy"));
    let e = npy::read_header(dir.join("short_header.npy")).unwrap_err();
    assert!(format!("{e}").contains("short_header.npy"));
    done(dir);
}

#[test]
fn npy_streaming_writer_checks_the_count() {
    let frames: Vec<Vec<f32>> = (0..4)
        .map(|f| (0..6).map(|i| (f * 10 + i) as f32).collect())
        .collect();
    let mut w = NpyWriter::new(Vec::new(), Dtype::F32, &[4, 2, 3]).unwrap();
    for fr in &frames {
        w.write(fr).unwrap();
    }
    let bytes = w.finish().unwrap();
    let h = npy::parse_header(&bytes).unwrap();
    assert_eq!(h.shape, vec![4, 2, 3]);
    assert_eq!(h.data_offset % 64, 0);
    let vals: Vec<f32> = bytes[h.data_offset..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, frames.concat());

    let mut w = NpyWriter::new(Vec::new(), Dtype::F32, &[2, 3]).unwrap();
    w.write(&[1.0f32; 3]).unwrap();
    assert!(w.write(&[1.0f64; 3]).is_err(), "dtype mismatch");
    assert!(w.write(&[1.0f32; 4]).is_err(), "too many elements");
    assert!(w.finish().is_err(), "too few elements");
}

// ------------------------------------------------------------------------------------------------
// PNG, decoded from scratch.

struct Png {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
    filters: Vec<u8>,
    idat_chunks: usize,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn decode_png(bytes: &[u8]) -> Png {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "signature");
    let mut pos = 8;
    let mut chunks = Vec::new();
    while pos < bytes.len() {
        let len = be32(&bytes[pos..]) as usize;
        let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
        let data = &bytes[pos + 8..pos + 8 + len];
        let crc = be32(&bytes[pos + 8 + len..]);
        let mut c = flate2::Crc::new();
        c.update(&kind);
        c.update(data);
        assert_eq!(
            c.sum(),
            crc,
            "CRC of chunk {}",
            String::from_utf8_lossy(&kind)
        );
        chunks.push((kind, data));
        pos += 12 + len;
    }
    assert_eq!(pos, bytes.len(), "nothing after the last chunk");
    assert_eq!(&chunks[0].0, b"IHDR", "IHDR first");
    assert_eq!(&chunks.last().unwrap().0, b"IEND", "IEND last");
    assert!(chunks.last().unwrap().1.is_empty());
    let ihdr = chunks[0].1;
    assert_eq!(ihdr.len(), 13);
    let (width, height) = (be32(ihdr) as usize, be32(&ihdr[4..]) as usize);
    assert_eq!(
        &ihdr[8..],
        &[8, 2, 0, 0, 0],
        "8-bit RGB, deflate, filter 0, no interlace"
    );
    let idat: Vec<u8> = chunks
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let idat_chunks = chunks.iter().filter(|(k, _)| k == b"IDAT").count();
    // IDAT chunks are consecutive.
    let first = chunks.iter().position(|(k, _)| k == b"IDAT").unwrap();
    assert!(chunks[first..first + idat_chunks]
        .iter()
        .all(|(k, _)| k == b"IDAT"));
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = width * 3;
    assert_eq!(raw.len(), height * (stride + 1), "one filter byte per row");
    let mut rgb = vec![0u8; height * stride];
    let mut filters = Vec::new();
    for y in 0..height {
        let f = raw[y * (stride + 1)];
        assert!(f <= 4, "filter type {f}");
        filters.push(f);
        for x in 0..stride {
            let v = raw[y * (stride + 1) + 1 + x];
            let a = if x >= 3 { rgb[y * stride + x - 3] } else { 0 } as i16;
            let b = if y > 0 { rgb[(y - 1) * stride + x] } else { 0 } as i16;
            let c = if x >= 3 && y > 0 {
                rgb[(y - 1) * stride + x - 3]
            } else {
                0
            } as i16;
            let pred = match f {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                _ => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
            };
            rgb[y * stride + x] = v.wrapping_add(pred as u8);
        }
    }
    Png {
        width,
        height,
        rgb,
        filters,
        idat_chunks,
    }
}

#[test]
fn png_decodes_to_the_pixels_written() {
    let dir = tmp_dir("png");
    let mut rng = Xs(12345);
    // Smooth gradients above, noise below: different rows want different filters.
    let (w, h) = (37, 29);
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if y < 20 {
                rgb.extend_from_slice(&[(x * 7) as u8, (y * 9) as u8, ((x + y) * 3) as u8]);
            } else {
                rgb.extend_from_slice(&[rng.next() as u8, rng.next() as u8, rng.next() as u8]);
            }
        }
    }
    let p = dir.join("img.png");
    plot::write_png(&p, w, h, &rgb).unwrap();
    let png = decode_png(&std::fs::read(&p).unwrap());
    assert_eq!((png.width, png.height), (w, h));
    assert_eq!(png.rgb, rgb);
    let mut kinds = png.filters.clone();
    kinds.sort_unstable();
    kinds.dedup();
    assert!(kinds.len() >= 2, "adaptive filtering: {kinds:?}");

    // One pixel; incompressible data spanning several IDAT chunks.
    let one = decode_png(&plot::encode_png(1, 1, &[1, 2, 3]).unwrap());
    assert_eq!(one.rgb, [1, 2, 3]);
    let (w, h) = (700, 700);
    let noise: Vec<u8> = (0..w * h * 3).map(|_| rng.next() as u8).collect();
    let big = decode_png(&plot::encode_png(w, h, &noise).unwrap());
    assert!(big.idat_chunks >= 2, "{} IDAT chunks", big.idat_chunks);
    assert_eq!(big.rgb, noise);

    // Bad sizes.
    assert!(plot::encode_png(0, 3, &[]).is_err());
    assert!(plot::encode_png(2, 2, &[0; 11]).is_err());
    let e = plot::write_png(dir.join("bad.png"), 2, 2, &[0; 5]).unwrap_err();
    assert!(format!("{e:#}").contains("bad.png"));
    done(dir);
}

// ------------------------------------------------------------------------------------------------
// Colour maps and ticks.

/// Relative luminance (WCAG) of an sRGB colour.
fn luminance(c: [u8; 3]) -> f64 {
    let lin = |v: u8| {
        let s = v as f64 / 255.0;
        if s <= 0.04045 {
            s / 12.92
        } else {
            ((s + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])
}

#[test]
fn colour_maps() {
    assert_eq!(viridis(0.0), [68, 1, 84]);
    assert_eq!(viridis(1.0), [253, 231, 37]);
    assert_eq!(viridis(0.5), [33, 145, 140]);
    assert_eq!(viridis(-3.0), viridis(0.0), "clamped");
    assert_eq!(viridis(7.0), viridis(1.0), "clamped");
    assert_eq!(viridis(f64::NAN), viridis(0.0), "NaN maps to the low end");
    // Luminance strictly increases at 101 samples, and never drops at 2001 (8-bit rounding
    // aside).
    let l: Vec<f64> = (0..=100)
        .map(|i| luminance(viridis(i as f64 / 100.0)))
        .collect();
    assert!(l.windows(2).all(|p| p[1] > p[0]), "viridis luminance {l:?}");
    let fine: Vec<f64> = (0..=2000)
        .map(|i| luminance(viridis(i as f64 / 2000.0)))
        .collect();
    assert!(fine.windows(2).all(|p| p[1] >= p[0] - 2e-3));

    let (blue, mid, red) = (coolwarm(0.0), coolwarm(0.5), coolwarm(1.0));
    assert_eq!(blue, [59, 76, 192]);
    assert_eq!(red, [180, 4, 38]);
    assert!(
        mid.iter().all(|&v| (215..=225).contains(&v)),
        "light grey {mid:?}"
    );
    // Diverging: luminance rises to the centre and falls after it.
    let l: Vec<f64> = (0..=20)
        .map(|i| luminance(coolwarm(i as f64 / 20.0)))
        .collect();
    assert!(l[..=10].windows(2).all(|p| p[1] > p[0]), "{l:?}");
    assert!(l[10..].windows(2).all(|p| p[1] < p[0]), "{l:?}");
    assert_eq!(Colormap::Coolwarm.rgb(0.25), coolwarm(0.25));

    // Categorical colours are distinct.
    let cats: Vec<[u8; 3]> = (0..40).map(category_color).collect();
    for i in 0..cats.len() {
        for j in 0..i {
            assert_ne!(cats[i], cats[j], "categories {i} and {j}");
        }
    }
}

#[test]
fn xml_escaping() {
    assert_eq!(
        plot::xml_escape("a<b & \"c\" 'd' >\u{1}\te"),
        "a&lt;b &amp; &quot;c&quot; &apos;d&apos; &gt; e"
    );
    // Every builder's text goes through it.
    let nasty = "x < y && z > \"w\"";
    for svg in [
        Heatmap::new(1, 2, &[0.0, 1.0])
            .title(nasty)
            .x_label(nasty)
            .y_label(nasty)
            .value_label(nasty)
            .x_ticks(vec![(0, nasty.into())])
            .to_svg()
            .unwrap(),
        LinePlot::new()
            .title(nasty)
            .x_label(nasty)
            .y_label(nasty)
            .series(Series::new(nasty, &[1.0, 2.0], &[1.0, 2.0]))
            .hline(1.5, nasty)
            .to_svg()
            .unwrap(),
        ScatterPlot::new(&[1.0, 2.0], &[1.0, 2.0])
            .title(nasty)
            .x_label(nasty)
            .y_label(nasty)
            .categories(&[0, 1])
            .category_names(vec![nasty.into()])
            .to_svg()
            .unwrap(),
        ScatterPlot::new(&[1.0, 2.0], &[1.0, 2.0])
            .values(&[1.0, 2.0], nasty)
            .to_svg()
            .unwrap(),
    ] {
        check_svg(&svg);
        assert!(!svg.contains(nasty));
        assert!(svg.contains("x &lt; y &amp;&amp; z &gt; &quot;w&quot;"));
    }
}

#[test]
fn ticks_are_nice_numbers() {
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    };
    let t = nice_ticks(0.0, 1.0, 6);
    assert!(close(&t, &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), "{t:?}");
    let t = nice_ticks(0.51, 0.98, 6);
    assert!(close(&t, &[0.6, 0.7, 0.8, 0.9]), "{t:?}");
    let t = nice_ticks(-3.7, 12.2, 6);
    assert!(close(&t, &[0.0, 5.0, 10.0]), "{t:?}");
    let t = nice_ticks(1234.0, 98765.0, 6);
    assert!(close(&t, &[2e4, 4e4, 6e4, 8e4]), "{t:?}");
    // Any range: steps are 1, 2 or 5 times a power of ten and ticks lie inside.
    let mut rng = Xs(99);
    for _ in 0..200 {
        let lo = rng.normal() * 10f64.powi((rng.unit() * 12.0) as i32 - 6);
        let hi = lo + rng.unit().max(1e-3) * 10f64.powi((rng.unit() * 12.0) as i32 - 6);
        let t = nice_ticks(lo, hi, 6);
        assert!(!t.is_empty() && t.len() <= 12, "{lo} {hi} {t:?}");
        let eps = 1e-9 * hi.abs().max(lo.abs());
        assert!(
            t.iter().all(|&v| v >= lo - eps && v <= hi + eps),
            "{lo} {hi} {t:?}"
        );
        if t.len() >= 2 {
            let step = t[1] - t[0];
            let m = step / 10f64.powf(step.log10().floor());
            assert!(
                // Loose: t[1] - t[0] cancels digits when the span is tiny next to the values.
                [1.0, 2.0, 5.0, 10.0].iter().any(|n| (m - n).abs() < 1e-3),
                "step {step} for {lo}..{hi}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// SVG checks.

/// A small XML well-formedness check: balanced and properly nested tags, one root element
/// `<svg>`, quoted attributes, `&` only in entities, no `<` in text.
fn check_xml(s: &str) {
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut i = 0;
    while let Some(p) = s[i..].find('<') {
        let text = &s[i..i + p];
        check_entities(text);
        let start = i + p;
        if s[start..].starts_with("<?") {
            i = start + s[start..].find("?>").expect("unterminated <?") + 2;
            continue;
        }
        if s[start..].starts_with("<!--") {
            i = start + s[start..].find("-->").expect("unterminated comment") + 3;
            continue;
        }
        let end = start + s[start..].find('>').expect("unterminated tag");
        let tag = &s[start + 1..end];
        assert!(!tag.contains('<'), "'<' inside tag {tag}");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in {tag}"
        );
        check_entities(tag);
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name.trim()), "closing </{name}>");
        } else {
            let name = tag
                .trim_end_matches('/')
                .split_whitespace()
                .next()
                .expect("tag name");
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg", "root element");
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        i = end + 1;
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    assert_eq!(roots, 1);
    assert!(s[i..].trim().is_empty());
}

fn check_entities(t: &str) {
    for (k, _) in t.match_indices('&') {
        let rest = &t[k..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| rest.starts_with(e)),
            "bare & in {t}"
        );
    }
}

/// The SVG without its base64 payloads (whose letters may spell anything).
fn without_data(svg: &str) -> String {
    let mut out = String::new();
    let mut rest = svg;
    while let Some(p) = rest.find("base64,") {
        out.push_str(&rest[..p + 7]);
        rest = &rest[p + 7..];
        rest = &rest[rest.find('"').unwrap()..];
    }
    out.push_str(rest);
    out
}

/// Well-formed, and no non-finite number anywhere.
fn check_svg(svg: &str) {
    check_xml(svg);
    let plain = without_data(svg);
    for bad in ["NaN", "inf", "Inf"] {
        assert!(!plain.contains(bad), "{bad} in the SVG");
    }
}

/// The PNGs embedded in an SVG, decoded.
fn embedded_pngs(svg: &str) -> Vec<Png> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(p) = rest.find("data:image/png;base64,") {
        rest = &rest[p + 22..];
        let end = rest.find('"').unwrap();
        out.push(decode_png(&unbase64(&rest[..end])));
        rest = &rest[end..];
    }
    out
}

fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    };
    let b = s.as_bytes();
    assert_eq!(b.len() % 4, 0);
    let mut out = Vec::new();
    for q in b.chunks(4) {
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = q.iter().take(4 - pad).fold(0u32, |n, &c| n << 6 | val(c)) << (6 * pad);
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

/// The cell colours of an embedded heat-map image: `rows` x `cols` blocks of `k` x `k` equal
/// pixels (small maps are stored with each cell repeated, large ones at one pixel per cell).
fn cells_of(png: &Png, rows: usize, cols: usize) -> Vec<[u8; 3]> {
    let k = png.width / cols;
    assert!(
        k >= 1 && png.width == k * cols && png.height == k * rows,
        "{} x {} image for {rows} x {cols} cells",
        png.width,
        png.height
    );
    assert!(
        png.width.max(png.height) >= 256 || k == 1,
        "small maps are upscaled"
    );
    let at = |y: usize, x: usize| {
        let o = (y * png.width + x) * 3;
        [png.rgb[o], png.rgb[o + 1], png.rgb[o + 2]]
    };
    let mut out = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            let v = at(r * k, c * k);
            for dy in 0..k {
                for dx in 0..k {
                    assert_eq!(at(r * k + dy, c * k + dx), v, "cell ({r}, {c}) is uniform");
                }
            }
            out.push(v);
        }
    }
    out
}

fn text_labels(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .map(|t| {
            let t = &t[t.find('>').unwrap() + 1..];
            t[..t.find("</text>").unwrap()].to_string()
        })
        .collect()
}

#[test]
fn heatmap_png_and_svg() {
    let dir = tmp_dir("heatmap");
    // A contact-map-like matrix with one non-finite cell.
    let n = 214;
    let mut m: Vec<f32> = (0..n * n)
        .map(|k| {
            let (i, j) = ((k / n) as f32, (k % n) as f32);
            (-(i - j).abs() / 8.0).exp()
        })
        .collect();
    m[5 * n + 7] = f32::NAN;
    let hm = Heatmap::new(n, n, &m)
        .title("Contacts <A & B>")
        .x_label("residue")
        .y_label("residue")
        .value_label("probability")
        .x_labels_with(|i| (i + 1).to_string())
        .y_labels((1..=n).map(|i| i.to_string()).collect());

    // Raster: each cell a square of at least 2 x 2 pixels.
    let p = dir.join("map.png");
    hm.save_png(&p).unwrap();
    let png = decode_png(&std::fs::read(&p).unwrap());
    assert_eq!(png.width, png.height);
    let s = png.width / n;
    assert!(s >= 2 && png.width == s * n, "scale {s}");
    let px = |r: usize, c: usize| {
        let o = (r * png.width + c) * 3;
        [png.rgb[o], png.rgb[o + 1], png.rgb[o + 2]]
    };
    // Range is the finite min..max: the diagonal is the max (1.0).
    let lo = m
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f32, |a, &b| a.min(b)) as f64;
    for (r, c) in [(0, 0), (3, 100), (200, 13), (213, 213)] {
        let v = m[r * n + c] as f64;
        let want = viridis((v - lo) / (1.0 - lo));
        for dy in 0..s {
            for dx in 0..s {
                assert_eq!(px(r * s + dy, c * s + dx), want, "cell ({r}, {c})");
            }
        }
    }
    assert_eq!(px(5 * s, 7 * s), [255, 255, 255], "non-finite cell");

    let svg = hm.to_svg().unwrap();
    check_svg(&svg);
    assert!(svg.contains("<title>Contacts &lt;A &amp; B&gt;</title>"));
    assert!(svg.contains(">Contacts &lt;A &amp; B&gt;</text>"));
    assert!(!svg.contains("<A & B>"));
    assert!(svg.contains("image-rendering:pixelated"));
    let labels = text_labels(&svg);
    // Residue numbers at round values: 20, 40, ..., 200 on both axes.
    for r in (20..=200).step_by(20) {
        let k = labels.iter().filter(|l| **l == r.to_string()).count();
        assert_eq!(k, 2, "tick {r} on both axes: {labels:?}");
    }
    assert!(!labels.iter().any(|l| l == "21"));
    for l in ["residue", "probability"] {
        assert!(labels.iter().any(|t| t == l), "{l}");
    }
    // Colour bar: the min and max values.
    assert!(labels.iter().any(|l| l == "1"), "{labels:?}");
    assert!(svg.contains("<desc>1 cell is not finite"), "note");
    let pngs = embedded_pngs(&svg);
    assert_eq!(pngs.len(), 1);
    let cells = cells_of(&pngs[0], n, n);
    assert_eq!(cells[0], viridis(1.0));
    assert_eq!(cells[5 * n + 7], [255, 255, 255]);
    assert_eq!(
        cells[3 * n + 100],
        px(3 * s, 100 * s),
        "same colours as the raster"
    );
    hm.save_svg(dir.join("map.svg")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("map.svg")).unwrap(), svg);

    // Rectangular, explicit ticks, diverging map symmetric about zero, 3 x 5 cells.
    let d = [
        -2.0, -1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    ];
    let hm = Heatmap::new(3, 5, &d)
        .colormap(Colormap::Coolwarm)
        .x_ticks(vec![(0, "first".into()), (4, "last".into())])
        .y_ticks(vec![(1, "middle".into())]);
    let svg = hm.to_svg().unwrap();
    hm.save_svg(dir.join("coolwarm.svg")).unwrap();
    check_svg(&svg);
    let cells = cells_of(&embedded_pngs(&svg)[0], 3, 5);
    assert_eq!(cells[0], coolwarm(0.0), "-2 is the low end");
    assert_eq!(cells[2], coolwarm(0.5), "0 is the centre");
    assert_eq!(cells[4], coolwarm(0.625));
    let labels = text_labels(&svg);
    for l in ["first", "last", "middle", "-2", "2"] {
        assert!(labels.iter().any(|t| t == l), "{l} in {labels:?}");
    }
    let (w, h, _) = hm.to_rgb().unwrap();
    assert_eq!(
        (w % 5, h % 3, w / 5, h / 3),
        (0, 0, w / 5, w / 5),
        "square cells"
    );

    // Errors.
    assert!(Heatmap::new(2, 2, &[1.0; 3]).to_svg().is_err());
    assert!(Heatmap::new(2, 2, &[1.0; 4])
        .range(1.0, 1.0)
        .to_svg()
        .is_err());
    assert!(Heatmap::new(2, 2, &[1.0; 4])
        .x_ticks(vec![(2, "x".into())])
        .to_svg()
        .is_err());
    assert!(Heatmap::new(2, 2, &[1.0; 4])
        .x_labels(vec!["a".into()])
        .to_svg()
        .is_err());
    let e = Heatmap::new(2, 2, &[1.0; 3])
        .save_svg(dir.join("bad.svg"))
        .unwrap_err();
    assert!(format!("{e:#}").contains("bad.svg"));
    done(dir);
}

#[test]
fn line_plot_svg() {
    let dir = tmp_dir("line");
    // Implied timescales: log y, bands, a non-finite and a negative value, a reference line.
    let lag = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0];
    let t1 = [150.0, 210.0, 260.0, f64::NAN, 290.0, 300.0];
    let t2 = [12.0, 15.0, -1.0, 19.0, 20.0, 21.0];
    let plot = LinePlot::new()
        .title("Implied timescales <lag & tau>")
        .x_label("lag time (ns)")
        .y_label("timescale (ns)")
        .log_y(true)
        .series(
            Series::new("process 1", &lag, &t1).band(&t1.map(|v| v * 0.8), &t1.map(|v| v * 1.2)),
        )
        .series(Series::new("process 2", &lag, &t2).dashed())
        .series(Series::new("lag", &lag, &lag).markers(false))
        .hline(1000.0, "simulation length");
    let svg = plot.to_svg().unwrap();
    check_svg(&svg);
    assert!(svg.contains("Implied timescales &lt;lag &amp; tau&gt;"));
    let labels = text_labels(&svg);
    for l in [
        "1",
        "10",
        "100",
        "1000",
        "process 1",
        "process 2",
        "simulation length",
        "lag time (ns)",
        "timescale (ns)",
    ] {
        assert!(labels.iter().any(|t| t == l), "{l} in {labels:?}");
    }
    let desc = &svg[svg.find("<desc>").unwrap()..svg.find("</desc>").unwrap()];
    assert!(desc.contains("process 1&quot;: 1 point skipped"), "{desc}");
    assert!(desc.contains("process 2&quot;: 1 point skipped"), "{desc}");
    assert!(svg.contains("fill-opacity=\"0.2\""), "band");
    assert!(
        svg.contains("stroke-dasharray"),
        "dashed line and reference line"
    );
    plot.save_svg(dir.join("its.svg")).unwrap();

    // Linear: VAMP-2 against epoch, x ticks at round numbers.
    let epochs: Vec<usize> = (0..=200).collect();
    let vamp: Vec<f32> = epochs
        .iter()
        .map(|&e| 3.0 - 2.0 * (-(e as f32) / 30.0).exp())
        .collect();
    let plot = LinePlot::new()
        .title("VAMP-2")
        .x_label("epoch")
        .series(Series::new("train", &epochs, &vamp))
        .series(Series::new(
            "",
            &epochs,
            &vamp.iter().map(|v| v - 0.1).collect::<Vec<_>>(),
        ));
    let svg = plot.to_svg().unwrap();
    plot.save_svg(dir.join("vamp.svg")).unwrap();
    check_svg(&svg);
    let labels = text_labels(&svg);
    for l in [
        "0", "50", "100", "150", "200", "1.0", "1.5", "2.0", "2.5", "3.0", "train",
    ] {
        assert!(labels.iter().any(|t| t == l), "{l} in {labels:?}");
    }
    assert!(!svg.contains("<desc>"), "nothing skipped");
    // Every number in the drawing is finite even with no drawable point at all.
    let svg = LinePlot::new()
        .series(Series::new(
            "empty",
            &[f64::NAN, f64::INFINITY],
            &[1.0, 2.0],
        ))
        .to_svg()
        .unwrap();
    check_svg(&svg);
    assert!(svg.contains("2 points skipped"));

    // Fixed ranges clip the curves; a reference line outside them is drawn nowhere. Log x.
    let svg = LinePlot::new()
        .log_x(true)
        .x_range(1.0, 100.0)
        .y_range(0.0, 1.0)
        .series(Series::new(
            "loss",
            &[0.5, 3.0, 30.0, 300.0],
            &[2.0, 0.5, 0.25, 0.1],
        ))
        .hline(5.0, "outside")
        .to_svg()
        .unwrap();
    check_svg(&svg);
    assert!(svg.contains("clip-path=\"url(#hiermd-clip-"));
    let labels = text_labels(&svg);
    for l in ["1", "10", "100", "0", "0.2", "1.0"] {
        assert!(labels.iter().any(|t| t == l), "{l} in {labels:?}");
    }
    assert!(!labels.iter().any(|t| t == "outside"));

    // Errors.
    assert!(LinePlot::new()
        .series(Series::new("a", &[1.0, 2.0], &[1.0]))
        .to_svg()
        .is_err());
    assert!(LinePlot::new()
        .series(Series::new("a", &[1.0], &[1.0]).band(&[0.0, 1.0], &[2.0]))
        .to_svg()
        .is_err());
    assert!(LinePlot::new()
        .log_y(true)
        .y_range(0.0, 1.0)
        .to_svg()
        .is_err());
    done(dir);
}

#[test]
fn scatter_plot_svg() {
    let dir = tmp_dir("scatter");
    let mut rng = Xs(7);
    let mut cloud = |n: usize| -> (Vec<f32>, Vec<f32>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut s = Vec::new();
        for i in 0..n {
            let state = i % 3;
            x.push((rng.normal() + 3.0 * state as f64) as f32);
            y.push((rng.normal() - 2.0 * state as f64) as f32);
            s.push(state);
        }
        (x, y, s)
    };

    // Categories: one path per state, legend with names and counts.
    let (mut x, y, s) = cloud(600);
    x[10] = f32::NAN;
    let plot = ScatterPlot::new(&x, &y)
        .title("SPIB latent space")
        .x_label("z0")
        .y_label("z1")
        .categories(&s)
        .category_names(vec!["unfolded".into(), "intermediate <I>".into()]);
    let svg = plot.to_svg().unwrap();
    check_svg(&svg);
    assert_eq!(
        svg.matches("fill-opacity=\"0.8\"").count(),
        3,
        "one path per state"
    );
    let labels = text_labels(&svg);
    for l in [
        "unfolded (200)",
        "intermediate &lt;I&gt; (199)",
        "state 2 (200)",
        "z0",
        "z1",
    ] {
        assert!(labels.iter().any(|t| t == l), "{l} in {labels:?}");
    }
    assert!(svg.contains("<desc>1 point skipped"));
    for c in 0..3 {
        assert!(svg.contains(&format!(
            "#{:02x}{:02x}{:02x}",
            category_color(c)[0],
            category_color(c)[1],
            category_color(c)[2]
        )));
    }
    plot.save_svg(dir.join("latent.svg")).unwrap();

    // Values: viridis with a colour bar.
    let v: Vec<f64> = x.iter().map(|&a| a as f64 * 0.5).collect();
    let plot = ScatterPlot::new(&x, &y).values(&v, "time (ns)");
    let svg = plot.to_svg().unwrap();
    plot.save_svg(dir.join("values.svg")).unwrap();
    check_svg(&svg);
    assert!(svg.contains("linearGradient"));
    assert!(text_labels(&svg).iter().any(|t| t == "time (ns)"));

    // 100,000 points: binned into one density image, still small.
    let (x, y, s) = cloud(100_000);
    for (k, plot) in [
        ScatterPlot::new(&x, &y).categories(&s),
        ScatterPlot::new(&x, &y).values(&x, "z0"),
        ScatterPlot::new(&x, &y),
    ]
    .into_iter()
    .enumerate()
    {
        let svg = plot.to_svg().unwrap();
        plot.save_svg(dir.join(format!("density{k}.svg"))).unwrap();
        check_svg(&svg);
        assert!(svg.len() < 300_000, "{} bytes", svg.len());
        let pngs = embedded_pngs(&svg);
        assert_eq!(pngs.len(), 1);
        assert!(pngs[0].width > 100 && pngs[0].height > 100);
        assert!(svg.contains("100000 points binned"));
    }
    // Below the threshold the points are drawn, compactly.
    let svg = ScatterPlot::new(&x[..20_000], &y[..20_000])
        .categories(&s[..20_000])
        .to_svg()
        .unwrap();
    check_svg(&svg);
    assert!(embedded_pngs(&svg).is_empty());
    assert!(svg.len() < 20_000 * 30, "{} bytes", svg.len());

    assert!(ScatterPlot::new(&[1.0, 2.0], &[1.0]).to_svg().is_err());
    assert!(ScatterPlot::new(&[1.0, 2.0], &[1.0, 2.0])
        .categories(&[0])
        .to_svg()
        .is_err());
    done(dir);
}

#[test]
fn heatmap_of_3200_residues_stays_small() {
    // An attention map of a 3,200-token protein: one embedded image of 3,200 x 3,200 pixels.
    let n = 3200;
    let t0 = std::time::Instant::now();
    let m: Vec<f32> = (0..n * n)
        .map(|k| {
            let (i, j) = ((k / n) as f32, (k % n) as f32);
            (-(i - j).abs() / 30.0).exp() + 0.3 * ((i / 97.0).sin() * (j / 53.0).cos()).abs()
        })
        .collect();
    let svg = Heatmap::new(n, n, &m)
        .title("Attention")
        .x_labels_with(|i| (i + 1).to_string())
        .to_svg()
        .unwrap();
    eprintln!(
        "3200 x 3200 heatmap: {} bytes of SVG in {:?}",
        svg.len(),
        t0.elapsed()
    );
    check_svg(&svg);
    assert!(svg.len() < n * n * 3, "{} bytes", svg.len());
    assert_eq!(
        svg.matches("<rect").count(),
        3,
        "background, frame and colour bar only"
    );
    let png = &embedded_pngs(&svg)[0];
    assert_eq!((png.width, png.height), (n, n));
}
