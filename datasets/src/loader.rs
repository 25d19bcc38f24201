//! The streaming reader a training rank pulls batches from.
//!
//! Three stages, bounded at each step so memory does not grow with the dataset:
//! - a fetch thread walks this rank's plan ([`crate::plan`]) from the cursor and reads the row
//!   groups the next batches need, `io_threads` range reads at a time (on the object-store I/O
//!   runtime), keeping only rows a later batch still needs;
//! - `decode_threads` workers decode images and apply the transforms, one batch each;
//! - [`Loader::next_batch`] hands batches out in plan order; at most `prefetch_batches` wait.
//!
//! A sample that cannot be used (bad row, bad image, bad correspondence, a row group whose
//! bytes do not match the manifest or do not decode) makes its batch skipped: the sample is
//! recorded with its id in the [`DataReport`] and the next batch of the plan is used, or, in
//! strict mode, the first one is an error. Store errors that outlast the retries are errors.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::cache::CachedSample;
use crate::error::{DataError, Result, SampleProblem};
use crate::manifest::Manifest;
use crate::plan::{plan_epoch, row_bucket, Cursor, PlanSpec, RowRef};
use crate::report::DataReport;
use crate::schema::{decode_row, sample_ids, RawSample};
use crate::shard::{
    decode_row_group, decode_sample_ids, fetch_row_group, id_at, read_footer, ShardFooter,
};
use crate::store::Location;
use crate::transform::{decode_sample, Decoded, TransformSpec};

/// Consecutive skipped batches after which the loader gives up (the data is unusable).
const MAX_CONSECUTIVE_SKIPS: usize = 1000;

#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub plan: PlanSpec,
    pub transform: TransformSpec,
    /// Row groups fetched concurrently.
    pub io_threads: usize,
    /// Batches decoded concurrently.
    pub decode_threads: usize,
    /// Decoded batches kept ready.
    pub prefetch_batches: usize,
    /// Fail at the first unusable sample instead of skipping it.
    pub strict: bool,
    /// The location read is a latent cache (`datasets precompute`), not a dataset: batches
    /// carry [`CachedSample`]s instead of decoded images.
    pub cached: bool,
}

/// A batch of decoded samples and the cursor after it.
#[derive(Debug)]
pub struct Batch {
    /// Decoded samples (reading a dataset).
    pub samples: Vec<Decoded>,
    /// Cached latents and embeddings (reading a cache).
    pub cached: Vec<CachedSample>,
    pub epoch: u64,
    pub index: usize,
    pub cursor: Cursor,
}

/// A row as the fetch stage hands it on.
enum RowData {
    Raw(RawSample),
    Cached(CachedSample),
}

type Row = std::result::Result<RowData, Skip>;

#[derive(Debug, Clone)]
struct Skip {
    sample_id: String,
    at: String,
    problem: SampleProblem,
}

struct Job {
    seq: u64,
    epoch: u64,
    index: usize,
    cursor: Cursor,
    rows: Vec<(String, Row)>,
    target: TargetCheck,
}

/// What size the targets of a batch must have.
#[derive(Debug, Clone, Copy)]
enum TargetCheck {
    /// No aspect buckets: the transform makes every target square.
    Square,
    /// The bucket (width, height) the plan put the batch in.
    Bucket(usize, usize),
    /// Aspect buckets, but the manifest has no usable size for the batch's row.
    Unknown,
}

impl TargetCheck {
    /// Why a target of `width` x `height` px cannot go in this batch.
    fn problem(self, width: usize, height: usize) -> Option<SampleProblem> {
        let reason = match self {
            Self::Square => return None,
            Self::Bucket(w, h) if (w, h) == (width, height) => return None,
            Self::Bucket(w, h) => format!(
                "is {width}x{height} px after the transform, but the size in the manifest puts it in the {w}x{h} bucket (the manifest does not describe this shard)"
            ),
            Self::Unknown => {
                "its size in the manifest is missing or zero, and aspect buckets need it".into()
            }
        };
        Some(SampleProblem::Invalid {
            what: "target".into(),
            reason,
        })
    }
}

