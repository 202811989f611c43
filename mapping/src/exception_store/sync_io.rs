//! Synchronous I/O over an [`IoQueue`], for the control plane (activating a store,
//! initialising a new one). The data path never uses this: it drives the stores'
//! requests through its own polled queues.

use udm_drivers::{Completion, IoError, IoQueue, IoRequest};

/// Submits `req` and polls `queue` until it completes and the queue has nothing left in
/// flight (a stacked queue may carry work other threads wait for). The queue must be
/// idle: every completion it returns is taken to be this request's.
pub fn run(queue: &mut dyn IoQueue, req: IoRequest) -> Result<(), IoError> {
    let result = submit_and_wait(queue, req);
    while queue.in_flight() > 0 {
        if queue.poll(&mut [Completion::EMPTY; 4]) == 0 {
            std::thread::yield_now();
        }
    }
    result
}

fn submit_and_wait(queue: &mut dyn IoQueue, req: IoRequest) -> Result<(), IoError> {
    let mut pending = Some(req);
    let mut out = [Completion::EMPTY; 4];
    loop {
        if let Some(r) = pending.take() {
            match queue.submit(r) {
                Ok(()) => queue.kick(),
                Err(full) => pending = Some(full.0),
            }
        }
        let n = queue.poll(&mut out);
        if let Some(c) = out[..n].iter().find(|c| c.tag == req.tag) {
            return c.result;
        }
        if n == 0 {
            std::thread::yield_now();
        }
    }
}
