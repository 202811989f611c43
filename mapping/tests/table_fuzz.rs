//! The table fuzz target's checks (fuzz/checks/table.rs), run as a bounded proptest so
//! CI exercises them without nightly: random text, and table-shaped text built from
//! the tokens that matter (numbers at the edges, target names, device names, escapes,
//! comments). For the real fuzzer: `cd fuzz && cargo +nightly fuzz run table_text
//! corpus/table_text seeds/table_text`.

#[path = "../../fuzz/checks/table.rs"]
mod table;

use proptest::prelude::*;

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("8".to_string()),
        Just("4096".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".into()),
        Just("+4".into()),
        Just("1k".into()),
        Just("linear".into()),
        Just("striped".into()),
        Just("zero".into()),
        Just("error".into()),
        Just("d0".into()),
        Just("d1".into()),
        Just("d2".into()),
        Just("m0".into()),
        Just("vol".into()),
        Just("#".into()),
        Just("\\ ".into()),
        Just("\\".into()),
        Just("\t".into()),
        (0u64..5000).prop_map(|n| n.to_string()),
        "[a-z0-9#\\\\ ]{0,6}",
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..9).prop_map(|t| t.join(" "))
}

/// Lines that start where the previous ended, so loads get past the gap check.
fn contiguous() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (1u64..300, prop_oneof![Just("linear"), Just("striped"), Just("zero"), Just("error")], line()),
        1..6,
    )
    .prop_map(|lines| {
        let mut start = 0;
        let mut out = String::new();
        for (len, target, args) in lines {
            out.push_str(&format!("{start} {len} {target} {args}\n"));
            start += len;
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text(text in any::<String>()) {
        table::check_table_text(&text);
    }

    #[test]
    fn table_shaped_text(lines in prop::collection::vec(line(), 0..6)) {
        table::check_table_text(&lines.join("\n"));
    }

    #[test]
    fn contiguous_tables(text in contiguous()) {
        table::check_table_text(&text);
    }
}

#[test]
fn seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/table_text");
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        table::check_table_text(&text);
    }
}
