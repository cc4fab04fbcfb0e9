//! Device checks: painn, torchmd_et.

use super::Ctx;
use anyhow::Result;

/// `painn`.
pub(super) fn painn(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("painn: checks", false, "not written yet");
    Ok(())
}

/// `torchmd_et`.
pub(super) fn torchmd_et(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("torchmd_et: checks", false, "not written yet");
    Ok(())
}
