//! Pictures people would rather look at than read: PNG images, heat maps (attention maps, residue
//! contact maps), line plots (implied timescales, VAMP-2 scores, loss curves) and scatter plots
//! (latent spaces, VAMP components), written without any plotting or image crate.
//!
//! - [`write_png`] / [`encode_png`]: 8-bit RGB PNG (zlib through flate2, per-row adaptive
//!   filtering, CRC-32 per chunk), readable by any viewer and by Python's PIL.
//! - Colour maps: [`viridis`] (sequential, perceptually uniform, luminance increasing),
//!   [`coolwarm`] (diverging, light grey at the centre), and [`category_color`] (categorical).
//! - [`Heatmap`]: a matrix as a raster PNG ([`Heatmap::save_png`], no text) or as an SVG with
//!   axes, ticks, title and colour bar in which the matrix itself is one embedded base64 PNG
//!   drawn with `image-rendering: pixelated`, so a 3,200 x 3,200 map is one image, not ten
//!   million rectangles.
//! - [`LinePlot`]: named series with lines, markers, optional shaded bands, horizontal reference
//!   lines, optional log axes, and ticks at "nice" round numbers ([`nice_ticks`]).
//! - [`ScatterPlot`]: 2-D points coloured by a category (state) or a value; up to
//!   [`ScatterPlot::density_above`] points (20,000 by default) are drawn as tiny squares, one
//!   `<path>` per colour; above that the points are binned into a density image.
//!
//! - [`svg_to_png`]: every `save_svg` also writes a PNG of the same picture beside the SVG (same
//!   name, `.png`), rasterised here from the SVG itself (lines, markers, filled shapes, embedded
//!   images, and text in a tiny built-in bitmap font), for viewers and clusters without an SVG
//!   renderer.
//!
//! Every SVG text is XML-escaped, and every number written is finite: points with non-finite
//! coordinates (or non-positive ones on a log axis) are skipped, and the SVG says how many in its
//! `<desc>` and in a visible footnote.

use anyhow::{ensure, Context, Result};
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

// ------------------------------------------------------------------------------------------------
// Numbers accepted as plot data.

/// Numbers accepted as plot data (converted to `f64`).
pub trait PlotNum: Copy {
    /// The value as `f64`.
    fn to_f64(self) -> f64;
}

macro_rules! plot_num {
    ($($t:ty),*) => {$(
        impl PlotNum for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
plot_num!(f32, f64, i32, i64, u32, u64, usize, u8);

fn to_vec<T: PlotNum>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

// ------------------------------------------------------------------------------------------------
// PNG.

/// The eight bytes every PNG file starts with.
pub const PNG_SIGNATURE: [u8; 8] = *b"\x89PNG\r\n\x1a\n";

/// Encodes an 8-bit RGB image (`rgb`: `height` rows of `width` pixels, 3 bytes each, top row
/// first) as a PNG file in memory.
///
/// Each row gets the PNG filter (None, Sub, Up, Average or Paeth) with the smallest sum of
/// absolute filtered bytes (the heuristic libpng uses), which makes smooth colour-mapped images
/// compress several times better than unfiltered rows. The compressed stream is split into IDAT
/// chunks of at most 1 MiB.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        width > 0 && height > 0,
        "png: empty image ({width} x {height})"
    );
    ensure!(
        width <= i32::MAX as usize && height <= i32::MAX as usize,
        "png: {width} x {height} exceeds PNG's limit of 2^31 - 1 pixels per side"
    );
    let stride = width
        .checked_mul(3)
        .and_then(|s| s.checked_mul(height).map(|_| s))
        .context("png: image size overflows")?;
    ensure!(
        rgb.len() == stride * height,
        "png: a {width} x {height} RGB image needs {} bytes, got {}",
        stride * height,
        rgb.len()
    );
    let mut z = ZlibEncoder::new(Vec::new(), Compression::new(6));
    let zero = vec![0u8; stride];
    let mut cand: [Vec<u8>; 5] = std::array::from_fn(|_| vec![0u8; stride + 1]);
    for y in 0..height {
        let cur = &rgb[y * stride..(y + 1) * stride];
        let prev = if y == 0 {
            &zero[..]
        } else {
            &rgb[(y - 1) * stride..y * stride]
        };
        let mut best = 0;
        let mut best_cost = u64::MAX;
        for (kind, out) in cand.iter_mut().enumerate() {
            out[0] = kind as u8;
            let mut cost = 0u64;
            for x in 0..stride {
                let a = if x >= 3 { cur[x - 3] } else { 0 };
                let b = prev[x];
                let c = if x >= 3 { prev[x - 3] } else { 0 };
                let pred = match kind {
                    0 => 0,
                    1 => a,
                    2 => b,
                    3 => ((a as u16 + b as u16) / 2) as u8,
                    _ => paeth(a, b, c),
                };
                let f = cur[x].wrapping_sub(pred);
                out[x + 1] = f;
                cost += (f as i8).unsigned_abs() as u64;
            }
            if cost < best_cost {
                best_cost = cost;
                best = kind;
            }
        }
        z.write_all(&cand[best])?;
    }
    let idat = z.finish()?;

    let mut out = Vec::with_capacity(idat.len() + 64 + idat.len() / (1 << 20) * 12);
    out.extend_from_slice(&PNG_SIGNATURE);
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for part in idat.chunks(1 << 20) {
        png_chunk(&mut out, b"IDAT", part);
    }
    png_chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// The Paeth predictor of the PNG specification.
fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = a as i16 + b as i16 - c as i16;
    let pa = (p - a as i16).abs();
    let pb = (p - b as i16).abs();
    let pc = (p - c as i16).abs();
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

/// Appends one chunk: length, type, data, CRC-32 of type and data.
fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// Writes an 8-bit RGB image to `path` as a PNG file (see [`encode_png`]), atomically.
pub fn write_png(path: impl AsRef<Path>, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let png = encode_png(width, height, rgb).with_context(|| format!("{}", path.display()))?;
    crate::optim::write_atomic(path, &png)
}

/// Standard base64 (RFC 4648, with padding), for PNGs embedded in SVG as data URIs.
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

// ------------------------------------------------------------------------------------------------
// Colour maps.

/// matplotlib's viridis sampled at 33 evenly spaced points (256-entry table by van der Walt and
/// Smith, CC0); linear interpolation between them stays within 3/255 of the full table.
const VIRIDIS: [[u8; 3]; 33] = [
    [68, 1, 84],
    [71, 13, 96],
    [72, 24, 106],
    [72, 35, 116],
    [71, 45, 123],
    [69, 55, 129],
    [66, 64, 134],
    [62, 73, 137],
    [59, 82, 139],
    [55, 91, 141],
    [51, 99, 141],
    [47, 107, 142],
    [44, 114, 142],
    [41, 122, 142],
    [38, 130, 142],
    [35, 137, 142],
    [33, 145, 140],
    [31, 152, 139],
    [31, 160, 136],
    [34, 167, 133],
    [40, 174, 128],
    [50, 182, 122],
    [63, 188, 115],
    [78, 195, 107],
    [94, 201, 98],
    [112, 207, 87],
    [132, 212, 75],
    [152, 216, 62],
    [173, 220, 48],
    [194, 223, 35],
    [216, 226, 25],
    [236, 229, 27],
    [253, 231, 37],
];

/// Moreland's diverging cool-warm map (matplotlib's `coolwarm`) at 33 evenly spaced points.
const COOLWARM: [[u8; 3]; 33] = [
    [59, 76, 192],
    [68, 90, 204],
    [78, 104, 216],
    [88, 117, 225],
    [98, 130, 234],
    [108, 143, 241],
    [119, 154, 247],
    [130, 166, 251],
    [141, 176, 254],
    [152, 185, 255],
    [163, 194, 254],
    [174, 201, 252],
    [185, 208, 249],
    [195, 213, 244],
    [204, 217, 237],
    [213, 219, 229],
    [221, 220, 220],
    [229, 216, 209],
    [236, 211, 197],
    [241, 204, 184],
    [245, 196, 172],
    [247, 186, 159],
    [247, 176, 147],
    [246, 165, 134],
    [244, 152, 122],
    [240, 139, 110],
    [235, 125, 98],
    [228, 110, 86],
    [221, 95, 75],
    [212, 78, 65],
    [202, 59, 55],
    [190, 36, 46],
    [180, 4, 38],
];

fn lerp_table(table: &[[u8; 3]], t: f64) -> [u8; 3] {
    // NaN maps to the low end rather than propagating.
    let t = if t >= 0.0 { t.min(1.0) } else { 0.0 };
    let x = t * (table.len() - 1) as f64;
    let i = (x.floor() as usize).min(table.len() - 2);
    let f = x - i as f64;
    let (a, b) = (table[i], table[i + 1]);
    std::array::from_fn(|k| (a[k] as f64 + (b[k] as f64 - a[k] as f64) * f).round() as u8)
}

/// The viridis colour of `t` in [0, 1] (clamped; NaN gives the colour of 0): dark violet to
/// yellow with monotonically increasing luminance, readable in grey scale and by colour-blind
/// viewers.
pub fn viridis(t: f64) -> [u8; 3] {
    lerp_table(&VIRIDIS, t)
}

/// The cool-warm diverging colour of `t` in [0, 1] (clamped; NaN gives the colour of 0): blue at
/// 0, light grey at 0.5, red at 1. For signed quantities centred on zero (differences,
/// correlations).
pub fn coolwarm(t: f64) -> [u8; 3] {
    lerp_table(&COOLWARM, t)
}

/// matplotlib's `tab10`, the categorical palette most readers know.
const TAB10: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// The colour of category (state) `i`: `tab10` for the first ten, then hues spaced by the golden
/// angle, so the same state gets the same colour in every plot.
pub fn category_color(i: usize) -> [u8; 3] {
    if i < TAB10.len() {
        return TAB10[i];
    }
    let h = (i as f64 * 137.507_764) % 360.0;
    let l = if i.is_multiple_of(2) { 0.45 } else { 0.6 };
    hsl(h, 0.6, l)
}

fn hsl(h: f64, s: f64, l: f64) -> [u8; 3] {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    [r, g, b].map(|v| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// A continuous colour map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Colormap {
    /// [`viridis`], for magnitudes (attention weights, contact probabilities).
    #[default]
    Viridis,
    /// [`coolwarm`], for signed values; heat maps default to a range symmetric about zero.
    Coolwarm,
}

impl Colormap {
    /// The colour of `t` in [0, 1].
    pub fn rgb(self, t: f64) -> [u8; 3] {
        match self {
            Colormap::Viridis => viridis(t),
            Colormap::Coolwarm => coolwarm(t),
        }
    }
}

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

// ------------------------------------------------------------------------------------------------
// Number formatting and ticks.

/// A coordinate for SVG: two decimals, trailing zeros trimmed. Callers filter non-finite values
/// before; "0" here keeps a slip from ever writing NaN into a file.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    trim_zeros(format!("{v:.2}"))
}

fn trim_zeros(mut s: String) -> String {
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

/// Scientific notation with `digits` decimals in the mantissa, zeros trimmed: `1.5e-6`.
fn sci(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$e}");
    match s.split_once('e') {
        Some((m, e)) => format!("{}e{e}", trim_zeros(m.to_string())),
        None => s,
    }
}

/// A value for a label: four significant digits, scientific outside [1e-3, 1e5).
fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "?".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return sci(v, 3);
    }
    let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
    trim_zeros(format!("{v:.decimals$}"))
}

/// A tick label for a value on a grid of spacing `step`: as many decimals as the step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 || v.abs() < step * 1e-9 {
        return "0".into();
    }
    let a = v.abs();
    let step_exp = step.log10().floor();
    if !(1e-4..1e6).contains(&a) {
        let digits = (a.log10().floor() - step_exp).clamp(0.0, 6.0) as usize;
        return sci(v, digits);
    }
    let decimals = (-step_exp).clamp(0.0, 10.0) as usize;
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        "0".into()
    } else {
        s
    }
}

/// Heckbert's "nice number": 1, 2, 5 or 10 times a power of ten, the nearest to `x`.
fn nice(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    let f = x / p;
    let nf = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    nf * p
}

/// Tick spacing and the ticks: multiples of a nice step inside `[lo, hi]`.
fn nice_ticks_step(lo: f64, hi: f64, target: usize) -> (f64, Vec<f64>) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return (1.0, if lo.is_finite() { vec![lo] } else { vec![] });
    }
    // Heckbert rounds the range first, which can halve the tick count (0..216 gets steps of
    // 100); rounding the raw spacing keeps closer to `target`.
    let step = nice((hi - lo) / (target.max(2) - 1) as f64);
    let (first, last) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
    // A span at the limit of f64 precision has no representable grid.
    if !(first.abs() < 1e15 && last.abs() < 1e15 && last - first < 1000.0) {
        return (step, vec![]);
    }
    let (first, last) = (first as i64, last as i64);
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (step, ticks)
}

/// "Nice" tick values for an axis from `lo` to `hi`: multiples of 1, 2 or 5 times a power of ten,
/// about `target` of them (Heckbert, Graphics Gems, 1990), all inside `[lo, hi]`.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    nice_ticks_step(lo, hi, target).1
}

/// One axis of a line or scatter plot: its range, whether logarithmic, and its ticks.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<(f64, String)>,
    minor: Vec<f64>,
}

impl Axis {
    /// An axis over data from `dlo` to `dhi` (`dlo > dhi` when there are no data) with a 4%
    /// margin, or exactly over `fixed`.
    fn new(dlo: f64, dhi: f64, log: bool, fixed: Option<(f64, f64)>) -> Axis {
        let (mut lo, mut hi) = match fixed {
            Some(r) => r,
            None if dlo > dhi => {
                if log {
                    (1.0, 10.0)
                } else {
                    (0.0, 1.0)
                }
            }
            None => (dlo, dhi),
        };
        if log {
            let (mut a, mut b) = (lo.log10(), hi.log10());
            if fixed.is_none() {
                if b - a < 1e-12 {
                    a -= 0.5;
                    b += 0.5;
                } else {
                    let m = 0.04 * (b - a);
                    a -= m;
                    b += m;
                }
            }
            lo = 10f64.powf(a);
            hi = 10f64.powf(b);
        } else if fixed.is_none() {
            if hi - lo <= hi.abs().max(lo.abs()) * 1e-12 {
                let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
                lo -= pad;
                hi += pad;
            } else {
                let m = 0.04 * (hi - lo);
                lo -= m;
                hi += m;
            }
        }
        let mut axis = Axis {
            lo,
            hi,
            log,
            ticks: Vec::new(),
            minor: Vec::new(),
        };
        if log {
            axis.log_ticks();
        } else {
            let (step, t) = nice_ticks_step(lo, hi, 6);
            axis.ticks = t.into_iter().map(|v| (v, fmt_tick(v, step))).collect();
        }
        axis
    }