enum Done {
    Batch(Batch),
    Skipped {
        skips: Vec<Skip>,
        epoch: u64,
        cursor: Cursor,
        rows: usize,
    },
    Failed(DataError),
}

/// Decoded batches waiting for the consumer. A worker may add batch `seq` only when
/// `seq < next + cap`: memory stays bounded, and the batch the consumer waits for can always
/// be added.
struct Reorder {
    ready: BTreeMap<u64, Done>,
    next: u64,
    cap: u64,
}

pub struct Loader {
    manifest: Arc<Manifest>,
    opts: LoaderOptions,
    cursor: Cursor,
    next_seq: u64,
    /// (epoch, batches handed out in it): an epoch without any usable batch is an error.
    delivered: (u64, usize),
    done: Arc<(Mutex<Reorder>, Condvar)>,
    report: Arc<Mutex<DataReport>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LoaderOptions {
    /// Whether these options can read `manifest` (named `at`): the plan and the transform
    /// agree on aspect buckets, and the manifest records the target sizes buckets need.
    pub fn check(&self, manifest: &Manifest, at: &str) -> Result<()> {
        let t = &self.transform;
        if self.plan.buckets != t.aspect_buckets.then_some(t.resolution) {
            return Err(DataError::input(
                "loader",
                "the plan's aspect buckets differ from the transform's (plan.buckets must be Some(resolution) exactly when transform.aspect_buckets is on)",
            ));
        }
        if t.aspect_buckets
            && manifest
                .shards
                .iter()
                .any(|s| s.row_groups.iter().any(|g| g.targets.is_empty()))
        {
            return Err(DataError::manifest(
                at,
                "records no target sizes, which aspect buckets need (written by an older `datasets`): write the dataset again, or turn aspect buckets off",
            ));
        }
        Ok(())
    }
}

impl Loader {
    /// Opens the dataset at `url` (folder or object-store URL) and starts reading at `cursor`.
    pub fn open(url: &str, opts: LoaderOptions, cursor: Cursor) -> Result<Self> {
        let loc = Location::parse(url)?;
        let manifest = Arc::new(Manifest::load(&loc)?);
        Self::start(loc, manifest, opts, cursor)
    }

