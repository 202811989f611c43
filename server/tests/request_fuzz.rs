//! The virtio-blk request fuzz target's checks (fuzz/checks/virtio_blk.rs), run as a
//! bounded proptest so CI exercises them without nightly. For the real fuzzer:
//! `cd fuzz && cargo +nightly fuzz run virtio_blk_request`.

#[path = "../../fuzz/checks/virtio_blk.rs"]
mod virtio_blk;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_chains_never_escape_guest_memory(data in prop::collection::vec(any::<u8>(), 0..600)) {
        virtio_blk::check_chain(&data);
    }

    /// Chains shaped like real requests (a header at 0 with a chosen type and sector),
    /// so the checks past the header run often.
    #[test]
    fn request_shaped_chains(kind in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
                             sector in prop_oneof![0u64..64, any::<u64>()],
                             cfg in any::<[u8; 3]>(), ndesc in 1u8..8,
                             descs in prop::collection::vec(any::<[u8; 9]>(), 8)) {
        let mut data = vec![cfg[0], cfg[1], cfg[2], ndesc];
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        // Descriptor 0 points at the header (offset 0 of region 0, 16 bytes, readable);
        // its bytes double as the first 9 bytes of guest memory, so place the header
        // right after the descriptor list instead and point at it.
        let header_at = 4 + 9 * 8;
        let mut first = [0u8; 9];
        first[0..4].copy_from_slice(&(header_at as u32 - 4).to_le_bytes());
        first[4..8].copy_from_slice(&16u32.to_le_bytes());
        data.extend_from_slice(&first);
        for d in descs.iter().take(7) {
            data.extend_from_slice(d);
        }
        data.extend_from_slice(&hdr);
        virtio_blk::check_chain(&data);
    }
}
