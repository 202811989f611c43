//! Scatter-gather lists: views over memory the submitter owns.
//!
//! An [`IoSegment`] has the layout of `struct iovec`, so a backend can pass an array of
//! them straight to `readv`/io_uring. An [`SgList`] is a *view* — a window of bytes over
//! an array of segments the submitter keeps alive until the request completes. Splitting
//! a request (the mapping layer does this at segment and chunk boundaries) only moves the
//! window: no allocation and no copying of the segment array.

use std::marker::PhantomData;
use std::ptr::NonNull;

/// One contiguous piece of memory: `struct iovec` layout.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IoSegment {
    base: *mut u8,
    len: usize,
}

impl IoSegment {
    /// Describes `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+len` must be valid for reads and writes, and stay so until every
    /// request whose list includes this segment has completed.
    pub const unsafe fn new(base: *mut u8, len: usize) -> Self {
        IoSegment { base, len }
    }

    /// Start address.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Segments that cannot form one request: an I/O is smaller than 4 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{segments} segments{} are too many for one I/O (the limit is 4 GiB in fewer than 2^32 segments); split the request", .bytes.map(|b| format!(" of {b} bytes")).unwrap_or_default())]
pub struct SgTooLarge {
    /// Segments offered.
    pub segments: usize,
    /// Bytes they add up to (when counted).
    pub bytes: Option<u64>,
}

/// A window of `len` bytes over an array of [`IoSegment`]s, starting `skip` bytes into
/// the first one. `Copy`: handing a list to a lower layer duplicates only the window.
#[derive(Debug, Clone, Copy)]
pub struct SgList {
    first: NonNull<IoSegment>,
    /// Segments from `first` to the end of the underlying array.
    count: u32,
    skip: u32,
    len: u32,
    _segments: PhantomData<*const IoSegment>,
}

// SAFETY: an SgList is a description of memory, not an owner of it. Whoever built it
// promised (in the `unsafe` constructors) that the segment array and the memory it names
// outlive the request, whichever thread the request completes on. Queues move between
// threads before they are used, so they must be able to hold in-flight lists.
unsafe impl Send for SgList {}

impl SgList {
    /// An empty list, for requests that carry no data (flush, discard, write-zeroes).
    pub const fn empty() -> Self {
        SgList { first: NonNull::dangling(), count: 0, skip: 0, len: 0, _segments: PhantomData }
    }

    /// A list covering every byte of `segments`.
    ///
    /// # Panics
    /// When the segments add up to 4 GiB or more. Only for arrays built from the caller's
    /// own buffers; anything sized by outside input (a guest's descriptors) goes through
    /// [`SgList::try_from_raw`].
    ///
    /// # Safety
    /// The array itself (not only the memory it points to) must stay valid and unchanged
    /// until the request completes; each segment must satisfy [`IoSegment::new`].
    pub unsafe fn from_raw(segments: *const IoSegment, count: usize) -> Self {
        // SAFETY: forwarded contract.
        match unsafe { Self::try_from_raw(segments, count) } {
            Ok(list) => list,
            Err(e) => panic!("{e}"),
        }
    }

    /// A list covering every byte of `segments`, or an error when they cannot be one
    /// request (4 GiB or more in total, or 2^32 segments or more).
    ///
    /// # Safety
    /// As [`SgList::from_raw`].
    pub unsafe fn try_from_raw(segments: *const IoSegment, count: usize) -> Result<Self, SgTooLarge> {
        if count == 0 {
            return Ok(Self::empty());
        }
        let too_large = |bytes| SgTooLarge { segments: count, bytes };
        let count32 = u32::try_from(count).map_err(|_| too_large(None))?;
        let mut len: u64 = 0;
        for i in 0..count {
            // SAFETY: the caller promised `count` valid segments at `segments`.
            len = len.saturating_add(unsafe { (*segments.add(i)).len } as u64);
        }
        let len = u32::try_from(len).map_err(|_| too_large(Some(len)))?;
        Ok(SgList {
            // SAFETY: count > 0 so the caller handed a real (non-null) array.
            first: unsafe { NonNull::new_unchecked(segments as *mut IoSegment) },
            count: count32,
            skip: 0,
            len,
            _segments: PhantomData,
        })
    }

