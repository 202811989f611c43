//! Physical Region Page lists (NVMe Base Specification 2.0, 4.1.1): how a transfer's
//! scatter-gather layout becomes PRP1, PRP2 and a PRP list, and how a transfer is split
//! into commands when one command cannot express it (MDTS, or a layout PRPs cannot
//! describe).
//!
//! With 4 KiB pages a command's data is: the first piece starting anywhere
//! dword-aligned, then whole pages; every piece but the first starts on a page boundary
//! and every piece but the last ends on one. The planner cuts a transfer wherever that
//! rule breaks (at a logical block boundary); when it breaks inside a block, the
//! transfer goes through a bounce buffer instead.

/// Memory page size udm configures (CC.MPS = 0).
pub const PAGE: usize = 4096;
/// Entries in one PRP list page; udm uses one list per command, no chaining.
pub const LIST_ENTRIES: usize = PAGE / 8;
/// Largest command udm builds: one PRP1 page plus a full list covers at least this.
pub const MAX_COMMAND_BYTES: usize = LIST_ENTRIES * PAGE;

/// Splits a transfer of `chunks` into commands of at most `max_cmd` bytes (a multiple
/// of PAGE and of `block`), each expressible with PRPs, calling `emit(offset, len)` for
/// each in order. Returns false (having emitted a prefix, which the caller discards) if
/// the layout needs a cut inside a logical block or a chunk is not dword aligned.
pub fn plan(
    chunks: impl Iterator<Item = (u64, usize)>,
    block: usize,
    max_cmd: usize,
    mut emit: impl FnMut(usize, usize),
) -> bool {
    debug_assert!(max_cmd > 0 && max_cmd.is_multiple_of(PAGE) && max_cmd.is_multiple_of(block));
    let mut cmd_start = 0usize;
    let mut cmd_len = 0usize;
    let mut offset = 0usize;
    let mut prev_end_aligned = true;
    for (addr, len) in chunks {
        if len == 0 {
            continue;
        }
        if !addr.is_multiple_of(4) {
            return false;
        }
        let continues = addr.is_multiple_of(PAGE as u64) && prev_end_aligned;
        if cmd_len > 0 && !continues {
            if !cmd_len.is_multiple_of(block) {
                return false;
            }
            emit(cmd_start, cmd_len);
            cmd_start = offset;
            cmd_len = 0;
        }
        let mut left = len;
        while left > 0 {
            if cmd_len == max_cmd {
                emit(cmd_start, cmd_len);
                cmd_start = offset;
                cmd_len = 0;
            }
            let take = left.min(max_cmd - cmd_len);
            cmd_len += take;
            offset += take;
            left -= take;
        }
        prev_end_aligned = (addr + len as u64).is_multiple_of(PAGE as u64);
    }
    if cmd_len > 0 {
        if !cmd_len.is_multiple_of(block) {
            return false;
        }
        emit(cmd_start, cmd_len);
    }
    true
}

