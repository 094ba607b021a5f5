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
 */
#include "attn_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define ATTN_MAX_THREADS 256

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
static int pool_workers;     /* workers started */
static int pool_active;      /* workers taking part in the current job */
static int pool_busy;        /* workers still working on it */
static long pool_generation; /* bumped for each job */
static attn_job *pool_job;
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

static void *attn_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    long seen = 0;
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_generation;
        if (id >= pool_active) continue; /* not needed for this job */
        attn_job *job = pool_job;
        pthread_mutex_unlock(&pool_lock);
        attn_run_items(job, id + 1);
        pthread_mutex_lock(&pool_lock);
        if (--pool_busy == 0) pthread_cond_signal(&pool_done);
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
    pool_workers = pool_active = pool_busy = 0;
    pool_job = NULL;
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

    pthread_mutex_lock(&pool_lock);
    while (pool_workers < want - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, attn_worker, (void *)(intptr_t)pool_workers) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    pool_active = want - 1 < pool_workers ? want - 1 : pool_workers;
    pool_busy = pool_active;
    pool_job = &job;
    pool_generation++;
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);

    attn_run_items(&job, 0); /* the caller works too */

    pthread_mutex_lock(&pool_lock);
    while (pool_busy > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pool_job = NULL;
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&run_lock);
}
