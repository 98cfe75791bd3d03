/* Inet sockets: TCP listeners on 0.0.0.0:PORT (O_NONBLOCK, SO_REUSEADDR, TCP_NODELAY,
 * keepalive with TCP_KEEPIDLE/INTVL/CNT, SO_RCVBUF, backlog 13), on [::]:PORT (IPV6_V6ONLY,
 * SO_REUSEPORT, FD_CLOEXEC, SO_SNDBUF) and on [::1]:PORT+1; bound UDP sockets on
 * 127.0.0.1:PORT (SO_SNDBUF) and [::1]:PORT (connected to [::1]:PORT+2); a TCP connection to
 * the v4 listener, both ends in the process. After restore the options, flags and addresses
 * are the same and every listener accepts; in a clone (another PID) the connection reads as
 * reset by the peer (ECONNRESET), in the original it still carries data. Argument: PORT;
 * "serve" as second argument: after the checks, answer "pid N" to every connection on the
 * v4 and v6 listeners until stdin reaches EOF. */
#include "conform.h"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

static int port;

static int opt(int fd, int level, int name)
{
    int v = -1;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, name, &v, &l))
        return -1000;
    return v;
}

static void setopt(int fd, int level, int name, int v)
{
    if (setsockopt(fd, level, name, &v, sizeof v))
        printf("FAIL: setsockopt %d/%d\n", level, name);
}

static int tcp(int family, const char *addr, int p, int flags)
{
    int s = socket(family, SOCK_STREAM | flags, 0);
    if (family == AF_INET) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(p) };
        inet_pton(AF_INET, addr, &a.sin_addr);
        setopt(s, SOL_SOCKET, SO_REUSEADDR, 1);
        if (bind(s, (void *)&a, sizeof a))
            printf("FAIL: bind %s:%d: %s\n", addr, p, strerror(errno));
    } else {
        struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(p) };
        inet_pton(AF_INET6, addr, &a.sin6_addr);
        setopt(s, IPPROTO_IPV6, IPV6_V6ONLY, 1);
        if (bind(s, (void *)&a, sizeof a))
            printf("FAIL: bind [%s]:%d: %s\n", addr, p, strerror(errno));
    }
    return s;
}

