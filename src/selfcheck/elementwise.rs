//! Device checks: elementwise, reduce, softmax, dropout, optim.

use super::Ctx;
use anyhow::Result;

/// `elementwise`.
pub(super) fn elementwise(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("elementwise: checks", false, "not written yet");
    Ok(())
}

/// `reduce`.
pub(super) fn reduce(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("reduce: checks", false, "not written yet");
    Ok(())
}

/// `softmax`.
pub(super) fn softmax(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("softmax: checks", false, "not written yet");
    Ok(())
}

/// `dropout`.
pub(super) fn dropout(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("dropout: checks", false, "not written yet");
    Ok(())
}

/// `optim`.
pub(super) fn optim(ctx: &mut Ctx) -> Result<()> {
    ctx.truth("optim: checks", false, "not written yet");
    Ok(())
}
