/* Unix sockets bound to paths: a SOCK_STREAM listener at DIR/stream.sock (mode 0666, backlog
 * 6) and a SOCK_DGRAM socket at DIR/dgram.sock. After restore each is bound to the same path
 * and reachable there (connect/sendto by path reach this process's own sockets: in a clone,
 * through its own mount namespace, where its sockets are mounted over the paths). Argument:
 * DIR; "serve" as second argument: after the checks, answer "pid N" to every connection on the
 * stream socket until stdin reaches EOF. */
#include "conform.h"
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

static socklen_t addr(struct sockaddr_un *a, const char *dir, const char *name)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof a->sun_path, "%s/%s", dir, name);
    return sizeof *a;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    int serving = argc > 2 && !strcmp(argv[2], "serve");
    struct sockaddr_un a;
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    socklen_t al = addr(&a, dir, "stream.sock");
    unlink(a.sun_path);
    if (bind(ls, (void *)&a, al) || listen(ls, 6))
        printf("FAIL: bind/listen %s: %s\n", a.sun_path, strerror(errno));
    chmod(a.sun_path, 0666);
    int dg = socket(AF_UNIX, SOCK_DGRAM, 0);
    al = addr(&a, dir, "dgram.sock");
    unlink(a.sun_path);
    if (bind(dg, (void *)&a, al))
        printf("FAIL: bind %s: %s\n", a.sun_path, strerror(errno));
    ready();
    wait_go();
    struct sockaddr_un got;
    socklen_t gl = sizeof got;
    addr(&a, dir, "stream.sock");
    CHECK(getsockname(ls, (void *)&got, &gl) == 0 && !strcmp(got.sun_path, a.sun_path),
          "listener's name");
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK(getsockopt(ls, SOL_SOCKET, SO_ACCEPTCONN, &v, &vl) == 0 && v == 1, "listening");
    struct stat st;
    CHECK(stat(a.sun_path, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 0777) == 0666,
          "the socket file at the path, mode 0666");
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(connect(c, (void *)&a, sizeof a) == 0, "connect to %s: %s", a.sun_path,
          strerror(errno));
    struct pollfd p = { ls, POLLIN, 0 };
    int s = poll(&p, 1, 5000) == 1 ? accept(ls, NULL, NULL) : -1;
    char b[8] = { 0 };
    CHECK(s >= 0 && write(c, "k", 1) == 1 && read(s, b, 1) == 1 && b[0] == 'k',
          "our own listener accepts the connection to its path");
    close(c);
    if (s >= 0)
        close(s);
    int sd = socket(AF_UNIX, SOCK_DGRAM, 0);
    al = addr(&a, dir, "dgram.sock");
    CHECK(sendto(sd, "dg", 2, 0, (void *)&a, al) == 2 && recv(dg, b, sizeof b, MSG_DONTWAIT) == 2,
          "a datagram to %s reaches our socket", a.sun_path);
    close(sd);
    int rc = finish();
    if (serving && !rc) {
        char msg[32];
        int n = snprintf(msg, sizeof msg, "pid %d\n", getpid());
        struct pollfd q[2] = { { 0, POLLIN, 0 }, { ls, POLLIN, 0 } };
        for (;;) {
            if (poll(q, 2, -1) < 0)
                continue;
            if (q[0].revents && read(0, b, sizeof b) <= 0)
                break;
            if (q[1].revents & POLLIN) {
                int x = accept(ls, NULL, NULL);
                if (x >= 0) {
                    (void)!write(x, msg, n);
                    close(x);
                }
            }
        }
    }
    return rc;
}
