//! Finishing snapshot merges, as LVM's polling does (lvmpolld): a merge runs in the
//! background of its `snapshot-merge` table; once its status shows `allocated ==
//! metadata` nothing is left, and this poller gives the origin its table back and removes
//! the merged snapshot's devices (`snapshot_ops::finish_merge`). Until then `udm snapshot
//! list` shows the merge and its progress.
//!
//! How a merge survives the daemon: the merge itself marks the COW (see
//! `udm_mapping::exception_store::format::MERGE_MARK`) before it first writes the origin
//! and clears the mark when it is complete. A declared `[[snapshot]]` whose COW carries
//! the mark at start is re-attached and merged again (`Daemon::apply`), so a merge cut by
//! a crash or a kill resumes where the COW says it stood, as the kernel resumes one when
//! LVM loads the `snapshot-merge` table again.

use std::collections::BTreeSet;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use udm_mapping::registry::Registry;
use udm_mapping::snapshot_ops;

/// How often finished merges are looked for (LVM polls every 15 s by default; a merge
/// of a small COW finishes in well under a second, so poll faster).
const POLL: Duration = Duration::from_millis(200);

/// What to do once a merge is finished (the daemon saves its state).
pub type OnFinished = Box<dyn Fn() + Send + Sync>;

/// The poller thread; dropping it stops the thread.
pub struct MergeFinisher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    on_finished: Arc<Mutex<Option<OnFinished>>>,
}

impl MergeFinisher {
    /// Starts polling `registry` (held weakly: the poller never keeps it alive). Each
    /// finish holds `composite` shared (see `Daemon::save_state`).
    pub fn start(registry: Weak<Registry>, composite: Arc<RwLock<()>>) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let on_finished: Arc<Mutex<Option<OnFinished>>> = Arc::default();
        let hook = Arc::clone(&on_finished);
        let thread = std::thread::Builder::new()
            .name("udm-merge-poll".into())
            .spawn(move || {
                let mut failing = BTreeSet::new();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
                    let Some(reg) = registry.upgrade() else { return };
                    let finished = {
                        let _step = composite.read().unwrap_or_else(|e| e.into_inner());
                        finish_completed(&reg, &mut failing)
                    };
                    if finished > 0 {
                        if let Some(f) = &*hook.lock().unwrap_or_else(|e| e.into_inner()) {
                            f();
                        }
                    }
                }
            })
            .map_err(|e| tracing::error!("cannot start the merge poller: merges will not finish by themselves: {e}"))
            .ok();
        MergeFinisher { stop: Some(stop), thread, on_finished }
    }

    /// Calls `f` after each poll that finished a merge.
    pub fn on_finished(&self, f: OnFinished) {
        *self.on_finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

impl Drop for MergeFinisher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Finishes every merge that is complete; returns how many. `failing` holds the origins
/// whose finish failed, so each failure is logged once, not at every poll.
fn finish_completed(reg: &Arc<Registry>, failing: &mut BTreeSet<String>) -> usize {
    let mut finished = 0;
    for merge in snapshot_ops::list(reg).into_iter().filter(|s| s.merging) {
        // Only LVM-shaped stacks (as `udm snapshot create` builds them): merges set up
        // by hand with `udm dm` tables are left for their owner to finish.
        let lvm_shaped = merge.cow == snapshot_ops::cow_name(&merge.name)
            && reg.device(&snapshot_ops::real_name(&merge.origin)).is_ok();
        if !lvm_shaped {
            continue;
        }
        let done = snapshot_ops::merge_progress(reg, &merge.origin).is_ok_and(|p| p.done);
        if !done {
            continue;
        }
        match snapshot_ops::finish_merge(reg, &merge.origin) {
            Ok(()) => {
                finished += 1;
                failing.remove(&merge.origin);
                tracing::info!("snapshot {} is merged into {} and removed", merge.name, merge.origin);
            }
            Err(e) => {
                if failing.insert(merge.origin.clone()) {
                    tracing::warn!(
                        "merge of {} into {} is complete but cannot be finished yet: {e}; retrying",
                        merge.name,
                        merge.origin
                    );
                }
            }
        }
    }
    finished
}
