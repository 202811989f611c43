//! Backends: devices at the bottom of every stack.

pub mod fault;
pub mod file;
pub mod mem;
pub mod null;
