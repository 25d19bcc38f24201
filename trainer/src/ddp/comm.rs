//! The communication thread. One OS thread owns the collective (NCCL communicators are not
//! `Send`, and one owner keeps the order of collectives identical on every rank); the training
//! thread hands it jobs and either waits for the answer or keeps computing and collects it later
//! ([`Pending`]), which is how gradient buckets overlap the backward pass.
//!
//! A watchdog bounds every job: a waiter that sees the running job exceed the collective
//! timeout (plus a grace for the backend's own, more precise, timeout to fire first) calls the
//! backend's abort hook (NCCL: `ncclCommAbort`; TCP: shut the sockets), marks the handle
//! poisoned and returns [`DistError::Stuck`] naming the operation and the ranks. A poisoned
//! handle is dropped without joining its thread, so a rank whose peer vanished exits instead of
//! hanging.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{AbortHandle, Collective, DistError, DistResult};

type Job = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// How often a waiter looks at the running job's age.
const POLL: Duration = Duration::from_millis(50);

/// Added to the collective timeout before the watchdog fires, so that a backend that bounds
/// its own waits (the TCP ring names the silent peer) reports first.
const GRACE: Duration = Duration::from_secs(5);

/// What the waiters share with the communication thread.
struct Watchdog {
    /// The running job: its operation and when it started.
    running: Mutex<Option<(&'static str, Instant)>>,
    /// Jobs whose run exceeds this are stuck.
    limit: Duration,
    abort: Mutex<Option<AbortHandle>>,
    poisoned: AtomicBool,
    rank: usize,
    world: usize,
}

impl Watchdog {
    fn new(limit: Duration, abort: Option<AbortHandle>, rank: usize, world: usize) -> Arc<Self> {
        Arc::new(Self {
            running: Mutex::new(None),
            limit,
            abort: Mutex::new(abort),
            poisoned: AtomicBool::new(false),
            rank,
            world,
        })
    }

    fn running(&self) -> Option<(&'static str, Instant)> {
        *self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_running(&self, job: Option<(&'static str, Instant)>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = job;
    }

    /// The error for a stuck job, aborting the backend once.
    fn fire(&self, op: &'static str, waited: Duration) -> DistError {
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            tracing::error!(
                op,
                rank = self.rank,
                world = self.world,
                waited_s = waited.as_secs_f64(),
                "collective stuck: aborting the communicator"
            );
            let abort = self.abort.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(abort) = abort {
                abort();
            }
        }
        DistError::Stuck {
            op,
            rank: self.rank,
            world: self.world,
            waited,
        }
    }
}

/// A handle to the communication thread.
pub struct Dist {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    world: usize,
    backend: &'static str,
    watchdog: Arc<Watchdog>,
    /// Anything that must live as long as the ranks talk (the store server rank 0 may host).
    _keep: Vec<Box<dyn Send>>,
}

/// The answer to a job submitted with [`Dist::submit`].
pub struct Pending<R> {
    rx: mpsc::Receiver<DistResult<R>>,
    watchdog: Arc<Watchdog>,
}

impl<R> Pending<R> {
    /// The job's result; [`DistError::Stuck`] when the job running on the thread (this one, or
    /// one queued before it) exceeds the collective timeout.
    pub fn wait(self) -> DistResult<R> {
        loop {
            match self.rx.recv_timeout(POLL) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(DistError::ThreadGone),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some((op, started)) = self.watchdog.running() {
                        let waited = started.elapsed();
                        if waited > self.watchdog.limit {
                            return Err(self.watchdog.fire(op, waited));
                        }
                    }
                }
            }
        }
    }
}

