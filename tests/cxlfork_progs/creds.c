/* Credentials: started as root, a daemon drops privileges as servers do (redis-server or
 * nginx workers running as nobody): supplementary groups 100 and 65534, setresgid and
 * setresuid to 65534, no_new_privs, then a second thread (which inherits them).
 * argv[1] "plain": no capability left. "caps": keeps CAP_NET_BIND_SERVICE through the change
 * of uid (SECBIT_KEEP_CAPS, with SECBIT_NOROOT locked) in its permitted, effective,
 * inheritable and ambient sets, and drops CAP_SYS_ADMIN from its bounding set. argv[2]: a
 * file only root can read. After "go" the main thread and the other thread (each for itself:
 * credentials are per thread) check their ids, groups, capability sets, securebits,
 * no_new_privs and dumpable flag, and that the root-only file cannot be opened. */
#include "conform.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#define NBS (1U << CAP_NET_BIND_SERVICE)
static int caps_mode;
static const char *secret;
static int to_thread[2], from_thread[2];

static void check_creds(const char *who)
{
    uid_t r, e, s;
    gid_t gr, ge, gs;
    /* raw syscalls: this thread's own credentials */
    syscall(SYS_getresuid, &r, &e, &s);
    syscall(SYS_getresgid, &gr, &ge, &gs);
    CHECK(r == 65534 && e == 65534 && s == 65534, "%s uids %u/%u/%u", who, r, e, s);
    CHECK(gr == 65534 && ge == 65534 && gs == 65534, "%s gids %u/%u/%u", who, gr, ge, gs);
    CHECK(syscall(SYS_setfsuid, -1) == 65534 && syscall(SYS_setfsgid, -1) == 65534,
          "%s fs ids", who);
    gid_t g[8];
    int n = (int)syscall(SYS_getgroups, 8, g);
    CHECK(n == 2 && ((g[0] == 100 && g[1] == 65534) || (g[0] == 65534 && g[1] == 100)),
          "%s groups: %d", who, n);
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    CHECK(syscall(SYS_capget, &h, d) == 0, "%s capget", who);
    unsigned want = caps_mode ? NBS : 0;
    CHECK(d[0].effective == want && d[0].permitted == want && d[0].inheritable == want &&
          !d[1].effective && !d[1].permitted && !d[1].inheritable,
          "%s caps eff %x prm %x inh %x", who, d[0].effective, d[0].permitted,
          d[0].inheritable);
    CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_BIND_SERVICE, 0, 0) ==
          caps_mode, "%s ambient", who);
    CHECK(prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN) == !caps_mode, "%s bounding set", who);
    CHECK(prctl(PR_CAPBSET_READ, CAP_CHOWN) == 1, "%s bounding set lost CAP_CHOWN", who);
    int sb = prctl(PR_GET_SECUREBITS);
    CHECK(sb == (caps_mode ? 0x13 : 0), "%s securebits %#x", who, sb);
    CHECK(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1, "%s no_new_privs", who);
    int fd = open(secret, O_RDONLY);
    CHECK(fd < 0 && errno == EACCES, "%s opened the root-only file %s (fd %d)", who, secret,
          fd);
    if (fd >= 0)
        close(fd);
}

static void *thread_main(void *arg)
{
    char c;
    (void)arg;
    while (read(to_thread[0], &c, 1) != 1)
        ;
    check_creds("thread");
    (void)!write(from_thread[1], "t", 1);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    caps_mode = strcmp(argv[1], "caps") == 0;
    secret = argv[2];
    if (getuid() != 0 || pipe(to_thread) || pipe(from_thread))
        return 3;
    pthread_t t;
    if (strcmp(argv[1], "split") == 0) {       /* the main thread alone changes its uids */
        pthread_create(&t, NULL, thread_main, NULL);
        if (syscall(SYS_setresuid, 65534, 65534, 65534))
            return 9;
        ready();
        wait_go();
        return 0;
    }
    gid_t groups[2] = { 100, 65534 };
    if (setgroups(2, groups))
        return 4;
    if (caps_mode) {
        if (prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) ||
            prctl(PR_SET_SECUREBITS, 0x13 /* NOROOT|NOROOT_LOCKED|KEEP_CAPS */, 0, 0, 0))
            return 5;
    }
    if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
        return 6;
    if (caps_mode) {
        struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
        struct __user_cap_data_struct d[2] = { { NBS, NBS, NBS }, { 0, 0, 0 } };
        if (syscall(SYS_capset, &h, d) ||
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0))
            return 7;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return 8;
    CHECK(prctl(PR_GET_DUMPABLE) == 0, "dumpable after setuid: %d", prctl(PR_GET_DUMPABLE));
    /* made now, it inherits every credential (capsets, ambient, securebits, no_new_privs are
     * per thread and glibc changes only ids in every thread) */
    pthread_create(&t, NULL, thread_main, NULL);
    ready();
    wait_go();
    check_creds("main");
    CHECK(prctl(PR_GET_DUMPABLE) == 0, "dumpable %d", prctl(PR_GET_DUMPABLE));
    char c = 0;
    (void)!write(to_thread[1], "g", 1);
    CHECK(read(from_thread[0], &c, 1) == 1 && c == 't', "the thread did not answer");
    return finish();
}
