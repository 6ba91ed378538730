"""fastbptt's C thread team: run the parts of one job on worker threads, with a ~1 µs hand-off.

The Cython kernels split a batch, and ``pgemm`` a GEMM, into parts; part 0
runs on the calling thread and part i on worker i (POSIX threads started on
first use). A worker waits for its next part by spinning for ``spin_us``
microseconds (200 by default: the parts of one training step follow each
other closely), then sleeps on a condition variable, so an idle team costs
nothing. The caller spins until every part is done (parts are balanced).

A part is *claimed* before it runs, by its worker or, once the caller is
done with part 0, by the caller: a part whose worker has not started it by
then (asleep, or descheduled on a busy machine) runs on the calling thread
instead of being waited for. Without this, a worker that the OS had not
scheduled made the caller wait a time slice (ms) at every hand-off: a
training step at T=100, B=32, H=64 took 2x longer on 2 threads than on 1
on a loaded machine (docs/steady_timings.md). The caller claims only after
its own part, so parts that wait for each other (the kernels' per-step
barriers) have all been claimed by workers by then: none is ever run after
another it waits for.

Why not OpenMP: an OpenMP build links libgomp, and a process holds one
libgomp; torch ships its own (same soname), and whichever loads first serves
both, with the other's settings. With our module loaded first, torch's
``nn.RNN`` step ran 8-10x slower in the same process (68 vs 671 ms at
T=200, B=64, H=256). This team is private to fastbptt: no runtime is shared.

One job runs at a time (a lock); jobs from several Python threads queue.
After ``fork`` the child starts with no workers (they are not inherited).
"""

from libc.stdint cimport intptr_t

from threading import get_ident
from weakref import ref as weakref_ref