static int udp(int family, const char *addr, int p)
{
    int s = socket(family, SOCK_DGRAM, 0);
    struct sockaddr_storage ss = { 0 };
    socklen_t l;
    if (family == AF_INET) {
        struct sockaddr_in *a = (void *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(p);
        inet_pton(AF_INET, addr, &a->sin_addr);
        l = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (void *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(p);
        inet_pton(AF_INET6, addr, &a->sin6_addr);
        l = sizeof *a;
    }
    if (bind(s, (void *)&ss, l))
        printf("FAIL: bind udp %s:%d: %s\n", addr, p, strerror(errno));
    return s;
}

static int connect_to(int family, const char *addr, int p)
{
    int c = socket(family, SOCK_STREAM, 0);
    struct sockaddr_storage ss = { 0 };
    socklen_t l;
    if (family == AF_INET) {
        struct sockaddr_in *a = (void *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(p);
        inet_pton(AF_INET, addr, &a->sin_addr);
        l = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (void *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(p);
        inet_pton(AF_INET6, addr, &a->sin6_addr);
        l = sizeof *a;
    }
    if (connect(c, (void *)&ss, l)) {
        close(c);
        return -1;
    }
    return c;
}

static int accept_wait(int l)
{
    struct pollfd p = { l, POLLIN, 0 };
    if (poll(&p, 1, 5000) != 1)
        return -1;
    return accept(l, NULL, NULL);
}

/* the listener l accepts a connection to addr:p and carries a byte */
static void check_accepts(int l, int family, const char *addr, int p, const char *what)
{
    int c = connect_to(family, addr, p);
    CHECK(c >= 0, "%s: connect to %s port %d: %s", what, addr, p, strerror(errno));
    if (c < 0)
        return;
    int a = accept_wait(l);
    char b = 0;
    CHECK(a >= 0 && write(c, "q", 1) == 1 && read(a, &b, 1) == 1 && b == 'q',
          "%s: accept/carry on %s port %d", what, addr, p);
    close(c);
    if (a >= 0)
        close(a);
}

static int local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t l = sizeof ss;
    getsockname(fd, (void *)&ss, &l);
    return ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                         : ((struct sockaddr_in6 *)&ss)->sin6_port);
}

static void serve(int t4, int t6)
{
    struct pollfd p[3] = { { 0, POLLIN, 0 }, { t4, POLLIN, 0 }, { t6, POLLIN, 0 } };
    char msg[64];
    int n = snprintf(msg, sizeof msg, "pid %d\n", getpid());
    for (;;) {
        if (poll(p, 3, -1) < 0)
            continue;
        if (p[0].revents) {
            char b[16];
            if (read(0, b, sizeof b) <= 0)
                return;
        }
        for (int i = 1; i < 3; i++)
            if (p[i].revents & POLLIN) {
                int a = accept(p[i].fd, NULL, NULL);
                if (a >= 0) {
                    (void)!write(a, msg, n);
                    close(a);
                }
            }
    }
}

int main(int argc, char **argv)
{
    port = argc > 1 ? atoi(argv[1]) : 47100;
    int serving = argc > 2 && !strcmp(argv[2], "serve");
    pid_t pid0 = getpid();
    int t4 = tcp(AF_INET, "0.0.0.0", port, SOCK_NONBLOCK);
    setopt(t4, IPPROTO_TCP, TCP_NODELAY, 1);
    setopt(t4, SOL_SOCKET, SO_KEEPALIVE, 1);
    setopt(t4, IPPROTO_TCP, TCP_KEEPIDLE, 77);
    setopt(t4, IPPROTO_TCP, TCP_KEEPINTVL, 11);
    setopt(t4, IPPROTO_TCP, TCP_KEEPCNT, 4);
    setopt(t4, SOL_SOCKET, SO_RCVBUF, 100000);
    listen(t4, 13);
    int t6 = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setopt(t6, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    setopt(t6, SOL_SOCKET, SO_REUSEPORT, 1);
    setopt(t6, SOL_SOCKET, SO_SNDBUF, 60000);
    struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port),
                               .sin6_addr = IN6ADDR_ANY_INIT };
    if (bind(t6, (void *)&a6, sizeof a6))
        printf("FAIL: bind [::]:%d: %s\n", port, strerror(errno));
    listen(t6, 5);
    int t6lo = tcp(AF_INET6, "::1", port + 1, 0);
    listen(t6lo, 3);
    int u4 = udp(AF_INET, "127.0.0.1", port);
    setopt(u4, SOL_SOCKET, SO_SNDBUF, 50000);
    int u6 = udp(AF_INET6, "::1", port);
    struct sockaddr_in6 peer = { .sin6_family = AF_INET6, .sin6_port = htons(port + 2),
                                 .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    (void)!connect(u6, (void *)&peer, sizeof peer);
    int c = connect_to(AF_INET, "127.0.0.1", port);
    int ac = accept_wait(t4);
    CHECK(c >= 0 && ac >= 0, "connection to the v4 listener before the checkpoint");
    int rcv4 = opt(t4, SOL_SOCKET, SO_RCVBUF), snd6 = opt(t6, SOL_SOCKET, SO_SNDBUF);
    int sndu4 = opt(u4, SOL_SOCKET, SO_SNDBUF);
    ready();
    wait_go();
    int clone = getpid() != pid0;

    CHECK(opt(t4, SOL_SOCKET, SO_ACCEPTCONN) == 1 && opt(t6, SOL_SOCKET, SO_ACCEPTCONN) == 1 &&
          opt(t6lo, SOL_SOCKET, SO_ACCEPTCONN) == 1, "listening state");
    CHECK(opt(t4, SOL_SOCKET, SO_REUSEADDR) == 1, "t4 SO_REUSEADDR");
    CHECK(opt(t4, IPPROTO_TCP, TCP_NODELAY) == 1, "t4 TCP_NODELAY");
    CHECK(opt(t4, SOL_SOCKET, SO_KEEPALIVE) == 1, "t4 SO_KEEPALIVE");
    CHECK(opt(t4, IPPROTO_TCP, TCP_KEEPIDLE) == 77 && opt(t4, IPPROTO_TCP, TCP_KEEPINTVL) == 11 &&
          opt(t4, IPPROTO_TCP, TCP_KEEPCNT) == 4, "t4 keepalive idle/intvl/cnt %d %d %d",
          opt(t4, IPPROTO_TCP, TCP_KEEPIDLE), opt(t4, IPPROTO_TCP, TCP_KEEPINTVL),
          opt(t4, IPPROTO_TCP, TCP_KEEPCNT));
    CHECK(opt(t4, SOL_SOCKET, SO_RCVBUF) == rcv4, "t4 SO_RCVBUF %d, was %d",
          opt(t4, SOL_SOCKET, SO_RCVBUF), rcv4);
    CHECK(opt(t6, IPPROTO_IPV6, IPV6_V6ONLY) == 1 && opt(t6lo, IPPROTO_IPV6, IPV6_V6ONLY) == 1,
          "IPV6_V6ONLY");
    CHECK(opt(t6, SOL_SOCKET, SO_REUSEPORT) == 1 && opt(t4, SOL_SOCKET, SO_REUSEPORT) == 0,
          "SO_REUSEPORT");
    CHECK(opt(t6, SOL_SOCKET, SO_SNDBUF) == snd6, "t6 SO_SNDBUF");
    CHECK(opt(u4, SOL_SOCKET, SO_SNDBUF) == sndu4, "u4 SO_SNDBUF");
    CHECK(opt(t6, IPPROTO_TCP, TCP_NODELAY) == 0 && opt(t6, SOL_SOCKET, SO_KEEPALIVE) == 0,
          "t6 has no TCP_NODELAY/keepalive");
    CHECK((fcntl(t4, F_GETFL) & O_NONBLOCK) && !(fcntl(t6, F_GETFL) & O_NONBLOCK),
          "O_NONBLOCK");
    CHECK((fcntl(t6, F_GETFD) & FD_CLOEXEC) && !(fcntl(t4, F_GETFD) & FD_CLOEXEC),
          "FD_CLOEXEC");
    CHECK(local_port(t4) == port && local_port(t6) == port && local_port(t6lo) == port + 1 &&
          local_port(u4) == port && local_port(u6) == port, "ports");
    struct sockaddr_in6 pa;
    socklen_t pl = sizeof pa;
    CHECK(getpeername(u6, (void *)&pa, &pl) == 0 && ntohs(pa.sin6_port) == port + 2,
          "u6 connected to [::1]:%d", port + 2);
    check_accepts(t4, AF_INET, "127.0.0.1", port, "t4");
    check_accepts(t6, AF_INET6, "::1", port, "t6");
    check_accepts(t6lo, AF_INET6, "::1", port + 1, "t6lo");
    int su = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, "127.0.0.1", &ua.sin_addr);
    char b[8] = { 0 };
    CHECK(sendto(su, "dgram", 5, 0, (void *)&ua, sizeof ua) == 5 &&
          recv(u4, b, sizeof b, MSG_DONTWAIT) == 5 && !memcmp(b, "dgram", 5), "UDP on u4");
    close(su);
    if (clone) {
        errno = 0;
        ssize_t r = read(c, b, 1);
        CHECK(r < 0 && errno == ECONNRESET, "clone: connection read %zd %s, not ECONNRESET",
              r, strerror(errno));
        r = read(ac, b, 1);
        CHECK(r < 0 && errno == ECONNRESET, "clone: accepted connection read %zd %s", r,
              strerror(errno));
        CHECK(read(c, b, 1) == 0, "clone: EOF after the reset");
    } else {
        CHECK(write(c, "o", 1) == 1 && read(ac, b, 1) == 1 && b[0] == 'o' &&
              write(ac, "p", 1) == 1 && read(c, b, 1) == 1 && b[0] == 'p',
              "original: its connection still carries data");
    }
    int rc = finish();
    if (serving && !rc)
        serve(t4, t6);
    return rc;
}
