//! Fuzzes the vhost-user handler and the queue workers with a hostile front end:
//! `cargo +nightly fuzz run vhost_frontend corpus/vhost_frontend seeds/vhost_frontend`.
#![no_main]

#[path = "../checks/vhost_frontend.rs"]
mod vhost_frontend;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vhost_frontend::check_frontend(data);
});