    fn log_ticks(&mut self) {
        let (a, b) = (self.lo.log10(), self.hi.log10());
        let inside = |v: f64| v >= self.lo * (1.0 - 1e-9) && v <= self.hi * (1.0 + 1e-9);
        let decades: Vec<i32> = ((a - 1e-9).ceil() as i32..=(b + 1e-9).floor() as i32).collect();
        if decades.len() >= 2 {
            let every = decades.len().div_ceil(8);
            self.ticks = decades
                .iter()
                .filter(|k| k.rem_euclid(every as i32) == 0)
                .map(|&k| (10f64.powi(k), fmt_pow10(k)))
                .collect();
            if decades.len() <= 7 {
                for d in (a.floor() as i32)..=(b.ceil() as i32) {
                    for m in 2..=9 {
                        let v = m as f64 * 10f64.powi(d);
                        if inside(v) {
                            self.minor.push(v);
                        }
                    }
                }
            }
            return;
        }
        // Less than two decades: 1-2-5 steps, or failing that linear nice ticks.
        let mut t = Vec::new();
        for d in (a.floor() as i32)..=(b.ceil() as i32) {
            for m in [1.0, 2.0, 5.0] {
                let v = m * 10f64.powi(d);
                if inside(v) {
                    t.push(v);
                }
            }
        }
        if t.len() >= 3 {
            self.ticks = t.into_iter().map(|v| (v, fmt_value(v))).collect();
        } else {
            let (step, t) = nice_ticks_step(self.lo, self.hi, 5);
            self.ticks = t
                .into_iter()
                .filter(|&v| v > 0.0)
                .map(|v| (v, fmt_tick(v, step)))
                .collect();
        }
    }

    /// Position of `v` along the axis, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

fn fmt_pow10(k: i32) -> String {
    if (-3..=5).contains(&k) {
        fmt_value(10f64.powi(k))
    } else {
        format!("1e{k}")
    }
}

// ------------------------------------------------------------------------------------------------
// SVG building blocks.

/// Escapes text for XML content and attribute values; drops control characters XML 1.0 forbids.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Estimated width of `s` in pixels at font size `size` (sans-serif averages ~0.6 em per glyph).
fn text_w(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// `<text>` with escaped content; `extra` holds further attributes (already escaped).
fn text(s: &mut String, x: f64, y: f64, size: f64, anchor: &str, extra: &str, content: &str) {
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="{}" text-anchor="{anchor}"{extra}>{}</text>"#,
        num(x),
        num(y),
        num(size),
        xml_escape(content)
    );
    s.push('\n');
}

/// The plot area in pixels.
#[derive(Clone, Copy)]
struct Frame {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

/// Light grid lines at the major ticks (drawn before the data).
fn grid(s: &mut String, f: Frame, xt: &[(f64, String)], yt: &[(f64, String)]) {
    let mut d = String::new();
    for (x, _) in xt {
        let _ = write!(d, "M{} {}V{}", num(*x), num(f.y), num(f.y + f.h));
    }
    for (y, _) in yt {
        let _ = write!(d, "M{} {}H{}", num(f.x), num(*y), num(f.x + f.w));
    }
    if !d.is_empty() {
        let _ = writeln!(
            s,
            r##"<path d="{d}" fill="none" stroke="#e8e8e8" stroke-width="1"/>"##
        );
    }
}

/// Tick marks and labels in pixel positions, plus minor tick marks.
struct PxTicks {
    major: Vec<(f64, String)>,
    minor: Vec<f64>,
}

impl PxTicks {
    fn from_axis(a: &Axis, start: f64, len: f64, flip: bool) -> PxTicks {
        let px = |v: f64| {
            let f = a.frac(v);
            if flip {
                start + len * (1.0 - f)
            } else {
                start + len * f
            }
        };
        PxTicks {
            major: a.ticks.iter().map(|(v, l)| (px(*v), l.clone())).collect(),
            minor: a.minor.iter().map(|&v| px(v)).collect(),
        }
    }

    fn max_label_w(&self, size: f64) -> f64 {
        self.major
            .iter()
            .map(|(_, l)| text_w(l, size))
            .fold(0.0, f64::max)
    }

    /// Whether x labels must be rotated to not overlap.
    fn crowded(&self, size: f64) -> bool {
        let w = self.max_label_w(size);
        self.major
            .windows(2)
            .any(|p| (p[1].0 - p[0].0).abs() < w + 6.0)
    }
}

const TICK_FONT: f64 = 11.0;
const LABEL_FONT: f64 = 13.0;
const TITLE_FONT: f64 = 15.0;

/// The frame, tick marks and tick labels (drawn after the data). Returns the depth below the
/// frame that the x tick labels take.
fn axes(s: &mut String, f: Frame, xt: &PxTicks, yt: &PxTicks) -> f64 {
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333" stroke-width="1"/>"##,
        num(f.x),
        num(f.y),
        num(f.w),
        num(f.h)
    );
    let bottom = f.y + f.h;
    let mut d = String::new();
    for (x, _) in &xt.major {
        let _ = write!(d, "M{} {}v5", num(*x), num(bottom));
    }
    for x in &xt.minor {
        let _ = write!(d, "M{} {}v3", num(*x), num(bottom));
    }
    for (y, _) in &yt.major {
        let _ = write!(d, "M{} {}h-5", num(f.x), num(*y));
    }
    for y in &yt.minor {
        let _ = write!(d, "M{} {}h-3", num(f.x), num(*y));
    }
    if !d.is_empty() {
        let _ = writeln!(
            s,
            r##"<path d="{d}" fill="none" stroke="#333" stroke-width="1"/>"##
        );
    }
    let rotate = xt.crowded(TICK_FONT);
    let depth = if rotate {
        for (x, l) in &xt.major {
            let y = bottom + 9.0;
            let tr = format!(
                r#" dy="0.35em" transform="rotate(-45 {} {})""#,
                num(*x),
                num(y)
            );
            text(s, *x, y, TICK_FONT, "end", &tr, l);
        }
        12.0 + xt.max_label_w(TICK_FONT) * std::f64::consts::FRAC_1_SQRT_2 + TICK_FONT
    } else {
        for (x, l) in &xt.major {
            text(s, *x, bottom + 8.0 + TICK_FONT, TICK_FONT, "middle", "", l);
        }
        12.0 + TICK_FONT
    };
    for (y, l) in &yt.major {
        text(s, f.x - 8.0, *y, TICK_FONT, "end", r#" dy="0.35em""#, l);
    }
    depth
}

/// Title above the frame, x label below at `x_label_y`, y label rotated at `y_label_x`.
fn labels(
    s: &mut String,
    f: Frame,
    title: &str,
    x_label: &str,
    y_label: &str,
    xl_y: f64,
    yl_x: f64,
) {
    if !title.is_empty() {
        text(
            s,
            f.x + f.w / 2.0,
            24.0,
            TITLE_FONT,
            "middle",
            r#" font-weight="bold""#,
            title,
        );
    }
    if !x_label.is_empty() {
        text(s, f.x + f.w / 2.0, xl_y, LABEL_FONT, "middle", "", x_label);
    }
    if !y_label.is_empty() {
        let cy = f.y + f.h / 2.0;
        let tr = format!(r#" transform="rotate(-90 {} {})""#, num(yl_x), num(cy));
        text(s, yl_x, cy, LABEL_FONT, "middle", &tr, y_label);
    }
}

/// A vertical colour bar at (`x`, `y`) of size `w` x `h`, `lo` at the bottom, with the min and
/// max values and nice ticks in between, and `label` rotated beside it. Returns the width used.
fn color_bar(
    s: &mut String,
    (x, y, w, h): (f64, f64, f64, f64),
    cmap: Colormap,
    (lo, hi): (f64, f64),
    log: bool,
    label: &str,
) -> f64 {
    // Ids are document-global, also across SVGs inlined into one HTML page: name the gradient
    // after its content, so equal ids always mean equal gradients.
    let id = format!("hiermd-colorbar-{cmap:?}").to_ascii_lowercase();
    let _ = write!(
        s,
        r#"<defs><linearGradient id="{id}" x1="0" y1="1" x2="0" y2="0">"#
    );
    for k in 0..=32 {
        let t = k as f64 / 32.0;
        let _ = write!(
            s,
            r#"<stop offset="{}" stop-color="{}"/>"#,
            num(t),
            hex(cmap.rgb(t))
        );
    }
    s.push_str("</linearGradient></defs>\n");
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="url(#{id})" stroke="#333" stroke-width="1"/>"##,
        num(x),
        num(y),
        num(w),
        num(h)
    );
    let map = |v: f64| -> f64 {
        let f = if log {
            (v.ln() - lo.ln()) / (hi.ln() - lo.ln())
        } else if hi > lo {
            (v - lo) / (hi - lo)
        } else {
            0.5
        };
        y + h * (1.0 - f)
    };
    let mut marks: Vec<(f64, String)> = vec![(lo, fmt_value(lo)), (hi, fmt_value(hi))];
    if !log && hi > lo {
        let (step, t) = nice_ticks_step(lo, hi, 5);
        for v in t {
            let py = map(v);
            if (py - y).abs() > 14.0 && (py - y - h).abs() > 14.0 {
                marks.push((v, fmt_tick(v, step)));
            }
        }
    }
    let mut d = String::new();
    let mut lw: f64 = 0.0;
    for (v, l) in &marks {
        let py = map(*v);
        let _ = write!(d, "M{} {}h4", num(x + w), num(py));
        text(s, x + w + 7.0, py, TICK_FONT, "start", r#" dy="0.35em""#, l);
        lw = lw.max(text_w(l, TICK_FONT));
    }
    let _ = writeln!(
        s,
        r##"<path d="{d}" fill="none" stroke="#333" stroke-width="1"/>"##
    );
    let mut used = w + 7.0 + lw;
    if !label.is_empty() {
        let lx = x + used + 8.0 + LABEL_FONT / 2.0;
        let cy = y + h / 2.0;
        let tr = format!(r#" transform="rotate(90 {} {})""#, num(lx), num(cy));
        text(s, lx, cy, LABEL_FONT, "middle", &tr, label);
        used += 8.0 + LABEL_FONT + 4.0;
    }
    used
}

/// Assembles the document: `<title>`, `<desc>` with the notes, white background, the body, and
/// the notes again as a visible footnote below `height`.
fn svg_document(width: f64, height: f64, title: &str, notes: &[String], body: &str) -> String {
    const NOTE_LINES: usize = 3;
    let shown = notes.len().min(NOTE_LINES);
    let extra = if notes.is_empty() {
        0.0
    } else {
        (shown + usize::from(notes.len() > NOTE_LINES)) as f64 * 14.0 + 4.0
    };
    let (w, h) = (width.ceil(), (height + extra).ceil());
    let mut s = String::with_capacity(body.len() + 1024);
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{}" height="{}" viewBox="0 0 {} {}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#,
        num(w),
        num(h),
        num(w),
        num(h)
    );
    let _ = writeln!(
        s,
        "<title>{}</title>",
        xml_escape(if title.is_empty() {
            "hiermd plot"
        } else {
            title
        })
    );
    if !notes.is_empty() {
        let _ = writeln!(s, "<desc>{}</desc>", xml_escape(&notes.join("; ")));
    }
    s.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s.push_str(body);
    for (i, n) in notes.iter().take(NOTE_LINES).enumerate() {
        text(
            &mut s,
            8.0,
            height + 14.0 * (i + 1) as f64 - 2.0,
            10.0,
            "start",
            r##" fill="#666""##,
            &format!("Note: {n}"),
        );
    }
    if notes.len() > NOTE_LINES {
        text(
            &mut s,
            8.0,
            height + 14.0 * (NOTE_LINES + 1) as f64 - 2.0,
            10.0,
            "start",
            r##" fill="#666""##,
            &format!(
                "... and {} more notes in the file's description",
                notes.len() - NOTE_LINES
            ),
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Repeats every pixel of an RGB image `k` x `k` times.
fn upscale(w: usize, h: usize, rgb: &[u8], k: usize) -> Vec<u8> {
    if k == 1 {
        return rgb.to_vec();
    }
    let mut out = Vec::with_capacity(w * h * k * k * 3);
    for row in rgb.chunks_exact(w * 3) {
        let start = out.len();
        for px in row.chunks_exact(3) {
            for _ in 0..k {
                out.extend_from_slice(px);
            }
        }
        let line = out[start..].to_vec();
        for _ in 1..k {
            out.extend_from_slice(&line);
        }
    }
    out
}

/// An `<image>` holding a PNG of `w` x `h` pixels (RGB rows) drawn over `f`, pixels kept sharp by
/// `image-rendering: pixelated`. Images shorter than 256 pixels on their longer side are stored
/// with each pixel repeated `k` x `k` times (integer `k`) to reach it, so that renderers which
/// ignore `image-rendering` and smooth (librsvg, some PDF converters) still show crisp cells;
/// repeated pixels cost almost nothing after compression.
fn embedded_png(s: &mut String, f: Frame, w: usize, h: usize, rgb: &[u8]) -> Result<()> {
    let k = 256usize.div_ceil(w.max(h)).max(1);
    let png = encode_png(w * k, h * k, &upscale(w, h, rgb, k))?;
    let _ = writeln!(
        s,
        r#"<image x="{}" y="{}" width="{}" height="{}" preserveAspectRatio="none" style="image-rendering:optimizeSpeed;image-rendering:pixelated" xlink:href="data:image/png;base64,{}"/>"#,
        num(f.x),
        num(f.y),
        num(f.w),
        num(f.h),
        base64(&png)
    );
    Ok(())
}

/// Writes the SVG to `path` and its rasterisation ([`svg_to_png`]) beside it, the same name
/// with the extension `.png`, both atomically.
fn save_text(path: &Path, what: &str, svg: Result<String>) -> Result<()> {
    let svg = svg.with_context(|| format!("{}: {what}", path.display()))?;
    crate::optim::write_atomic(path, svg.as_bytes())?;
    let png_path = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        // Never overwrite the SVG just written with its PNG.
        let mut p = path.as_os_str().to_owned();
        p.push(".png");
        std::path::PathBuf::from(p)
    } else {
        path.with_extension("png")
    };
    let png = svg_to_png(&svg).with_context(|| format!("{}: {what}", png_path.display()))?;
    crate::optim::write_atomic(&png_path, &png)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ------------------------------------------------------------------------------------------------
// Heat maps.

/// How the ticks of one heat-map axis are chosen.
#[derive(Clone, Debug)]
enum TickSpec {
    /// Row/column numbers from 0, about ten of them.
    Auto,
    /// Given positions and labels.
    Explicit(Vec<(usize, String)>),
    /// A label for every row/column; about ten are shown.
    Labels(Vec<String>),
}

/// A matrix drawn as a colour-mapped image: attention maps (token x token), residue contact maps,
/// transition matrices. Row 0 is at the top, as in a printed matrix.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// use hiermd::plot::{Colormap, Heatmap};
/// let n = 214;
/// let contacts = vec![0.5f32; n * n];
/// Heatmap::new(n, n, &contacts)
///     .title("Contact probability")
///     .x_label("residue")
///     .y_label("residue")
///     .x_labels_with(|i| (i + 1).to_string())
///     .y_labels_with(|i| (i + 1).to_string())
///     .range(0.0, 1.0)
///     .save_svg("contacts.svg")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Heatmap {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
    title: String,
    x_label: String,
    y_label: String,
    value_label: String,
    x_ticks: TickSpec,
    y_ticks: TickSpec,
    range: Option<(f64, f64)>,
    colormap: Colormap,
    nan_color: [u8; 3],
    size: f64,
}

impl Heatmap {
    /// A `rows` x `cols` matrix in row-major order (`data.len()` must be `rows * cols`; checked
    /// when drawing).
    pub fn new<T: PlotNum>(rows: usize, cols: usize, data: &[T]) -> Self {
        Heatmap {
            rows,
            cols,
            data: to_vec(data),
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            value_label: String::new(),
            x_ticks: TickSpec::Auto,
            y_ticks: TickSpec::Auto,
            range: None,
            colormap: Colormap::Viridis,
            nan_color: [255, 255, 255],
            size: 560.0,
        }
    }

    /// Title above the map.
    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = t.into();
        self
    }

    /// Label of the x axis (columns).
    pub fn x_label(mut self, t: impl Into<String>) -> Self {
        self.x_label = t.into();
        self
    }

    /// Label of the y axis (rows).
    pub fn y_label(mut self, t: impl Into<String>) -> Self {
        self.y_label = t.into();
        self
    }

    /// Label of the colour bar (what the values are).
    pub fn value_label(mut self, t: impl Into<String>) -> Self {
        self.value_label = t.into();
        self
    }

    /// Column ticks at the given column indices with the given labels.
    pub fn x_ticks(mut self, ticks: Vec<(usize, String)>) -> Self {
        self.x_ticks = TickSpec::Explicit(ticks);
        self
    }

    /// Row ticks at the given row indices with the given labels.
    pub fn y_ticks(mut self, ticks: Vec<(usize, String)>) -> Self {
        self.y_ticks = TickSpec::Explicit(ticks);
        self
    }

    /// A label for every column (e.g. residue numbers); about ten evenly spaced ones are shown,
    /// at round numbers when the labels are integers. Must have `cols` entries.
    pub fn x_labels(mut self, labels: Vec<String>) -> Self {
        self.x_ticks = TickSpec::Labels(labels);
        self
    }

    /// A label for every row; see [`Heatmap::x_labels`]. Must have `rows` entries.
    pub fn y_labels(mut self, labels: Vec<String>) -> Self {
        self.y_ticks = TickSpec::Labels(labels);
        self
    }

    /// Column labels from a function of the column index; see [`Heatmap::x_labels`].
    pub fn x_labels_with(self, f: impl Fn(usize) -> String) -> Self {
        let l = (0..self.cols).map(f).collect();
        self.x_labels(l)
    }

    /// Row labels from a function of the row index; see [`Heatmap::x_labels`].
    pub fn y_labels_with(self, f: impl Fn(usize) -> String) -> Self {
        let l = (0..self.rows).map(f).collect();
        self.y_labels(l)
    }

    /// Values mapped to the ends of the colour map (others are clamped). By default the finite
    /// minimum and maximum of the data; for [`Colormap::Coolwarm`] symmetric about zero.
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.range = Some((min, max));
        self
    }

    /// The colour map (default [`Colormap::Viridis`]).
    pub fn colormap(mut self, c: Colormap) -> Self {
        self.colormap = c;
        self
    }

    /// Colour of non-finite cells (default white).
    pub fn nan_color(mut self, c: [u8; 3]) -> Self {
        self.nan_color = c;
        self
    }

    /// Length in SVG pixels of the longer side of the matrix (default 560).
    pub fn size(mut self, px: f64) -> Self {
        self.size = px;
        self
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.rows > 0 && self.cols > 0,
            "heatmap: empty matrix ({} x {})",
            self.rows,
            self.cols
        );
        ensure!(
            self.data.len() == self.rows * self.cols,
            "heatmap: a {} x {} matrix needs {} values, got {}",
            self.rows,
            self.cols,
            self.rows * self.cols,
            self.data.len()
        );
        if let Some((a, b)) = self.range {
            ensure!(
                a.is_finite() && b.is_finite() && a < b,
                "heatmap: value range ({a}, {b}) must be finite with min < max"
            );
        }
        ensure!(
            self.size.is_finite() && self.size >= 16.0,
            "heatmap: size {} px is too small",
            self.size
        );
        Ok(())
    }

    /// The value range the colours span.
    fn value_range(&self) -> (f64, f64) {
        if let Some(r) = self.range {
            return r;
        }
        let (lo, hi) = self
            .data
            .iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if lo > hi {
            return (0.0, 1.0);
        }
        if self.colormap == Colormap::Coolwarm {
            let m = lo.abs().max(hi.abs());
            return if m > 0.0 { (-m, m) } else { (-1.0, 1.0) };
        }
        (lo, hi)
    }

    fn non_finite(&self) -> usize {
        self.data.iter().filter(|v| !v.is_finite()).count()
    }

    /// One RGB pixel per cell, row 0 first.
    fn cell_rgb(&self) -> Vec<u8> {
        let (lo, hi) = self.value_range();
        let mut rgb = Vec::with_capacity(self.data.len() * 3);
        for &v in &self.data {
            let c = if !v.is_finite() {
                self.nan_color
            } else if hi > lo {
                self.colormap.rgb((v - lo) / (hi - lo))
            } else {
                self.colormap.rgb(0.5)
            };
            rgb.extend_from_slice(&c);
        }
        rgb
    }

    /// Pixels per cell of the raster image: at least 2, so that a 600-pixel image results for
    /// small matrices, and 1 only when 2 would exceed 16,384 pixels per side.
    fn raster_scale(&self) -> usize {
        let long = self.rows.max(self.cols);
        let scale = 600usize.div_ceil(long).max(2);
        if long * scale > 16_384 {
            (16_384 / long).max(1)
        } else {
            scale
        }
    }

    /// The raster image: each cell a square of `k` x `k` pixels, `k` at least 2 (enough for about
    /// 600 pixels across small matrices), 1 only when 2 would exceed 16,384 pixels per side;
    /// returns width, height and RGB bytes (rows top first).
    pub fn to_rgb(&self) -> Result<(usize, usize, Vec<u8>)> {
        self.check()?;
        let s = self.raster_scale();
        let cells = self.cell_rgb();
        let rgb = upscale(self.cols, self.rows, &cells, s);
        let (w, h) = (self.cols * s, self.rows * s);
        Ok((w, h, rgb))
    }

    /// The raster image as PNG bytes (no text: axes and colour bar are in the SVG).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let (w, h, rgb) = self.to_rgb()?;
        encode_png(w, h, &rgb)
    }