impl Dist {
    /// Starts the thread; `factory` builds the collective on it (connecting to the other ranks).
    /// Every job is bounded by `timeout` (plus a grace for the backend's own timeouts).
    pub fn start<F>(factory: F, timeout: Duration) -> DistResult<Self>
    where
        F: FnOnce() -> DistResult<Box<dyn Collective>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job>();
        type Ready = (usize, usize, &'static str, Option<AbortHandle>);
        let (ready_tx, ready_rx) = mpsc::channel::<DistResult<Ready>>();
        let thread = std::thread::Builder::new()
            .name("collectives".into())
            .spawn(move || {
                let mut coll = match factory() {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok((
                            c.rank(),
                            c.world_size(),
                            c.backend(),
                            c.abort_handle(),
                        )));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(coll.as_mut());
                }
            })
            .map_err(|e| DistError::Rendezvous(format!("cannot start the thread: {e}")))?;
        let (rank, world, backend, abort) =
            ready_rx.recv().unwrap_or(Err(DistError::ThreadGone))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            rank,
            world,
            backend,
            watchdog: Watchdog::new(timeout.saturating_add(GRACE), abort, rank, world),
            _keep: Vec::new(),
        })
    }

    /// One rank, no communication.
    pub fn single() -> Self {
        // Building `Single` cannot fail, and neither can starting a thread in practice; if it
        // does, the first collective reports ThreadGone.
        Self::start(|| Ok(Box::new(super::Single)), Duration::MAX).unwrap_or(Self {
            tx: None,
            thread: None,
            rank: 0,
            world: 1,
            backend: "single",
            watchdog: Watchdog::new(Duration::MAX, None, 0, 1),
            _keep: Vec::new(),
        })
    }

    /// Keeps `thing` alive as long as this handle.
    pub fn keep(&mut self, thing: Box<dyn Send>) {
        self._keep.push(thing);
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Queues `f` (the operation `op`, named in errors) behind earlier jobs and returns at
    /// once. After a stuck job the handle is poisoned and every job fails at once.
    pub fn submit<R, F>(&self, op: &'static str, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Collective) -> DistResult<R> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        if self.watchdog.poisoned.load(Ordering::SeqCst) {
            let _ = tx.send(Err(DistError::Poisoned { op }));
        } else if let Some(jobs) = &self.tx {
            let watchdog = Arc::clone(&self.watchdog);
            let _ = jobs.send(Box::new(move |c: &mut dyn Collective| {
                watchdog.set_running(Some((op, Instant::now())));
                let r = f(c);
                watchdog.set_running(None);
                let _ = tx.send(r);
            }));
        }
        Pending {
            rx,
            watchdog: Arc::clone(&self.watchdog),
        }
    }

    /// Runs `f` (the operation `op`) on the thread and waits for it.
    pub fn call<R, F>(&self, op: &'static str, f: F) -> DistResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Collective) -> DistResult<R> + Send + 'static,
    {
        self.submit(op, f).wait()
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        self.tx.take();
        // A stuck thread may never return: leave it to the process exit rather than hang.
        if self.watchdog.poisoned.load(Ordering::SeqCst) {
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ReduceOp;
    use super::*;
    use candle_core::Tensor;

    /// A backend whose collectives block until aborted, like one whose peer died.
    struct Hung {
        release: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Collective for Hung {
        fn rank(&self) -> usize {
            1
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "hung"
        }
        fn all_reduce(&mut self, t: &Tensor, _op: ReduceOp) -> DistResult<Tensor> {
            let (lock, cv) = &*self.release;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            Err(DistError::Nccl(format!("aborted ({:?})", t.dims())))
        }
        fn broadcast(&mut self, t: &Tensor, _root: usize) -> DistResult<Tensor> {
            Ok(t.clone())
        }
        fn all_gather_bytes(&mut self, mine: &[u8]) -> DistResult<Vec<Vec<u8>>> {
            Ok(vec![mine.to_vec(); 2])
        }
        fn abort_handle(&self) -> Option<AbortHandle> {
            let release = Arc::clone(&self.release);
            Some(Arc::new(move || {
                let (lock, cv) = &*release;
                *lock.lock().unwrap() = true;
                cv.notify_all();
            }))
        }
    }

    #[test]
    fn a_stuck_collective_times_out_aborts_and_poisons_the_handle() {
        let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let hung = Hung {
            release: Arc::clone(&release),
        };
        let dist = Dist::start(move || Ok(Box::new(hung)), Duration::ZERO).unwrap();
        let t = Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let started = Instant::now();
        // Queued behind the stuck one: its waiter sees the running job's age too.
        let first = dist.submit("gradient bucket", move |c| c.all_reduce(&t, ReduceOp::Mean));
        let second = dist.submit("step flags", |c| c.barrier());
        match second.wait() {
            Err(DistError::Stuck {
                op, rank, world, ..
            }) => assert_eq!((op, rank, world), ("gradient bucket", 1, 2)),
            other => panic!("expected Stuck, got {:?}", other.err()),
        }
        let waited = started.elapsed();
        assert!(
            waited >= GRACE && waited < GRACE + Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(*release.0.lock().unwrap(), "the abort hook ran");
        // The aborted job ends with the backend's error; later jobs fail at once.
        assert!(matches!(first.wait(), Err(DistError::Nccl(_))));
        let msg = dist
            .call("barrier", |c| c.barrier())
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("barrier") && msg.contains("stuck"), "{msg}");
    }
}
