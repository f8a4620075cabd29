//! State machines and policies with no I/O: time comes in as an argument.

pub mod jwt;
pub mod queue;
pub mod session;
