/*
 * attn_parallel.c -- a small thread pool for the core's parallel loops.
 *
 * attn_parallel_for(n, max_threads, fn, ctx) calls fn(ctx, item, thread) for
 * item = 0 .. n-1 on up to max_threads threads (the caller is thread 0).
 * Items are handed out one at a time from an atomic counter, so uneven items
 * (causal rows) balance themselves. Every item writes its own outputs, so
 * results do not depend on the thread count.
 *
 * The join protocol. Waking a sleeping thread costs up to a few milliseconds
 * on a virtual machine, far more than a small attention call, so the caller
 * never waits for a worker that has not started:
 *   - the caller publishes the job (a new generation) and works on it;
 *   - a worker that sees the new generation *joins* it (a counter in
 *     pool_state) before it touches the job, and leaves it when done;
 *   - when the items run out the caller *closes* the job and waits only for
 *     the workers that joined. A worker that wakes after that finds the job
 *     closed and goes back to waiting, without touching it.
 * pool_state holds the generation (high 32 bits), a closed bit and the
 * number of workers inside; joining is a compare-and-swap on it, so a worker
 * can never join a job that is closed or that is not the one it saw.
 *
 * A worker spins for ATTN_SPIN_NS after a job, watching for the next one,
 * before it sleeps on a condition variable.
 *
 * A call that can be interrupted passes an attn_cancel: the caller (thread
 * 0) polls it between items, every thread reads its stop flag before taking
 * an item, so all leave within one item of the interrupt.
 *
 * One parallel loop runs at a time; a caller that finds the pool busy (a
 * second Python thread calling attnpy) runs its loop alone. Workers are
 * started on first use and kept; after fork() the child has none and starts
 * its own on first use (attn_at_fork). The system's threads, locks and
 * clock come from attn_thread.h (POSIX threads or Win32).
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime, sysconf in strict C11 */
#endif
#if defined(__APPLE__) && !defined(_DARWIN_C_SOURCE)
#define _DARWIN_C_SOURCE 1 /* with _POSIX_C_SOURCE, Darwin hides _SC_NPROCESSORS_ONLN */
#endif
#include "attn_internal.h"

#include "attn_thread.h"

#include <assert.h>
#include <stdatomic.h>
#include <stdlib.h>

#define ATTN_SPIN_NS 1000000 /* a worker watches for the next job for 1 ms */

#define STATE_CLOSED (UINT64_C(1) << 31)
#define STATE_INSIDE (STATE_CLOSED - 1)   /* low 31 bits: workers inside the job */
#define STATE_GEN(s) ((uint32_t)((s) >> 32))

typedef struct {
    void (*fn)(void *ctx, int64_t item, int thread);
    void *ctx;
    int64_t n;
    atomic_llong next;
    attn_cancel *cancel;
} attn_job;

static attn_mutex pool_lock = ATTN_MUTEX_INIT; /* sleeping and waking */
static attn_cond pool_wake = ATTN_COND_INIT;   /* a new job */
static attn_cond pool_done = ATTN_COND_INIT;   /* the last worker left */
static attn_mutex run_lock = ATTN_MUTEX_INIT;  /* one loop at a time */

static int pool_workers;                /* workers started (under pool_lock) */
static int pool_sleeping;               /* workers waiting on pool_wake (under pool_lock) */
static long worker_start[ATTN_MAX_THREADS]; /* the generation a new worker waits past */
static atomic_long pool_generation;     /* bumped to publish a job */
static atomic_int pool_active;          /* workers (by id) asked to help with it */
static attn_job *_Atomic pool_job;      /* valid while a worker is inside the job */
static _Atomic uint64_t pool_state;     /* generation | closed | workers inside */
static int num_threads;                 /* 0: not chosen yet (under pool_lock) */
static int atfork_registered;           /* (under run_lock) */

double attn_seconds(void) { return 1e-9 * (double)attn_now_ns(); }

