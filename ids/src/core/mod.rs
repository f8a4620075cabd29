//! State machines with no I/O: time and randomness come in as arguments.

pub mod verification;
