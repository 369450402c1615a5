//! verify (below)
