//! A team of spinning worker threads for the CPU backend's split steps.
//!
//! A decode step is dozens of small parallel jobs a few microseconds apart
//! (each matrix–vector product split over the cores). A thread pool whose
//! idle workers sleep pays a wake-up of tens of microseconds per job; the
//! team's workers spin for a while after each job (then sleep), so a job
//! posted while they are hot starts on every core at once. The calling
//! thread runs parts too and returns when every part has run.
//!
//! Protocol: a job is posted under a mutex with a new epoch; parts are
//! claimed from one atomic word holding `(epoch, next part)`, so a worker
//! that is late for a job can never claim a part of the next one with the
//! old job's closure; the caller waits until every part of its job is done
//! before the closure goes out of scope.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A job's closure, its lifetime erased: valid while its epoch's parts are
/// not all done (the poster waits for that).
type JobRef = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// The current job and its epoch.
    job: Mutex<(u64, Option<JobRef>, usize)>,
    posted: Condvar,
    /// `epoch << 32 | next part index`.
    claim: AtomicU64,
    /// Parts of the current job not yet finished.
    left: AtomicUsize,
    /// The epoch of the latest job (read without the lock while spinning).
    epoch: AtomicU64,
    /// Workers asleep on `posted` (or about to be): a job is announced
    /// with a wake-up only when there are some.
    sleepers: AtomicUsize,
    stop: AtomicBool,
    /// The panic of a part of the current job, handed to its poster.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// The team: `workers` threads besides the caller.
pub(crate) struct Team {
    shared: Arc<Shared>,
    /// Serializes posters (one job at a time).
    post: Mutex<()>,
}

/// How long a worker spins for the next job before sleeping.
const SPIN: Duration = Duration::from_millis(2);

impl Team {
    /// A team of `workers` spinning threads (`None` if they cannot start).
    pub(crate) fn new(workers: usize) -> Option<Team> {
        let shared = Arc::new(Shared {
            job: Mutex::new((0, None, 0)),
            posted: Condvar::new(),
            claim: AtomicU64::new(0),
            left: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        for i in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("kiln-team-{i}"))
                .spawn(move || worker(&s))
                .ok()?;
        }
        Some(Team {
            shared,
            post: Mutex::new(()),
        })
    }

    /// Runs `f(0) … f(parts - 1)` on the team and the calling thread. A
    /// part that panics does not stop the others; once all are done, the
    /// (first) panic resumes on the calling thread, and the team runs the
    /// next job as usual.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        let _one = self.post.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        // SAFETY: the reference is used only for parts of this job, and
        // this function returns only after every one of them has finished.
        let job: JobRef = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), JobRef>(f) };
        // The job is written under the lock, which is released before the
        // epoch announces it: a spinning worker that sees the epoch takes
        // the lock uncontended. Sleeping workers are woken (a system call)
        // only when there are some.
        let epoch = {
            let mut j = s.job.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = j.0 + 1;
            s.left.store(parts, Ordering::SeqCst);
            s.claim.store(epoch << 32, Ordering::SeqCst);
            *j = (epoch, Some(job), parts);
            epoch
        };
        s.epoch.store(epoch, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _j = s.job.lock().unwrap_or_else(|p| p.into_inner());
            s.posted.notify_all();
        }
        run_parts(s, epoch, job, parts);
        while s.left.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        let mut j = s.job.lock().unwrap_or_else(|p| p.into_inner());
        j.1 = None;
        drop(j);
        let panic = s.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _j = self.shared.job.lock();
        self.shared.posted.notify_all();
    }
}

/// Claims and runs parts of job `epoch` until none is left.
fn run_parts(s: &Shared, epoch: u64, job: JobRef, parts: usize) {
    loop {
        let c = s.claim.load(Ordering::Acquire);
        if c >> 32 != epoch || (c & 0xffff_ffff) as usize >= parts {
            return;
        }
        if s.claim
            .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // A panic is kept for the poster, and the part still counts as
            // done: the poster must not return (freeing the closure) while
            // parts run, nor wait for a part that will never finish.
            let part = (c & 0xffff_ffff) as usize;
            if let Err(payload) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(part)))
            {
                s.panic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(payload);
            }
            s.left.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Spin for a new epoch, then sleep until one is posted.
        let started = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Relaxed) {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && started.elapsed() > SPIN {
                // Counted under the lock: a poster that writes its job under
                // the same lock afterwards sees the count and wakes us; one
                // that wrote it before fails the predicate.
                let j = s.job.lock().unwrap_or_else(|p| p.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let _j = s
                    .posted
                    .wait_while(j, |j| j.0 == seen && !s.stop.load(Ordering::Relaxed))
                    .unwrap_or_else(|p| p.into_inner());
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let (epoch, job, parts) = *s.job.lock().unwrap_or_else(|p| p.into_inner());
        seen = epoch;
        if let Some(job) = job {
            run_parts(s, epoch, job, parts);
        }
    }
}

/// The team for `threads` threads (the caller and `threads - 1` workers),
/// made on first use; `None` when the system refuses threads.
pub(crate) fn team(threads: usize) -> Option<Arc<Team>> {
    static TEAMS: Mutex<Vec<(usize, Arc<Team>)>> = Mutex::new(Vec::new());
    let mut teams = TEAMS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, t)) = teams.iter().find(|(n, _)| *n == threads) {
        return Some(t.clone());
    }
    let t = Arc::new(Team::new(threads.saturating_sub(1))?);
    teams.push((threads, t.clone()));
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        let t = Team::new(3).expect("threads");
        for parts in [1usize, 2, 5, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                t.run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_panicking_part_resumes_on_the_caller_after_every_part_ran() {
        let t = Team::new(3).expect("threads");
        for bad in [0usize, 5, 63] {
            let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                t.run(64, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    if i == bad {
                        panic!("part {i} fails");
                    }
                })
            }));
            let payload = caught.expect_err("the panic reaches the caller");
            assert_eq!(
                payload.downcast_ref::<String>().map(String::as_str),
                Some(format!("part {bad} fails").as_str())
            );
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            // The team, workers included, runs the next job.
            let n = AtomicUsize::new(0);
            t.run(64, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(n.load(Ordering::Relaxed), 64);
        }
    }
}
