//! Fuzzes the table parser and loader: `cargo +nightly fuzz run table_text`.
#![no_main]

#[path = "../checks/table.rs"]
mod table;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        table::check_table_text(text);
    }
});