cdef extern from *:
    """
    #include <pthread.h>
    #include <sched.h>
    #include <time.h>
    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #define FB_PAUSE() _mm_pause()
    #else
    #define FB_PAUSE() ((void)0)
    #endif

    #define FB_MAX_WORKERS 255
    typedef void (*fb_part_fn)(void *arg, Py_ssize_t part, Py_ssize_t parts);
    /* one cache line each; claim: the last job whose part of this slot was claimed (by the worker or the caller) */
    typedef struct { long job; long seen; long claim; char pad[40]; } fb_slot;

    static fb_slot fb_slots[FB_MAX_WORKERS];
    static pthread_mutex_t fb_run_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
    static pthread_mutex_t fb_lock = PTHREAD_MUTEX_INITIALIZER;       /* sleepers and wake-ups */
    static pthread_cond_t fb_wake = PTHREAD_COND_INITIALIZER;
    static int fb_sleeping = 0, fb_workers = 0, fb_atfork = 0;
    static long fb_generation = 0, fb_pending = 0, fb_spin_ns = 200000, fb_steal = 1;
    static fb_part_fn fb_fn = NULL;
    static void *fb_arg = NULL;
    static Py_ssize_t fb_parts = 0;

    static long fb_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
    }

    /* Claim a slot's part of job ``job``: true for exactly one claimant. Jobs are numbered upwards, so a
       worker that read an old job number late never claims a newer job's part. */
    static int fb_claim(fb_slot *slot, long job) {
        long c = __atomic_load_n(&slot->claim, __ATOMIC_ACQUIRE);
        while (c < job) {
            if (__atomic_compare_exchange_n(&slot->claim, &c, job, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return 1;
        }
        return 0;
    }

    static void *fb_worker(void *p) {
        Py_ssize_t i = (Py_ssize_t)(intptr_t)p;
        fb_slot *slot = &fb_slots[i];
        for (;;) {
            long job = __atomic_load_n(&slot->job, __ATOMIC_ACQUIRE);
            if (job == slot->seen) {
                long t0 = fb_now_ns(), spin = __atomic_load_n(&fb_spin_ns, __ATOMIC_RELAXED);
                unsigned n = 0;
                while ((job = __atomic_load_n(&slot->job, __ATOMIC_ACQUIRE)) == slot->seen) {
                    FB_PAUSE();
                    if ((++n & 63u) == 0 && fb_now_ns() - t0 > spin) break;
                }
                if (job == slot->seen) {
                    pthread_mutex_lock(&fb_lock);
                    while ((job = __atomic_load_n(&slot->job, __ATOMIC_ACQUIRE)) == slot->seen) {
                        fb_sleeping++;
                        pthread_cond_wait(&fb_wake, &fb_lock);
                        fb_sleeping--;
                    }
                    pthread_mutex_unlock(&fb_lock);
                }
            }
            slot->seen = job;
            if (fb_claim(slot, job)) {                  /* else the caller ran it */
                fb_fn(fb_arg, i + 1, fb_parts);        /* worker i runs part i + 1 */
                __atomic_fetch_sub(&fb_pending, 1, __ATOMIC_ACQ_REL);
            }
        }
        return NULL;
    }

    static void fb_after_fork_child(void) {             /* the workers were not inherited */
        pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
        pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
        fb_run_lock = fresh;
        fb_lock = fresh;
        fb_wake = fresh_cond;
        fb_sleeping = 0;
        fb_workers = 0;
        fb_pending = 0;
    }

    /* Start workers until there are n (or as many as the system gives); returns how many there are. */
    static int fb_start_workers(int n) {
        if (!fb_atfork) {
            pthread_atfork(NULL, NULL, fb_after_fork_child);
            fb_atfork = 1;
        }
        if (n > FB_MAX_WORKERS) n = FB_MAX_WORKERS;
        while (fb_workers < n) {
            pthread_t th;
            pthread_attr_t attr;
            fb_slot *slot = &fb_slots[fb_workers];
            slot->seen = slot->job;
            slot->claim = slot->job;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            int rc = pthread_create(&th, &attr, fb_worker, (void *)(intptr_t)fb_workers);
            pthread_attr_destroy(&attr);
            if (rc != 0) break;
            fb_workers++;
        }
        return fb_workers;
    }

    /* Run fn(arg, p, parts) for p = 0 .. parts-1: part 0 here, the others on workers. */
    static void fb_run_parts(fb_part_fn fn, void *arg, Py_ssize_t parts) {
        Py_ssize_t p, on_workers;
        if (parts <= 1) {
            if (parts == 1) fn(arg, 0, 1);
            return;
        }
        pthread_mutex_lock(&fb_run_lock);
        on_workers = fb_start_workers((int)(parts - 1));
        if (on_workers > parts - 1) on_workers = parts - 1;
        if (on_workers == 0) {                          /* no threads to be had: all parts here */
            pthread_mutex_unlock(&fb_run_lock);
            for (p = 0; p < parts; p++) fn(arg, p, parts);
            return;
        }
        fb_fn = fn;                 /* fewer workers than asked (thread limits): fewer, bigger parts */
        fb_arg = arg;
        fb_parts = on_workers + 1;
        __atomic_store_n(&fb_pending, (long)on_workers, __ATOMIC_RELEASE);
        fb_generation++;
        for (p = 0; p < on_workers; p++)
            __atomic_store_n(&fb_slots[p].job, fb_generation, __ATOMIC_RELEASE);
        pthread_mutex_lock(&fb_lock);
        if (fb_sleeping) pthread_cond_broadcast(&fb_wake);
        pthread_mutex_unlock(&fb_lock);
        fn(arg, 0, on_workers + 1);
        if (__atomic_load_n(&fb_steal, __ATOMIC_RELAXED))
            for (p = 0; p < on_workers; p++)            /* parts no worker has started: run them here */
                if (fb_claim(&fb_slots[p], fb_generation)) {
                    fn(arg, p + 1, on_workers + 1);
                    __atomic_fetch_sub(&fb_pending, 1, __ATOMIC_ACQ_REL);
                }
        unsigned n = 0;
        while (__atomic_load_n(&fb_pending, __ATOMIC_ACQUIRE) > 0) {
            FB_PAUSE();
            if ((++n & 1023u) == 0) sched_yield();      /* a worker may have been descheduled */
        }
        pthread_mutex_unlock(&fb_run_lock);
    }
    """
    ctypedef void (*fb_part_fn)(void *arg, Py_ssize_t part, Py_ssize_t parts) noexcept nogil
    void fb_run_parts(fb_part_fn fn, void *arg, Py_ssize_t parts) noexcept nogil
    int fb_start_workers(int n) noexcept nogil
    int fb_workers
    long fb_spin_ns
    long fb_steal