    /// Writes the raster image (each cell at least 2 x 2 pixels, no text) to `path`.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (w, h, rgb) = self
            .to_rgb()
            .with_context(|| format!("{}", path.display()))?;
        write_png(path, w, h, &rgb)
    }

    /// Ticks (index, label) of an axis with `n` cells.
    fn ticks(spec: &TickSpec, n: usize, axis: &str) -> Result<Vec<(usize, String)>> {
        Ok(match spec {
            TickSpec::Auto => auto_ticks(&(0..n).map(|i| i.to_string()).collect::<Vec<_>>()),
            TickSpec::Labels(l) => {
                ensure!(
                    l.len() == n,
                    "heatmap: {} {axis} labels for {n} {axis}s",
                    l.len()
                );
                auto_ticks(l)
            }
            TickSpec::Explicit(t) => {
                if let Some((i, _)) = t.iter().find(|(i, _)| *i >= n) {
                    anyhow::bail!("heatmap: {axis} tick at {i}, but there are {n} {axis}s");
                }
                t.clone()
            }
        })
    }

    /// The SVG: title, axes with ticks, the matrix as an embedded PNG (one pixel per cell,
    /// scaled up with sharp pixels), and a colour bar with the value range.
    pub fn to_svg(&self) -> Result<String> {
        self.check()?;
        let (lo, hi) = self.value_range();
        let cell = self.size / self.rows.max(self.cols) as f64;
        let (pw, ph) = (
            (self.cols as f64 * cell).max(40.0),
            (self.rows as f64 * cell).max(40.0),
        );
        let xt = Self::ticks(&self.x_ticks, self.cols, "column")?;
        let yt = Self::ticks(&self.y_ticks, self.rows, "row")?;
        let ytw = yt
            .iter()
            .map(|(_, l)| text_w(l, TICK_FONT))
            .fold(0.0, f64::max);
        let left = 10.0 + if self.y_label.is_empty() { 0.0 } else { 22.0 } + ytw + 8.0;
        let top = if self.title.is_empty() { 14.0 } else { 40.0 };
        let f = Frame {
            x: left,
            y: top,
            w: pw,
            h: ph,
        };
        let xpx = PxTicks {
            major: xt
                .iter()
                .map(|(i, l)| (f.x + (*i as f64 + 0.5) * pw / self.cols as f64, l.clone()))
                .collect(),
            minor: vec![],
        };
        let ypx = PxTicks {
            major: yt
                .iter()
                .map(|(i, l)| (f.y + (*i as f64 + 0.5) * ph / self.rows as f64, l.clone()))
                .collect(),
            minor: vec![],
        };
        let mut body = String::new();
        embedded_png(&mut body, f, self.cols, self.rows, &self.cell_rgb())?;
        let depth = axes(&mut body, f, &xpx, &ypx);
        let xl_y = f.y + f.h + depth + 18.0;
        labels(
            &mut body,
            f,
            &self.title,
            &self.x_label,
            &self.y_label,
            xl_y,
            10.0 + LABEL_FONT / 2.0,
        );
        let bar_x = f.x + f.w + 16.0;
        let used = color_bar(
            &mut body,
            (bar_x, f.y, 16.0, f.h),
            self.colormap,
            (lo, hi),
            false,
            &self.value_label,
        );
        let width = (bar_x + used + 12.0)
            .max(f.x + f.w / 2.0 + text_w(&self.title, TITLE_FONT) / 2.0 + 10.0);
        let height = if self.x_label.is_empty() {
            f.y + f.h + depth + 8.0
        } else {
            xl_y + 10.0
        };
        let mut notes = Vec::new();
        let bad = self.non_finite();
        if bad > 0 {
            notes.push(format!(
                "{} not finite, drawn in {}",
                plural(bad, "cell is", "cells are"),
                hex(self.nan_color)
            ));
        }
        Ok(svg_document(width, height, &self.title, &notes, &body))
    }

    /// Writes the SVG (see [`Heatmap::to_svg`]) to `path` and its PNG ([`svg_to_png`]) beside it
    /// (`path` with the extension `.png`), atomically.
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        save_text(path.as_ref(), "heatmap", self.to_svg())
    }
}

/// About ten ticks for `labels.len()` cells: all when there are at most 12, otherwise every
/// `step`-th (step 1, 2 or 5 times a power of ten), placed where the label is a multiple of the
/// step when the labels are integers (residue 10, 20, ... rather than 1, 11, ...).
fn auto_ticks(labels: &[String]) -> Vec<(usize, String)> {
    let n = labels.len();
    if n <= 12 {
        return labels.iter().cloned().enumerate().collect();
    }
    let step = (nice(n as f64 / 10.0) as usize).max(1);
    let round: Vec<(usize, String)> = labels
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            l.trim()
                .parse::<i64>()
                .is_ok_and(|v| v.rem_euclid(step as i64) == 0)
        })
        .map(|(i, l)| (i, l.clone()))
        .collect();
    if round.len() >= 3 && round.len() <= 2 * n / step + 2 {
        round
    } else {
        (0..n)
            .step_by(step)
            .map(|i| (i, labels[i].clone()))
            .collect()
    }
}

// ------------------------------------------------------------------------------------------------
// Line plots.

/// One named curve of a [`LinePlot`].
#[derive(Clone, Debug)]
pub struct Series {
    name: String,
    x: Vec<f64>,
    y: Vec<f64>,
    band: Option<(Vec<f64>, Vec<f64>)>,
    markers: Option<bool>,
    line: bool,
    dashed: bool,
    color: Option<[u8; 3]>,
}

impl Series {
    /// Points `(x[i], y[i])`, drawn in the order given.
    pub fn new<X: PlotNum, Y: PlotNum>(name: impl Into<String>, x: &[X], y: &[Y]) -> Self {
        Series {
            name: name.into(),
            x: to_vec(x),
            y: to_vec(y),
            band: None,
            markers: None,
            line: true,
            dashed: false,
            color: None,
        }
    }

    /// A shaded band from `lower[i]` to `upper[i]` at `x[i]` (confidence interval, spread over
    /// seeds).
    pub fn band<T: PlotNum>(mut self, lower: &[T], upper: &[T]) -> Self {
        self.band = Some((to_vec(lower), to_vec(upper)));
        self
    }

    /// Markers at the points; by default shown when the series has at most 100 points.
    pub fn markers(mut self, on: bool) -> Self {
        self.markers = Some(on);
        self
    }

    /// The connecting line (default on).
    pub fn line(mut self, on: bool) -> Self {
        self.line = on;
        self
    }

    /// A dashed line.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    /// The colour (default: the `i`-th [`category_color`] for the `i`-th series).
    pub fn color(mut self, c: [u8; 3]) -> Self {
        self.color = Some(c);
        self
    }
}

/// Curves against a common x axis: implied timescales against lag time (log y), VAMP-2 score or
/// loss against epoch. Legend to the right of the plot.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// use hiermd::plot::{LinePlot, Series};
/// let lag = [1.0, 2.0, 5.0, 10.0, 20.0];
/// let t1 = [120.0, 180.0, 230.0, 250.0, 255.0];
/// LinePlot::new()
///     .title("Implied timescales")
///     .x_label("lag time (ns)")
///     .y_label("timescale (ns)")
///     .log_y(true)
///     .series(
///         Series::new("process 1", &lag, &t1)
///             .band(&[100.0, 160.0, 210.0, 230.0, 235.0], &[140.0, 200.0, 250.0, 270.0, 275.0]),
///     )
///     .hline(20.0, "lag = timescale")
///     .save_svg("its.svg")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LinePlot {
    title: String,
    x_label: String,
    y_label: String,
    log_x: bool,
    log_y: bool,
    x_range: Option<(f64, f64)>,
    y_range: Option<(f64, f64)>,
    series: Vec<Series>,
    hlines: Vec<(f64, String)>,
    width: f64,
    height: f64,
}

impl Default for LinePlot {
    fn default() -> Self {
        Self::new()
    }
}

impl LinePlot {
    /// An empty plot, 640 x 420 pixels of plot area and margins (plus the legend).
    pub fn new() -> Self {
        LinePlot {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            log_x: false,
            log_y: false,
            x_range: None,
            y_range: None,
            series: Vec::new(),
            hlines: Vec::new(),
            width: 640.0,
            height: 420.0,
        }
    }

