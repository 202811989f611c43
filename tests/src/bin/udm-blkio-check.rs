//! `udm-blkio-check`: a vhost-user-blk client built on libblkio (the `blkio` crate),
//! a front end udm did not write, for end-to-end checks inside guests.
//!
//! * `write SOCKET --bytes N --seed S`: writes a pattern (every 512-byte sector carries
//!   its number and the seed) over the first N bytes, in 64 KiB requests, 8 in flight;
//! * `verify SOCKET --bytes N --seed S`: reads it back and checks every sector;
//! * `zero SOCKET --bytes N`: checks that the first N bytes read as zeroes.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "udm-blkio-check")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    Write {
        socket: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        seed: u64,
    },
    Verify {
        socket: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        seed: u64,
    },
    Zero {
        socket: String,
        #[arg(long)]
        bytes: u64,
    },
}

const REQ: usize = 64 << 10;
const DEPTH: usize = 8;

fn fill(buf: &mut [u8], first_sector: u64, seed: u64) {
    for (k, s) in buf.chunks_mut(512).enumerate() {
        let sector = first_sector + k as u64;
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..16].copy_from_slice(&seed.to_le_bytes());
        s[16..].fill((sector ^ seed) as u8);
    }
}

fn run(socket: &str, bytes: u64, write: bool, expect: impl Fn(&mut [u8], u64)) -> Result<(), String> {
    let err = |what: &str, e: blkio::Error| format!("{what}: {e}");
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("virtio-blk-vhost-user", e))?;
    b.set_str("path", socket).map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err("connect", e))?;
    b.set_i32("num-queues", 1).map_err(|e| err("num-queues", e))?;
    let mut started = b.start().map_err(|e| err("start", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    if capacity < bytes {
        return Err(format!("the disk has {capacity} bytes, fewer than {bytes}"));
    }
    let region = b.alloc_mem_region(REQ * DEPTH).map_err(|e| err("alloc_mem_region", e))?;
    b.map_mem_region(&region).map_err(|e| err("map_mem_region", e))?;
    let q = &mut started.queues[0];
    let base = region.addr;
    // SAFETY: the region is REQ * DEPTH bytes mapped for the client's life; each slot's
    // REQ bytes are touched only while no request uses that slot.
    let slot = |i: usize| unsafe { std::slice::from_raw_parts_mut((base + i * REQ) as *mut u8, REQ) };
    let mut offsets = [0u64; DEPTH];
    let mut next = 0u64;
    let mut in_flight = 0;
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    while next < bytes || in_flight > 0 {
        while next < bytes {
            let Some(i) = free.pop() else { break };
            let len = (bytes - next).min(REQ as u64) as usize;
            offsets[i] = next;
            if write {
                expect(&mut slot(i)[..len], next / 512);
                q.write(next, (base + i * REQ) as *const u8, len, i, ReqFlags::empty());
            } else {
                slot(i)[..len].fill(0xee);
                q.read(next, (base + i * REQ) as *mut u8, len, i, ReqFlags::empty());
            }
            next += len as u64;
            in_flight += 1;
        }
        let mut timeout = Duration::from_secs(60);
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).map_err(|e| err("do_io", e))?;
        if n == 0 {
            return Err("no completion within 60 s".into());
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            let i = c.user_data;
            if c.ret != 0 {
                return Err(format!("request at byte {} failed: {}", offsets[i], c.ret));
            }
            if !write {
                let len = (bytes - offsets[i]).min(REQ as u64) as usize;
                expect(&mut slot(i)[..len], offsets[i] / 512);
            }
            free.push(i);
            in_flight -= 1;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let bad = std::cell::Cell::new(None::<String>);
    let result = match Cli::parse().mode {
        Mode::Write { socket, bytes, seed } => run(&socket, bytes, true, |buf, first| fill(buf, first, seed)),
        Mode::Verify { socket, bytes, seed } => run(&socket, bytes, false, |buf, first| {
            let mut want = vec![0u8; buf.len()];
            fill(&mut want, first, seed);
            if buf != &want[..] {
                let k = buf.chunks(512).zip(want.chunks(512)).position(|(a, b)| a != b).unwrap_or(0);
                bad.set(Some(format!("sector {} differs", first + k as u64)));
            }
        }),
        Mode::Zero { socket, bytes } => run(&socket, bytes, false, |buf, first| {
            if let Some(p) = buf.iter().position(|&b| b != 0) {
                bad.set(Some(format!("byte {} of sector {} is not zero", p % 512, first + p as u64 / 512)));
            }
        }),
    };
    let outcome = result.and_then(|()| bad.take().map_or(Ok(()), Err));
    match outcome {
        Ok(()) => {
            println!("blkio-check ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("blkio-check FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
