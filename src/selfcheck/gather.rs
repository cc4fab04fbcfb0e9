//! Device checks: scatter, tokens.

use super::Ctx;
use anyhow::Result;

/// `scatter`.
pub(super) fn scatter(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("scatter: checks", false, "not written yet");
    Ok(())
}

/// `tokens`.
pub(super) fn tokens(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("tokens: checks", false, "not written yet");
    Ok(())
}