    /// Starts reading `manifest` below `loc` at `cursor`.
    pub fn start(
        loc: Location,
        manifest: Arc<Manifest>,
        opts: LoaderOptions,
        cursor: Cursor,
    ) -> Result<Self> {
        if opts.plan.world == 0 || opts.plan.rank >= opts.plan.world {
            return Err(DataError::input(
                "loader",
                format!("rank {} of a world of {}", opts.plan.rank, opts.plan.world),
            ));
        }
        opts.check(&manifest, &loc.name(crate::manifest::MANIFEST))?;
        if plan_epoch(&manifest, &opts.plan, cursor.epoch)
            .batches
            .is_empty()
        {
            return Err(DataError::input(
                loc.name(crate::manifest::MANIFEST),
                format!(
                    "rank {} of {} gets no full batch of {} samples with equal reference counts \
                     from {} rows; lower the batch size or add data",
                    opts.plan.rank, opts.plan.world, opts.plan.batch_size, manifest.total_rows
                ),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new((
            Mutex::new(Reorder {
                ready: BTreeMap::new(),
                next: 0,
                cap: opts.prefetch_batches.max(1) as u64,
            }),
            Condvar::new(),
        ));
        let report: Arc<Mutex<DataReport>> = Default::default();
        let (job_tx, job_rx) = sync_channel::<Job>(opts.prefetch_batches.max(1));
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();
        {
            let fetch = Fetcher {
                loc,
                manifest: manifest.clone(),
                opts: opts.clone(),
                footers: HashMap::new(),
                units: HashMap::new(),
                stop: stop.clone(),
                report: report.clone(),
                done: done.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name("data-fetch".into())
                    .spawn(move || fetch.run(cursor, job_tx))
                    .map_err(|e| {
                        DataError::input("loader", format!("cannot start a thread: {e}"))
                    })?,
            );
        }
        for i in 0..opts.decode_threads.max(1) {
            let (rx, done, stop, spec) =
                (job_rx.clone(), done.clone(), stop.clone(), opts.transform);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-decode-{i}"))
                    .spawn(move || decode_worker(rx, done, stop, spec))
                    .map_err(|e| {
                        DataError::input("loader", format!("cannot start a thread: {e}"))
                    })?,
            );
        }
        Ok(Self {
            manifest,
            opts,
            cursor,
            next_seq: 0,
            delivered: (cursor.epoch, cursor.batch),
            done,
            report,
            stop,
            threads,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The position after the last batch handed out.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// A copy of the report so far.
    pub fn report(&self) -> DataReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Batches this rank has in `epoch`.
    pub fn batches_in_epoch(&self, epoch: u64) -> usize {
        plan_epoch(&self.manifest, &self.opts.plan, epoch)
            .batches
            .len()
    }

    /// The next usable batch in plan order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let mut skipped_in_a_row = 0;
        loop {
            let item = {
                let (lock, cv) = &*self.done;
                let mut guard = lock
                    .lock()
                    .map_err(|_| DataError::input("loader", "a data thread panicked"))?;
                loop {
                    if let Some(d) = guard.ready.remove(&self.next_seq) {
                        guard.next = self.next_seq + 1;
                        cv.notify_all();
                        break d;
                    }
                    guard = cv
                        .wait(guard)
                        .map_err(|_| DataError::input("loader", "a data thread panicked"))?;
                }
            };
            self.next_seq += 1;
            match item {
                Done::Batch(b) => {
                    self.cursor = b.cursor;
                    if self.delivered.0 != b.epoch {
                        self.delivered = (b.epoch, 0);
                    }
                    self.delivered.1 += 1;
                    if let Ok(mut r) = self.report.lock() {
                        r.samples_read += b.samples.len() + b.cached.len();
                    }
                    return Ok(b);
                }
                Done::Skipped {
                    skips,
                    epoch,
                    cursor,
                    rows,
                } => {
                    self.cursor = cursor;
                    if self.delivered.0 != epoch {
                        self.delivered = (epoch, 0);
                    }
                    if self.opts.strict {
                        let s = skips.into_iter().next();
                        return Err(match s {
                            Some(s) => DataError::Sample {
                                sample_id: s.sample_id,
                                at: s.at,
                                problem: s.problem,
                            },
                            None => DataError::input("loader", "a batch was skipped"),
                        });
                    }
                    if let Ok(mut r) = self.report.lock() {
                        r.batches_dropped += 1;
                        r.samples_read += rows;
                        for s in &skips {
                            tracing::warn!(
                                "skipping sample `{}` ({}): {}",
                                s.sample_id,
                                s.at,
                                s.problem
                            );
                            r.skip(
                                &s.sample_id,
                                &s.at,
                                s.problem.kind(),
                                &s.problem.to_string(),
                            );
                        }
                    }
                    skipped_in_a_row += 1;
                    if cursor.epoch > epoch && self.delivered.1 == 0 {
                        return Err(DataError::input(
                            "loader",
                            format!(
                                "epoch {epoch} had no usable batch for this rank: {}",
                                self.report().summary()
                            ),
                        ));
                    }
                    if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS {
                        return Err(DataError::input(
                            "loader",
                            format!(
                                "{MAX_CONSECUTIVE_SKIPS} batches in a row had unusable samples: {}",
                                self.report().summary()
                            ),
                        ));
                    }
                }
                Done::Failed(e) => return Err(e),
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Threads notice the flag after their current job; a fetch blocked on the network is
        // not waited for.
        for t in self.threads.drain(..) {
            drop(t);
        }
    }
}

/// Hands batch `seq` to the consumer, waiting while it is too far ahead (see [`Reorder`]).
fn publish(done: &(Mutex<Reorder>, Condvar), seq: u64, d: Done, stop: &AtomicBool) {
    let (lock, cv) = done;
    let Ok(mut g) = lock.lock() else { return };
    while seq >= g.next + g.cap {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        g = match cv.wait_timeout(g, std::time::Duration::from_millis(200)) {
            Ok((g, _)) => g,
            Err(_) => return,
        };
    }
    g.ready.insert(seq, d);
    cv.notify_all();
}

fn decode_worker(
    rx: Arc<Mutex<Receiver<Job>>>,
    done: Arc<(Mutex<Reorder>, Condvar)>,
    stop: Arc<AtomicBool>,
    spec: TransformSpec,
) {
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let job = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let n = job.rows.len();
        let mut samples = Vec::with_capacity(n);
        let mut cached = Vec::new();
        let mut skips = Vec::new();
        for (at, row) in job.rows {
            match row {
                Ok(RowData::Raw(raw)) => {
                    let skip = |problem| Skip {
                        sample_id: raw.sample_id.clone(),
                        at: at.clone(),
                        problem,
                    };
                    // An image decoder that panics on hostile bytes costs this sample only.
                    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        raw.check()
                            .and_then(|()| decode_sample(&raw, &spec))
                            .and_then(|d| {
                                match job.target.problem(d.target.width, d.target.height) {
                                    Some(p) => Err(p),
                                    None => Ok(d),
                                }
                            })
                    }))
                    .unwrap_or_else(|_| {
                        Err(SampleProblem::Invalid {
                            what: "images".into(),
                            reason: "an image decoder panicked on this sample".into(),
                        })
                    });
                    match decoded.map_err(skip) {
                        Ok(d) => samples.push(d),
                        Err(s) => skips.push(s),
                    }
                }
                Ok(RowData::Cached(c)) => {
                    let (rows, cols) = (c.grid.0 as usize, c.grid.1 as usize);
                    match job.target.problem(cols * 16, rows * 16) {
                        Some(problem) => skips.push(Skip {
                            sample_id: c.sample_id.clone(),
                            at,
                            problem,
                        }),
                        None => cached.push(c),
                    }
                }
                Err(s) => skips.push(s),
            }
        }
        let d = if skips.is_empty() {
            Done::Batch(Batch {
                samples,
                cached,
                epoch: job.epoch,
                index: job.index,
                cursor: job.cursor,
            })
        } else {
            Done::Skipped {
                skips,
                epoch: job.epoch,
                cursor: job.cursor,
                rows: n,
            }
        };
        publish(&done, job.seq, d, &stop);
    }
}

/// A row group: (shard, group).
type UnitKey = (u32, u32);

/// Rows of a fetched row group that later batches still need.
struct Unit {
    rows: Vec<Option<Row>>,
    uses: usize,
}

struct Fetcher {
    loc: Location,
    manifest: Arc<Manifest>,
    opts: LoaderOptions,
    footers: HashMap<u32, std::result::Result<ShardFooter, String>>,
    units: HashMap<(u32, u32), Unit>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<DataReport>>,
    done: Arc<(Mutex<Reorder>, Condvar)>,
}

impl Fetcher {
    fn run(mut self, cursor: Cursor, tx: SyncSender<Job>) {
        let mut seq = 0u64;
        let mut epoch = cursor.epoch;
        let mut start = cursor.batch;
        loop {
            let plan = plan_epoch(&self.manifest, &self.opts.plan, epoch);
            if let Ok(mut r) = self.report.lock() {
                r.tail_rows_dropped.insert(epoch, plan.dropped.len());
            }
            if plan.batches.is_empty() {
                publish(
                    &self.done,
                    seq,
                    Done::Failed(DataError::input(
                        "loader",
                        format!("epoch {epoch} has no full batch for this rank"),
                    )),
                    &self.stop,
                );
                return;
            }
            let batches = &plan.batches[start.min(plan.batches.len())..];
            self.units.clear();
            let mut uses: HashMap<(u32, u32), usize> = HashMap::new();
            for r in batches.iter().flatten() {
                *uses.entry(r.unit()).or_default() += 1;
            }
            for (j, batch) in batches.iter().enumerate() {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let index = start + j;
                if let Err(e) = self.ensure_loaded(&batches[j..], &mut uses) {
                    publish(&self.done, seq, Done::Failed(e), &self.stop);
                    return;
                }
                let rows = batch.iter().map(|r| self.take(r)).collect();
                let target = match (self.opts.plan.buckets, batch.first()) {
                    (None, _) | (_, None) => TargetCheck::Square,
                    (Some(_), Some(r)) => match row_bucket(&self.manifest, &self.opts.plan, r) {
                        Some((w, h)) => TargetCheck::Bucket(w, h),
                        None => TargetCheck::Unknown,
                    },
                };
                let next = if index + 1 == plan.batches.len() {
                    Cursor {
                        epoch: epoch + 1,
                        batch: 0,
                    }
                } else {
                    Cursor {
                        epoch,
                        batch: index + 1,
                    }
                };
                let job = Job {
                    seq,
                    epoch,
                    index,
                    cursor: next,
                    rows,
                    target,
                };
                if tx.send(job).is_err() {
                    return;
                }
                seq += 1;
            }
            epoch += 1;
            start = 0;
        }
    }

    fn row_name(&self, r: &RowRef) -> String {
        let file = &self.manifest.shards[r.shard as usize].file;
        format!("{file} row group {} row {}", r.group, r.row)
    }

    /// Takes a loaded row out of its unit, dropping the unit once no batch needs it.
    fn take(&mut self, r: &RowRef) -> (String, Row) {
        let at = self.row_name(r);
        let key = r.unit();
        let row = match self.units.get_mut(&key) {
            Some(u) => {
                u.uses = u.uses.saturating_sub(1);
                let row = u.rows.get_mut(r.row as usize).and_then(Option::take);
                if u.uses == 0 {
                    self.units.remove(&key);
                }
                row
            }
            None => None,
        };
        let row = row.unwrap_or_else(|| {
            Err(Skip {
                sample_id: "?".into(),
                at: at.clone(),
                problem: SampleProblem::Invalid {
                    what: "row".into(),
                    reason: "not loaded (internal: planned twice)".into(),
                },
            })
        });
        (at, row)
    }

    /// Loads the units of `upcoming[0]` plus, to keep `io_threads` reads busy, those of the
    /// batches after it.
    fn ensure_loaded(
        &mut self,
        upcoming: &[Vec<RowRef>],
        uses: &mut HashMap<(u32, u32), usize>,
    ) -> Result<()> {
        let missing = |units: &HashMap<(u32, u32), Unit>, b: &Vec<RowRef>| -> Vec<(u32, u32)> {
            let mut m: Vec<(u32, u32)> = b
                .iter()
                .map(RowRef::unit)
                .filter(|u| !units.contains_key(u))
                .collect();
            m.sort();
            m.dedup();
            m
        };
        let first = missing(&self.units, &upcoming[0]);
        if first.is_empty() {
            return Ok(());
        }
        let mut wanted = first;
        let io = self.opts.io_threads.max(1);
        for b in upcoming.iter().skip(1) {
            if wanted.len() >= io {
                break;
            }
            for u in missing(&self.units, b) {
                if !wanted.contains(&u) && wanted.len() < io {
                    wanted.push(u);
                }
            }
        }
        for &(s, _) in &wanted {
            if self.footers.contains_key(&s) {
                continue;
            }
            let shard = &self.manifest.shards[s as usize];
            let footer = match read_footer(&self.loc, shard) {
                Ok(f) => Ok(f),
                Err(err @ DataError::Store { .. }) => match self.damaged(shard) {
                    Some(reason) => Err(reason),
                    None => return Err(err),
                },
                Err(other) => Err(other.message()),
            };
            self.footers.insert(s, footer);
        }
        let loaded: Vec<(UnitKey, Result<Vec<Row>>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = wanted
                .iter()
                .map(|&unit| {
                    let this = &*self;
                    scope.spawn(move || (unit, this.load_unit_guarded(unit)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        (
                            (u32::MAX, u32::MAX),
                            Err(DataError::input("loader", "a fetch thread panicked")),
                        )
                    })
                })
                .collect()
        });
        for (unit, rows) in loaded {
            let rows = rows?;
            let n = uses.remove(&unit).unwrap_or(0);
            self.units.insert(
                unit,
                Unit {
                    rows: rows.into_iter().map(Some).collect(),
                    uses: n,
                },
            );
        }
        Ok(())
    }

    /// Why a read of `shard` failed when the shard itself is at fault (missing, or not the size
    /// the manifest records: truncated or replaced), rather than the store (a failure that
    /// outlasted the retries stays an error).
    fn damaged(&self, shard: &crate::manifest::ShardInfo) -> Option<String> {
        match self.loc.size(&shard.file) {
            Ok(n) if n != shard.bytes => Some(format!(
                "{} is {n} bytes, the manifest says {} (truncated or replaced)",
                self.loc.name(&shard.file),
                shard.bytes
            )),
            Ok(_) => None,
            Err(_) if matches!(self.loc.exists(&shard.file), Ok(false)) => {
                Some(format!("{} does not exist", self.loc.name(&shard.file)))
            }
            Err(_) => None,
        }
    }

    /// [`Self::load_unit`], with a panic in a decoder (a bug in a library on hostile bytes)
    /// turned into skips of the row group's rows instead of taking the run down.
    fn load_unit_guarded(&self, unit: UnitKey) -> Result<Vec<Row>> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_unit(unit)))
            .unwrap_or_else(|_| {
                let shard = &self.manifest.shards[unit.0 as usize];
                let n = shard.row_groups[unit.1 as usize].rows;
                Ok((0..n)
                    .map(|row| {
                        Err(Skip {
                            sample_id: "?".into(),
                            at: format!("{} row group {} row {row}", shard.file, unit.1),
                            problem: SampleProblem::Shard {
                                reason: "the Parquet decoder panicked on this row group".into(),
                            },
                        })
                    })
                    .collect())
            })
    }

    /// Fetches and decodes one row group into rows; data problems become per-row skips, store
    /// failures are errors.
    fn load_unit(&self, (s, g): (u32, u32)) -> Result<Vec<Row>> {
        let shard = &self.manifest.shards[s as usize];
        let n = shard.row_groups[g as usize].rows;
        let at = self.loc.name(&shard.file);
        let name = |row: usize| format!("{} row group {g} row {row}", shard.file);
        let all_bad = |ids: Vec<Option<String>>, problem: SampleProblem| -> Vec<Row> {
            (0..n)
                .map(|row| {
                    Err(Skip {
                        sample_id: id_at(&ids, row),
                        at: name(row),
                        problem: problem.clone(),
                    })
                })
                .collect()
        };
        let footer = match self.footers.get(&s) {
            Some(Ok(f)) => f,
            Some(Err(reason)) => {
                return Ok(all_bad(
                    vec![],
                    SampleProblem::Shard {
                        reason: reason.clone(),
                    },
                ))
            }
            None => return Err(DataError::input("loader", "footer not loaded")),
        };
        let (bytes, mismatch) = match fetch_row_group(&self.loc, shard, g as usize) {
            Ok(b) => b,
            Err(e @ DataError::Store { .. }) => match self.damaged(shard) {
                Some(reason) => return Ok(all_bad(vec![], SampleProblem::Shard { reason })),
                None => return Err(e),
            },
            Err(e) => {
                return Ok(all_bad(
                    vec![],
                    SampleProblem::Shard {
                        reason: e.message(),
                    },
                ))
            }
        };
        let bytes = bytes::Bytes::from(bytes);
        let ids_only =
            || decode_sample_ids(&at, shard, footer, g as usize, bytes.clone()).unwrap_or_default();
        if let Some(reason) = mismatch {
            return Ok(all_bad(ids_only(), SampleProblem::Shard { reason }));
        }
        let batch = match decode_row_group(&at, shard, footer, g as usize, bytes.clone()) {
            Ok(b) => b,
            Err(e) => {
                return Ok(all_bad(
                    ids_only(),
                    SampleProblem::Shard {
                        reason: e.message(),
                    },
                ))
            }
        };
        if self.opts.cached {
            return Ok((0..n)
                .map(|row| {
                    crate::cache::decode_row(&batch, row)
                        .map(RowData::Cached)
                        .map_err(|(sample_id, problem)| Skip {
                            sample_id,
                            at: name(row),
                            problem,
                        })
                })
                .collect());
        }
        let ids = sample_ids(&batch);
        Ok((0..n)
            .map(|row| {
                decode_row(&batch, row)
                    .map(RowData::Raw)
                    .map_err(|problem| Skip {
                        sample_id: id_at(&ids, row),
                        at: name(row),
                        problem,
                    })
            })
            .collect())
    }
}