cdef void run_parts(part_fn fn, void *arg, Py_ssize_t parts) noexcept nogil:
    """Run ``fn(arg, p, parts)`` for every part ``p``: part 0 on this thread, the others on workers."""
    fb_run_parts(<fb_part_fn> fn, arg, parts)


def workers():
    """How many worker threads the team has started so far."""
    return fb_workers


def set_spin_us(double us):
    """How long an idle worker spins before it sleeps (microseconds, >= 0); returns the old value."""
    global fb_spin_ns
    if not us >= 0:
        raise ValueError(f"us: expected a number >= 0, got {us!r}")
    old = fb_spin_ns / 1000.0
    fb_spin_ns = <long> (us * 1000.0)
    return old


def set_steal(bint on):
    """Whether the caller runs the parts that no worker has started once its own part is done
    (on by default; off: it waits for the workers, for tests and measurements); returns the old value."""
    global fb_steal
    old = bool(fb_steal)
    fb_steal = 1 if on else 0
    return old


# ------------------------------------------------------------------ a job for the tests

cdef struct _Probe:
    long *thread_of_part
    long *parts_seen


cdef extern from *:
    """
    static long fb_thread_id(void) { return (long)pthread_self(); }
    """
    long fb_thread_id() noexcept nogil


cdef void _probe_part(void *arg, Py_ssize_t part, Py_ssize_t parts) noexcept nogil:
    cdef _Probe *probe = <_Probe *> arg
    probe.thread_of_part[part] = fb_thread_id()
    probe.parts_seen[part] = parts


def _run_probe(Py_ssize_t parts):
    """Run a job of ``parts`` parts (tests).

    Returns ``(thread ids, parts seen, caller's thread id)``: per part, an id
    of the thread that ran it (0: not run) and the part count it was given.
    """
    import numpy as np
    if parts < 1:
        raise ValueError(f"parts: expected an int >= 1, got {parts}")
    cdef long[::1] threads = np.zeros(parts, dtype=np.int_)
    cdef long[::1] seen = np.full(parts, -1, dtype=np.int_)
    cdef _Probe probe
    probe.thread_of_part = &threads[0]
    probe.parts_seen = &seen[0]
    with nogil:
        run_parts(_probe_part, &probe, parts)
    return list(threads), list(seen), fb_thread_id()


# ------------------------------------------------------------- a call scope, compiled

cdef object _call_until_done(object fn, int attempts):
    """``fn()``, called again when an exception -- an interrupt -- cuts it short (``fn`` can be
    repeated); raises the first exception once a call completed, or the last after ``attempts``."""
    first = None
    for _ in range(attempts):
        try:
            fn()
        except BaseException as exc:
            if first is None:
                first = exc
            continue
        if first is not None:
            raise first
        return
    raise first


cdef object _threads_module = None      # fastbptt._threads (bound by bind_scope_state)


def bind_scope_state(module):
    """Give :class:`Scope` the module whose state it keeps: ``fastbptt._threads`` (its ``_scope``,
    ``_lock``, ``_holders``, ``_saved`` and ``_blas_libs``, looked up at each use: ``_lock`` is
    replaced after a fork)."""
    global _threads_module
    _threads_module = module


ctypedef int (*_get_threads_fn)() noexcept nogil
ctypedef void (*_set_threads_fn)(int) noexcept nogil

cdef object _libs_seen = None           # the _blas_libs() list the pointers below are of
cdef _get_threads_fn _c_get[8]           # per library: its C functions, when they are ctypes
cdef _set_threads_fn _c_set[8]           # functions (OpenBLAS), else NULL (a Python call)


