//! Device checks: eqsdpa.

use super::Ctx;
use anyhow::Result;

/// `eqsdpa`.
pub(super) fn eqsdpa(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("eqsdpa: checks", false, "not written yet");
    Ok(())
}
