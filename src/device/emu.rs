//! The emu device: kernels compiled for the host (see `cuda/emu/emu.h`).

use std::sync::atomic::{AtomicU64, Ordering};

/// State of an emu device: the seed that orders threads between barriers.
///
/// Every launch draws its own seed from the device seed and a launch counter, so a run is
/// reproducible from the one seed printed by the test harness, while successive launches still
/// see different thread orders.
pub struct Emu {
    seed: u64,
    launches: AtomicU64,
}

impl Emu {
    /// An emu device with this seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            launches: AtomicU64::new(0),
        }
    }

    /// Seed from `HIERMD_EMU_SEED` when set (to replay a failure), else from the clock.
    pub fn from_env() -> Self {
        let seed = std::env::var("HIERMD_EMU_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(crate::testing::clock_seed);
        Self::new(seed)
    }

    /// The device seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The seed of the next launch.
    pub(crate) fn next_launch_seed(&self) -> u64 {
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        crate::testing::splitmix64(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}
