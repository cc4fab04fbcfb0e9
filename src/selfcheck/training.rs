//! Device checks: training.

use super::Ctx;
use anyhow::Result;

/// `training`.
pub(super) fn training(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("training: checks", false, "not written yet");
    Ok(())
}