    /// Title above the plot.
    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = t.into();
        self
    }

    /// Label of the x axis.
    pub fn x_label(mut self, t: impl Into<String>) -> Self {
        self.x_label = t.into();
        self
    }

    /// Label of the y axis.
    pub fn y_label(mut self, t: impl Into<String>) -> Self {
        self.y_label = t.into();
        self
    }

    /// Logarithmic x axis (points with x <= 0 are skipped and noted).
    pub fn log_x(mut self, on: bool) -> Self {
        self.log_x = on;
        self
    }

    /// Logarithmic y axis (points with y <= 0 are skipped and noted).
    pub fn log_y(mut self, on: bool) -> Self {
        self.log_y = on;
        self
    }

    /// Fixed x range instead of the data's (curves are clipped to it).
    pub fn x_range(mut self, lo: f64, hi: f64) -> Self {
        self.x_range = Some((lo, hi));
        self
    }

    /// Fixed y range instead of the data's (curves are clipped to it).
    pub fn y_range(mut self, lo: f64, hi: f64) -> Self {
        self.y_range = Some((lo, hi));
        self
    }

    /// Adds a curve.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Adds a dashed horizontal reference line at `y`, labelled at its right end.
    pub fn hline(mut self, y: f64, label: impl Into<String>) -> Self {
        self.hlines.push((y, label.into()));
        self
    }

    /// Size of the canvas without the legend, in pixels (default 640 x 420).
    pub fn size(mut self, width: f64, height: f64) -> Self {
        self.width = width;
        self.height = height;
        self
    }

    fn check(&self) -> Result<()> {
        for s in &self.series {
            ensure!(
                s.x.len() == s.y.len(),
                "line plot: series {:?} has {} x values and {} y values",
                s.name,
                s.x.len(),
                s.y.len()
            );
            if let Some((lo, hi)) = &s.band {
                ensure!(
                    lo.len() == s.x.len() && hi.len() == s.x.len(),
                    "line plot: series {:?} has {} points but a band of {} lower and {} upper \
                     values",
                    s.name,
                    s.x.len(),
                    lo.len(),
                    hi.len()
                );
            }
        }
        for (name, r, log) in [
            ("x", self.x_range, self.log_x),
            ("y", self.y_range, self.log_y),
        ] {
            if let Some((a, b)) = r {
                ensure!(
                    a.is_finite() && b.is_finite() && a < b && (!log || a > 0.0),
                    "line plot: {name} range ({a}, {b}) must be finite with min < max{}",
                    if log {
                        " and min > 0 on a log axis"
                    } else {
                        ""
                    }
                );
            }
        }
        ensure!(
            self.width.is_finite()
                && self.height.is_finite()
                && self.width >= 120.0
                && self.height >= 100.0,
            "line plot: size {} x {} is too small",
            self.width,
            self.height
        );
        Ok(())
    }

    /// The SVG document.
    pub fn to_svg(&self) -> Result<String> {
        self.check()?;
        let ok = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
        let (lx, ly) = (self.log_x, self.log_y);
        let mut notes = Vec::new();
        // Data ranges over everything that will be drawn.
        let (mut xr, mut yr) = (
            (f64::INFINITY, f64::NEG_INFINITY),
            (f64::INFINITY, f64::NEG_INFINITY),
        );
        let grow = |r: &mut (f64, f64), v: f64| {
            r.0 = r.0.min(v);
            r.1 = r.1.max(v);
        };
        for s in &self.series {
            let mut skipped = 0;
            for i in 0..s.x.len() {
                if ok(s.x[i], lx) && ok(s.y[i], ly) {
                    grow(&mut xr, s.x[i]);
                    grow(&mut yr, s.y[i]);
                } else {
                    skipped += 1;
                }
                if let Some((lo, hi)) = &s.band {
                    if ok(s.x[i], lx) && ok(lo[i], ly) && ok(hi[i], ly) {
                        grow(&mut yr, lo[i]);
                        grow(&mut yr, hi[i]);
                    }
                }
            }
            if skipped > 0 {
                notes.push(format!(
                    "series \"{}\": {} skipped (not finite{})",
                    s.name,
                    plural(skipped, "point", "points"),
                    if lx || ly {
                        ", or not positive on a log axis"
                    } else {
                        ""
                    }
                ));
            }
        }
        for (y, label) in &self.hlines {
            if ok(*y, ly) {
                grow(&mut yr, *y);
            } else {
                notes.push(format!("reference line \"{label}\" skipped (not drawable)"));
            }
        }
        let xa = Axis::new(xr.0, xr.1, lx, self.x_range);
        let ya = Axis::new(yr.0, yr.1, ly, self.y_range);

        // Layout.
        let named: Vec<&Series> = self.series.iter().filter(|s| !s.name.is_empty()).collect();
        let legend_w = if named.is_empty() {
            0.0
        } else {
            named
                .iter()
                .map(|s| text_w(&s.name, TICK_FONT))
                .fold(0.0, f64::max)
                + 48.0
        };
        let ytick_w = ya
            .ticks
            .iter()
            .map(|(_, l)| text_w(l, TICK_FONT))
            .fold(0.0, f64::max);
        let left = 10.0 + if self.y_label.is_empty() { 0.0 } else { 22.0 } + ytick_w + 8.0;
        let top = if self.title.is_empty() { 14.0 } else { 40.0 };
        let bottom_reserve = 12.0 + TICK_FONT + if self.x_label.is_empty() { 8.0 } else { 30.0 };
        let f = Frame {
            x: left,
            y: top,
            w: (self.width - left - 20.0).max(40.0),
            h: (self.height - top - bottom_reserve).max(40.0),
        };
        let px = |v: f64| f.x + f.w * xa.frac(v);
        let py = |v: f64| f.y + f.h * (1.0 - ya.frac(v));
        let xt = PxTicks::from_axis(&xa, f.x, f.w, false);
        let yt = PxTicks::from_axis(&ya, f.y, f.h, true);

        let mut body = String::new();
        grid(&mut body, f, &xt.major, &yt.major);
        // Named after its geometry: equal ids mean equal clip paths even when several SVGs are
        // inlined into one HTML page.
        let clip = format!(
            "hiermd-clip-{}-{}-{}-{}",
            num(f.x),
            num(f.y),
            num(f.w),
            num(f.h)
        )
        .replace('.', "_");
        let _ = writeln!(
            body,
            r#"<defs><clipPath id="{clip}"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath></defs>"#,
            num(f.x),
            num(f.y),
            num(f.w),
            num(f.h)
        );
        let _ = writeln!(body, r#"<g clip-path="url(#{clip})">"#);
        let colors: Vec<[u8; 3]> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| s.color.unwrap_or_else(|| category_color(i)))
            .collect();
        // Bands first, so every line is drawn over every band.
        for (s, c) in self.series.iter().zip(&colors) {
            let Some((lo, hi)) = &s.band else { continue };
            let good = |i: usize| ok(s.x[i], lx) && ok(lo[i], ly) && ok(hi[i], ly);
            let mut d = String::new();
            let mut i = 0;
            while i < s.x.len() {
                if !good(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < s.x.len() && good(i) {
                    i += 1;
                }
                for (k, j) in (start..i).enumerate() {
                    let _ = write!(
                        d,
                        "{}{} {}",
                        if k == 0 { "M" } else { "L" },
                        num(px(s.x[j])),
                        num(py(hi[j]))
                    );
                }
                for j in (start..i).rev() {
                    let _ = write!(d, "L{} {}", num(px(s.x[j])), num(py(lo[j])));
                }
                d.push('Z');
            }
            if !d.is_empty() {
                let _ = writeln!(
                    body,
                    r#"<path d="{d}" fill="{}" fill-opacity="0.2" stroke="none"/>"#,
                    hex(*c)
                );
            }
        }
        for (y, _) in &self.hlines {
            if ok(*y, ly) {
                let _ = writeln!(
                    body,
                    r##"<path d="M{} {}H{}" stroke="#555" stroke-width="1" stroke-dasharray="6 4" fill="none"/>"##,
                    num(f.x),
                    num(py(*y)),
                    num(f.x + f.w)
                );
            }
        }
        for (s, c) in self.series.iter().zip(&colors) {
            let good = |i: usize| ok(s.x[i], lx) && ok(s.y[i], ly);
            if s.line {
                let mut d = String::new();
                let mut pen_down = false;
                for i in 0..s.x.len() {
                    if good(i) {
                        let _ = write!(
                            d,
                            "{}{} {}",
                            if pen_down { "L" } else { "M" },
                            num(px(s.x[i])),
                            num(py(s.y[i]))
                        );
                        pen_down = true;
                    } else {
                        pen_down = false;
                    }
                }
                if !d.is_empty() {
                    let _ = writeln!(
                        body,
                        r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round" stroke-linecap="round"{}/>"#,
                        hex(*c),
                        if s.dashed {
                            r#" stroke-dasharray="6 3""#
                        } else {
                            ""
                        }
                    );
                }
            }
            if s.markers.unwrap_or(s.x.len() <= 100) {
                let mut d = String::new();
                for i in (0..s.x.len()).filter(|&i| good(i)) {
                    circle(&mut d, px(s.x[i]), py(s.y[i]), 3.0);
                }
                if !d.is_empty() {
                    let _ = writeln!(
                        body,
                        r#"<path d="{d}" fill="{}" stroke="white" stroke-width="0.8"/>"#,
                        hex(*c)
                    );
                }
            }
        }
        body.push_str("</g>\n");
        for (y, label) in &self.hlines {
            if ok(*y, ly) && !label.is_empty() && (0.0..=1.0).contains(&ya.frac(*y)) {
                text(
                    &mut body,
                    f.x + f.w - 4.0,
                    py(*y) - 4.0,
                    10.0,
                    "end",
                    r##" fill="#444""##,
                    label,
                );
            }
        }
        let depth = axes(&mut body, f, &xt, &yt);
        let xl_y = f.y + f.h + depth + 18.0;
        labels(
            &mut body,
            f,
            &self.title,
            &self.x_label,
            &self.y_label,
            xl_y,
            10.0 + LABEL_FONT / 2.0,
        );
        // Legend.
        let mut width = self.width;
        if !named.is_empty() {
            let lx0 = f.x + f.w + 14.0;
            let rows = named.len() as f64;
            let _ = writeln!(
                body,
                r##"<rect x="{}" y="{}" width="{}" height="{}" fill="white" stroke="#ccc" stroke-width="1"/>"##,
                num(lx0),
                num(f.y),
                num(legend_w),
                num(rows * 18.0 + 8.0)
            );
            for (k, (s, c)) in self
                .series
                .iter()
                .zip(&colors)
                .filter(|(s, _)| !s.name.is_empty())
                .enumerate()
            {
                let cy = f.y + 4.0 + 18.0 * k as f64 + 9.0;
                if s.band.is_some() {
                    let _ = writeln!(
                        body,
                        r#"<rect x="{}" y="{}" width="22" height="10" fill="{}" fill-opacity="0.2"/>"#,
                        num(lx0 + 6.0),
                        num(cy - 5.0),
                        hex(*c)
                    );
                }
                if s.line {
                    let _ = writeln!(
                        body,
                        r#"<path d="M{} {}h22" stroke="{}" stroke-width="1.8"{} fill="none"/>"#,
                        num(lx0 + 6.0),
                        num(cy),
                        hex(*c),
                        if s.dashed {
                            r#" stroke-dasharray="6 3""#
                        } else {
                            ""
                        }
                    );
                }
                if s.markers.unwrap_or(s.x.len() <= 100) || !s.line {
                    let mut d = String::new();
                    circle(&mut d, lx0 + 17.0, cy, 3.0);
                    let _ = writeln!(body, r#"<path d="{d}" fill="{}"/>"#, hex(*c));
                }
                text(
                    &mut body,
                    lx0 + 34.0,
                    cy,
                    TICK_FONT,
                    "start",
                    r#" dy="0.35em""#,
                    &s.name,
                );
            }
            width = width.max(lx0 + legend_w + 10.0);
        }
        width = width.max(f.x + f.w / 2.0 + text_w(&self.title, TITLE_FONT) / 2.0 + 10.0);
        let height = (xl_y + 10.0).max(self.height);
        Ok(svg_document(width, height, &self.title, &notes, &body))
    }

    /// Writes the SVG (see [`LinePlot::to_svg`]) to `path` and its PNG ([`svg_to_png`]) beside it
    /// (`path` with the extension `.png`), atomically.
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        save_text(path.as_ref(), "line plot", self.to_svg())
    }
}

/// A circle of radius `r` at (`x`, `y`) as path commands (two arcs), so many markers share one
/// `<path>`.
fn circle(d: &mut String, x: f64, y: f64, r: f64) {
    let _ = write!(
        d,
        "M{} {}a{r} {r} 0 1 0 {} 0a{r} {r} 0 1 0 -{} 0",
        num(x - r),
        num(y),
        num(2.0 * r),
        num(2.0 * r)
    );
}

// ------------------------------------------------------------------------------------------------
// Scatter plots.

#[derive(Clone, Debug)]
enum PointColors {
    Plain,
    Categories(Vec<usize>),
    Values(Vec<f64>),
}

/// 2-D points, e.g. a SPIB latent space or the first two VAMP components, coloured by a state
/// label ([`ScatterPlot::categories`], legend with counts) or by a value
/// ([`ScatterPlot::values`], viridis with a colour bar).
///
/// Up to [`ScatterPlot::density_above`] drawn points (20,000 by default) become small squares,
/// one `<path>` per colour. Above that the points are binned into 2 x 2-pixel bins, embedded as
/// one PNG: each bin takes the colour of its most frequent category (faded for sparse bins), the
/// mean of its values, or, without colouring, a viridis density on a log scale.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// use hiermd::plot::ScatterPlot;
/// let (z0, z1, state) = (vec![0.0f32; 1000], vec![1.0f32; 1000], vec![0usize; 1000]);
/// ScatterPlot::new(&z0, &z1)
///     .title("SPIB latent space")
///     .x_label("z0")
///     .y_label("z1")
///     .categories(&state)
///     .category_names(vec!["unfolded".into(), "folded".into()])
///     .save_svg("latent.svg")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ScatterPlot {
    title: String,
    x_label: String,
    y_label: String,
    x: Vec<f64>,
    y: Vec<f64>,
    colors: PointColors,
    names: Vec<String>,
    value_label: String,
    value_range: Option<(f64, f64)>,
    density_above: usize,
    point_size: Option<f64>,
    width: f64,
    height: f64,
}

impl ScatterPlot {
    /// Points `(x[i], y[i])` (lengths checked when drawing).
    pub fn new<X: PlotNum, Y: PlotNum>(x: &[X], y: &[Y]) -> Self {
        ScatterPlot {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            x: to_vec(x),
            y: to_vec(y),
            colors: PointColors::Plain,
            names: Vec::new(),
            value_label: String::new(),
            value_range: None,
            density_above: 20_000,
            point_size: None,
            width: 560.0,
            height: 480.0,
        }
    }

