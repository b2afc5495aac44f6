//! A pool of worker threads for the agent's jobs off its read loop: file requests, and
//! each running process's output and end.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::say;

/// How long a pool worker beyond [`KEPT_WORKERS`] waits for a job before it ends.
const WORKER_IDLE: Duration = Duration::from_secs(60);
/// Pool workers that stay however long they idle.
const KEPT_WORKERS: usize = 4;

/// A job for a [`Pool`] worker.
type Job = Box<dyn FnOnce() + Send>;

/// Threads that run jobs off the read loop. A job goes to an idle worker, or to a new
/// one when all are busy, up to `max` (beyond that jobs queue); workers stay for the
/// next job, since under emulation starting a thread costs milliseconds.
pub(super) struct Pool {
    state: Mutex<PoolState>,
    /// A job was queued.
    queued: Condvar,
    max: usize,
}

#[derive(Default)]
struct PoolState {
    jobs: std::collections::VecDeque<Job>,
    /// Workers waiting for a job (counted from before their thread runs).
    idle: usize,
    workers: usize,
}

impl Pool {
    pub(super) fn new(max: usize) -> Pool {
        Pool { state: Mutex::new(PoolState::default()), queued: Condvar::new(), max }
    }

    /// Runs `job` on a worker, starting one when no idle worker is left for it.
    pub(super) fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) {
        let mut st = self.state.lock();
        st.jobs.push_back(Box::new(job));
        if st.jobs.len() > st.idle && st.workers < self.max {
            self.start_worker_locked(&mut st);
        }
        self.queued.notify_one();
    }

    /// Starts a worker that waits for jobs.
    pub(super) fn start_worker(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.start_worker_locked(&mut st);
    }

    fn start_worker_locked(self: &Arc<Self>, st: &mut PoolState) {
        let me = self.clone();
        let started = thread::Builder::new().spawn(move || loop {
            let mut st = me.state.lock();
            while st.jobs.is_empty() {
                // Beyond a few, a worker idle for a minute ends: the pool shrinks back
                // after a burst of commands.
                if me.queued.wait_for(&mut st, WORKER_IDLE).timed_out()
                    && st.jobs.is_empty()
                    && st.workers > KEPT_WORKERS
                {
                    st.workers -= 1;
                    st.idle -= 1;
                    return;
                }
            }
            let job = st.jobs.pop_front().expect("not empty");
            st.idle -= 1;
            drop(st);
            job();
            me.state.lock().idle += 1;
        });
        match started {
            Ok(_) => {
                st.workers += 1;
                st.idle += 1;
            }
            // The queued jobs wait for a worker to be free.
            Err(e) => say(format_args!("cannot start a worker thread: {e}")),
        }
    }
}
