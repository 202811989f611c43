//! The back-end-to-front-end channel (SET_BACKEND_REQ_FD), used for one message: the
//! config-change notice after a resize.
//!
//! The `vhost` crate receives that socket and wraps it in a `Backend` that can send
//! shared-object and shmem messages but not CONFIG_CHANGE_MSG, and it keeps the socket
//! private. So udm peeks at each incoming message header before the crate reads it; a
//! peek of a SET_BACKEND_REQ_FD message hands udm its own duplicate of the socket
//! (the kernel installs a copy of the passed descriptor on MSG_PEEK), and the crate
//! still receives the original.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// `VHOST_USER_SET_BACKEND_REQ_FD` (front-end request 21).
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (back-end request 2).
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// Most descriptors one message carries (vhost-user: 8 memory regions).
const MAX_FDS: usize = 8;

/// Peeks at the next message on `sock` (blocking until one arrives). Returns a duplicate
/// of the back-end channel socket if the message is SET_BACKEND_REQ_FD, else `None`;
/// other duplicated descriptors are closed at once.
pub fn peek_backend_channel(sock: &UnixStream) -> io::Result<Option<UnixStream>> {
    let mut hdr = [0u8; 4];
    let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() };
    // Room for MAX_FDS descriptors of control data.
    let mut cmsg_buf = [0u64; 16];
    // SAFETY: msghdr is plain data; zeroed then filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: `msg` points at live buffers of the sizes given; MSG_PEEK leaves the data
    // (and the original descriptors) queued for the real read.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let fds = received_fds(&msg);
    if n < 4 || u32::from_le_bytes(hdr) != SET_BACKEND_REQ_FD || fds.len() != 1 {
        return Ok(None);
    }
    let fd = fds.into_iter().next().expect("one descriptor");
    Ok(Some(UnixStream::from(fd)))
}

/// The descriptors in a received message's control data, owned (closed when dropped).
fn received_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in, within
    // msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg points at a complete header inside the buffer (CMSG_NXTHDR checks).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; the data length is what the kernel wrote.
            let data_len = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (data_len / std::mem::size_of::<RawFd>()).min(MAX_FDS);
            // SAFETY: CMSG_DATA points at `count` descriptors the kernel just installed
            // in this process; reading unaligned because control data has no alignment
            // guarantee for RawFd arrays.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: in bounds (count), see above.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
                out.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: walking to the next header of the same buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    out
}

/// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG without asking for a reply (a reply would
/// need this thread to read the channel, and the front end answers by sending GET_CONFIG
/// on the main channel anyway).
pub fn send_config_change(chan: &mut UnixStream) -> io::Result<()> {
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    chan.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn send_with_fd(sock: &UnixStream, code: u32, fd: RawFd) {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&code.to_le_bytes());
        let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: 12 };
        let mut cbuf = [0u64; 4];
        // SAFETY: test-only sendmsg over live buffers.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            assert_eq!(libc::sendmsg(sock.as_raw_fd(), &msg, 0), 12);
        }
    }

    #[test]
    fn peeking_duplicates_the_channel_and_leaves_the_message_queued() {
        let (a, b) = UnixStream::pair().unwrap();
        let (chan_ours, mut chan_theirs) = UnixStream::pair().unwrap();
        send_with_fd(&a, SET_BACKEND_REQ_FD, chan_ours.as_raw_fd());
        let mut dup = peek_backend_channel(&b).unwrap().expect("a duplicate");
        send_config_change(&mut dup).unwrap();
        let mut got = [0u8; 12];
        chan_theirs.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), CONFIG_CHANGE_MSG);
        // The message is still there for the real reader.
        let mut hdr = [0u8; 12];
        (&b).read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), SET_BACKEND_REQ_FD);
        // Another message with a descriptor yields nothing.
        send_with_fd(&a, 5, chan_ours.as_raw_fd());
        assert!(peek_backend_channel(&b).unwrap().is_none());
    }
}
