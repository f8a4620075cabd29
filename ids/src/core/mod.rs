//! State machines with no I/O: time and randomness come in as arguments.

pub mod ratelimit;
pub mod verification;
