"""cxlfork porter: a CXLporter-style serverless autoscaler on cxlfork.

Functions are worker programs speaking newline-delimited JSON on stdin/stdout
(cxlfork.workers.protocol). The porter cold-starts a function's first instance, checkpoints it
with cxlfork after K invocations, and scales out later instances by restoring that checkpoint
(mow / moa / hybrid, switched per function against an SLO and local-memory pressure).

    config    TOML config, validated (file:key: reason)
    instance  one worker process: cold start or restore, one request at a time over pipes
    http_instance  one HTTP instance (protocol openwhisk / http) in its own network namespace
    netns     network namespaces: a child's own (lo up), sockets made inside an instance's
    lifeline  a watcher that SIGKILLs restored HTTP clones when the porter dies
    memory    local (anonymous) and shared (page-store) memory of a process, from smaps
    cgroup    the porter's memory cgroup (v2 or v1): the kernel enforces the local limit
    ghosts    per-function pools of pre-spawned restorers (cxlfork ghosts) in that cgroup
    pool      the instances of one function: acquire / release, scale-out, checkpoint trigger
    policy    the per-function clone-policy switch (SLO, pressure)
    metrics   Prometheus metrics and the /stats document
    server    the HTTP API (loopback by default)
    service   the Porter: ties it together, housekeeping loop, clean shutdown
    cli       `cxlfork porter --config F`
"""
