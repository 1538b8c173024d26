# cython: language_level=3, boundscheck=False, wraparound=False
"""C hot path for vCPU placement: the same contract as
shim.resources.qos.placement.place_threads_py (see there), done with open/write/close and
sched_setaffinity from libc with the GIL released around the syscall loops."""
from libc.stdlib cimport malloc, free
from libc.stdio cimport snprintf
from libc.errno cimport errno
from posix.unistd cimport write as c_write, close as c_close

import os

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags)
    enum:
        O_WRONLY
        O_CLOEXEC

cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    int CPU_SETSIZE
    void CPU_ZERO(cpu_set_t *s)
    void CPU_SET(int cpu, cpu_set_t *s)
    int sched_setaffinity(int pid, size_t size, const cpu_set_t *mask)

AFFINITY = "sched_setaffinity"


cdef int _write_tids(const char *path, int *tids, int *errs, Py_ssize_t n) noexcept nogil:
    """Write each tid to path (one write each); per-tid errno into errs. Returns open errno."""
    cdef char buf[24]
    cdef int fd = c_open(path, O_WRONLY | O_CLOEXEC)
    cdef Py_ssize_t i
    cdef int length
    if fd < 0:
        return errno
    for i in range(n):
        length = snprintf(buf, sizeof(buf), "%d", tids[i])
        if c_write(fd, buf, length) < 0:
            errs[i] = errno
        else:
            errs[i] = 0
    c_close(fd)
    return 0


def place_threads(ops):
    """ops: iterable of (tid, attach_files, cpus or None) → list of (tid, where, errno)."""
    cdef dict by_file = {}
    cdef list affinity = []
    cdef list failures = []
    cdef Py_ssize_t i, n
    cdef int *tids
    cdef int *errs
    cdef int open_err, rc, e, cpu
    cdef bytes bpath
    cdef const char *cpath
    cdef cpu_set_t mask
    for tid, files, cpus in ops:
        for path in files:
            lst = by_file.get(path)
            if lst is None:
                by_file[path] = [tid]
            else:
                lst.append(tid)
        if cpus is not None:
            affinity.append((tid, cpus))
    for path, tid_list in by_file.items():
        n = len(tid_list)
        tids = <int *>malloc(n * sizeof(int))
        errs = <int *>malloc(n * sizeof(int))
        if tids == NULL or errs == NULL:
            free(tids)
            free(errs)
            raise MemoryError()
        try:
            for i in range(n):
                tids[i] = tid_list[i]
            bpath = os.fsencode(path)
            cpath = bpath
            with nogil:
                open_err = _write_tids(cpath, tids, errs, n)
            if open_err:
                failures.extend([(t, path, open_err) for t in tid_list])
            else:
                for i in range(n):
                    if errs[i]:
                        failures.append((tids[i], path, errs[i]))
        finally:
            free(tids)
            free(errs)
    for tid, cpus in affinity:
        CPU_ZERO(&mask)
        for c in cpus:
            cpu = c
            if cpu < 0 or cpu >= CPU_SETSIZE:
                raise ValueError(f"cpu {cpu} out of range")
            CPU_SET(cpu, &mask)
        n = tid
        with nogil:
            rc = sched_setaffinity(<int>n, sizeof(cpu_set_t), &mask)
            e = errno if rc < 0 else 0
        if rc < 0:
            failures.append((tid, AFFINITY, e))
    return failures
