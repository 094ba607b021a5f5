/*
 * attn_thread.h -- the little the thread pool (attn_parallel.c) needs from
 * the system, on POSIX threads or on Win32: a mutex, a condition variable,
 * starting a detached thread, a monotonic clock, the number of CPUs, and
 * fork handlers (POSIX only; Windows has no fork).
 *
 * Both sides initialise their mutexes and condition variables statically
 * (ATTN_MUTEX_INIT, ATTN_COND_INIT), so nothing needs a first-use init.
 */
#ifndef ATTN_THREAD_H
#define ATTN_THREAD_H

#include <stdint.h>

#if defined(_WIN32)
#define WIN32_LEAN_AND_MEAN
#include <windows.h>

typedef SRWLOCK attn_mutex;
typedef CONDITION_VARIABLE attn_cond;
#define ATTN_MUTEX_INIT SRWLOCK_INIT
#define ATTN_COND_INIT CONDITION_VARIABLE_INIT

static inline void attn_mutex_lock(attn_mutex *m) { AcquireSRWLockExclusive(m); }
static inline void attn_mutex_unlock(attn_mutex *m) { ReleaseSRWLockExclusive(m); }
/* 1 when taken, 0 when another thread holds it */
static inline int attn_mutex_trylock(attn_mutex *m) { return TryAcquireSRWLockExclusive(m) != 0; }
static inline void attn_cond_wait(attn_cond *c, attn_mutex *m)
{
    SleepConditionVariableSRW(c, m, INFINITE, 0);
}
static inline void attn_cond_signal(attn_cond *c) { WakeConditionVariable(c); }
static inline void attn_cond_broadcast(attn_cond *c) { WakeAllConditionVariable(c); }

typedef struct {
    void *(*fn)(void *);
    void *arg;
} attn_thread_start_;

static DWORD WINAPI attn_thread_main_(LPVOID p)
{
    attn_thread_start_ s = *(attn_thread_start_ *)p;
    HeapFree(GetProcessHeap(), 0, p);
    s.fn(s.arg);
    return 0;
}

/* Start fn(arg) on a new thread nobody joins; 0 on success. */
static inline int attn_thread_start(void *(*fn)(void *), void *arg)
{
    attn_thread_start_ *s = HeapAlloc(GetProcessHeap(), 0, sizeof *s);
    if (!s) return -1;
    s->fn = fn;
    s->arg = arg;
    HANDLE t = CreateThread(NULL, 0, attn_thread_main_, s, 0, NULL);
    if (!t) {
        HeapFree(GetProcessHeap(), 0, s);
        return -1;
    }
    CloseHandle(t);
    return 0;
}

static inline int64_t attn_now_ns(void)
{
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (int64_t)((double)c.QuadPart * (1e9 / (double)f.QuadPart));
}

static inline long attn_cpu_count(void) { return (long)GetActiveProcessorCount(ALL_PROCESSOR_GROUPS); }

/* no fork on Windows: nothing to hold still across one */
static inline void attn_at_fork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    (void)prepare, (void)parent, (void)child;
}
static inline void attn_cond_reset(attn_cond *c) { InitializeConditionVariable(c); }

#else /* POSIX threads */
#include <pthread.h>
#include <time.h>
#include <unistd.h>

typedef pthread_mutex_t attn_mutex;
typedef pthread_cond_t attn_cond;
#define ATTN_MUTEX_INIT PTHREAD_MUTEX_INITIALIZER
#define ATTN_COND_INIT PTHREAD_COND_INITIALIZER

static inline void attn_mutex_lock(attn_mutex *m) { pthread_mutex_lock(m); }
static inline void attn_mutex_unlock(attn_mutex *m) { pthread_mutex_unlock(m); }
static inline int attn_mutex_trylock(attn_mutex *m) { return pthread_mutex_trylock(m) == 0; }
static inline void attn_cond_wait(attn_cond *c, attn_mutex *m) { pthread_cond_wait(c, m); }
static inline void attn_cond_signal(attn_cond *c) { pthread_cond_signal(c); }
static inline void attn_cond_broadcast(attn_cond *c) { pthread_cond_broadcast(c); }

static inline int attn_thread_start(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    if (pthread_create(&t, NULL, fn, arg) != 0) return -1;
    pthread_detach(t);
    return 0;
}

static inline int64_t attn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline long attn_cpu_count(void) { return sysconf(_SC_NPROCESSORS_ONLN); }

static inline void attn_at_fork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    pthread_atfork(prepare, parent, child);
}
/* after fork, in the child: a condition variable as new (its waiters, the
   parent's workers, do not exist there) */
static inline void attn_cond_reset(attn_cond *c) { pthread_cond_init(c, NULL); }
#endif

#endif /* ATTN_THREAD_H */
