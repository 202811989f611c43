//! What the control socket returns, as serde types (the CLI renders them as tables).

use serde::{Deserialize, Serialize};
use udm_mapping::registry::{DeviceKind, DeviceReport, DeviceState};
use udm_mapping::snapshot_ops::SnapshotInfo;

use crate::vhost_blk::stats::QueueSnapshot;
use crate::vhost_blk::ExportConfig;

/// `backend` or `mapped`.
pub fn kind_name(k: DeviceKind) -> &'static str {
    match k {
        DeviceKind::Backend => "backend",
        DeviceKind::Mapped => "mapped",
    }
}

/// `dm info` of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfoReport {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Option<String>,
    /// `backend` or `mapped`.
    pub kind: String,
    /// `ACTIVE` or `SUSPENDED`.
    pub state: String,
    /// dmsetup's `Tables present`.
    pub tables: String,
    /// Open handles.
    pub open_count: usize,
    /// Devices using it.
    pub holders: Vec<String>,
    /// Targets in the live table.
    pub targets: usize,
    /// Size in sectors.
    pub sectors: u64,
    /// Event counter.
    pub event_nr: u64,
    /// Why the device came back from the state file as an `error` device (what it was
    /// is kept in the state until it is given another table or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl From<DeviceReport> for DeviceInfoReport {
    fn from(r: DeviceReport) -> Self {
        DeviceInfoReport {
            tables: r.tables_present().into(),
            name: r.name,
            uuid: r.uuid,
            kind: kind_name(r.kind).into(),
            state: match r.state {
                DeviceState::Active => "ACTIVE".into(),
                DeviceState::Suspended => "SUSPENDED".into(),
            },
            open_count: r.open_count,
            holders: r.holders,
            targets: r.target_count,
            sectors: r.sectors,
            event_nr: r.event_nr,
            problem: None,
        }
    }
}

/// `backend ls` of one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendReport {
    /// Name tables use.
    pub name: String,
    /// The spec it was opened from (`None` for backends made by snapshot operations).
    pub spec: Option<String>,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Largest transfer in bytes.
    pub max_transfer: u32,
    /// Refuses writes.
    pub read_only: bool,
    /// Mapped devices whose tables use it.
    pub used_by: Vec<String>,
    /// Exports serving it directly.
    pub exported_by: Vec<String>,
    /// Open handles (exports, benchmarks).
    pub open_count: usize,
}

/// `snapshot list` of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Snapshot (or merging origin).
    pub name: String,
    /// Origin.
    pub origin: String,
    /// COW device.
    pub cow: String,
    /// Chunk in sectors.
    pub chunk_sectors: u64,
    /// Merge in progress.
    pub merging: bool,
    /// Status text.
    pub status: String,
    /// lvs' Data%.
    pub data_percent: String,
}

impl From<SnapshotInfo> for SnapshotReport {
    fn from(s: SnapshotInfo) -> Self {
        SnapshotReport {
            data_percent: s.data_percent(),
            name: s.name,
            origin: s.origin,
            cow: s.cow,
            chunk_sectors: s.chunk_sectors,
            merging: s.merging,
            status: s.status,
        }
    }
}

/// `stats` of one export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Export name.
    pub export: String,
    /// Device name.
    pub device: String,
    /// All queues together.
    pub total: QueueSnapshot,
    /// Each virtqueue.
    pub queues: Vec<QueueSnapshot>,
}

impl ExportStats {
    /// Sums the queues.
    pub fn new(cfg: &ExportConfig, queues: Vec<QueueSnapshot>) -> Self {
        let mut total = QueueSnapshot::default();
        for q in &queues {
            total.accumulate(q);
        }
        ExportStats { export: cfg.name.clone(), device: cfg.device.clone(), total, queues }
    }
}
