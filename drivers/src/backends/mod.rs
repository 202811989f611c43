//! Backends: devices at the bottom of every stack.

pub mod mem;
pub mod null;
