//! Placeholder until the reader lands.

use super::Topology;
use anyhow::{bail, Result};
use std::path::Path;

/// Reads a topology (not implemented yet).
pub fn read_pdb(path: &Path) -> Result<Topology> {
    bail!(
        "{}: this topology format is not supported yet",
        path.display()
    )
}
