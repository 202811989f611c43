//! udm-mapping: the userspace device-mapper (tables, targets, registry, snapshots).
