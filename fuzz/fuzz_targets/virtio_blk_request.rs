//! Fuzzes virtio-blk request parsing: `cargo +nightly fuzz run virtio_blk_request`.
#![no_main]

#[path = "../checks/virtio_blk.rs"]
mod virtio_blk;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    virtio_blk::check_chain(data);
});
