//! The communication thread. One OS thread owns the collective (NCCL communicators are not
//! `Send`, and one owner keeps the order of collectives identical on every rank); the training
//! thread hands it jobs and either waits for the answer or keeps computing and collects it later
//! ([`Pending`]), which is how gradient buckets overlap the backward pass.

use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{Collective, DistError, DistResult};

type Job = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// A handle to the communication thread.
pub struct Dist {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    world: usize,
    backend: &'static str,
    /// Anything that must live as long as the ranks talk (the store server rank 0 may host).
    _keep: Vec<Box<dyn Send>>,
}

/// The answer to a job submitted with [`Dist::submit`].
pub struct Pending<R>(mpsc::Receiver<DistResult<R>>);

impl<R> Pending<R> {
    pub fn wait(self) -> DistResult<R> {
        self.0.recv().unwrap_or(Err(DistError::ThreadGone))
    }
}

impl Dist {
    /// Starts the thread; `factory` builds the collective on it (connecting to the other ranks).
    pub fn start<F>(factory: F) -> DistResult<Self>
    where
        F: FnOnce() -> DistResult<Box<dyn Collective>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<DistResult<(usize, usize, &'static str)>>();
        let thread = std::thread::Builder::new()
            .name("collectives".into())
            .spawn(move || {
                let mut coll = match factory() {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok((c.rank(), c.world_size(), c.backend())));
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
        let (rank, world, backend) = ready_rx.recv().unwrap_or(Err(DistError::ThreadGone))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            rank,
            world,
            backend,
            _keep: Vec::new(),
        })
    }

    /// One rank, no communication.
    pub fn single() -> Self {
        // Building `Single` cannot fail, and neither can starting a thread in practice; if it
        // does, the first collective reports ThreadGone.
        Self::start(|| Ok(Box::new(super::Single))).unwrap_or(Self {
            tx: None,
            thread: None,
            rank: 0,
            world: 1,
            backend: "single",
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

    /// Queues `f` behind earlier jobs and returns at once.
    pub fn submit<R, F>(&self, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Collective) -> DistResult<R> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &self.tx {
            let _ = jobs.send(Box::new(move |c: &mut dyn Collective| {
                let _ = tx.send(f(c));
            }));
        }
        Pending(rx)
    }

    /// Runs `f` on the thread and waits for it.
    pub fn call<R, F>(&self, f: F) -> DistResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Collective) -> DistResult<R> + Send + 'static,
    {
        self.submit(f).wait()
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
