//! A lean vhost-user-blk load generator over libblkio (`blkio` crate), for comparing
//! vhost-user-blk servers (udm, qemu-storage-daemon) with the same client.
//!
//! One queue, `--qd` requests kept in flight (closed loop), random 4 KiB-aligned offsets
//! from a xorshift generator, per-request latency in an HDR histogram. With `--poll` the
//! client busy-polls a poll queue (no completion interrupts); otherwise it sleeps in
//! `do_io` until a completion arrives. Given `--server-pid`, the server's CPU time
//! (utime + stime of every thread, /proc/PID/stat) is measured over the run, so the
//! result includes IOPS per server CPU-second. Prints one JSON object.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
}

#[derive(Debug, Parser)]
struct Args {
    /// vhost-user-blk socket.
    #[arg(long)]
    socket: String,
    /// Workload.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Block size.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Seconds to measure (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes of the device to spread I/O over (default: all of it).
    #[arg(long)]
    span: Option<u64>,
    /// Busy-poll a poll queue instead of waiting for completion events.
    #[arg(long)]
    poll: bool,
    /// Server process whose CPU time to measure.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label copied into the output.
    #[arg(long, default_value = "")]
    label: String,
}

/// utime + stime of a process in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let e = |e: blkio::Error| e.to_string();
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    b.set_str("path", &a.socket).map_err(e)?;
    b.connect().map_err(e)?;
    if a.poll {
        b.set_i32("num-queues", 0).map_err(e)?;
        b.set_i32("num-poll-queues", 1).map_err(e)?;
    } else {
        b.set_i32("num-queues", 1).map_err(e)?;
    }
    b.set_i32("queue-size", (a.qd.next_power_of_two().max(2) as i32).max(128)).map_err(e)?;
    let started = b.start().map_err(e)?;
    let mut q = started.queues.into_iter().chain(started.poll_queues).next().ok_or("no queue")?;
    let capacity = b.get_u64("capacity").map_err(e)?;
    let region = b.alloc_mem_region((a.bs * a.qd).next_multiple_of(2 << 20)).map_err(e)?;
    b.map_mem_region(&region).map_err(e)?;
    let blocks = a.span.unwrap_or(capacity).min(capacity) / a.bs as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * a.bs as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let buf = (region.addr + slot * a.bs) as *mut u8;
        match a.rw {
            Rw::Randread => q.read(off, buf, a.bs, slot, ReqFlags::empty()),
            Rw::Randwrite => q.write(off, buf, a.bs, slot, ReqFlags::empty()),
        }
    };
    let mut started_at = vec![Instant::now(); a.qd];
    for (slot, t) in started_at.iter_mut().enumerate() {
        *t = Instant::now();
        submit(&mut q, slot, next_offset());
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..a.qd).map(|_| MaybeUninit::uninit()).collect();
    let warmup_end = Instant::now() + Duration::from_secs(1);
    let mut measuring = false;
    let (mut t0, mut cpu0, mut done) = (Instant::now(), 0.0, 0u64);
    let end_after = Duration::from_secs_f64(a.seconds);
    loop {
        let min = if a.poll { 0 } else { 1 };
        let n = q.do_io(&mut comps, min, None, None).map_err(e)?;
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("request failed: {}", c.ret));
            }
            let slot = c.user_data;
            if measuring {
                let _ = hist.record((now - started_at[slot]).as_nanos() as u64);
                done += 1;
            }
            started_at[slot] = now;
            submit(&mut q, slot, next_offset());
        }
        if !measuring && now >= warmup_end {
            measuring = true;
            t0 = now;
            cpu0 = a.server_pid.map_or(0.0, cpu_seconds);
        } else if measuring && now - t0 >= end_after {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = a.server_pid.map_or(0.0, |p| cpu_seconds(p) - cpu0);
    let iops = done as f64 / secs;
    println!(
        "{{\"label\":\"{}\",\"rw\":\"{:?}\",\"qd\":{},\"poll\":{},\"iops\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\
         \"server_cpu_s\":{:.2},\"seconds\":{:.2},\"iops_per_server_cpu_s\":{:.0}}}",
        a.label,
        a.rw,
        a.qd,
        a.poll,
        iops,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu,
        secs,
        if cpu > 0.0 { done as f64 / cpu } else { 0.0 }
    );
    Ok(())
}
