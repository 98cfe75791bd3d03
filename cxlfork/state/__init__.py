"""The kinds of process state cxlfork carries, one module each, with its checkpoint side
(`collect`: read it from the frozen process, refuse what cannot be carried, naming it) and its
restore side (recreate it for a clone, or give the restore plan what it needs) side by side:

    process    exe, cwd, umask, session, mm fields, rlimits; child processes refused
    creds      uids, gids, groups, capability sets, securebits, no_new_privs, dumpable
               (applied last by the restorer; threads with other credentials refused)
    registers  general registers, xstate, rseq, robust list, clear-child-tid address
    threads    the other threads (their registers, mask, sigaltstack...); thread hand-over
    signals    sigactions, sigaltstack, blocked mask
    memory     mappings and their stored page runs, shmem/memfd objects, mapped files
    fds        the fd table (dups, FD_CLOEXEC, stdio), handing each fd to its kind:
    files      regular files, directories, character devices, memfd fds
    pipes      pipes with both ends inside the process, their buffered bytes
    sockets    AF_UNIX socketpairs with both ends inside the process, their queues; other
               unix sockets (abstract names, listening), connections to outside (reset)
    inet       TCP listeners, UDP sockets, their options; TCP connections (reset in a clone)
    netns      the clone's own network namespace (made at restore), a socket's at checkpoint
    mountns    the clone's own mount namespace, for unix sockets bound to paths
    eventfds   eventfd counters and flags
    epoll      epoll interest lists (entries added by the restore plan)
    timerfd    timerfds: clock, time left, interval, flags, pending expirations
    signalfd   signalfd masks and flags
    inotify    inotify watches, re-added by path under the same watch descriptors
    fifos      named FIFOs, reopened by path
    deleted    deleted-but-open files, their contents carried as store objects
    timers     POSIX timers and interval timers

The pipelines that call them in order are cxlfork.checkpoint and cxlfork.restore.
"""