void attn_cancel_init(attn_cancel *c, const attn_interrupt *interrupt)
{
    c->interrupt = interrupt;
    atomic_init(&c->stop, 0);
    c->checks = 0;
    c->next_poll_ns = 0; /* the clock starts at the first look at it */
}

int attn_cancel_check(attn_cancel *c, int thread)
{
    if (!c) return 0;
    if (atomic_load_explicit(&c->stop, memory_order_relaxed)) return 1;
    /* the clock every 4th check: a small call (one item) never reads it */
    if (thread != 0 || !c->interrupt || (++c->checks & 3) != 0) return 0;
    int64_t now = attn_now_ns();
    if (c->next_poll_ns == 0) c->next_poll_ns = now + (int64_t)ATTN_POLL_MS * 1000000;
    if (now < c->next_poll_ns) return 0;
    int stop = c->interrupt->poll(c->interrupt->ctx) != 0;
    c->next_poll_ns = attn_now_ns() + (int64_t)ATTN_POLL_MS * 1000000;
    if (stop) atomic_store(&c->stop, 1);
    return stop;
}

static void attn_run_items(attn_job *job, int thread)
{
    for (;;) {
        if (attn_cancel_check(job->cancel, thread)) return;
        int64_t item = atomic_fetch_add(&job->next, 1);
        if (item >= job->n) return;
        job->fn(job->ctx, item, thread);
    }
}

/* Wait until pool_generation differs from seen: spin first, then sleep. */
static long attn_wait_generation(long seen)
{
    int64_t start = attn_now_ns();
    for (int i = 0;; i++) {
        long g = atomic_load_explicit(&pool_generation, memory_order_acquire);
        if (g != seen) return g;
        if ((i & 255) == 255 && attn_now_ns() - start > ATTN_SPIN_NS) break;
    }
    attn_mutex_lock(&pool_lock);
    pool_sleeping++;
    long g;
    while ((g = atomic_load(&pool_generation)) == seen) attn_cond_wait(&pool_wake, &pool_lock);
    pool_sleeping--;
    attn_mutex_unlock(&pool_lock);
    return g;
}

/* Enter job generation g if it is still open; 1 on success. */
static int attn_join(long g)
{
    uint64_t s = atomic_load(&pool_state);
    while (STATE_GEN(s) == (uint32_t)g && !(s & STATE_CLOSED))
        if (atomic_compare_exchange_weak(&pool_state, &s, s + 1)) return 1;
    return 0;
}

static void attn_leave(void)
{
    uint64_t s = atomic_fetch_sub(&pool_state, 1) - 1;
    if ((s & STATE_CLOSED) && (s & STATE_INSIDE) == 0) { /* the caller may be asleep */
        attn_mutex_lock(&pool_lock);
        attn_cond_signal(&pool_done);
        attn_mutex_unlock(&pool_lock);
    }
}

static void *attn_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    attn_mutex_lock(&pool_lock);
    long seen = worker_start[id];
    attn_mutex_unlock(&pool_lock);
    for (;;) {
        seen = attn_wait_generation(seen);
        if (id >= atomic_load(&pool_active) || !attn_join(seen)) continue;
        attn_run_items(atomic_load(&pool_job), id + 1);
        attn_leave();
    }
    return NULL;
}

/* fork(): hold the pool still across it; the child starts with no workers. */
static void attn_prefork(void) { attn_mutex_lock(&run_lock); attn_mutex_lock(&pool_lock); }
static void attn_postfork_parent(void)
{
    attn_mutex_unlock(&pool_lock);
    attn_mutex_unlock(&run_lock);
}
static void attn_postfork_child(void)
{
    pool_workers = pool_sleeping = 0;
    atomic_store(&pool_active, 0);
    atomic_store(&pool_job, NULL);
    atomic_store(&pool_state, (uint64_t)(uint32_t)atomic_load(&pool_generation) << 32);
    /* the forking thread took both locks in attn_prefork and is the child's
       only thread: it releases them (re-initialising a held mutex is undefined) */
    attn_mutex_unlock(&pool_lock);
    attn_mutex_unlock(&run_lock);
    attn_cond_reset(&pool_wake);
    attn_cond_reset(&pool_done);
    attn_tune_forked();
}

