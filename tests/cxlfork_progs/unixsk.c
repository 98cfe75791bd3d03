/* Unix sockets that are not plain socketpairs: a SOCK_STREAM listener and a SOCK_SEQPACKET
 * one on abstract names (backlog, SO_PASSCRED on one), a SOCK_DGRAM socket bound to an
 * abstract name, an unbound unconnected socket, a connection through the stream listener
 * (both ends inside), socketpairs with ends shut down (SHUT_WR on a stream end, SHUT_RD on a
 * seqpacket end), and an inherited fd (second argument): a socketpair end whose peer is
 * outside the process.
 * After restore the names, listening state and options are back and the listeners accept; the
 * shut-down ends still are; in a clone (another PID) that fd reads as reset (ECONNRESET), in the
 * original it still carries data. First argument: a name prefix (abstract names must not collide
 * between tests running the original in one namespace). */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static socklen_t abstract(struct sockaddr_un *a, const char *prefix, const char *name)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "%s-%s", prefix, name);
    return offsetof(struct sockaddr_un, sun_path) + 1 + n;
}

static int opt(int fd, int name)
{
    int v = -1;
    socklen_t l = sizeof v;
    return getsockopt(fd, SOL_SOCKET, name, &v, &l) ? -1000 : v;
}

static int bound(int type, const char *prefix, const char *name)
{
    struct sockaddr_un a;
    socklen_t l = abstract(&a, prefix, name);
    int s = socket(AF_UNIX, type, 0);
    if (bind(s, (void *)&a, l))
        printf("FAIL: bind @%s-%s: %s\n", prefix, name, strerror(errno));
    return s;
}

static int has_name(int fd, const char *prefix, const char *name)
{
    struct sockaddr_un a, want;
    socklen_t l = sizeof a, wl = abstract(&want, prefix, name);
    return getsockname(fd, (void *)&a, &l) == 0 && l == wl && !memcmp(&a, &want, l);
}

static void check_accepts(int l, int type, const char *prefix, const char *name)
{
    struct sockaddr_un a;
    socklen_t al = abstract(&a, prefix, name);
    int c = socket(AF_UNIX, type, 0);
    CHECK(connect(c, (void *)&a, al) == 0, "connect to @%s-%s: %s", prefix, name,
          strerror(errno));
    int s = accept(l, NULL, NULL);
    char b = 0;
    CHECK(s >= 0 && write(c, "u", 1) == 1 && read(s, &b, 1) == 1 && b == 'u',
          "@%s-%s accepts and carries", prefix, name);
    close(c);
    close(s);
}

int main(int argc, char **argv)
{
    const char *px = argc > 1 ? argv[1] : "cxu";
    pid_t pid0 = getpid();
    int outside = argc > 2 ? atoi(argv[2]) : 3;
    CHECK(opt(outside, SO_TYPE) == SOCK_STREAM, "fd 3 is not a stream socket");
    int ls = bound(SOCK_STREAM, px, "stream");
    listen(ls, 9);
    int lq = bound(SOCK_SEQPACKET | SOCK_NONBLOCK, px, "seq");
    int one = 1;
    setsockopt(lq, SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    listen(lq, 4);
    int dg = bound(SOCK_DGRAM, px, "dgram");
    int unb = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    socklen_t al = abstract(&a, px, "stream");
    int cl = socket(AF_UNIX, SOCK_STREAM, 0);
    (void)!connect(cl, (void *)&a, al);
    int ac = accept(ls, NULL, NULL);
    (void)!write(cl, "queued", 6);
    int sw[2], sr[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sw);
    (void)!write(sw[0], "before", 6);
    shutdown(sw[0], SHUT_WR);
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sr);
    shutdown(sr[1], SHUT_RD);
    ready();
    wait_go();
    int clone = getpid() != pid0;

    CHECK(opt(ls, SO_ACCEPTCONN) == 1 && opt(lq, SO_ACCEPTCONN) == 1 && opt(dg, SO_ACCEPTCONN) == 0,
          "listening state");
    CHECK(has_name(ls, px, "stream") && has_name(lq, px, "seq") && has_name(dg, px, "dgram"),
          "abstract names");
    CHECK(opt(lq, SO_PASSCRED) == 1 && opt(ls, SO_PASSCRED) == 0, "SO_PASSCRED");
    CHECK(opt(lq, SO_TYPE) == SOCK_SEQPACKET && opt(dg, SO_TYPE) == SOCK_DGRAM, "types");
    CHECK((fcntl(lq, F_GETFL) & O_NONBLOCK) && !(fcntl(ls, F_GETFL) & O_NONBLOCK), "O_NONBLOCK");
    check_accepts(ls, SOCK_STREAM, px, "stream");
    check_accepts(lq, SOCK_SEQPACKET, px, "seq");
    int sd = socket(AF_UNIX, SOCK_DGRAM, 0);
    al = abstract(&a, px, "dgram");
    char b[16] = { 0 };
    CHECK(sendto(sd, "dg", 2, 0, (void *)&a, al) == 2 && recv(dg, b, sizeof b, MSG_DONTWAIT) == 2
          && !memcmp(b, "dg", 2), "datagram to @%s-dgram", px);
    close(sd);
    struct sockaddr_un un;
    socklen_t ul = sizeof un;
    CHECK(getsockname(unb, (void *)&un, &ul) == 0 && ul == sizeof(sa_family_t) &&
          opt(unb, SO_ACCEPTCONN) == 0, "unbound socket");
    /* the connection through the listener: both ends inside, queue carried */
    CHECK(read(ac, b, 6) == 6 && !memcmp(b, "queued", 6), "connection's queued bytes");
    CHECK(write(ac, "x", 1) == 1 && read(cl, b, 1) == 1 && b[0] == 'x', "connection carries");
    /* shut-down ends */
    CHECK(read(sw[1], b, 6) == 6 && !memcmp(b, "before", 6) && read(sw[1], b, 1) == 0,
          "SHUT_WR end: its bytes, then EOF at the peer");
    errno = 0;
    CHECK(send(sw[0], "y", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE, "write on a SHUT_WR end: %s",
          strerror(errno));
    CHECK(write(sw[1], "z", 1) == 1 && read(sw[0], b, 1) == 1 && b[0] == 'z',
          "the other direction still works");
    errno = 0;
    CHECK(recv(sr[1], b, 1, MSG_DONTWAIT) == 0, "SHUT_RD seqpacket end reads 0");
    errno = 0;
    CHECK(send(sr[0], "w", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE,
          "its peer cannot send: %s", strerror(errno));
    if (clone) {
        errno = 0;
        ssize_t r = read(outside, b, 1);
        CHECK(r < 0 && errno == ECONNRESET, "clone: fd 3 read %zd (%s), not ECONNRESET", r,
              strerror(errno));
    } else {
        CHECK(write(outside, "o", 1) == 1 && read(outside, b, 1) == 1 && b[0] == 'O',
              "original: fd 3 still carries data");
    }
    return finish();
}
