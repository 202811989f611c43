//! The vhost-user front-end fuzz target's checks (fuzz/checks/vhost_frontend.rs), run as
//! a bounded proptest so CI exercises them without nightly: random programs, and
//! programs shaped like a real start-up (owner, features, memory, ring, kick) followed by
//! random steps, plus the seeds in fuzz/seeds/vhost_frontend. For the real fuzzer:
//! `cd fuzz && cargo +nightly fuzz run vhost_frontend`.

#[path = "../../fuzz/checks/vhost_frontend.rs"]
mod vhost_frontend;

use proptest::prelude::*;

/// A start-up in the harness's encoding: (ring byte, op byte, operands...).
fn start_up(ring: u8, file_len: u8, region_len: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0, 0]); // SET_OWNER
    p.extend_from_slice(&[0, 2, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]); // SET_FEATURES: all offered
    p.extend_from_slice(&[0, 3, 1]); // SET_PROTOCOL_FEATURES: all offered
    p.extend_from_slice(&[0, 4, 1, file_len, region_len, 1, 1, 1]); // SET_MEM_TABLE: one region at 0
    p.extend_from_slice(&[ring, 7, 2, 3]); // SET_VRING_NUM 8
    p.extend_from_slice(&[ring, 8, 0, 0, 0]); // SET_VRING_ADDR at 0 / 0x1000 / 0x2000
    p.extend_from_slice(&[ring, 11, 1, 0, 0]); // SET_VRING_CALL: a blocking eventfd
    p.extend_from_slice(&[ring, 10, 1, 0]); // SET_VRING_KICK
    p.extend_from_slice(&[ring, 12, 1]); // SET_VRING_ENABLE
    p
}

#[test]
fn the_seeds_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/vhost_frontend");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("the seed directory") {
        let path = entry.expect("a seed").path();
        // Patience is a guard against a wedged worker, not a speed requirement.
        let seed = std::fs::read(&path).expect("a readable seed");
        let summary = vhost_frontend::check_frontend_with(&seed, std::time::Duration::from_secs(10));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // The well-formed seeds prove the harness reaches the data path: a worker answers.
        if ["read", "write_ring1", "get_id_huge", "indirect"].contains(&name) {
            assert!(summary.answered > 0, "seed {name}: the guest's request was not answered ({summary:?})");
        }
        n += 1;
    }
    assert!(n > 0, "no seeds in {dir}");
}

/// The corpus a libFuzzer run built (minimised), replayed: what once found new coverage
/// keeps passing.
#[test]
fn the_fuzz_corpus_passes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/vhost_frontend_corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("the corpus directory") {
        let input = std::fs::read(entry.expect("a corpus entry").path()).expect("a readable corpus entry");
        let _ = vhost_frontend::check_frontend(&input);
        n += 1;
    }
    assert!(n > 0, "no corpus in {dir}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_front_ends_cannot_hurt_the_daemon(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = vhost_frontend::check_frontend(&data);
    }

    /// A front end that sets a ring up properly (with a memfd that may be shorter than
    /// the region), then queues arbitrary descriptors and keeps reconfiguring.
    #[test]
    fn started_rings_survive_arbitrary_chains_and_messages(
        ring in 0u8..2, file_len in 0u8..4, region_len in 0u8..5,
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut data = start_up(ring, file_len, region_len);
        data.extend_from_slice(&rest);
        let _ = vhost_frontend::check_frontend(&data);
    }
}