/* The fork handlers, once (the caller holds run_lock). */
static void attn_register_fork_locked(void)
{
    if (atfork_registered) return;
    attn_at_fork(attn_prefork, attn_postfork_parent, attn_postfork_child);
    atfork_registered = 1;
}

void attn_register_fork(void)
{
    attn_mutex_lock(&run_lock);
    attn_register_fork_locked();
    attn_mutex_unlock(&run_lock);
}

/* The default: OMP_NUM_THREADS if set, else the CPUs online. */
static int attn_default_threads(void)
{
    const char *env = getenv("OMP_NUM_THREADS");
    if (env && *env) {
        long n = strtol(env, NULL, 10);
        if (n >= 1) return n > ATTN_MAX_THREADS ? ATTN_MAX_THREADS : (int)n;
    }
    long n = attn_cpu_count();
    return n < 1 ? 1 : n > ATTN_MAX_THREADS ? ATTN_MAX_THREADS : (int)n;
}

int attn_set_num_threads(int n)
{
    assert(n >= 0 && n <= ATTN_MAX_THREADS); /* the binding checks */
    attn_mutex_lock(&pool_lock);
    num_threads = n; /* 0: back to the default */
    attn_mutex_unlock(&pool_lock);
    return ATTN_OK;
}

int attn_get_num_threads(void)
{
    attn_mutex_lock(&pool_lock);
    int n = num_threads ? num_threads : attn_default_threads();
    attn_mutex_unlock(&pool_lock);
    return n;
}

void attn_parallel_for(int64_t n, int max_threads,
                       void (*fn)(void *ctx, int64_t item, int thread), void *ctx,
                       attn_cancel *cancel)
{
    attn_job job = {.fn = fn, .ctx = ctx, .n = n, .cancel = cancel};
    atomic_init(&job.next, 0);
    int want = max_threads < n ? max_threads : (int)n;
    if (want <= 1 || !attn_mutex_trylock(&run_lock)) {
        attn_run_items(&job, 0); /* one thread wanted, or the pool is busy */
        return;
    }
    attn_register_fork_locked();

    /* publish the job as a new, open generation; wake sleepers */
    attn_mutex_lock(&pool_lock);
    while (pool_workers < want - 1) {
        worker_start[pool_workers] = atomic_load(&pool_generation);
        if (attn_thread_start(attn_worker, (void *)(intptr_t)pool_workers) != 0) break;
        pool_workers++;
    }
    long g = atomic_load(&pool_generation) + 1;
    atomic_store(&pool_job, &job);
    atomic_store(&pool_active, want - 1);
    atomic_store(&pool_state, (uint64_t)(uint32_t)g << 32);
    atomic_store_explicit(&pool_generation, g, memory_order_release);
    if (pool_sleeping) attn_cond_broadcast(&pool_wake);
    attn_mutex_unlock(&pool_lock);

    attn_run_items(&job, 0); /* the caller works too */

    /* close the job; wait for the workers inside it, spinning first (they
       are working, so they finish soon), then sleeping */
    uint64_t s = atomic_fetch_or(&pool_state, STATE_CLOSED) | STATE_CLOSED;
    int64_t start = attn_now_ns();
    for (int i = 0; (s & STATE_INSIDE) != 0; i++) {
        if ((i & 255) == 255 && attn_now_ns() - start > ATTN_SPIN_NS) break;
        s = atomic_load(&pool_state);
    }
    if (s & STATE_INSIDE) {
        attn_mutex_lock(&pool_lock);
        while (atomic_load(&pool_state) & STATE_INSIDE) attn_cond_wait(&pool_done, &pool_lock);
        attn_mutex_unlock(&pool_lock);
    }
    attn_mutex_unlock(&run_lock);
}
