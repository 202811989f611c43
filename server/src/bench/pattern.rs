//! The `--verify` data pattern: every 512-byte sector carries its own sector number and
//! the generation of the write that put it there, then words derived from both. A read
//! that returns the wrong sector, a stale generation or any flipped bit is caught, and
//! the header says what was found instead.

use udm_drivers::SECTOR_SIZE;

const WORDS: usize = SECTOR_SIZE as usize / 8;

#[inline]
fn word(sector: u64, generation: u32, i: usize) -> u64 {
    let mut z = sector ^ (u64::from(generation) << 40) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` (whole sectors) with the pattern of `first_sector..` at `generation`.
pub fn fill(buf: &mut [u8], first_sector: u64, generation: u32) {
    for (s, sector_bytes) in buf.chunks_exact_mut(SECTOR_SIZE as usize).enumerate() {
        let sector = first_sector + s as u64;
        for (i, w) in sector_bytes.chunks_exact_mut(8).enumerate() {
            let v = match i {
                0 => sector,
                1 => u64::from(generation),
                _ => word(sector, generation, i),
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What a bad sector held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// The sector that read back wrong.
    pub sector: u64,
    /// The generation expected there.
    pub expected_generation: u32,
    /// The sector number found in its header.
    pub found_sector: u64,
    /// The generation found in its header.
    pub found_generation: u64,
    /// Offset of the first wrong byte inside the sector.
    pub byte: usize,
}

/// Checks `buf` against the pattern; returns the first bad sector.
pub fn check(buf: &[u8], first_sector: u64, generation: u32) -> Option<Mismatch> {
    for (s, sector_bytes) in buf.chunks_exact(SECTOR_SIZE as usize).enumerate() {
        let sector = first_sector + s as u64;
        let read = |i: usize| u64::from_le_bytes(sector_bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        for i in 0..WORDS {
            let want = match i {
                0 => sector,
                1 => u64::from(generation),
                _ => word(sector, generation, i),
            };
            let got = read(i);
            if got != want {
                let diff = (got ^ want).trailing_zeros() as usize / 8;
                return Some(Mismatch {
                    sector,
                    expected_generation: generation,
                    found_sector: read(0),
                    found_generation: read(1),
                    byte: i * 8 + diff,
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_every_kind_of_damage() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 80, 3);
        assert_eq!(check(&buf, 80, 3), None);
        assert_eq!(check(&buf, 80, 4).unwrap().sector, 80, "stale generation");
        assert_eq!(check(&buf, 88, 3).unwrap().found_sector, 80, "misplaced data");
        buf[512 * 5 + 300] ^= 1;
        let m = check(&buf, 80, 3).unwrap();
        assert_eq!((m.sector, m.byte), (85, 300));
    }
}
