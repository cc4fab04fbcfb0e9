//! Placeholder until the reader lands: opening fails with a clear message.

use super::{Frame, TrajectoryReader};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Reader (not implemented yet).
pub struct PdbTrajectoryReader {
    path: PathBuf,
}

impl PdbTrajectoryReader {
    /// Opens a file.
    pub fn open(path: &Path) -> Result<Self> {
        bail!(
            "{}: this trajectory format is not supported yet",
            path.display()
        )
    }
}

impl TrajectoryReader for PdbTrajectoryReader {
    fn natoms(&self) -> usize {
        0
    }
    fn nframes_hint(&self) -> Option<usize> {
        None
    }
    fn read_frame(&mut self, _frame: &mut Frame) -> Result<bool> {
        Ok(false)
    }
    fn position(&self) -> usize {
        0
    }
    fn path(&self) -> &Path {
        &self.path
    }
}
