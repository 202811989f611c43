//! Walking a split-virtqueue descriptor chain from a given head index.
//!
//! virtio-queue pops heads from the available ring; udm walks the chains itself, both
//! those it just popped and, after a reconnect, those it did *not* pop in this process
//! (the in-flight ones the previous process left behind, by head index from the inflight
//! region). The walker reads `struct virtq_desc` entries (virtio-queue's `Descriptor`)
//! with one copy each and the spec's guards: a bounded number of steps, indirect tables
//! only at the top level. A chain that breaks a guard (a loop or a chain longer than its
//! table, a `next` past the table, a descriptor outside guest memory, a bad or nested
//! indirect table) ends the walk and is reported by [`ChainWalk::broken`]: that request
//! fails, instead of running with the descriptors seen so far.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::request::{Desc, GuestMem};

/// Iterator over the descriptors of the chain at `head` in the table at `table`.
pub struct ChainWalk<'a> {
    mem: &'a GuestMem,
    table: u64,
    table_len: u16,
    next: Option<u16>,
    ttl: u32,
    indirect: bool,
    broken: Option<&'static str>,
}

impl<'a> ChainWalk<'a> {
    /// Starts at `head` of a descriptor table of `queue_size` entries.
    pub fn new(mem: &'a GuestMem, table: u64, queue_size: u16, head: u16) -> Self {
        ChainWalk {
            mem,
            table,
            table_len: queue_size,
            next: Some(head),
            ttl: u32::from(queue_size),
            indirect: false,
            broken: None,
        }
    }

    /// Why the walk stopped before the chain's end, if it did.
    pub fn broken(&self) -> Option<&'static str> {
        self.broken
    }

    fn fail(&mut self, why: &'static str) -> Option<Desc> {
        self.broken = Some(why);
        None
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Desc;

    fn next(&mut self) -> Option<Desc> {
        loop {
            let idx = self.next.take()?;
            if idx >= self.table_len {
                return self.fail("a descriptor index is past the end of its table");
            }
            if self.ttl == 0 {
                return self.fail("the chain is longer than its table (a loop)");
            }
            self.ttl -= 1;
            let Some(d) = self.table.checked_add(u64::from(idx) * 16).and_then(|at| read_descriptor(self.mem, at))
            else {
                return self.fail("a descriptor lies outside guest memory");
            };
            if d.refers_to_indirect_table() {
                if self.indirect {
                    return self.fail("an indirect table inside an indirect table");
                }
                if d.len() == 0 || !d.len().is_multiple_of(16) || d.len() / 16 > u32::from(u16::MAX) {
                    return self.fail("an indirect table's length is not 1 to 65535 descriptors");
                }
                self.indirect = true;
                self.table = d.addr().0;
                self.table_len = (d.len() / 16) as u16;
                self.ttl = u32::from(self.table_len);
                self.next = Some(0);
                continue;
            }
            if d.has_next() {
                self.next = Some(d.next());
            }
            return Some(Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() });
        }
    }
}

/// Reads `struct virtq_desc` at `addr`: one volatile 16-byte copy when it lies in one
/// region (always, for a well-behaved driver), vm-memory's general path otherwise.
#[inline]
fn read_descriptor(mem: &GuestMem, addr: u64) -> Option<Descriptor> {
    let Some(raw) = mem.read_array::<16>(addr) else {
        return mem.read_obj(GuestAddress(addr)).ok();
    };
    let le64 = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
    let le32 = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
    let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
    let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
    Some(Descriptor::new(le64, le32, flags, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    #[test]
    fn walks_direct_and_indirect_chains_and_stops_on_loops() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let put = |at: u64, d: Descriptor| mem.write_obj(d, GuestAddress(at)).unwrap();
        let (next, write, ind) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16, VRING_DESC_F_INDIRECT as u16);
        put(0, Descriptor::new(0x1000, 16, next, 3));
        put(3 * 16, Descriptor::new(0x2000, 1, write, 0));
        let got: Vec<Desc> = ChainWalk::new(&mem, 0, 8, 0).collect();
        assert_eq!(
            got,
            vec![Desc { addr: 0x1000, len: 16, writable: false }, Desc { addr: 0x2000, len: 1, writable: true }]
        );
        // An indirect table of two entries at 0x800.
        put(16, Descriptor::new(0x800, 32, ind, 0));
        put(0x800, Descriptor::new(0x3000, 16, next, 1));
        put(0x810, Descriptor::new(0x4000, 1, write, 0));
        assert_eq!(ChainWalk::new(&mem, 0, 8, 1).count(), 2);
        assert_eq!(ChainWalk::new(&mem, 1, 8, 1).broken(), None);
        // A loop ends after queue-size steps, and the walk says the chain is broken.
        put(5 * 16, Descriptor::new(0x1000, 16, next, 5));
        let mut walk = ChainWalk::new(&mem, 0, 8, 5);
        assert_eq!(walk.by_ref().count(), 8);
        assert!(walk.broken().is_some_and(|why| why.contains("loop")));
        // A `next` past the table, a nested indirect table, a table outside memory.
        put(6 * 16, Descriptor::new(0x1000, 16, next, 99));
        let mut walk = ChainWalk::new(&mem, 0, 8, 6);
        assert_eq!(walk.by_ref().count(), 1);
        assert!(walk.broken().is_some());
        put(0x820, Descriptor::new(0x800, 16, ind, 0));
        put(7 * 16, Descriptor::new(0x820, 16, ind, 0));
        let mut walk = ChainWalk::new(&mem, 0, 8, 7);
        assert_eq!(walk.by_ref().count(), 0);
        assert!(walk.broken().is_some_and(|why| why.contains("inside an indirect")));
        let mut walk = ChainWalk::new(&mem, 1 << 20, 8, 0);
        assert_eq!(walk.by_ref().count(), 0);
        assert!(walk.broken().is_some());
    }
}
