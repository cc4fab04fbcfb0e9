//! Elements: symbols, atomic numbers and standard masses.
