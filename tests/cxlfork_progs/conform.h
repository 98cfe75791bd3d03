/* Shared by the cxlfork conformance programs: each sets up one kind of state, prints "ready",
 * blocks reading "go" on stdin (the checkpoint happens there, so the read is an interrupted
 * syscall that must restart), then checks its state and prints "ok" or "FAIL: why". */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { char _m[256]; \
    int _n = snprintf(_m, sizeof _m, "FAIL: " __VA_ARGS__); _m[_n < 250 ? _n : 250] = '\n'; \
    (void)!write(1, _m, (_n < 250 ? _n : 250) + 1); failures++; } } while (0)

static void ready(void) { (void)!write(1, "ready\n", 6); }

static __attribute__((unused)) void wait_go(void)
{
    char b[16];
    ssize_t n = read(0, b, sizeof b);
    CHECK(n == 3 && memcmp(b, "go\n", 3) == 0, "read of go returned %zd", n);
}

static int finish(void)
{
    if (!failures)
        (void)!write(1, "ok\n", 3);
    return failures ? 1 : 0;
}
