//! A persistent team of worker threads for one model: made when the model is created, woken
//! for each parallel loop of a run (matrix-product panels, softmax rows, erf runs), never
//! created or allocated during a run. Workers spin briefly after each job, because a run's
//! parallel loops follow each other within microseconds, then park until woken.
//!
//! The kernels reach the team through [`parallel_for`], which uses the team installed on the
//! calling thread by [`Pool::install`] for the duration of a run, and runs the loop inline when
//! there is none.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How many times an idle worker checks for work before parking.
const SPINS: usize = 20_000;

/// One parallel loop: `tasks` calls of `body`, handed out one index at a time.
struct Job<'a> {
    body: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl Job<'_> {
    /// Runs tasks until none is left.
    fn work(&self) {
        loop {
            let task = self.next.fetch_add(1, SeqCst);
            if task >= self.tasks {
                return;
            }
            (self.body)(task);
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// What the caller and the workers share.
struct Shared {
    /// The job being run, or null. Points to a `Job` on the caller's stack.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for each job, so that a worker notices new work.
    epoch: AtomicUsize,
    /// Workers between noticing a job and finishing with it; the caller waits for zero before
    /// its job leaves the stack.
    active: AtomicUsize,
    stop: AtomicBool,
}

/// A team of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

std::thread_local! {
    /// The team of the run on this thread, if any.
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
}

impl Pool {
    /// A team for `threads` threads in all (the caller counts as one); 0 or 1 makes no workers.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{index}"))
                    .spawn(move || worker(&shared, 0))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { shared, workers })
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Makes this team the one [`parallel_for`] uses on this thread until the guard drops.
    pub fn install(&self) -> Installed {
        let previous = CURRENT.with(|c| c.replace(self));
        Installed { previous }
    }

    fn run(&self, tasks: usize, body: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            body,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        // The job outlives every worker's use of it: the caller waits below until all tasks are
        // done and no worker holds the pointer.
        let pointer = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
        // Loops nested in this job's tasks run inline, on whichever thread runs the task.
        let installed = CURRENT.with(|c| c.replace(std::ptr::null()));
        self.shared.job.store(pointer, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for worker in &self.workers {
            worker.thread().unpark();
        }
        job.work();
        while job.done.load(SeqCst) < tasks {
            std::hint::spin_loop();
        }
        self.shared.job.store(std::ptr::null_mut(), SeqCst);
        while self.shared.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        CURRENT.with(|c| c.set(installed));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for worker in self.workers.drain(..) {
            worker.thread().unpark();
            let _ = worker.join();
        }
    }
}

/// Restores the previously installed team when dropped.
pub struct Installed {
    previous: *const Pool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// A worker's loop. `seen` is the epoch at the team's creation (not at the thread's start, which
/// may come after the first jobs, or after the team is dropped).
fn worker(shared: &Shared, mut seen: usize) {
    loop {
        let mut spins = 0;
        while shared.epoch.load(SeqCst) == seen && !shared.stop.load(SeqCst) {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::park();
            }
        }
        seen = shared.epoch.load(SeqCst);
        if shared.stop.load(SeqCst) {
            return;
        }
        shared.active.fetch_add(1, SeqCst);
        let job = shared.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: a non-null job stays alive until `active` drops back to zero (`Pool::run`).
            unsafe { (*job).work() };
        }
        shared.active.fetch_sub(1, SeqCst);
    }
}

/// Runs `body(0..tasks)` on the team installed on this thread, or inline without one. Returns
/// when every call has returned.
pub fn parallel_for(tasks: usize, body: &(dyn Fn(usize) + Sync)) {
    let pool = CURRENT.with(Cell::get);
    if pool.is_null() || tasks < 2 {
        (0..tasks).for_each(body);
        return;
    }
    // SAFETY: the installed team outlives its `Installed` guard, which covers this call.
    let pool = unsafe { &*pool };
    if pool.workers.is_empty() {
        (0..tasks).for_each(body);
    } else {
        pool.run(tasks, body);
    }
}

/// Threads of the team installed on this thread (1 without one).
pub fn current_threads() -> usize {
    let pool = CURRENT.with(Cell::get);
    if pool.is_null() {
        1
    } else {
        // SAFETY: as in `parallel_for`.
        unsafe { (*pool).threads() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_team() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).unwrap();
            let _installed = pool.install();
            for tasks in [0, 1, 2, 7, 100] {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                parallel_for(tasks, &|i| {
                    counts[i].fetch_add(1, SeqCst);
                });
                assert!(
                    counts.iter().all(|c| c.load(SeqCst) == 1),
                    "{threads} threads, {tasks} tasks"
                );
            }
        }
        assert_eq!(current_threads(), 1);
    }
}
