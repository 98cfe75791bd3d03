/* AF_UNIX socketpairs with both ends in the process: SOCK_STREAM, SOCK_DGRAM and
 * SOCK_SEQPACKET, data queued in both directions (message boundaries kept for datagrams),
 * O_NONBLOCK on one end, FD_CLOEXEC on another, a dup of an end, a buffer size, an empty
 * pair; after restore each pair is still connected to itself. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>

static int pair(int type, int sv[2])
{
    return socketpair(AF_UNIX, type, 0, sv);
}

static void check_dgrams(int fd, const char *what, const char *const *msgs, int n)
{
    char b[64];
    for (int i = 0; i < n; i++) {
        memset(b, 0, sizeof b);
        ssize_t r = recv(fd, b, sizeof b, MSG_DONTWAIT);
        CHECK(r == (ssize_t)strlen(msgs[i]) && !strcmp(b, msgs[i]), "%s message %d: %zd '%s'",
              what, i, r, b);
    }
    CHECK(recv(fd, b, sizeof b, MSG_DONTWAIT) < 0 && errno == EAGAIN, "%s: queue not empty",
          what);
}

static void check_connected(int a, int b, const char *what)
{
    char buf[8] = { 0 };
    CHECK(send(a, "ping", 4, 0) == 4 && recv(b, buf, sizeof buf, 0) == 4 &&
          !memcmp(buf, "ping", 4), "%s: a->b", what);
    CHECK(send(b, "pong", 4, 0) == 4 && recv(a, buf, sizeof buf, 0) == 4 &&
          !memcmp(buf, "pong", 4), "%s: b->a", what);
}

int main(void)
{
    int st[2], dg[2], sp[2], empty[2];
    if (pair(SOCK_STREAM, st) || pair(SOCK_DGRAM, dg) || pair(SOCK_SEQPACKET, sp) ||
        pair(SOCK_STREAM | SOCK_CLOEXEC, empty)) {
        printf("FAIL: socketpair\n");
        return 1;
    }
    static char big[100000];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (char)(i * 7 + 3);
    (void)!send(st[1], "stream-", 7, 0);
    (void)!send(st[1], big, sizeof big, 0);
    (void)!send(st[0], "back", 4, 0);
    const char *dmsgs[] = { "one", "two two", "three three three" };
    for (int i = 0; i < 3; i++)
        (void)!send(dg[0], dmsgs[i], strlen(dmsgs[i]), 0);
    const char *smsgs[] = { "seq-a", "seq-bb" };
    for (int i = 0; i < 2; i++)
        (void)!send(sp[1], smsgs[i], strlen(smsgs[i]), 0);
    (void)!send(sp[0], "rev", 3, 0);
    fcntl(dg[1], F_SETFL, O_NONBLOCK);
    int dup_st = dup(st[0]);
    int sz = 65536;
    setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    int want_sz = 0;
    socklen_t sl = sizeof want_sz;
    getsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &want_sz, &sl);
    ready();
    wait_go();
    /* stream: the bytes in order, then the other direction */
    static char got[sizeof big + 7];
    size_t have = 0;
    while (have < sizeof got) {
        ssize_t r = recv(dup_st, got + have, sizeof got - have, MSG_DONTWAIT);
        if (r <= 0)
            break;
        have += r;
    }
    CHECK(have == sizeof got && !memcmp(got, "stream-", 7) && !memcmp(got + 7, big, sizeof big),
          "stream data: %zu bytes", have);
    char b[16] = { 0 };
    CHECK(recv(st[1], b, sizeof b, MSG_DONTWAIT) == 4 && !memcmp(b, "back", 4),
          "stream data the other way: '%s'", b);
    check_dgrams(dg[1], "dgram", dmsgs, 3);
    check_dgrams(sp[0], "seqpacket", smsgs, 2);
    const char *rev[] = { "rev" };
    check_dgrams(sp[1], "seqpacket back", rev, 1);
    CHECK(fcntl(dg[1], F_GETFL) & O_NONBLOCK, "O_NONBLOCK on a dgram end");
    CHECK(!(fcntl(dg[0], F_GETFL) & O_NONBLOCK), "no O_NONBLOCK on the other end");
    CHECK(fcntl(empty[0], F_GETFD) == FD_CLOEXEC && fcntl(st[0], F_GETFD) == 0, "FD_CLOEXEC");
    int types[4][2] = { { st[0], SOCK_STREAM }, { dg[1], SOCK_DGRAM }, { sp[0], SOCK_SEQPACKET },
                        { empty[1], SOCK_STREAM } };
    for (int i = 0; i < 4; i++) {
        int t = 0;
        sl = sizeof t;
        CHECK(getsockopt(types[i][0], SOL_SOCKET, SO_TYPE, &t, &sl) == 0 && t == types[i][1],
              "SO_TYPE of fd %d: %d", types[i][0], t);
    }
    int now_sz = 0;
    sl = sizeof now_sz;
    getsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &now_sz, &sl);
    CHECK(now_sz == want_sz, "SO_SNDBUF %d, want %d", now_sz, want_sz);
    check_connected(st[0], st[1], "stream");
    check_connected(dg[0], dg[1], "dgram");
    check_connected(sp[0], sp[1], "seqpacket");
    check_connected(empty[0], empty[1], "empty stream");
    return finish();
}
