//! Kinetic analysis of learned states: k-means, Markov state models, implied timescales and the
//! Chapman-Kolmogorov test; the consistency checks of a state assignment, and states of a
//! VAMPnet that pass them.

pub mod checks;
pub mod dihedral;
pub mod kmeans;
pub mod msm;
pub mod states;
