/*
 * attn_parallel.c -- a small thread pool for the core's parallel loops.
 *
 * attn_parallel_for(n, fn, ctx) calls fn(ctx, item) for item = 0 .. n-1 on
 * up to attn_get_num_threads() threads (the caller is one of them). Items
 * are handed out one at a time from an atomic counter, so uneven items
 * (causal rows) balance themselves. Every item writes its own outputs, so
 * results do not depend on the thread count.
 *
 * - One parallel loop runs at a time; a caller that finds the pool busy (a
 *   second Python thread calling attnpy) runs its loop alone, unblocked.
 * - Workers are started on first use and kept; after fork() the child has
 *   none, and starts its own on first use (pthread_atfork).
 * - A worker that finishes a loop spins for a short while (ATTN_SPIN_NS)
 *   watching for the next one before it sleeps: waking a sleeping thread
 *   costs tens of microseconds, as much as a small attention call.
 */
#include "attn_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define ATTN_MAX_THREADS 256
#define ATTN_SPIN_NS 200000 /* 0.2 ms */

typedef struct {
    void (*fn)(void *ctx, int64_t item, int thread);
    void *ctx;
    int64_t n;
    atomic_llong next;
} attn_job;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* guards the fields below */
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;  /* one loop at a time */
static int pool_workers;            /* workers started */
static int pool_sleeping;           /* workers waiting on pool_wake */
static atomic_int pool_active;      /* workers taking part in the current job */
static atomic_int pool_busy;        /* workers still working on it */
static atomic_long pool_generation; /* bumped for each job (release: job published) */
static attn_job *_Atomic pool_job;
static long worker_start[ATTN_MAX_THREADS]; /* the generation a new worker waits past */
static int num_threads;      /* 0: not chosen yet */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void attn_run_items(attn_job *job, int thread)
{
    for (;;) {
        int64_t item = atomic_fetch_add(&job->next, 1);
        if (item >= job->n) return;
        job->fn(job->ctx, item, thread);
    }
}

static int64_t attn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
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
    pthread_mutex_lock(&pool_lock);
    pool_sleeping++;
    long g;
    while ((g = atomic_load(&pool_generation)) == seen) pthread_cond_wait(&pool_wake, &pool_lock);
    pool_sleeping--;
    pthread_mutex_unlock(&pool_lock);
    return g;
}

static void *attn_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool_lock);
    long seen = worker_start[id]; /* the generation before the job it was started for */
    pthread_mutex_unlock(&pool_lock);
    for (;;) {
        seen = attn_wait_generation(seen);
        if (id >= atomic_load(&pool_active)) continue; /* not needed for this job */
        attn_run_items(atomic_load(&pool_job), id + 1);
        if (atomic_fetch_sub(&pool_busy, 1) == 1) {
            pthread_mutex_lock(&pool_lock);
            pthread_cond_signal(&pool_done);
            pthread_mutex_unlock(&pool_lock);
        }
    }
    return NULL;
}

/* fork(): hold the pool still across it; the child starts with no workers. */
static void attn_prefork(void) { pthread_mutex_lock(&run_lock); pthread_mutex_lock(&pool_lock); }
static void attn_postfork_parent(void)
{
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&run_lock);
}
static void attn_postfork_child(void)
{
    pool_workers = pool_sleeping = 0;
    atomic_store(&pool_active, 0);
    atomic_store(&pool_busy, 0);
    atomic_store(&pool_job, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&run_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_done, NULL);
}
static void attn_register_atfork(void)
{
    pthread_atfork(attn_prefork, attn_postfork_parent, attn_postfork_child);
}

/* The default: OMP_NUM_THREADS if set, else the CPUs online. */
static int attn_default_threads(void)
{
    const char *env = getenv("OMP_NUM_THREADS");
    if (env && *env) {
        long n = strtol(env, NULL, 10);
        if (n >= 1) return n > ATTN_MAX_THREADS ? ATTN_MAX_THREADS : (int)n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > ATTN_MAX_THREADS ? ATTN_MAX_THREADS : (int)n;
}

int attn_set_num_threads(int n)
{
    if (n < 0 || n > ATTN_MAX_THREADS) return ATTN_EINVAL;
    pthread_mutex_lock(&pool_lock);
    num_threads = n; /* 0: back to the default */
    pthread_mutex_unlock(&pool_lock);
    return ATTN_OK;
}

int attn_get_num_threads(void)
{
    pthread_mutex_lock(&pool_lock);
    int n = num_threads ? num_threads : attn_default_threads();
    pthread_mutex_unlock(&pool_lock);
    return n;
}

void attn_parallel_for(int64_t n, int max_threads,
                       void (*fn)(void *ctx, int64_t item, int thread), void *ctx)
{
    attn_job job = {.fn = fn, .ctx = ctx, .n = n};
    atomic_init(&job.next, 0);
    int want = max_threads < n ? max_threads : (int)n;
    if (want <= 1 || pthread_mutex_trylock(&run_lock) != 0) {
        attn_run_items(&job, 0); /* one thread wanted, or the pool is busy */
        return;
    }
    pthread_once(&atfork_once, attn_register_atfork);

    /* publish the job, then wake the workers (only sleepers need the signal) */
    pthread_mutex_lock(&pool_lock);
    int active = want - 1;
    atomic_store(&pool_active, active);
    atomic_store(&pool_busy, active);
    atomic_store(&pool_job, &job);
    while (pool_workers < active) {
        pthread_t t;
        worker_start[pool_workers] = atomic_load(&pool_generation);
        if (pthread_create(&t, NULL, attn_worker, (void *)(intptr_t)pool_workers) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    if (pool_workers < active) { /* could not start them all: the rest is ours */
        atomic_store(&pool_active, pool_workers);
        atomic_store(&pool_busy, pool_workers);
    }
    atomic_fetch_add_explicit(&pool_generation, 1, memory_order_release);
    if (pool_sleeping) pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);

    attn_run_items(&job, 0); /* the caller works too */

    /* wait for the workers: spin briefly, then sleep */
    int64_t start = attn_now_ns();
    for (int i = 0; atomic_load(&pool_busy) > 0; i++)
        if ((i & 255) == 255 && attn_now_ns() - start > ATTN_SPIN_NS) break;
    pthread_mutex_lock(&pool_lock);
    while (atomic_load(&pool_busy) > 0) pthread_cond_wait(&pool_done, &pool_lock);
    atomic_store(&pool_job, NULL);
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&run_lock);
}