cdef object _blas_libs():
    """``_threads._blas_libs()``, with the C functions of its ctypes entries (OpenBLAS's
    ``openblas_get/set_num_threads``) taken out: called directly, without ctypes' ~0.1-0.15 µs."""
    global _libs_seen
    libs = _threads_module._blas_libs()
    if libs is not _libs_seen:
        import ctypes
        for i in range(min(len(libs), 8)):
            get, set_ = libs[i]
            fns = isinstance(get, ctypes._CFuncPtr) and isinstance(set_, ctypes._CFuncPtr)
            _c_get[i] = <_get_threads_fn> <intptr_t> ctypes.cast(get, ctypes.c_void_p).value if fns else NULL
            _c_set[i] = <_set_threads_fn> <intptr_t> ctypes.cast(set_, ctypes.c_void_p).value if fns else NULL
        _libs_seen = libs
    return libs


cdef object _get_threads(object libs, Py_ssize_t i):
    return _c_get[i]() if i < 8 and _c_get[i] != NULL else libs[i][0]()


cdef _set_threads(object libs, Py_ssize_t i, int n):
    if i < 8 and _c_set[i] != NULL:
        _c_set[i](n)
    else:
        libs[i][1](n)


cdef _pin(object ident, object token, bint inside):
    """``_threads._locked(_threads._set_holder, ident, token, inside, libs)``, compiled: the same
    steps (each repeatable) under the same lock, which no exception leaves held."""
    libs = _blas_libs()
    lock = _threads_module._lock
    try:
        lock.acquire()
        holders = _threads_module._holders
        saved = _threads_module._saved
        if inside:
            holders[ident] = token
        elif holders.get(ident) is token:
            del holders[ident]
        if holders:
            for i in range(len(libs)):
                if i not in saved:
                    old = _get_threads(libs, i)
                    saved[i] = old if old != 1 else None
                    if old != 1:
                        _set_threads(libs, i, 1)
        else:
            for i in list(saved):
                old = saved[i]
                if old is not None:
                    _set_threads(libs, i, old)
                del saved[i]
        lock.release()
    except BaseException:
        if lock._is_owned():
            lock._release_save()
        raise


cdef class Scope:
    """One top-level call of ``fastbptt._threads.call_scope``, a context manager with no Python
    bytecode of its own: a ``KeyboardInterrupt`` (or a trace hook) cannot fall between the ``with``
    statement and its steps, nor leave it half-way. The steps of ``_threads._Scope`` on the same
    state: entering registers this thread, pins the BLAS pools and sets the team size; leaving
    undoes each step (repeatable: done again when an exception cuts it short or entering fails, and
    when this object is freed with the ``with`` statement's exit skipped). ~1 µs to enter and
    leave, where the Python steps took ~7 µs after a kernel had taken the caches."""

    cdef int _team
    cdef object _token          # set while this scope holds the pin
    cdef object _ident
    cdef bint _entered
    cdef object __weakref__

    def __cinit__(self, int threads):
        self._team = threads
        self._token = None
        self._entered = False

    def _enter(self):
        self._ident = get_ident()
        self._token = token = object()
        local = _threads_module._scope
        local.owner = weakref_ref(self)
        local.threads = self._team
        _pin(self._ident, token, True)

    def _leave(self):
        token = self._token
        if token is None:
            return
        local = _threads_module._scope
        if get_ident() == self._ident:
            owner = local.__dict__.get("owner")
            if owner is not None and owner() is self:
                local.threads = 0
                local.owner = None
        _pin(self._ident, token, False)
        self._token = None          # last: until here, a repeat does whatever is left

    def __enter__(self):
        self._entered = True            # from here on, _leave() undoes whatever _enter() did
        try:
            self._enter()
        except BaseException:
            self._entered = False
            _call_until_done(self._leave, 4)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._entered:
            self._entered = False
            _call_until_done(self._leave, 4)
        return False

    def __del__(self):
        if self._entered:
            self._entered = False
            try:
                _call_until_done(self._leave, 4)
            except BaseException:
                pass