    /// A list over one segment stored in the caller's memory.
    ///
    /// # Safety
    /// As [`SgList::from_raw`] with `count == 1`.
    pub unsafe fn from_segment(segment: &IoSegment) -> Self {
        // SAFETY: forwarded contract.
        unsafe { Self::from_raw(segment, 1) }
    }

    /// Bytes covered.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the list covers no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-window `[offset, offset + len)` of this list.
    ///
    /// Panics if the window reaches past the list: callers compute it from the request
    /// they were given, so overrunning is a bug in udm, not bad input.
    #[inline]
    pub fn slice(&self, offset: usize, len: usize) -> SgList {
        assert!(offset + len <= self.len as usize, "SgList::slice out of bounds");
        if len == 0 {
            return SgList::empty();
        }
        let mut first = self.first;
        let mut count = self.count;
        let mut skip = self.skip as usize + offset;
        loop {
            // SAFETY: `first` is within the array (count > 0 because bytes remain).
            let seg_len = unsafe { first.as_ref().len };
            if skip < seg_len {
                break;
            }
            skip -= seg_len;
            // SAFETY: more bytes remain, so the array has a next element.
            first = unsafe { NonNull::new_unchecked(first.as_ptr().add(1)) };
            count -= 1;
        }
        SgList { first, count, skip: skip as u32, len: len as u32, _segments: PhantomData }
    }

    /// The contiguous pieces of this window, in order.
    #[inline]
    pub fn chunks(&self) -> SgChunks<'_> {
        SgChunks {
            next: self.first,
            count: self.count,
            skip: self.skip as usize,
            left: self.len as usize,
            _list: PhantomData,
        }
    }

    /// Whether the window is exactly the whole underlying segment array, so it can be
    /// handed to `readv`-style calls as it is.
    pub fn is_whole_array(&self) -> bool {
        if self.skip != 0 {
            return false;
        }
        let mut total = 0usize;
        for i in 0..self.count as usize {
            // SAFETY: i < count, within the array.
            total += unsafe { (*self.first.as_ptr().add(i)).len };
        }
        total == self.len as usize
    }

    /// Pointer to the first segment and how many segments the window touches.
    /// Valid as an iovec array only when [`SgList::is_whole_array`] is true.
    pub fn raw_segments(&self) -> (*const IoSegment, usize) {
        (self.first.as_ptr(), self.chunks().count())
    }

    /// Copies `src` into the start of the window (`src.len() <= self.len()`).
    pub fn copy_from_slice(&self, src: &[u8]) {
        assert!(src.len() <= self.len());
        let mut done = 0;
        for (ptr, len) in self.chunks() {
            let n = len.min(src.len() - done);
            if n == 0 {
                break;
            }
            // SAFETY: the constructor's contract makes `ptr..ptr+len` writable memory that
            // does not overlap `src` (a device's buffer is never its own storage).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
            done += n;
        }
    }

    /// Copies the start of the window into `dst` (`dst.len() <= self.len()`).
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        assert!(dst.len() <= self.len());
        let mut done = 0;
        for (ptr, len) in self.chunks() {
            let n = len.min(dst.len() - done);
            if n == 0 {
                break;
            }
            // SAFETY: as in copy_from_slice, with `ptr..ptr+len` readable.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.as_mut_ptr().add(done), n) };
            done += n;
        }
    }

    /// Copies the window into raw memory at `dst`.
    ///
    /// # Safety
    /// `dst..dst+self.len()` must be writable and not overlap the window.
    pub unsafe fn copy_to_raw(&self, dst: *mut u8) {
        let mut done = 0;
        for (ptr, len) in self.chunks() {
            // SAFETY: caller's contract for `dst`, constructor's for `ptr`.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.add(done), len) };
            done += len;
        }
    }

    /// Copies raw memory at `src` into the window.
    ///
    /// # Safety
    /// `src..src+self.len()` must be readable and not overlap the window.
    pub unsafe fn copy_from_raw(&self, src: *const u8) {
        let mut done = 0;
        for (ptr, len) in self.chunks() {
            // SAFETY: caller's contract for `src`, constructor's for `ptr`.
            unsafe { std::ptr::copy_nonoverlapping(src.add(done), ptr, len) };
            done += len;
        }
    }

    /// Zeroes every byte of the window.
    pub fn fill_zero(&self) {
        for (ptr, len) in self.chunks() {
            // SAFETY: the constructor's contract makes the chunk writable.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
    }
}

