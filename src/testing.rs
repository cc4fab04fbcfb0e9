//! Test support shared by the op tests, the shim tests and `hiermd demo`: fresh seeded random
//! inputs, one test body run on every device, comparisons against an f64 reference, and
//! central-difference gradient checks.
//!
//! Devices are chosen by `HIERMD_TEST_DEVICES` (default `cpu,emu,cuda`). A device listed by
//! default but absent (cuda on a machine without a driver) is skipped and the reason printed; a
//! device listed explicitly in the variable must run, so a GPU machine cannot pass by skipping.

use crate::device::{CudaDevice, Device};
use anyhow::{bail, Result};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The SplitMix64 finaliser: a cheap, well-mixed hash of a 64-bit value.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed from the clock, so that every run draws fresh inputs.
pub fn clock_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(t ^ (std::process::id() as u64) << 32)
}

/// The seed of this test process: `HIERMD_TEST_SEED` to replay a failure, else from the clock.
pub fn test_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        std::env::var("HIERMD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(clock_seed)
    })
}

/// A small, fast, seeded random generator (xoshiro256**).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = splitmix64(z);
        }
        Self { s }
    }

    /// A generator for one test: the process seed mixed with the test's name, so tests draw
    /// different inputs, all reproducible from the one printed seed.
    pub fn for_test(name: &str) -> Self {
        Self::for_name(test_seed(), name)
    }

    /// A generator for one named consumer of a run's seed (a test, a device-check family): the
    /// seed mixed with an FNV-1a hash of the name.
    pub fn for_name(seed: u64, name: &str) -> Self {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Self::new(seed ^ h)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniformly random rotation matrix (row-major), from a normalised random quaternion
    /// (equivariance tests rotate inputs by it).
    pub fn rotation(&mut self) -> [[f64; 3]; 3] {
        let q: [f64; 4] = std::array::from_fn(|_| self.normal());
        let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
        let [w, x, y, z] = q.map(|c| c / n);
        [
            [
                1.0 - 2.0 * (y * y + z * z),
                2.0 * (x * y - w * z),
                2.0 * (x * z + w * y),
            ],
            [
                2.0 * (x * y + w * z),
                1.0 - 2.0 * (x * x + z * z),
                2.0 * (y * z - w * x),
            ],
            [
                2.0 * (x * z - w * y),
                2.0 * (y * z + w * x),
                1.0 - 2.0 * (x * x + y * y),
            ],
        ]
    }

    /// `n` normal values scaled by `scale`, as f32.
    pub fn normal_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// Whether a device can be opened here, and why not.
pub enum Availability {
    /// Opened.
    Ready(Device),
    /// Not available, with the reason.
    Missing(String),
}

fn cuda_availability() -> Availability {
    match CudaDevice::open(0) {
        Ok(d) => Availability::Ready(Device::Cuda(d)),
        Err(e) => Availability::Missing(format!("{e:#}")),
    }
}

/// The devices tests run on, each with its availability; `required` is true for those listed
/// explicitly in `HIERMD_TEST_DEVICES`.
pub fn test_devices() -> Vec<(String, bool, Availability)> {
    let (list, explicit) = match std::env::var("HIERMD_TEST_DEVICES") {
        Ok(v) if !v.trim().is_empty() => (v, true),
        _ => ("cpu,emu,cuda".to_string(), false),
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let avail = match name {
                "cpu" => Availability::Ready(Device::Cpu),
                "emu" => Availability::Ready(Device::emu()),
                "cuda" => cuda_availability(),
                other => Availability::Missing(format!("unknown test device {other:?}")),
            };
            (name.to_string(), explicit, avail)
        })
        .collect()
}

/// Runs `body` on every test device. Prints one line naming the devices that ran and those
/// skipped with the reason; panics if the body fails on any device, or if a required device is
/// missing.
pub fn run_on_devices(test: &str, body: impl Fn(&Device) -> Result<()>) {
    run_on(test, true, body)
}