/// PRP1 and PRP2 for one command's `chunks` (already translated to IOVAs and planned,
/// so they obey the PRP rule), writing a PRP list at `list` (IOVA `list_iova`) when
/// more than two pages are involved.
///
/// # Safety
/// `list` must point to LIST_ENTRIES writable u64s that the device does not read until
/// the command is submitted; the chunks must come from [`plan`] (at most
/// `MAX_COMMAND_BYTES` bytes).
pub unsafe fn build(chunks: impl Iterator<Item = (u64, usize)>, list: *mut u64, list_iova: u64) -> (u64, u64) {
    let mut prp1 = 0u64;
    let mut entries = 0usize; // pages after the first
    let mut first = true;
    for (iova, len) in chunks {
        if len == 0 {
            continue;
        }
        let mut page = iova & !(PAGE as u64 - 1);
        let end = iova + len as u64;
        if first {
            prp1 = iova;
            first = false;
            page += PAGE as u64;
        }
        while page < end {
            debug_assert!(entries < LIST_ENTRIES);
            // SAFETY: entries < LIST_ENTRIES (the plan bounds the pages), inside the list.
            unsafe { list.add(entries).write(page) };
            entries += 1;
            page += PAGE as u64;
        }
    }
    let prp2 = match entries {
        0 => 0,
        // SAFETY: entry 0 was written just above.
        1 => unsafe { list.read() },
        _ => list_iova,
    };
    (prp1, prp2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pieces(chunks: &[(u64, usize)], block: usize, max: usize) -> Option<Vec<(usize, usize)>> {
        let mut v = Vec::new();
        plan(chunks.iter().copied(), block, max, |o, l| v.push((o, l))).then_some(v)
    }

    #[test]
    fn simple_layouts() {
        // One aligned buffer, MDTS 8 KiB: split into 8 KiB commands.
        assert_eq!(pieces(&[(0x10000, 20480)], 512, 8192), Some(vec![(0, 8192), (8192, 8192), (16384, 4096)]));
        // An unaligned start is fine for the first piece.
        assert_eq!(pieces(&[(0x10200, 3584), (0x20000, 4096)], 512, 1 << 20), Some(vec![(0, 7680)]));
        // Two pieces that do not meet on page boundaries: two commands.
        assert_eq!(pieces(&[(0x10000, 1024), (0x20000, 1024)], 512, 1 << 20), Some(vec![(0, 1024), (1024, 1024)]));
        // A cut inside a 4 KiB block is impossible: bounce.
        assert_eq!(pieces(&[(0x10000, 1024), (0x20000, 3072)], 4096, 1 << 20), None);
        // Not dword aligned: bounce.
        assert_eq!(pieces(&[(0x10001, 512)], 512, 1 << 20), None);
    }

    #[test]
    fn builds_prp_entries() {
        let mut list = vec![0u64; LIST_ENTRIES];
        // SAFETY: `list` has LIST_ENTRIES entries.
        let one = unsafe { build([(0x5000_0200u64, 512usize)].into_iter(), list.as_mut_ptr(), 0x9000) };
        assert_eq!(one, (0x5000_0200, 0));
        // SAFETY: as above.
        let two = unsafe { build([(0x5000_0200u64, 4096usize)].into_iter(), list.as_mut_ptr(), 0x9000) };
        assert_eq!(two, (0x5000_0200, 0x5000_1000));
        // SAFETY: as above.
        let many =
            unsafe { build([(0x5000_0e00u64, 512usize), (0x7000_0000, 8192)].into_iter(), list.as_mut_ptr(), 0x9000) };
        assert_eq!(many, (0x5000_0e00, 0x9000));
        assert_eq!(&list[..2], &[0x7000_0000, 0x7000_1000]);
    }

    proptest! {
        /// Every plan covers the transfer exactly, in order, with block-multiple commands
        /// no larger than the limit, each of which obeys the PRP rule and fits one list.
        #[test]
        fn plans_obey_the_prp_rule(
            segs in prop::collection::vec((0u64..8, 0usize..4, 1usize..24), 1..8),
            block_shift in 0u32..4,
            max_pages in 1usize..16,
        ) {
            let block = 512usize << block_shift;
            let max = max_pages * PAGE * 8;
            // Segments: page number, a start offset in 512-byte units or an odd offset, length in 512-byte units.
            let chunks: Vec<(u64, usize)> = segs
                .iter()
                .enumerate()
                .map(|(i, &(page, off, len))| ((i as u64 * 64 + page) * PAGE as u64 + off as u64 * 512, len * 512))
                .collect();
            let total: usize = chunks.iter().map(|c| c.1).sum();
            prop_assume!(total.is_multiple_of(block));
            if let Some(p) = pieces(&chunks, block, max) {
                let mut at = 0;
                for &(o, l) in &p {
                    prop_assert_eq!(o, at);
                    prop_assert!(l > 0 && l <= max && l.is_multiple_of(block));
                    at += l;
                    // Re-derive this piece's chunks and check the PRP rule.
                    let mut pos = 0usize;
                    let mut parts = Vec::new();
                    for &(a, len) in &chunks {
                        let s = o.max(pos);
                        let e = (o + l).min(pos + len);
                        if s < e {
                            parts.push((a + (s - pos) as u64, e - s));
                        }
                        pos += len;
                    }
                    for (k, &(a, len)) in parts.iter().enumerate() {
                        if k > 0 {
                            prop_assert!(a.is_multiple_of(PAGE as u64));
                        }
                        if k + 1 < parts.len() {
                            prop_assert!((a + len as u64).is_multiple_of(PAGE as u64));
                        }
                    }
                    let pages: usize = parts.iter().map(|&(a, len)| {
                        let first = a / PAGE as u64;
                        let last = (a + len as u64 - 1) / PAGE as u64;
                        (last - first + 1) as usize
                    }).sum();
                    prop_assert!(pages <= LIST_ENTRIES + 1);
                }
                prop_assert_eq!(at, total);
            }
        }
    }
}