/// Iterator over the `(address, length)` pieces of an [`SgList`].
pub struct SgChunks<'a> {
    next: NonNull<IoSegment>,
    count: u32,
    skip: usize,
    left: usize,
    _list: PhantomData<&'a SgList>,
}

impl Iterator for SgChunks<'_> {
    type Item = (*mut u8, usize);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        while self.left > 0 && self.count > 0 {
            // SAFETY: count > 0, so `next` points into the array.
            let seg = unsafe { *self.next.as_ptr() };
            // SAFETY: advancing to one-past-the-last at most; never dereferenced then.
            self.next = unsafe { NonNull::new_unchecked(self.next.as_ptr().add(1)) };
            self.count -= 1;
            let avail = seg.len - self.skip;
            // SAFETY: skip < seg.len for the first segment, 0 afterwards.
            let ptr = unsafe { seg.base.add(self.skip) };
            self.skip = 0;
            if avail == 0 {
                continue;
            }
            let n = avail.min(self.left);
            self.left -= n;
            return Some((ptr, n));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn four_gib_or_more_is_an_error_not_a_panic() {
        let mut byte = 0u8;
        // SAFETY: the list is only measured, never read or written.
        let big = unsafe { IoSegment::new(&mut byte, 3 << 30) };
        let segs = [big, big];
        // SAFETY: as above.
        let err = unsafe { SgList::try_from_raw(segs.as_ptr(), 2) }.unwrap_err();
        assert_eq!(err, SgTooLarge { segments: 2, bytes: Some(6 << 30) });
        assert!(err.to_string().contains("4 GiB"), "{err}");
        // SAFETY: as above.
        assert_eq!(unsafe { SgList::try_from_raw(segs.as_ptr(), 1) }.unwrap().len(), 3 << 30);
    }

    proptest! {
        /// Any window of any segment layout reads the same bytes as the flat buffer.
        #[test]
        fn slice_matches_flat_view(lens in prop::collection::vec(0usize..64, 1..8), a in 0usize..512, b in 0usize..512) {
            let total: usize = lens.iter().sum();
            let mut backing: Vec<u8> = (0..total).map(|i| i as u8).collect();
            let base = backing.as_mut_ptr();
            let mut off = 0;
            let segs: Vec<IoSegment> = lens.iter().map(|&l| {
                // SAFETY: inside `backing`, which outlives the test.
                let s = unsafe { IoSegment::new(base.add(off), l) };
                off += l;
                s
            }).collect();
            // SAFETY: `segs` and `backing` outlive every use below.
            let list = unsafe { SgList::from_raw(segs.as_ptr(), segs.len()) };
            prop_assert_eq!(list.len(), total);
            let start = a.min(total);
            let len = b.min(total - start);
            let view = list.slice(start, len);
            let mut out = vec![0u8; len];
            view.copy_to_slice(&mut out);
            prop_assert_eq!(&out[..], &(start..start + len).map(|i| i as u8).collect::<Vec<_>>()[..]);
            let sub_start = len / 3;
            let sub = view.slice(sub_start, len - sub_start);
            let mut out2 = vec![0u8; len - sub_start];
            sub.copy_to_slice(&mut out2);
            prop_assert_eq!(&out2[..], &out[sub_start..]);
        }
    }
}