/// As [`run_on_devices`], for tests whose subject is a kernel: the cpu device, which has none,
/// is reported as not applicable.
pub fn run_on_kernel_devices(test: &str, body: impl Fn(&Device) -> Result<()>) {
    run_on(test, false, body)
}

fn run_on(test: &str, with_cpu: bool, body: impl Fn(&Device) -> Result<()>) {
    let mut ran = Vec::new();
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    for (name, required, avail) in test_devices() {
        match avail {
            Availability::Ready(Device::Cpu) if !with_cpu => {
                skipped.push("cpu (not applicable: the test checks a kernel)".to_string())
            }
            Availability::Ready(dev) => {
                let label = match &dev {
                    Device::Emu(e) => format!("emu(seed {})", e.seed()),
                    d => d.name(),
                };
                match body(&dev).and_then(|_| dev.synchronize()) {
                    Ok(()) => ran.push(label),
                    Err(e) => failures.push(format!("{label}: {e:#}")),
                }
            }
            Availability::Missing(why) if required => {
                failures.push(format!("{name}: required by HIERMD_TEST_DEVICES but {why}"))
            }
            Availability::Missing(why) => skipped.push(format!("{name} ({why})")),
        }
    }
    // Straight to the stderr handle, not eprintln!: the test harness captures the print macros of
    // passing tests, and this line (which devices ran, which were skipped and why) must show in
    // every plain `cargo test` run.
    let line = format!(
        "[{test}] seed {}: ran on {}; skipped {}\n",
        test_seed(),
        if ran.is_empty() {
            "nothing".into()
        } else {
            ran.join(", ")
        },
        if skipped.is_empty() {
            "none".into()
        } else {
            skipped.join(", ")
        }
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    if !failures.is_empty() {
        panic!(
            "[{test}] failed (replay with HIERMD_TEST_SEED={}):\n  {}",
            test_seed(),
            failures.join("\n  ")
        );
    }
}

/// Defines a `#[test]` that runs its body on every test device:
///
/// ```ignore
/// device_test!(silu_matches_reference, |dev| { ...; Ok(()) });
/// ```
#[macro_export]
macro_rules! device_test {
    ($name:ident, |$dev:ident| $body:block) => {
        #[test]
        fn $name() {
            $crate::testing::run_on_devices(
                stringify!($name),
                |$dev: &$crate::Device| -> ::anyhow::Result<()> { $body },
            );
        }
    };
}

/// Defines a `#[test]` whose subject is a kernel: runs on emu and cuda (cpu has no kernels).
#[macro_export]
macro_rules! kernel_test {
    ($name:ident, |$dev:ident| $body:block) => {
        #[test]
        fn $name() {
            $crate::testing::run_on_kernel_devices(
                stringify!($name),
                |$dev: &$crate::Device| -> ::anyhow::Result<()> { $body },
            );
        }
    };
}

/// Median wall time in seconds of `reps` runs of `f`, after `warmups` untimed runs; the device
/// is synchronised after each run so that queued GPU work is counted. For benchmarks, never for
/// assertions.
pub fn median_seconds(
    dev: &Device,
    warmups: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmups {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let s = std::time::Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Result of comparing values with a reference.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    /// Largest |got - want|.
    pub max_abs: f64,
    /// ||got - want|| / ||want|| (2-norms).
    pub rel_l2: f64,
}

/// Checks `|got - want| <= atol + rtol * |want|` element by element (NaN never passes) and
/// returns the error measures; the error names the worst element.
pub fn assert_close(
    what: &str,
    got: &[f32],
    want: &[f64],
    atol: f64,
    rtol: f64,
) -> Result<Comparison> {
    assert_close_each(what, got, want, atol, rtol, &[])
}

/// As [`assert_close`], element `i` allowed `extra[i]` beyond `atol + rtol |want|` (a bound that
/// follows that element's own numerics, e.g. [`AdamRounding`]; `extra` empty: none).
pub fn assert_close_each(
    what: &str,
    got: &[f32],
    want: &[f64],
    atol: f64,
    rtol: f64,
    extra: &[f64],
) -> Result<Comparison> {
    if got.len() != want.len() {
        bail!("{what}: {} values, reference has {}", got.len(), want.len());
    }
    let (mut max_abs, mut num, mut den) = (0.0f64, 0.0f64, 0.0f64);
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if !g.is_finite() {
            bail!("{what}: element {i} is {g} (reference {w}): never written, or overflowed");
        }
        let d = (g - w).abs();
        max_abs = max_abs.max(d);
        num += d * d;
        den += w * w;
        let excess = d - (atol + rtol * w.abs() + extra.get(i).copied().unwrap_or(0.0));
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        bail!(
            "{what}: element {i} is {} but the reference is {} (|diff| {:.3e} > {atol:.1e} + {rtol:.1e}*|ref|); max |diff| {max_abs:.3e}",
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs()
        );
    }
    Ok(Comparison {
        max_abs,
        rel_l2: if den > 0.0 {
            (num / den).sqrt()
        } else {
            num.sqrt()
        },
    })
}

/// A central difference `(f(h) - f(-h)) / 2h` (of a loss along a direction, say) and an estimate
/// of its own error: `4 |fd(h) - fd(2h)|`. Truncation error grows as h^2 and rounding error (an
/// f32 loss summed over many terms, divided by 2h) as 1/h, so the two estimates differ by about
/// the larger of their errors. A test then allows `tol * scale + error`: a wrong derivative is
/// off by far more, a right one is no longer failed by the difference's own noise.
pub fn central_difference(mut f: impl FnMut(f64) -> Result<f64>, h: f64) -> Result<(f64, f64)> {
    let fd = (f(h)? - f(-h)?) / (2.0 * h);
    let fd2 = (f(2.0 * h)? - f(-2.0 * h)?) / (4.0 * h);
    Ok((fd, 4.0 * (fd - fd2).abs()))
}

/// Central-difference check of an analytic gradient of a scalar function, in f64.
///
/// A coordinate passes when `|fd - analytic| <= tol * max(1, |fd|) + noise`, where `noise` is the
/// finite difference's own error at that coordinate, which depends on the step and on the
/// function, not on the gradient under test: its truncation error (O(step^2), measured as
/// `|fd(step) - fd(2 step)|`, which is 3x the truncation error of `fd(step)`) and its rounding
/// error (the function's values carry a relative error of a few ulps of their size, `eps |f|`,
/// and the difference divides it by `2 step`; a sum of many terms that cancel carries more, which
/// the same measured difference picks up). Both enter with a safety factor of 4. A wrong gradient
/// is off by far more than either: the test still fails on it, but no longer on the finite
/// difference's own noise (a CI run once failed at analytic -0.6865591390 vs FD -0.6865592397
/// with tol 1e-7: rounding of a 640-term sum divided by a 1e-6 step).
pub fn check_gradient(
    what: &str,
    f: impl Fn(&[f64]) -> f64,
    x: &[f64],
    analytic: &[f64],
    step: f64,
    tol: f64,
) -> Result<()> {
    if x.len() != analytic.len() {
        bail!(
            "{what}: gradient has {} entries for {} inputs",
            analytic.len(),
            x.len()
        );
    }
    let mut xp = x.to_vec();
    let mut central = |i: usize, h: f64| {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        ((fp - fm) / (2.0 * h), fp.abs().max(fm.abs()))
    };
    for i in 0..x.len() {
        let (fd, size) = central(i, step);
        let (fd2, _) = central(i, 2.0 * step);
        let rounding = 4.0 * f64::EPSILON * size / step;
        let noise = 4.0 * ((fd - fd2).abs() + rounding);
        // Written so that NaN on either side fails.
        let within = (fd - analytic[i]).abs() <= tol * fd.abs().max(1.0) + noise;
        if !within {
            bail!(
                "{what}: d/dx[{i}] analytic {} vs finite difference {fd} (x = {}; allowed {:.2e} + the difference's own error {noise:.2e})",
                analytic[i],
                x[i],
                tol * fd.abs().max(1.0)
            );
        }
    }
    Ok(())
}

/// First-order bounds on how far an f32 Adam / AdamW state may drift from the f64 reference
/// through rounding alone, element by element: what a fixed tolerance cannot express. With
/// coupled L2 decay the gradient read is `gs g + l2 p`, which can cancel to almost nothing;
/// Adam then divides the moments of that small difference by the square root of their second
/// moment, so its few ulps of rounding become a large relative error of the step. A fixed
/// tolerance fails such an element at some seeds (the seed sweep found it: 3 of 200); this
/// bound follows each rounding through the update instead.
#[derive(Clone, Debug)]
pub struct AdamRounding {
    /// Bound on |p_f32 - p_f64|.
    pub p: Vec<f64>,
    /// Bound on |m_f32 - m_f64|.
    pub m: Vec<f64>,
    /// Bound on |v_f32 - v_f64|.
    pub v: Vec<f64>,
}

impl AdamRounding {
    /// The bounds of `n` elements whose parameters start as exact f32 values (no error yet).
    pub fn new(n: usize) -> Self {
        Self {
            p: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Advances the bounds over one step of `crate::optim::adam_update_host`, given the f64
    /// state before the step (`p`, `m`, `v`) and the gradient `g` (as f32 values). Each f32
    /// operation may err by 2 ulps (2^-23 relative: a GPU's division and square root may be
    /// approximate), the scalars are rounded to f32 too, and errors in the inputs of an
    /// operation are carried through its derivative.
    pub fn step(&mut self, p: &[f64], g: &[f64], m: &[f64], v: &[f64], s: &crate::optim::AdamStep) {
        let e = 2f64.powi(-23);
        for i in 0..p.len() {
            let (p0, ep) = (p[i], self.p[i]);
            // gi = gs g + l2 p0: the scalars' rounding, two products and a sum.
            let (a, b) = (s.grad_scale * g[i], s.l2_decay * p0);
            let gi = a + b;
            let eg = 2.0 * e * a.abs() + 2.0 * e * b.abs() + e * gi.abs() + s.l2_decay.abs() * ep;
            // mi = m + (1 - b1)(gi - m).
            let mi = m[i] + s.one_minus_beta1 * (gi - m[i]);
            let em = (1.0 - s.one_minus_beta1) * self.m[i]
                + s.one_minus_beta1 * eg
                + 3.0 * e * (m[i].abs() + mi.abs() + (gi - m[i]).abs());
            // vi = b2 v + (1 - b2) gi^2.
            let vi = s.beta2 * v[i] + s.one_minus_beta2 * gi * gi;
            let ev = s.beta2 * self.v[i]
                + s.one_minus_beta2 * (2.0 * gi.abs() * eg + eg * eg)
                + 4.0 * e * vi;
            // denom = sqrt(vi) / bc2s + eps; |sqrt(x) - sqrt(y)| <= min(|x - y| / 2 sqrt(y),
            // sqrt(|x - y|)), so a second moment near zero is bounded too.
            let sq = vi.sqrt();
            let es = if sq > 0.0 {
                (ev / (2.0 * sq)).min(ev.sqrt())
            } else {
                ev.sqrt()
            } + e * sq;
            let denom = sq / s.bias_correction2_sqrt + s.eps;
            let ed = es / s.bias_correction2_sqrt + 3.0 * e * denom;
            // u = mi / denom, bounded with the smallest denominator the errors allow.
            let low = (denom - ed).max(s.eps);
            let u = mi / denom;
            let eu = em / low + mi.abs() * ed / (denom * low) + e * u.abs();
            // p = p0 pd - step_size u.
            let pn = p0 * s.param_decay - s.step_size * u;
            self.p[i] = s.param_decay.abs() * ep
                + s.step_size * eu
                + 2.0 * e * (p0 * s.param_decay).abs()
                + 2.0 * e * (s.step_size * u).abs()
                + e * pn.abs();
            self.m[i] = em;
            self.v[i] = ev;
        }
    }
}
