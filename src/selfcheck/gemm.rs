//! Device checks: gemm.

use super::Ctx;
use anyhow::Result;

/// `gemm`.
pub(super) fn gemm(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("gemm: checks", false, "not written yet");
    Ok(())
}
