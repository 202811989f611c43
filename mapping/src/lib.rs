//! udm-mapping: the userspace device-mapper (tables, targets, registry, snapshots).

pub mod exception_store;
pub mod io_buf;

#[cfg(test)]
pub(crate) mod test_fixtures;