    /// Title above the plot.
    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = t.into();
        self
    }

    /// Label of the x axis.
    pub fn x_label(mut self, t: impl Into<String>) -> Self {
        self.x_label = t.into();
        self
    }

    /// Label of the y axis.
    pub fn y_label(mut self, t: impl Into<String>) -> Self {
        self.y_label = t.into();
        self
    }

    /// Colours points by a state label per point, with [`category_color`]`(label)`, so a state
    /// has the same colour in every plot.
    pub fn categories(mut self, labels: &[usize]) -> Self {
        self.colors = PointColors::Categories(labels.to_vec());
        self
    }

    /// Names of the categories for the legend, indexed by label (default "state {label}").
    pub fn category_names(mut self, names: Vec<String>) -> Self {
        self.names = names;
        self
    }

    /// Colours points by a value per point (viridis) with a colour bar labelled `label`.
    pub fn values<T: PlotNum>(mut self, values: &[T], label: impl Into<String>) -> Self {
        self.colors = PointColors::Values(to_vec(values));
        self.value_label = label.into();
        self
    }

    /// Values mapped to the ends of the colour map (default: the drawn values' min and max).
    pub fn value_range(mut self, lo: f64, hi: f64) -> Self {
        self.value_range = Some((lo, hi));
        self
    }

    /// Above this many drawable points, bin them into a density image (default 20,000).
    pub fn density_above(mut self, n: usize) -> Self {
        self.density_above = n;
        self
    }

    /// Side of the square markers in pixels (default 4, 3 or 2 for up to 1,000, 5,000 and more
    /// points).
    pub fn point_size(mut self, px: f64) -> Self {
        self.point_size = Some(px);
        self
    }

    /// Size of the canvas without the legend or colour bar, in pixels (default 560 x 480).
    pub fn size(mut self, width: f64, height: f64) -> Self {
        self.width = width;
        self.height = height;
        self
    }

    fn check(&self) -> Result<()> {
        let n = self.x.len();
        ensure!(
            self.y.len() == n,
            "scatter plot: {} x values and {} y values",
            n,
            self.y.len()
        );
        match &self.colors {
            PointColors::Plain => {}
            PointColors::Categories(l) => ensure!(
                l.len() == n,
                "scatter plot: {} category labels for {n} points",
                l.len()
            ),
            PointColors::Values(v) => ensure!(
                v.len() == n,
                "scatter plot: {} values for {n} points",
                v.len()
            ),
        }
        if let Some((a, b)) = self.value_range {
            ensure!(
                a.is_finite() && b.is_finite() && a < b,
                "scatter plot: value range ({a}, {b}) must be finite with min < max"
            );
        }
        ensure!(
            self.width.is_finite()
                && self.height.is_finite()
                && self.width >= 120.0
                && self.height >= 100.0,
            "scatter plot: size {} x {} is too small",
            self.width,
            self.height
        );
        if let Some(p) = self.point_size {
            ensure!(
                p.is_finite() && p > 0.0,
                "scatter plot: point size {p} must be positive"
            );
        }
        Ok(())
    }

    fn category_name(&self, c: usize) -> String {
        self.names
            .get(c)
            .cloned()
            .unwrap_or_else(|| format!("state {c}"))
    }

    /// The SVG document.
    pub fn to_svg(&self) -> Result<String> {
        self.check()?;
        let n = self.x.len();
        let value = |i: usize| match &self.colors {
            PointColors::Values(v) => v[i],
            _ => 0.0,
        };
        let keep: Vec<usize> = (0..n)
            .filter(|&i| self.x[i].is_finite() && self.y[i].is_finite() && value(i).is_finite())
            .collect();
        let mut notes = Vec::new();
        if keep.len() < n {
            notes.push(format!(
                "{} skipped (non-finite coordinate{})",
                plural(n - keep.len(), "point", "points"),
                if matches!(self.colors, PointColors::Values(_)) {
                    " or value"
                } else {
                    ""
                }
            ));
        }
        let range = |v: &mut dyn Iterator<Item = f64>| {
            v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            })
        };
        let xr = range(&mut keep.iter().map(|&i| self.x[i]));
        let yr = range(&mut keep.iter().map(|&i| self.y[i]));
        let xa = Axis::new(xr.0, xr.1, false, None);
        let ya = Axis::new(yr.0, yr.1, false, None);
        let density = keep.len() > self.density_above;

        // Categories present, with counts, in label order.
        let mut cats: Vec<(usize, usize)> = Vec::new();
        if let PointColors::Categories(l) = &self.colors {
            let mut sorted: Vec<usize> = keep.iter().map(|&i| l[i]).collect();
            sorted.sort_unstable();
            for c in sorted {
                match cats.last_mut() {
                    Some((k, cnt)) if *k == c => *cnt += 1,
                    _ => cats.push((c, 1)),
                }
            }
        }
        let (vlo, vhi) = match (&self.colors, self.value_range) {
            (PointColors::Values(_), Some(r)) => r,
            (PointColors::Values(_), None) => {
                let r = range(&mut keep.iter().map(|&i| value(i)));
                if r.0 > r.1 {
                    (0.0, 1.0)
                } else {
                    r
                }
            }
            _ => (0.0, 1.0),
        };
        let vt = |v: f64| {
            if vhi > vlo {
                ((v - vlo) / (vhi - vlo)).clamp(0.0, 1.0)
            } else {
                0.5
            }
        };

        // Layout: legend or colour bar to the right.
        const MAX_LEGEND: usize = 24;
        let legend_rows: Vec<String> = cats
            .iter()
            .take(MAX_LEGEND)
            .map(|(c, k)| format!("{} ({k})", self.category_name(*c)))
            .collect();
        let ytick_w = ya
            .ticks
            .iter()
            .map(|(_, l)| text_w(l, TICK_FONT))
            .fold(0.0, f64::max);
        let left = 10.0 + if self.y_label.is_empty() { 0.0 } else { 22.0 } + ytick_w + 8.0;
        let top = if self.title.is_empty() { 14.0 } else { 40.0 };
        let bottom_reserve = 12.0 + TICK_FONT + if self.x_label.is_empty() { 8.0 } else { 30.0 };
        let f = Frame {
            x: left,
            y: top,
            w: (self.width - left - 20.0).max(40.0),
            h: (self.height - top - bottom_reserve).max(40.0),
        };
        let px = |v: f64| f.x + f.w * xa.frac(v);
        let py = |v: f64| f.y + f.h * (1.0 - ya.frac(v));
        let xt = PxTicks::from_axis(&xa, f.x, f.w, false);
        let yt = PxTicks::from_axis(&ya, f.y, f.h, true);

        let mut body = String::new();
        grid(&mut body, f, &xt.major, &yt.major);
        let mut density_max = 0u32;
        if density {
            let (bw, bh) = (
                ((f.w / 2.0).round() as usize).max(1),
                ((f.h / 2.0).round() as usize).max(1),
            );
            let bin = |i: usize| {
                let bx = ((xa.frac(self.x[i]) * bw as f64) as usize).min(bw - 1);
                let by = (((1.0 - ya.frac(self.y[i])) * bh as f64) as usize).min(bh - 1);
                by * bw + bx
            };
            let mut count = vec![0u32; bw * bh];
            for &i in &keep {
                count[bin(i)] += 1;
            }
            let cmax = count.iter().copied().max().unwrap_or(0).max(1);
            density_max = cmax;
            let fade = |c: u32| 0.3 + 0.7 * (1.0 + c as f64).ln() / (1.0 + cmax as f64).ln();
            let blend = |col: [u8; 3], a: f64| -> [u8; 3] {
                col.map(|v| (255.0 + (v as f64 - 255.0) * a).round() as u8)
            };
            let mut rgb = vec![255u8; bw * bh * 3];
            match &self.colors {
                PointColors::Plain => {
                    for (b, &c) in count.iter().enumerate() {
                        if c > 0 {
                            let t = (c as f64).ln() / (cmax as f64).ln().max(1e-12);
                            rgb[3 * b..3 * b + 3].copy_from_slice(&viridis(t));
                        }
                    }
                }
                PointColors::Values(_) => {
                    let mut sum = vec![0f64; bw * bh];
                    for &i in &keep {
                        sum[bin(i)] += value(i);
                    }
                    for (b, &c) in count.iter().enumerate() {
                        if c > 0 {
                            let col = viridis(vt(sum[b] / c as f64));
                            rgb[3 * b..3 * b + 3].copy_from_slice(&col);
                        }
                    }
                }
                PointColors::Categories(l) => {
                    // Majority category per bin, counted per dense category index.
                    let index: std::collections::HashMap<usize, usize> =
                        cats.iter().enumerate().map(|(k, (c, _))| (*c, k)).collect();
                    let k = cats.len();
                    let mut best = vec![(0u32, 0usize); bw * bh];
                    if k * bw * bh <= 50_000_000 {
                        let mut per = vec![0u32; k * bw * bh];
                        for &i in &keep {
                            let b = bin(i);
                            let ci = index[&l[i]];
                            per[b * k + ci] += 1;
                            // Ties go to the category seen first in this bin.
                            if per[b * k + ci] > best[b].0 {
                                best[b] = (per[b * k + ci], l[i]);
                            }
                        }
                    } else {
                        for &i in &keep {
                            let b = bin(i);
                            if best[b].0 == 0 {
                                best[b] = (1, l[i]);
                            }
                        }
                    }
                    for (b, &c) in count.iter().enumerate() {
                        if c > 0 {
                            let col = blend(category_color(best[b].1), fade(c));
                            rgb[3 * b..3 * b + 3].copy_from_slice(&col);
                        }
                    }
                }
            }
            embedded_png(&mut body, f, bw, bh, &rgb)?;
            notes.push(format!(
                "{} points binned into a {bw} x {bh} density image",
                keep.len()
            ));
        } else {
            let side = self.point_size.unwrap_or(match keep.len() {
                0..=1000 => 4.0,
                1001..=5000 => 3.0,
                _ => 2.0,
            });
            // Groups of points sharing a colour, drawn in order.
            let mut groups: Vec<([u8; 3], Vec<usize>)> = Vec::new();
            match &self.colors {
                PointColors::Plain => groups.push((category_color(0), keep.clone())),
                PointColors::Categories(l) => {
                    let index: std::collections::HashMap<usize, usize> =
                        cats.iter().enumerate().map(|(k, (c, _))| (*c, k)).collect();
                    groups = cats
                        .iter()
                        .map(|(c, _)| (category_color(*c), Vec::new()))
                        .collect();
                    for &i in &keep {
                        groups[index[&l[i]]].1.push(i);
                    }
                }
                PointColors::Values(_) => {
                    const BINS: usize = 64;
                    groups = (0..BINS)
                        .map(|b| (viridis((b as f64 + 0.5) / BINS as f64), Vec::new()))
                        .collect();
                    for &i in &keep {
                        let b = ((vt(value(i)) * BINS as f64) as usize).min(BINS - 1);
                        groups[b].1.push(i);
                    }
                }
            }
            let h = side / 2.0;
            let s = num(side);
            for (col, idx) in groups.iter().filter(|(_, idx)| !idx.is_empty()) {
                let mut d = String::with_capacity(idx.len() * 22);
                for &i in idx {
                    let _ = write!(
                        d,
                        "M{} {}h{s}v{s}h-{s}z",
                        trim_zeros(format!("{:.1}", px(self.x[i]) - h)),
                        trim_zeros(format!("{:.1}", py(self.y[i]) - h)),
                    );
                }
                let _ = writeln!(
                    body,
                    r#"<path d="{d}" fill="{}" fill-opacity="0.8"/>"#,
                    hex(*col)
                );
            }
        }
        let depth = axes(&mut body, f, &xt, &yt);
        let xl_y = f.y + f.h + depth + 18.0;
        labels(
            &mut body,
            f,
            &self.title,
            &self.x_label,
            &self.y_label,
            xl_y,
            10.0 + LABEL_FONT / 2.0,
        );
        let mut width = self.width;
        let lx0 = f.x + f.w + 14.0;
        match &self.colors {
            PointColors::Categories(_) if !cats.is_empty() => {
                let tw = legend_rows
                    .iter()
                    .map(|l| text_w(l, TICK_FONT))
                    .fold(text_w("+ 000 more", TICK_FONT), f64::max);
                let lw = tw + 30.0;
                let rows = legend_rows.len() + usize::from(cats.len() > MAX_LEGEND);
                let _ = writeln!(
                    body,
                    r##"<rect x="{}" y="{}" width="{}" height="{}" fill="white" stroke="#ccc" stroke-width="1"/>"##,
                    num(lx0),
                    num(f.y),
                    num(lw),
                    num(rows as f64 * 18.0 + 8.0)
                );
                for (k, ((c, _), label)) in cats.iter().zip(&legend_rows).enumerate() {
                    let cy = f.y + 4.0 + 18.0 * k as f64 + 9.0;
                    let _ = writeln!(
                        body,
                        r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/>"#,
                        num(lx0 + 7.0),
                        num(cy - 5.0),
                        hex(category_color(*c))
                    );
                    text(
                        &mut body,
                        lx0 + 23.0,
                        cy,
                        TICK_FONT,
                        "start",
                        r#" dy="0.35em""#,
                        label,
                    );
                }
                if cats.len() > MAX_LEGEND {
                    let cy = f.y + 4.0 + 18.0 * MAX_LEGEND as f64 + 9.0;
                    text(
                        &mut body,
                        lx0 + 23.0,
                        cy,
                        TICK_FONT,
                        "start",
                        r#" dy="0.35em""#,
                        &format!("+ {} more", cats.len() - MAX_LEGEND),
                    );
                }
                width = width.max(lx0 + lw + 10.0);
            }
            PointColors::Values(_) => {
                let used = color_bar(
                    &mut body,
                    (lx0, f.y, 16.0, f.h),
                    Colormap::Viridis,
                    (vlo, vhi),
                    false,
                    &self.value_label,
                );
                width = width.max(lx0 + used + 10.0);
            }
            PointColors::Plain if density => {
                let hi = density_max.max(2) as f64;
                let used = color_bar(
                    &mut body,
                    (lx0, f.y, 16.0, f.h),
                    Colormap::Viridis,
                    (1.0, hi),
                    true,
                    "points per bin",
                );
                width = width.max(lx0 + used + 10.0);
            }
            _ => {}
        }
        width = width.max(f.x + f.w / 2.0 + text_w(&self.title, TITLE_FONT) / 2.0 + 10.0);
        let height = (xl_y + 10.0).max(self.height);
        Ok(svg_document(width, height, &self.title, &notes, &body))
    }

    /// Writes the SVG (see [`ScatterPlot::to_svg`]) to `path` and its PNG ([`svg_to_png`]) beside it
    /// (`path` with the extension `.png`), atomically.
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        save_text(path.as_ref(), "scatter plot", self.to_svg())
    }
}

// ------------------------------------------------------------------------------------------------
// SVG to PNG.

/// PNG pixels per SVG pixel of the PNGs written beside every SVG (see [`svg_to_png`]).
pub const PNG_SCALE: f64 = 2.0;

/// Samples per PNG pixel side: shapes are drawn at this many times the PNG's resolution and
/// averaged down, which anti-aliases edges and text.
const SUPERSAMPLE: usize = 3;

