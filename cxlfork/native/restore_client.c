/* cxlfork-restore: the fast `cxlfork restore` command, a client of the resident restore
 * service (cxlfork/service.py, `cxlfork service`).
 *
 *   cxlfork-restore IMAGE [restore options]     (the same options as `cxlfork restore`)
 *
 * It connects to the service's unix socket ($CXLFORK_SERVICE_SOCK, else
 * /run/cxlfork/restore.sock), sends one SOCK_SEQPACKET message (magic, umask, the arguments
 * and the environment, NUL-separated) with its fds 0, 1, 2 and its working directory (an
 * O_PATH fd) as SCM_RIGHTS, and waits for one 4-byte answer: the exit status of the restore
 * command the service ran for it, or CX_FALLBACK when the service cannot act exactly as the
 * caller's own command would (another namespace, a seccomp filter...). The service checks the
 * caller with SO_PEERCRED; its output and errors go straight to the fds passed.
 *
 * Without a service (no socket, connection refused), or on CX_FALLBACK, it runs the Python
 * command instead: $CXLFORK_PYTHON (else the interpreter it was built for) -m cxlfork restore
 * ARGS. $CXLFORK_SERVICE: "auto" (default), "off" (always the Python command) or "require"
 * (no fallback: one error line and exit 1 when the service is not there).
 *
 * Installed under the name `cxlfork` (a link named so), it is the whole command: `cxlfork
 * restore ARGS` goes this way, every other verb straight to the Python command.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef CX_PYTHON
#define CX_PYTHON "python3"
#endif
#define CX_SOCK "/run/cxlfork/restore.sock"
#define CX_MAGIC "CXR1"
#define CX_FALLBACK 256
#define CX_MAX_MSG (192 << 10)

extern char **environ;

static void die(const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "cxlfork: error: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    exit(1);
}

/* python -m cxlfork [VERB] ARGV[1..] */
static void run_python(const char *verb, int argc, char **argv)
{
    const char *py = getenv("CXLFORK_PYTHON");
    if (!py || !*py)
        py = CX_PYTHON;
    char **av = calloc(argc + 5, sizeof(char *));
    if (!av)
        die("%s%s", "out of memory", "");
    int k = 0;
    av[k++] = (char *)py;
    av[k++] = "-m";
    av[k++] = "cxlfork";
    if (verb)
        av[k++] = (char *)verb;
    for (int i = 1; i < argc; i++)
        av[k++] = argv[i];
    execvp(py, av);
    die("cannot run %s for the cxlfork command: %s", py, strerror(errno));
}

static void fallback(int argc, char **argv)
{
    run_python("restore", argc, argv);
}

static int put(char *buf, size_t *at, const char *s)
{
    size_t n = strlen(s) + 1;
    if (*at + n > CX_MAX_MSG)
        return -1;
    memcpy(buf + *at, s, n);
    *at += n;
    return 0;
}

int main(int argc, char **argv)
{
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    if (!strcmp(base, "cxlfork")) {            /* the whole command: only restore is ours */
        if (argc < 2 || strcmp(argv[1], "restore"))
            run_python(NULL, argc, argv);
        argv++;
        argc--;
    }
    const char *mode = getenv("CXLFORK_SERVICE");
    if (!mode || !*mode)
        mode = "auto";
    int require = !strcmp(mode, "require");
    if (!strcmp(mode, "off"))
        fallback(argc, argv);
    if (!require && strcmp(mode, "auto"))
        die("CXLFORK_SERVICE=%s: expected auto, off or require%s", mode, "");
    const char *path = getenv("CXLFORK_SERVICE_SOCK");
    if (!path || !*path)
        path = CX_SOCK;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path))
        die("restore service socket path too long: %s%s", path, "");
    strcpy(sa.sun_path, path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        if (require)
            die("restore service not running at %s (%s): start it with 'cxlfork service' "
                "or unset CXLFORK_SERVICE", path, strerror(errno));
        fallback(argc, argv);
    }
    /* the message: magic, umask (8 hex digits), "restore" ARGS..., "", environ..., "" */
    char *buf = malloc(CX_MAX_MSG);
    size_t at = 0;
    mode_t um = umask(0);
    umask(um);
    char hdr[32];
    snprintf(hdr, sizeof(hdr), "%s%08o", CX_MAGIC, (unsigned)um);
    int bad = !buf || put(buf, &at, hdr) || put(buf, &at, "restore");
    for (int i = 1; i < argc && !bad; i++)
        bad = put(buf, &at, argv[i]);
    bad = bad || put(buf, &at, "");
    for (char **e = environ; *e && !bad; e++)
        bad = put(buf, &at, *e);
    bad = bad || put(buf, &at, "");
    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    for (int fd = 0; fd < 3 && !bad; fd++)
        bad = fcntl(fd, F_GETFD) < 0;          /* a closed stdio fd cannot be passed */
    if (bad || cwd < 0) {
        if (require)
            die("cannot use the restore service: %s%s", bad ? "arguments and environment "
                "too large, or fd 0-2 closed" : "working directory unreadable", "");
        close(s);
        fallback(argc, argv);
    }
    int fds[4] = { 0, 1, 2, cwd };
    union { char b[CMSG_SPACE(sizeof(fds))]; struct cmsghdr a; } cb;
    memset(&cb, 0, sizeof(cb));
    struct iovec iov = { buf, at };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b,
                         .msg_controllen = sizeof(cb.b) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(c), fds, sizeof(fds));
    if (sendmsg(s, &mh, MSG_NOSIGNAL) != (ssize_t)at) {
        if (require)
            die("sending the request to the restore service at %s: %s", path, strerror(errno));
        close(s);
        fallback(argc, argv);
    }
    close(cwd);
    free(buf);
    /* the answer: the status (int32), then for CX_FALLBACK the reason */
    char ans[4 + 512];
    ssize_t r;
    do
        r = recv(s, ans, sizeof(ans) - 1, 0);
    while (r < 0 && errno == EINTR);
    if (r < 4)
        die("the restore service at %s closed the connection without an answer%s", path,
            r < 0 ? strerror(errno) : "");
    int32_t st;
    memcpy(&st, ans, 4);
    ans[r] = 0;
    if (st == CX_FALLBACK) {
        if (require)
            die("the restore service cannot restore for this caller as its own command "
                "would (%s): run without CXLFORK_SERVICE=require%s", ans + 4, "");
        close(s);
        fallback(argc, argv);
    }
    return st & 0xff;
}
