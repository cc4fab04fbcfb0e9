//! Device checks: equivariant.

use super::Ctx;
use anyhow::Result;

/// `equivariant`.
pub(super) fn equivariant(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("equivariant: checks", false, "not written yet");
    Ok(())
}
