//! A human-readable decoding of a persistent COW image: the header, then every area
//! with its `old_chunk -> new_chunk` pairs. The text matches the fixtures'
//! `cow-dump.txt` (made by the kernel harness), so a store udm wrote can be diffed
//! against one the kernel wrote.

use std::fmt::Write;

use crate::exception_store::format::{self, Header, Layout};

/// Decodes `image`, a whole COW device. Areas are listed even when the header says
/// invalid; listing stops at the first area that is not full or lies past the end.
pub fn dump_image(image: &[u8]) -> String {
    let mut out = String::new();
    if image.len() < 16 {
        let _ = writeln!(out, "COW image of {} bytes is too small for a header", image.len());
        return out;
    }
    let h = Header::decode(image);
    let _ = writeln!(
        out,
        "header: magic={:#010x} ({}) valid={} version={} chunk_size={} sectors",
        h.magic,
        bytes_repr(&image[..4]),
        h.valid,
        h.version,
        h.chunk_sectors
    );
    if h.chunk_sectors == 0 || !h.chunk_sectors.is_power_of_two() {
        let _ = writeln!(out, "chunk size {} is not a power of two: no areas decoded", h.chunk_sectors);
        return out;
    }
    let layout = Layout { chunk_sectors: u64::from(h.chunk_sectors), cow_sectors: image.len() as u64 / 512 };
    let e = layout.exceptions_per_area();
    let _ = writeln!(
        out,
        "cow: {} bytes = {} chunks; {} exceptions per area; area i at chunk 1+{}*i",
        image.len(),
        layout.cow_chunks(),
        e,
        e + 1
    );
    let cb = layout.chunk_bytes();
    let mut total = 0usize;
    let mut area = 0u64;
    loop {
        let chunk = layout.area_location(area);
        if !layout.chunk_fits(chunk) {
            let _ = writeln!(out, "area {area} @chunk {chunk}: beyond the end of the COW");
            break;
        }
        let start = chunk as usize * cb;
        let mut entries = Vec::new();
        let full = format::decode_area(&image[start..start + cb], &mut entries);
        let _ = writeln!(
            out,
            "area {area} @chunk {chunk}: {} exceptions{}",
            entries.len(),
            if full { " (full)" } else { "" }
        );
        for x in &entries {
            let _ = writeln!(out, "  old_chunk {} -> new_chunk {}", x.old_chunk, x.new_chunk);
        }
        total += entries.len();
        if !full {
            break;
        }
        area += 1;
    }
    let _ = writeln!(out, "total exceptions: {total}");
    out
}

/// Python's `bytes` repr, which the fixtures' tool printed: `b'SnAp'`.
fn bytes_repr(b: &[u8]) -> String {
    let mut s = String::from("b'");
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' => s.push_str("\\'"),
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s.push('\'');
    s
}
