//! The virtio and vhost-user feature bits a udm export offers.

use udm_drivers::DeviceInfo;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtio feature bits for a device described by `info`. GET_ID has no feature bit:
/// drivers may always ask for the serial.
pub fn virtio_features(info: &DeviceInfo) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, &b| acc | (1u64 << b));
    if info.read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        if info.supports_discard {
            bits |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if info.supports_write_zeroes {
            bits |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// vhost-user protocol features. libblkio refuses back ends without REPLY_ACK, CONFIG and
/// CONFIGURE_MEM_SLOTS; INFLIGHT_SHMFD makes reconnect lossless; BACKEND_REQ carries the
/// config-change notice on resize.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// Whether `features` (as acknowledged by the driver) include `bit`.
pub fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}
