//! The Identify data structures udm reads (NVMe Base Specification 2.0, 5.17.2).

/// Identify Controller (CNS 01h), the fields udm uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerIdentity {
    /// PCI Vendor ID.
    pub vendor_id: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum Data Transfer Size as a power of two of the minimum page size; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub controller_id: u16,
    /// Version (same encoding as the VS register).
    pub version: u32,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Number of Namespaces (the largest NSID).
    pub namespaces: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Volatile Write Cache present.
    pub volatile_write_cache: bool,
    /// SGL Support.
    pub sgls: u32,
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: String,
}

/// OACS bit 8: Doorbell Buffer Config is supported.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
/// ONCS bit 2: Dataset Management.
pub const ONCS_DSM: u16 = 1 << 2;
/// ONCS bit 3: Write Zeroes.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches(['\0', ' ']).trim_start().to_string()
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl ControllerIdentity {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8; 4096]) -> Self {
        ControllerIdentity {
            vendor_id: u16_at(b, 0),
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            controller_id: u16_at(b, 78),
            version: u32_at(b, 80),
            oacs: u16_at(b, 256),
            namespaces: u32_at(b, 516),
            oncs: u16_at(b, 520),
            volatile_write_cache: b[525] & 1 != 0,
            sgls: u32_at(b, 536),
            subnqn: text(&b[768..1024]),
        }
    }
}

/// Identify Namespace (CNS 00h), the fields udm uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceIdentity {
    /// Namespace Size in logical blocks.
    pub size_blocks: u64,
    /// Namespace Capacity in logical blocks.
    pub capacity_blocks: u64,
    /// Logical block size in bytes of the format in use.
    pub block_size: u32,
    /// Metadata bytes per block of the format in use (udm needs 0).
    pub metadata_size: u16,
    /// Namespace is write protected.
    pub write_protected: bool,
}

impl NamespaceIdentity {
    /// Parses the 4096-byte structure.
    pub fn parse(b: &[u8; 4096]) -> Self {
        let format = (b[26] & 0xf) as usize;
        let lbaf = 128 + 4 * format;
        let lbads = b[lbaf + 2];
        NamespaceIdentity {
            size_blocks: u64_at(b, 0),
            capacity_blocks: u64_at(b, 8),
            block_size: if (9..=16).contains(&lbads) { 1 << lbads } else { 0 },
            metadata_size: u16_at(b, lbaf),
            write_protected: b[99] & 1 != 0,
        }
    }
}

/// Parses an Active Namespace ID list (CNS 02h): NSIDs in increasing order, ending at
/// the first zero.
pub fn parse_namespace_list(b: &[u8; 4096]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).take_while(|&n| n != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identify_structures() {
        let mut c = [0u8; 4096];
        c[0] = 0x36;
        c[1] = 0x1b;
        c[4..12].copy_from_slice(b"udm0001 ");
        c[77] = 3;
        c[256] = 0x00;
        c[257] = 0x01;
        c[516] = 2;
        c[520] = 0x0c;
        c[525] = 1;
        let id = ControllerIdentity::parse(&c);
        assert_eq!((id.vendor_id, id.serial.as_str(), id.mdts, id.namespaces), (0x1b36, "udm0001", 3, 2));
        assert_ne!(id.oacs & OACS_DOORBELL_BUFFER_CONFIG, 0);
        assert_ne!(id.oncs & ONCS_DSM, 0);
        assert!(id.volatile_write_cache);

        let mut n = [0u8; 4096];
        n[0..8].copy_from_slice(&4096u64.to_le_bytes());
        n[26] = 1;
        n[128 + 4 + 2] = 12;
        let ns = NamespaceIdentity::parse(&n);
        assert_eq!((ns.size_blocks, ns.block_size, ns.metadata_size), (4096, 4096, 0));

        let mut l = [0u8; 4096];
        l[0] = 1;
        l[4] = 2;
        assert_eq!(parse_namespace_list(&l), vec![1, 2]);
    }
}