/// The tiny built-in bitmap font: 5 x 9 cells (rows 0-6 above the baseline, 7-8 below it for
/// descenders), one string per glyph, rows separated by `|`, `#` a set pixel. Printable ASCII;
/// [`glyph`] maps a few other characters onto these and draws the rest as `?`.
const FONT: [(char, &str); 95] = [
    (' ', ""),
    ('!', "..#..|..#..|..#..|..#..|..#..|.....|..#.."),
    ('"', ".#.#.|.#.#.|.#.#."),
    ('#', ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#."),
    ('$', "..#..|.####|#.#..|.###.|..#.#|####.|..#.."),
    ('%', "##...|##..#|...#.|..#..|.#...|#..##|...##"),
    ('&', ".##..|#..#.|#.#..|.#...|#.#.#|#..#.|.##.#"),
    ('\'', "..#..|..#..|..#.."),
    ('(', "...#.|..#..|.#...|.#...|.#...|..#..|...#."),
    (')', ".#...|..#..|...#.|...#.|...#.|..#..|.#..."),
    ('*', ".....|..#..|#.#.#|.###.|#.#.#|..#..|....."),
    ('+', ".....|..#..|..#..|#####|..#..|..#..|....."),
    (',', ".....|.....|.....|.....|.....|.##..|..#..|.#..."),
    ('-', ".....|.....|.....|#####|.....|.....|....."),
    ('.', ".....|.....|.....|.....|.....|.##..|.##.."),
    ('/', ".....|....#|...#.|..#..|.#...|#....|....."),
    ('0', ".###.|#...#|#..##|#.#.#|##..#|#...#|.###."),
    ('1', "..#..|.##..|..#..|..#..|..#..|..#..|.###."),
    ('2', ".###.|#...#|....#|...#.|..#..|.#...|#####"),
    ('3', "#####|...#.|..#..|...#.|....#|#...#|.###."),
    ('4', "...#.|..##.|.#.#.|#..#.|#####|...#.|...#."),
    ('5', "#####|#....|####.|....#|....#|#...#|.###."),
    ('6', "..##.|.#...|#....|####.|#...#|#...#|.###."),
    ('7', "#####|....#|...#.|..#..|.#...|.#...|.#..."),
    ('8', ".###.|#...#|#...#|.###.|#...#|#...#|.###."),
    ('9', ".###.|#...#|#...#|.####|....#|...#.|.##.."),
    (':', ".....|.##..|.##..|.....|.##..|.##..|....."),
    (';', ".....|.##..|.##..|.....|.##..|..#..|.#..."),
    ('<', "...#.|..#..|.#...|#....|.#...|..#..|...#."),
    ('=', ".....|.....|#####|.....|#####|.....|....."),
    ('>', ".#...|..#..|...#.|....#|...#.|..#..|.#..."),
    ('?', ".###.|#...#|....#|...#.|..#..|.....|..#.."),
    ('@', ".###.|#...#|....#|.##.#|#.#.#|#.#.#|.###."),
    ('A', ".###.|#...#|#...#|#####|#...#|#...#|#...#"),
    ('B', "####.|#...#|#...#|####.|#...#|#...#|####."),
    ('C', ".###.|#...#|#....|#....|#....|#...#|.###."),
    ('D', "###..|#..#.|#...#|#...#|#...#|#..#.|###.."),
    ('E', "#####|#....|#....|####.|#....|#....|#####"),
    ('F', "#####|#....|#....|####.|#....|#....|#...."),
    ('G', ".###.|#...#|#....|#.###|#...#|#...#|.####"),
    ('H', "#...#|#...#|#...#|#####|#...#|#...#|#...#"),
    ('I', ".###.|..#..|..#..|..#..|..#..|..#..|.###."),
    ('J', "..###|...#.|...#.|...#.|...#.|#..#.|.##.."),
    ('K', "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#"),
    ('L', "#....|#....|#....|#....|#....|#....|#####"),
    ('M', "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#"),
    ('N', "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#"),
    ('O', ".###.|#...#|#...#|#...#|#...#|#...#|.###."),
    ('P', "####.|#...#|#...#|####.|#....|#....|#...."),
    ('Q', ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#"),
    ('R', "####.|#...#|#...#|####.|#.#..|#..#.|#...#"),
    ('S', ".####|#....|#....|.###.|....#|....#|####."),
    ('T', "#####|..#..|..#..|..#..|..#..|..#..|..#.."),
    ('U', "#...#|#...#|#...#|#...#|#...#|#...#|.###."),
    ('V', "#...#|#...#|#...#|#...#|#...#|.#.#.|..#.."),
    ('W', "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#."),
    ('X', "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#"),
    ('Y', "#...#|#...#|.#.#.|..#..|..#..|..#..|..#.."),
    ('Z', "#####|....#|...#.|..#..|.#...|#....|#####"),
    ('[', ".###.|.#...|.#...|.#...|.#...|.#...|.###."),
    ('\\', ".....|#....|.#...|..#..|...#.|....#|....."),
    (']', ".###.|...#.|...#.|...#.|...#.|...#.|.###."),
    ('^', "..#..|.#.#.|#...#"),
    ('_', ".....|.....|.....|.....|.....|.....|#####"),
    ('`', ".#...|..#.."),
    ('a', ".....|.....|.###.|....#|.####|#...#|.####"),
    ('b', "#....|#....|#.##.|##..#|#...#|#...#|####."),
    ('c', ".....|.....|.###.|#....|#....|#...#|.###."),
    ('d', "....#|....#|.##.#|#..##|#...#|#...#|.####"),
    ('e', ".....|.....|.###.|#...#|#####|#....|.###."),
    ('f', "..##.|.#..#|.#...|###..|.#...|.#...|.#..."),
    ('g', ".....|.....|.####|#...#|#...#|#...#|.####|....#|.###."),
    ('h', "#....|#....|#.##.|##..#|#...#|#...#|#...#"),
    ('i', "..#..|.....|.##..|..#..|..#..|..#..|.###."),
    ('j', "...#.|.....|..##.|...#.|...#.|...#.|...#.|#..#.|.##.."),
    ('k', "#....|#....|#..#.|#.#..|##...|#.#..|#..#."),
    ('l', ".##..|..#..|..#..|..#..|..#..|..#..|.###."),
    ('m', ".....|.....|##.#.|#.#.#|#.#.#|#.#.#|#.#.#"),
    ('n', ".....|.....|#.##.|##..#|#...#|#...#|#...#"),
    ('o', ".....|.....|.###.|#...#|#...#|#...#|.###."),
    ('p', ".....|.....|####.|#...#|#...#|#...#|####.|#....|#...."),
    ('q', ".....|.....|.####|#...#|#...#|#...#|.####|....#|....#"),
    ('r', ".....|.....|#.##.|##..#|#....|#....|#...."),
    ('s', ".....|.....|.####|#....|.###.|....#|####."),
    ('t', ".#...|.#...|###..|.#...|.#...|.#..#|..##."),
    ('u', ".....|.....|#...#|#...#|#...#|#..##|.##.#"),
    ('v', ".....|.....|#...#|#...#|#...#|.#.#.|..#.."),
    ('w', ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#."),
    ('x', ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#"),
    ('y', ".....|.....|#...#|#...#|#...#|#...#|.####|....#|.###."),
    ('z', ".....|.....|#####|...#.|..#..|.#...|#####"),
    ('{', "...#.|..#..|..#..|.#...|..#..|..#..|...#."),
    ('|', "..#..|..#..|..#..|..#..|..#..|..#..|..#.."),
    ('}', ".#...|..#..|..#..|...#.|..#..|..#..|.#..."),
    ('~', ".....|.....|.#...|#.#.#|...#.|.....|....."),
];

/// The set pixels (column, row) of a character's glyph; characters outside printable ASCII are
/// drawn as a close ASCII one where there is one, else as `?`.
fn glyph(c: char) -> Vec<(usize, usize)> {
    let c = match c {
        c if (' '..='~').contains(&c) => c,
        '\u{2212}' | '\u{2013}' | '\u{2014}' => '-',
        '\u{00d7}' => 'x',
        '\u{00b7}' | '\u{2022}' => '.',
        '\u{00b5}' | '\u{03bc}' => 'u',
        '\u{00c5}' => 'A',
        '\u{03c3}' => 's',
        '\u{03c4}' => 't',
        '\u{03bb}' => 'l',
        '\u{00a0}' | '\u{2009}' | '\u{202f}' => ' ',
        _ => '?',
    };
    let rows = FONT
        .iter()
        .find(|(g, _)| *g == c)
        .map_or("", |(_, rows)| *rows);
    let mut out = Vec::new();
    for (r, row) in rows.split('|').enumerate() {
        for (col, ch) in row.chars().enumerate() {
            if ch == '#' {
                out.push((col, r));
            }
        }
    }
    out
}

/// A point in canvas pixels.
type Pt = (f64, f64);

/// How a region is painted.
#[derive(Clone, Debug)]
enum Paint {
    Solid([u8; 3]),
    /// A linear gradient in the painted shape's bounding-box units.
    Gradient(Gradient),
}

#[derive(Clone, Debug)]
struct Gradient {
    from: Pt,
    to: Pt,
    stops: Vec<(f64, [u8; 3])>,
}

impl Gradient {
    fn at(&self, t: f64) -> [u8; 3] {
        let t = t.clamp(0.0, 1.0);
        let s = &self.stops;
        match s.iter().position(|(o, _)| *o >= t) {
            None => s.last().map_or([0, 0, 0], |x| x.1),
            Some(0) => s[0].1,
            Some(i) => {
                let (o0, c0) = s[i - 1];
                let (o1, c1) = s[i];
                let f = if o1 > o0 { (t - o0) / (o1 - o0) } else { 1.0 };
                std::array::from_fn(|k| {
                    (c0[k] as f64 + (c1[k] as f64 - c0[k] as f64) * f).round() as u8
                })
            }
        }
    }
}

/// A 2-D affine map `(x, y) -> (a x + c y + e, b x + d y + f)`.
#[derive(Clone, Copy, Debug)]
struct Affine([f64; 6]);

impl Affine {
    fn scale(s: f64) -> Self {
        Affine([s, 0.0, 0.0, s, 0.0, 0.0])
    }
    fn apply(&self, p: Pt) -> Pt {
        let [a, b, c, d, e, f] = self.0;
        (a * p.0 + c * p.1 + e, b * p.0 + d * p.1 + f)
    }
    /// `self` after `other` (`other` applied first).
    fn then(&self, other: &Affine) -> Affine {
        let [a, b, c, d, e, f] = self.0;
        let [a2, b2, c2, d2, e2, f2] = other.0;
        Affine([
            a * a2 + c * b2,
            b * a2 + d * b2,
            a * c2 + c * d2,
            b * c2 + d * d2,
            a * e2 + c * f2 + e,
            b * e2 + d * f2 + f,
        ])
    }
    /// The average length scale (for stroke widths).
    fn scale_factor(&self) -> f64 {
        let [a, b, c, d, _, _] = self.0;
        (a * d - b * c).abs().sqrt()
    }
}

/// Parses `rotate(a [cx cy])`, `translate(x [y])` and `scale(s [t])` lists (what this module
/// writes); anything else is ignored.
fn parse_transform(s: &str) -> Affine {
    let mut m = Affine([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    for part in s.split(')') {
        let Some((name, args)) = part.split_once('(') else {
            continue;
        };
        let v: Vec<f64> = args
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter_map(|x| x.parse().ok())
            .collect();
        let t = match (name.trim(), v.as_slice()) {
            ("rotate", [a, rest @ ..]) => {
                let (cx, cy) = match rest {
                    [cx, cy] => (*cx, *cy),
                    _ => (0.0, 0.0),
                };
                let (s, c) = a.to_radians().sin_cos();
                // translate(c) rotate(a) translate(-c)
                Affine([c, s, -s, c, cx - c * cx + s * cy, cy - s * cx - c * cy])
            }
            ("translate", [x]) => Affine([1.0, 0.0, 0.0, 1.0, *x, 0.0]),
            ("translate", [x, y]) => Affine([1.0, 0.0, 0.0, 1.0, *x, *y]),
            ("scale", [x]) => Affine([*x, 0.0, 0.0, *x, 0.0, 0.0]),
            ("scale", [x, y]) => Affine([*x, 0.0, 0.0, *y, 0.0, 0.0]),
            _ => continue,
        };
        m = m.then(&t);
    }
    m
}

/// A binary coverage mask over a rectangle of the canvas.
struct Mask {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    on: Vec<bool>,
}

impl Mask {
    /// A mask over the part of `bbox` (canvas pixels) inside `clip`.
    fn new(bbox: (f64, f64, f64, f64), clip: (usize, usize, usize, usize)) -> Option<Mask> {
        let x0 = (bbox.0.floor().max(clip.0 as f64)) as usize;
        let y0 = (bbox.1.floor().max(clip.1 as f64)) as usize;
        let x1 = (bbox.2.ceil().min(clip.2 as f64)).max(0.0) as usize;
        let y1 = (bbox.3.ceil().min(clip.3 as f64)).max(0.0) as usize;
        if !(bbox.0.is_finite() && bbox.1.is_finite() && bbox.2.is_finite() && bbox.3.is_finite())
            || x1 <= x0
            || y1 <= y0
        {
            return None;
        }
        let (w, h) = (x1 - x0, y1 - y0);
        Some(Mask {
            x0,
            y0,
            w,
            h,
            on: vec![false; w * h],
        })
    }

    /// Sets the pixels whose centres lie inside the polygon (even-odd rule).
    fn fill_polygon(&mut self, pts: &[Pt]) {
        if pts.len() < 3 {
            return;
        }
        let (mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY);
        for p in pts {
            ylo = ylo.min(p.1);
            yhi = yhi.max(p.1);
        }
        if !(ylo.is_finite() && yhi.is_finite()) {
            return;
        }
        let r0 = ((ylo - 0.5).ceil() - self.y0 as f64).max(0.0) as usize;
        let r1 = (((yhi - 0.5).floor() - self.y0 as f64 + 1.0).max(0.0) as usize).min(self.h);
        let mut xs: Vec<f64> = Vec::new();
        for r in r0..r1 {
            let yc = (self.y0 + r) as f64 + 0.5;
            xs.clear();
            for k in 0..pts.len() {
                let a = pts[k];
                let b = pts[(k + 1) % pts.len()];
                if (a.1 <= yc && yc < b.1) || (b.1 <= yc && yc < a.1) {
                    xs.push(a.0 + (yc - a.1) * (b.0 - a.0) / (b.1 - a.1));
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks_exact(2) {
                let c0 = ((pair[0] - 0.5).ceil() - self.x0 as f64).max(0.0);
                let c1 = ((pair[1] - 0.5).ceil() - self.x0 as f64).min(self.w as f64);
                if c1 > c0 {
                    let row = &mut self.on[r * self.w..(r + 1) * self.w];
                    row[c0 as usize..c1 as usize].fill(true);
                }
            }
        }
    }
}

/// A regular polygon approximating a disc.
fn disc(c: Pt, r: f64) -> Vec<Pt> {
    let n = ((r * 2.0).ceil() as usize).clamp(8, 48);
    (0..n)
        .map(|i| {
            let a = i as f64 / n as f64 * std::f64::consts::TAU;
            (c.0 + r * a.cos(), c.1 + r * a.sin())
        })
        .collect()
}

/// Splits a polyline into the dashes of `pattern` (lengths alternating on and off).
fn dashes(line: &[Pt], pattern: &[f64]) -> Vec<Vec<Pt>> {
    let total: f64 = pattern.iter().sum();
    if pattern.is_empty() || total <= 0.0 || pattern.iter().any(|v| *v < 0.0 || !v.is_finite()) {
        return vec![line.to_vec()];
    }
    let mut out = Vec::new();
    let mut k = 0;
    let mut left = pattern[0];
    let mut on = true;
    let mut cur: Vec<Pt> = vec![line[0]];
    for w in line.windows(2) {
        let (mut a, b) = (w[0], w[1]);
        let mut len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        while len > left {
            let f = left / len;
            let p = (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f);
            if on {
                cur.push(p);
                out.push(std::mem::take(&mut cur));
            } else {
                cur = vec![p];
            }
            on = !on;
            len -= left;
            a = p;
            k = (k + 1) % pattern.len();
            left = pattern[k];
        }
        left -= len;
        if on {
            cur.push(b);
        }
    }
    if on && cur.len() > 1 {
        out.push(cur);
    }
    out
}

/// Subpaths of an SVG path (`M L H V A Z` and their relative forms; curves, which this module
/// never writes, end the parse), flattened to polylines, with whether each is closed.
fn parse_path(d: &str) -> Vec<(Vec<Pt>, bool)> {
    // Tokens: command letters and numbers.
    let mut toks: Vec<Result<char, f64>> = Vec::new();
    let b = d.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_ascii_alphabetic() && c != 'e' && c != 'E' {
            toks.push(Ok(c));
            i += 1;
        } else if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' {
            let start = i;
            i += 1;
            let mut dot = c == '.';
            while i < b.len() {
                let ch = b[i] as char;
                if ch.is_ascii_digit() {
                    i += 1;
                } else if ch == '.' && !dot {
                    dot = true;
                    i += 1;
                } else if (ch == 'e' || ch == 'E')
                    && i + 1 < b.len()
                    && ((b[i + 1] as char).is_ascii_digit() || b[i + 1] == b'-' || b[i + 1] == b'+')
                {
                    i += 2;
                    while i < b.len() && (b[i] as char).is_ascii_digit() {
                        i += 1;
                    }
                    break;
                } else {
                    break;
                }
            }
            match d[start..i].parse::<f64>() {
                Ok(v) => toks.push(Err(v)),
                Err(_) => break,
            }
        } else {
            i += 1;
        }
    }
    let mut out: Vec<(Vec<Pt>, bool)> = Vec::new();
    let mut cur: Vec<Pt> = Vec::new();
    let mut pos: Pt = (0.0, 0.0);
    let mut start: Pt = (0.0, 0.0);
    let mut cmd = 'M';
    let mut t = 0;
    let nums = |t: &mut usize, n: usize| -> Option<Vec<f64>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            match toks.get(*t) {
                Some(Err(x)) => {
                    v.push(*x);
                    *t += 1;
                }
                _ => return None,
            }
        }
        Some(v)
    };
    let flush = |cur: &mut Vec<Pt>, out: &mut Vec<(Vec<Pt>, bool)>, closed: bool| {
        if cur.len() > 1 || (closed && !cur.is_empty()) {
            out.push((std::mem::take(cur), closed));
        } else {
            cur.clear();
        }
    };
    while t < toks.len() {
        if let Ok(c) = toks[t] {
            cmd = c;
            t += 1;
            if c == 'Z' || c == 'z' {
                flush(&mut cur, &mut out, true);
                pos = start;
                continue;
            }
        }
        let rel = cmd.is_ascii_lowercase();
        let base = if rel { pos } else { (0.0, 0.0) };
        match cmd.to_ascii_uppercase() {
            'M' => {
                let Some(v) = nums(&mut t, 2) else { break };
                flush(&mut cur, &mut out, false);
                pos = (base.0 + v[0], base.1 + v[1]);
                start = pos;
                cur.push(pos);
                // Further pairs are line-tos.
                cmd = if rel { 'l' } else { 'L' };
            }
            'L' => {
                let Some(v) = nums(&mut t, 2) else { break };
                pos = (base.0 + v[0], base.1 + v[1]);
                if cur.is_empty() {
                    cur.push(start);
                }
                cur.push(pos);
            }
            'H' => {
                let Some(v) = nums(&mut t, 1) else { break };
                pos = (if rel { pos.0 + v[0] } else { v[0] }, pos.1);
                if cur.is_empty() {
                    cur.push(start);
                }
                cur.push(pos);
            }
            'V' => {
                let Some(v) = nums(&mut t, 1) else { break };
                pos = (pos.0, if rel { pos.1 + v[0] } else { v[0] });
                if cur.is_empty() {
                    cur.push(start);
                }
                cur.push(pos);
            }
            'A' => {
                let Some(v) = nums(&mut t, 7) else { break };
                let end = (base.0 + v[5], base.1 + v[6]);
                if cur.is_empty() {
                    cur.push(pos);
                }
                arc_points(
                    &mut cur,
                    pos,
                    end,
                    v[0].abs(),
                    v[1].abs(),
                    v[3] != 0.0,
                    v[4] != 0.0,
                );
                pos = end;
            }
            _ => break,
        }
    }
    flush(&mut cur, &mut out, false);
    out
}

/// Appends the flattened elliptical arc from `p1` to `p2` (axis-aligned radii `rx`, `ry`, SVG's
/// endpoint parameterisation, F.6.5 of the SVG specification), `p1` excluded.
fn arc_points(out: &mut Vec<Pt>, p1: Pt, p2: Pt, rx: f64, ry: f64, large: bool, sweep: bool) {
    if rx == 0.0 || ry == 0.0 || p1 == p2 {
        out.push(p2);
        return;
    }
    let (x1, y1) = ((p1.0 - p2.0) / 2.0, (p1.1 - p2.1) / 2.0);
    let lambda = x1 * x1 / (rx * rx) + y1 * y1 / (ry * ry);
    let (rx, ry) = if lambda > 1.0 {
        (rx * lambda.sqrt(), ry * lambda.sqrt())
    } else {
        (rx, ry)
    };
    let num = rx * rx * ry * ry - rx * rx * y1 * y1 - ry * ry * x1 * x1;
    let den = rx * rx * y1 * y1 + ry * ry * x1 * x1;
    let sign = if large != sweep { 1.0 } else { -1.0 };
    let coef = sign * (num / den).max(0.0).sqrt();
    let (cxp, cyp) = (coef * rx * y1 / ry, -coef * ry * x1 / rx);
    let c = (cxp + (p1.0 + p2.0) / 2.0, cyp + (p1.1 + p2.1) / 2.0);
    let ang = |ux: f64, uy: f64| uy.atan2(ux);
    let t1 = ang((x1 - cxp) / rx, (y1 - cyp) / ry);
    let t2 = ang((-x1 - cxp) / rx, (-y1 - cyp) / ry);
    let mut dt = t2 - t1;
    if sweep && dt < 0.0 {
        dt += std::f64::consts::TAU;
    } else if !sweep && dt > 0.0 {
        dt -= std::f64::consts::TAU;
    }
    let n = ((dt.abs() / (std::f64::consts::PI / 16.0)).ceil() as usize).max(4);
    for k in 1..=n {
        let t = t1 + dt * k as f64 / n as f64;
        out.push((c.0 + rx * t.cos(), c.1 + ry * t.sin()));
    }
    *out.last_mut().expect("n >= 4") = p2;
}

/// `#rgb`, `#rrggbb` and a few names.
fn parse_color(s: &str) -> Option<[u8; 3]> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix('#') {
        let v = u32::from_str_radix(h, 16).ok()?;
        return match h.len() {
            3 => Some([
                ((v >> 8) & 15) as u8 * 17,
                ((v >> 4) & 15) as u8 * 17,
                (v & 15) as u8 * 17,
            ]),
            6 => Some([(v >> 16) as u8, (v >> 8) as u8, v as u8]),
            _ => None,
        };
    }
    Some(match s {
        "white" => [255, 255, 255],
        "black" => [0, 0, 0],
        "red" => [255, 0, 0],
        "green" => [0, 128, 0],
        "blue" => [0, 0, 255],
        "gray" | "grey" => [128, 128, 128],
        "lightgray" | "lightgrey" => [211, 211, 211],
        _ => return None,
    })
}

/// Decodes base64 (standard alphabet, padding optional, whitespace ignored).
fn unbase64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Decodes an 8-bit RGB (colour type 2) or RGBA (6, alpha dropped) non-interlaced PNG, what
/// [`encode_png`] writes: width, height, RGB rows.
pub fn decode_png(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>)> {
    use std::io::Read as _;
    ensure!(
        bytes.len() > 8 && bytes[..8] == PNG_SIGNATURE,
        "png: not a PNG file (bad signature)"
    );
    let mut at = 8;
    let mut header: Option<(usize, usize, u8)> = None;
    let mut idat = Vec::new();
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = bytes
            .get(at + 8..at + 8 + len)
            .context("png: truncated chunk")?;
        match kind {
            b"IHDR" => {
                ensure!(data.len() == 13, "png: bad IHDR");
                let w = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let h = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes")) as usize;
                ensure!(
                    data[8] == 8 && (data[9] == 2 || data[9] == 6) && data[12] == 0,
                    "png: only 8-bit RGB/RGBA without interlacing is supported"
                );
                ensure!(
                    w > 0 && h > 0 && w.saturating_mul(h) <= 1 << 28,
                    "png: bad size {w} x {h}"
                );
                header = Some((w, h, if data[9] == 2 { 3 } else { 4 }));
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let (w, h, bpp) = header.context("png: no IHDR")?;
    let stride = w * bpp as usize;
    let mut raw = Vec::with_capacity((stride + 1) * h);
    flate2::read::ZlibDecoder::new(&idat[..])
        .take(((stride + 1) * h) as u64)
        .read_to_end(&mut raw)
        .context("png: bad compressed data")?;
    ensure!(raw.len() == (stride + 1) * h, "png: truncated image data");
    let bpp = bpp as usize;
    let mut img = vec![0u8; stride * h];
    for y in 0..h {
        let f = raw[y * (stride + 1)];
        let src = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= bpp {
                img[y * stride + x - bpp]
            } else {
                0
            };
            let b = if y > 0 { img[(y - 1) * stride + x] } else { 0 };
            let c = if x >= bpp && y > 0 {
                img[(y - 1) * stride + x - bpp]
            } else {
                0
            };
            let pred = match f {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                4 => paeth(a, b, c),
                _ => anyhow::bail!("png: bad filter type {f}"),
            };
            img[y * stride + x] = src[x].wrapping_add(pred);
        }
    }
    if bpp == 4 {
        img = img
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
    }
    Ok((w, h, img))
}

/// Replaces XML's predefined and numeric character references.
fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let ent = &rest[1..end];
        let rep = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match rep {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The attributes of a start tag's text after its name.
fn attributes(s: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let Some(q) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            break;
        };
        let Some(end) = after[1..].find(q) else { break };
        out.push((name, xml_unescape(&after[1..1 + end])));
        rest = &after[1 + end + 1..];
    }
    out
}

/// The canvas of [`svg_to_rgb`]: RGB at `SUPERSAMPLE` times the output resolution.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    /// Blends `paint` at `opacity` into the pixels of `mask`; gradients span `bbox`.
    fn paint(&mut self, mask: &Mask, paint: &Paint, opacity: f64, bbox: (f64, f64, f64, f64)) {
        let a = opacity.clamp(0.0, 1.0);
        if a <= 0.0 {
            return;
        }
        for r in 0..mask.h {
            let y = mask.y0 + r;
            for c in 0..mask.w {
                if !mask.on[r * mask.w + c] {
                    continue;
                }
                let x = mask.x0 + c;
                let col = match paint {
                    Paint::Solid(col) => *col,
                    Paint::Gradient(g) => {
                        let (bw, bh) = ((bbox.2 - bbox.0).max(1e-9), (bbox.3 - bbox.1).max(1e-9));
                        let u = ((x as f64 + 0.5) - bbox.0) / bw;
                        let v = ((y as f64 + 0.5) - bbox.1) / bh;
                        let (dx, dy) = (g.to.0 - g.from.0, g.to.1 - g.from.1);
                        let l2 = dx * dx + dy * dy;
                        let t = if l2 > 0.0 {
                            ((u - g.from.0) * dx + (v - g.from.1) * dy) / l2
                        } else {
                            0.0
                        };
                        g.at(t)
                    }
                };
                let px = &mut self.rgb[3 * (y * self.w + x)..3 * (y * self.w + x) + 3];
                for k in 0..3 {
                    px[k] = (px[k] as f64 * (1.0 - a) + col[k] as f64 * a).round() as u8;
                }
            }
        }
    }
}

/// Presentation attributes of one element.
struct Style {
    fill: Option<Paint>,
    stroke: Option<Paint>,
    fill_opacity: f64,
    stroke_opacity: f64,
    stroke_width: f64,
    dash: Vec<f64>,
    round: bool,
}

/// Bounding box of point sets, grown by `pad`.
fn bbox_of<'a>(sets: impl Iterator<Item = &'a Vec<Pt>>, pad: f64) -> (f64, f64, f64, f64) {
    let mut b = (
        f64::INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NEG_INFINITY,
    );
    for s in sets {
        for p in s {
            b.0 = b.0.min(p.0);
            b.1 = b.1.min(p.1);
            b.2 = b.2.max(p.0);
            b.3 = b.3.max(p.1);
        }
    }
    (b.0 - pad, b.1 - pad, b.2 + pad, b.3 + pad)
}

/// Rasterises an SVG written by this module (rect, path with M/L/H/V/A/Z commands, text in the
/// built-in bitmap font, embedded PNG images, linear gradients, rectangular clip paths, rotate
/// transforms) at `scale` pixels per SVG pixel: width, height and RGB rows. Other elements are
/// skipped. Shapes are supersampled for anti-aliasing; text is drawn in a small built-in bitmap
/// font whose glyphs advance 0.6 em, the width this module's layout assumes.
pub fn svg_to_rgb(svg: &str, scale: f64) -> Result<(usize, usize, Vec<u8>)> {
    ensure!(
        scale.is_finite() && scale > 0.0,
        "svg to png: bad scale {scale}"
    );
    let open = svg.find("<svg").context("svg to png: no <svg> element")?;
    let end = svg[open..]
        .find('>')
        .context("svg to png: unterminated <svg>")?;
    let root = attributes(&svg[open + 4..open + end]);
    let dim = |name: &str| -> Result<f64> {
        root.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim_end_matches("px").parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| format!("svg to png: the <svg> element has no usable {name}"))
    };
    let (sw, sh) = (dim("width")?, dim("height")?);
    let (ow, oh) = (
        ((sw * scale).ceil() as usize).max(1),
        ((sh * scale).ceil() as usize).max(1),
    );
    ensure!(
        ow <= 16_384 && oh <= 16_384,
        "svg to png: {ow} x {oh} pixels is too large"
    );
    let ss = SUPERSAMPLE;
    let mut cv = Canvas {
        w: ow * ss,
        h: oh * ss,
        rgb: vec![255; ow * oh * ss * ss * 3],
    };
    let k = scale * ss as f64;
    let base = Affine::scale(k);
    let full = (0, 0, cv.w, cv.h);

    let mut gradients: std::collections::HashMap<String, Gradient> = Default::default();
    let mut clips: std::collections::HashMap<String, (f64, f64, f64, f64)> = Default::default();
    // Open groups: the clip each established (canvas pixels) and its transform.
    let mut groups: Vec<((usize, usize, usize, usize), Affine)> = Vec::new();
    let mut defs = 0usize;
    let mut grad_id: Option<String> = None;
    let mut clip_id: Option<String> = None;

    let mut i = open;
    while let Some(off) = svg[i..].find('<') {
        let start = i + off;
        let rest = &svg[start..];
        if rest.starts_with("<?") {
            i = start + rest.find("?>").map_or(rest.len(), |e| e + 2);
            continue;
        }
        if rest.starts_with("<!--") {
            i = start + rest.find("-->").map_or(rest.len(), |e| e + 3);
            continue;
        }
        let Some(close) = rest.find('>') else { break };
        let tag = &rest[1..close];
        i = start + close + 1;
        if let Some(name) = tag.strip_prefix('/') {
            match name.trim() {
                "defs" => defs = defs.saturating_sub(1),
                "g" => {
                    groups.pop();
                }
                "linearGradient" => grad_id = None,
                "clipPath" => clip_id = None,
                _ => {}
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
        let name = &tag[..name_end];
        let attrs = attributes(&tag[name_end..]);
        let get = |n: &str| attrs.iter().find(|(a, _)| *a == n).map(|(_, v)| v.as_str());
        let num_of = |n: &str, rel: f64| -> f64 {
            match get(n) {
                Some(v) if v.ends_with('%') => {
                    v.trim_end_matches('%').parse::<f64>().unwrap_or(0.0) / 100.0 * rel
                }
                Some(v) => v.trim_end_matches("px").parse().unwrap_or(0.0),
                None => 0.0,
            }
        };
        let (clip, parent) = groups.last().copied().unwrap_or((full, base));
        let m = match get("transform") {
            Some(t) => parent.then(&parse_transform(t)),
            None => parent,
        };
        match name {
            "defs" => {
                if !self_closing {
                    defs += 1;
                }
                continue;
            }
            "linearGradient" => {
                let id = get("id").unwrap_or("").to_string();
                let at = |n: &str, d: f64| get(n).map_or(d, |_| num_of(n, 1.0));
                gradients.insert(
                    id.clone(),
                    Gradient {
                        from: (at("x1", 0.0), at("y1", 0.0)),
                        to: (at("x2", 1.0), at("y2", 0.0)),
                        stops: Vec::new(),
                    },
                );
                if !self_closing {
                    grad_id = Some(id);
                }
                continue;
            }
            "stop" => {
                if let Some(g) = grad_id.as_ref().and_then(|id| gradients.get_mut(id)) {
                    let o = num_of("offset", 1.0).clamp(0.0, 1.0);
                    let c = get("stop-color").and_then(parse_color).unwrap_or([0, 0, 0]);
                    g.stops.push((o, c));
                }
                continue;
            }
            "clipPath" => {
                if !self_closing {
                    clip_id = Some(get("id").unwrap_or("").to_string());
                }
                continue;
            }
            "g" => {
                if !self_closing {
                    let mut c = clip;
                    if let Some(id) = get("clip-path")
                        .and_then(|v| v.strip_prefix("url(#"))
                        .and_then(|v| v.strip_suffix(')'))
                    {
                        if let Some(&(x0, y0, x1, y1)) = clips.get(id) {
                            let (a, b) = (m.apply((x0, y0)), m.apply((x1, y1)));
                            c = (
                                c.0.max(a.0.min(b.0).round().max(0.0) as usize),
                                c.1.max(a.1.min(b.1).round().max(0.0) as usize),
                                c.2.min(a.0.max(b.0).round().max(0.0) as usize),
                                c.3.min(a.1.max(b.1).round().max(0.0) as usize),
                            );
                        }
                    }
                    groups.push((c, m));
                }
                continue;
            }
            _ => {}
        }
        if name == "rect" {
            if let Some(id) = &clip_id {
                let (x, y) = (num_of("x", sw), num_of("y", sh));
                clips.insert(
                    id.clone(),
                    (x, y, x + num_of("width", sw), y + num_of("height", sh)),
                );
                continue;
            }
        }
        if defs > 0 {
            continue;
        }
        let paint_of = |v: Option<&str>, default: Option<[u8; 3]>| -> Option<Paint> {
            match v {
                None => default.map(Paint::Solid),
                Some("none") => None,
                Some(v) => {
                    if let Some(id) = v.strip_prefix("url(#").and_then(|v| v.strip_suffix(')')) {
                        gradients.get(id).cloned().map(Paint::Gradient)
                    } else {
                        parse_color(v).map(Paint::Solid)
                    }
                }
            }
        };
        let op = |n: &str| get(n).and_then(|v| v.parse::<f64>().ok()).unwrap_or(1.0);
        let opacity = op("opacity");
        let style = Style {
            fill: paint_of(get("fill"), Some([0, 0, 0])),
            stroke: paint_of(get("stroke"), None),
            fill_opacity: op("fill-opacity") * opacity,
            stroke_opacity: op("stroke-opacity") * opacity,
            stroke_width: get("stroke-width")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(1.0),
            dash: get("stroke-dasharray")
                .map(|v| {
                    v.split(|c: char| c == ',' || c.is_whitespace())
                        .filter_map(|x| x.parse::<f64>().ok())
                        .collect()
                })
                .unwrap_or_default(),
            round: get("stroke-linecap") == Some("round")
                || get("stroke-linejoin") == Some("round"),
        };
        match name {
            "rect" => {
                let (x, y) = (num_of("x", sw), num_of("y", sh));
                let (w, h) = (num_of("width", sw), num_of("height", sh));
                if w <= 0.0 || h <= 0.0 {
                    continue;
                }
                let pts: Vec<Pt> = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
                    .iter()
                    .map(|&p| m.apply(p))
                    .collect();
                draw_shape(&mut cv, &[(pts, true)], &style, &m, clip);
            }
            "path" => {
                let Some(d) = get("d") else { continue };
                let subs: Vec<(Vec<Pt>, bool)> = parse_path(d)
                    .into_iter()
                    .map(|(pts, closed)| (pts.iter().map(|&p| m.apply(p)).collect(), closed))
                    .collect();
                draw_shape(&mut cv, &subs, &style, &m, clip);
            }
            "image" => {
                let href = get("xlink:href").or_else(|| get("href")).unwrap_or("");
                let Some(data) = href.strip_prefix("data:image/png;base64,") else {
                    continue;
                };
                let Some(bytes) = unbase64(data) else {
                    continue;
                };
                let Ok((iw, ih, img)) = decode_png(&bytes) else {
                    continue;
                };
                let (x, y) = (num_of("x", sw), num_of("y", sh));
                let (w, h) = (num_of("width", sw), num_of("height", sh));
                draw_image(&mut cv, (iw, ih, &img), (x, y, w, h), &m, clip);
            }
            "text" => {
                let content = if self_closing {
                    String::new()
                } else {
                    let body_end = svg[i..].find("</text>").map_or(svg.len(), |e| i + e);
                    let c = xml_unescape(&svg[i..body_end]);
                    i = (body_end + "</text>".len()).min(svg.len());
                    c
                };
                let size = get("font-size")
                    .and_then(|v| v.trim_end_matches("px").parse::<f64>().ok())
                    .unwrap_or(16.0);
                let dy = match get("dy") {
                    Some(v) if v.ends_with("em") => {
                        v.trim_end_matches("em").parse::<f64>().unwrap_or(0.0) * size
                    }
                    Some(v) => v.trim_end_matches("px").parse::<f64>().unwrap_or(0.0),
                    None => 0.0,
                };
                let x = num_of("x", sw);
                let y = num_of("y", sh) + dy;
                let bold = matches!(get("font-weight"), Some("bold") | Some("700"));
                let color = match paint_of(get("fill"), Some([0, 0, 0])) {
                    Some(Paint::Solid(c)) => c,
                    Some(Paint::Gradient(g)) => g.at(0.5),
                    None => continue,
                };
                draw_text(
                    &mut cv,
                    &content,
                    (x, y, size),
                    get("text-anchor").unwrap_or("start"),
                    bold,
                    &m,
                    clip,
                    (color, style.fill_opacity),
                );
            }
            _ => {}
        }
    }

    // Average SUPERSAMPLE x SUPERSAMPLE blocks.
    let mut out = vec![0u8; ow * oh * 3];
    let n = (ss * ss) as u32;
    for y in 0..oh {
        for x in 0..ow {
            let mut acc = [0u32; 3];
            for sy in 0..ss {
                let row = (y * ss + sy) * cv.w;
                for sx in 0..ss {
                    let p = 3 * (row + x * ss + sx);
                    for (a, v) in acc.iter_mut().zip(&cv.rgb[p..p + 3]) {
                        *a += *v as u32;
                    }
                }
            }
            let o = 3 * (y * ow + x);
            for (dst, a) in out[o..o + 3].iter_mut().zip(acc) {
                *dst = ((a + n / 2) / n) as u8;
            }
        }
    }
    Ok((ow, oh, out))
}

/// Fills and strokes subpaths already in canvas pixels.
fn draw_shape(
    cv: &mut Canvas,
    subs: &[(Vec<Pt>, bool)],
    style: &Style,
    m: &Affine,
    clip: (usize, usize, usize, usize),
) {
    if subs.is_empty() {
        return;
    }
    let shape_box = bbox_of(subs.iter().map(|(p, _)| p), 0.0);
    if let Some(fill) = &style.fill {
        if let Some(mut mask) = Mask::new(shape_box, clip) {
            for (pts, _) in subs {
                mask.fill_polygon(pts);
            }
            cv.paint(&mask, fill, style.fill_opacity, shape_box);
        }
    }
    if let Some(stroke) = &style.stroke {
        let w = style.stroke_width * m.scale_factor();
        if w <= 0.0 || !w.is_finite() {
            return;
        }
        let hw = w / 2.0;
        let Some(mut mask) = Mask::new(bbox_of(subs.iter().map(|(p, _)| p), hw + 1.0), clip) else {
            return;
        };
        let dash: Vec<f64> = style.dash.iter().map(|d| d * m.scale_factor()).collect();
        for (pts, closed) in subs {
            let mut line = pts.clone();
            if *closed && line.len() > 1 {
                line.push(line[0]);
            }
            if line.len() < 2 {
                continue;
            }
            let pieces = if dash.is_empty() {
                vec![line.clone()]
            } else {
                dashes(&line, &dash)
            };
            for piece in &pieces {
                for seg in piece.windows(2) {
                    let (a, b) = (seg[0], seg[1]);
                    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                    let len = (dx * dx + dy * dy).sqrt();
                    if len <= 0.0 {
                        continue;
                    }
                    let (nx, ny) = (-dy / len * hw, dx / len * hw);
                    mask.fill_polygon(&[
                        (a.0 + nx, a.1 + ny),
                        (b.0 + nx, b.1 + ny),
                        (b.0 - nx, b.1 - ny),
                        (a.0 - nx, a.1 - ny),
                    ]);
                }
                // Joins (and round caps): discs at the vertices.
                let (lo, hi) = if style.round || (*closed && dash.is_empty()) {
                    (0, piece.len())
                } else {
                    (1, piece.len().saturating_sub(1))
                };
                if hw >= 1.0 {
                    for p in &piece[lo..hi.max(lo)] {
                        mask.fill_polygon(&disc(*p, hw));
                    }
                }
            }
        }
        cv.paint(&mask, stroke, style.stroke_opacity, shape_box);
    }
}

/// Draws an RGB image over the SVG rectangle `(x, y, w, h)` (nearest pixel, as
/// `image-rendering: pixelated`).
fn draw_image(
    cv: &mut Canvas,
    (iw, ih, img): (usize, usize, &[u8]),
    (x, y, w, h): (f64, f64, f64, f64),
    m: &Affine,
    clip: (usize, usize, usize, usize),
) {
    if w <= 0.0 || h <= 0.0 {
        return;
    }
    let (a, b) = (m.apply((x, y)), m.apply((x + w, y + h)));
    let (x0, y0, x1, y1) = (a.0.min(b.0), a.1.min(b.1), a.0.max(b.0), a.1.max(b.1));
    let cx0 = (x0.round().max(clip.0 as f64)) as usize;
    let cy0 = (y0.round().max(clip.1 as f64)) as usize;
    let cx1 = (x1.round().min(clip.2 as f64)).max(0.0) as usize;
    let cy1 = (y1.round().min(clip.3 as f64)).max(0.0) as usize;
    for py in cy0..cy1 {
        let sy = (((py as f64 + 0.5 - y0) / (y1 - y0) * ih as f64) as usize).min(ih - 1);
        for px in cx0..cx1 {
            let sx = (((px as f64 + 0.5 - x0) / (x1 - x0) * iw as f64) as usize).min(iw - 1);
            let s = 3 * (sy * iw + sx);
            let d = 3 * (py * cv.w + px);
            cv.rgb[d..d + 3].copy_from_slice(&img[s..s + 3]);
        }
    }
}

/// Draws a line of text in the built-in font: baseline at `y`, `size` the font size (glyph
/// pixels of size/10, advance 0.6 em), anchored at `x` by `anchor` (start, middle or end).
#[allow(clippy::too_many_arguments)]
fn draw_text(
    cv: &mut Canvas,
    content: &str,
    (x, y, size): (f64, f64, f64),
    anchor: &str,
    bold: bool,
    m: &Affine,
    clip: (usize, usize, usize, usize),
    (color, opacity): ([u8; 3], f64),
) {
    let n = content.chars().count();
    if n == 0 || size <= 0.0 {
        return;
    }
    let u = size / 10.0;
    let width = n as f64 * 6.0 * u;
    let left = match anchor {
        "middle" => x - width / 2.0 + 0.5 * u,
        "end" => x - width + u,
        _ => x,
    };
    let top = y - 7.0 * u;
    let pw = if bold { 1.45 * u } else { u };
    let mut quads: Vec<Vec<Pt>> = Vec::new();
    for (ci, ch) in content.chars().enumerate() {
        let gx = left + ci as f64 * 6.0 * u;
        for (col, row) in glyph(ch) {
            let (px, py) = (gx + col as f64 * u, top + row as f64 * u);
            quads.push(
                [(px, py), (px + pw, py), (px + pw, py + u), (px, py + u)]
                    .iter()
                    .map(|&p| m.apply(p))
                    .collect(),
            );
        }
    }
    let bbox = bbox_of(quads.iter(), 0.0);
    if let Some(mut mask) = Mask::new(bbox, clip) {
        for q in &quads {
            mask.fill_polygon(q);
        }
        cv.paint(&mask, &Paint::Solid(color), opacity, bbox);
    }
}

/// Rasterises an SVG written by this module (see [`svg_to_rgb`]) at [`PNG_SCALE`] pixels per SVG
/// pixel and encodes it as PNG.
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    let (w, h, rgb) = svg_to_rgb(svg, PNG_SCALE)?;
    encode_png(w, h, &rgb)
}
