/* Threads: every thread's registers, TLS (fs base), signal mask and sigaltstack survive, and
 * the blocking calls they sit in when checkpointed are resumed: a futex wait
 * (pthread_cond_wait), a nanosleep loop, a read on a pipe. Thread names (comm) too. The threads are joined at the end
 * (pthread_join waits on the kernel clearing the thread's tid address). */
#include "conform.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <sys/prctl.h>

static __thread long tls_value;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go_flag;
static atomic_int sleeper_go;
static int pipe_fds[2];
static pthread_barrier_t started;

struct check {
    long id;
    int sig;                    /* blocked in this thread only */
    char *alt;                  /* its sigaltstack */
};

static void *check_own(struct check *c, const char *who)
{
    CHECK(tls_value == c->id, "%s: TLS value %ld, want %ld", who, tls_value, c->id);
    char name[16] = "", want[16];
    prctl(PR_GET_NAME, name);
    snprintf(want, sizeof want, "cx-t%ld", c->id);
    CHECK(strcmp(name, want) == 0, "%s: thread name %s, want %s", who, name, want);
    sigset_t now;
    pthread_sigmask(SIG_SETMASK, NULL, &now);
    CHECK(sigismember(&now, c->sig), "%s: signal %d no longer blocked", who, c->sig);
    CHECK(!sigismember(&now, SIGUSR2) || c->sig == SIGUSR2, "%s: SIGUSR2 blocked", who);
    stack_t ss;
    sigaltstack(NULL, &ss);
    CHECK(ss.ss_sp == c->alt && ss.ss_size == 65536, "%s: sigaltstack %p/%zu, want %p/65536",
          who, ss.ss_sp, ss.ss_size, c->alt);
    return NULL;
}

static void setup(struct check *c)
{
    tls_value = c->id;
    char name[16];
    snprintf(name, sizeof name, "cx-t%ld", c->id);
    prctl(PR_SET_NAME, name);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, c->sig);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    c->alt = malloc(65536);
    stack_t ss = { .ss_sp = c->alt, .ss_size = 65536, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    pthread_barrier_wait(&started);
}

static void *waiter(void *arg)            /* futex wait in pthread_cond_wait */
{
    struct check *c = arg;
    setup(c);
    pthread_mutex_lock(&mu);
    while (!go_flag)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return check_own(c, "cond waiter");
}

static void *sleeper(void *arg)           /* nanosleep loop */
{
    struct check *c = arg;
    setup(c);
    while (!atomic_load(&sleeper_go)) {
        struct timespec t = { 0, 5 * 1000 * 1000 };
        nanosleep(&t, NULL);
    }
    return check_own(c, "sleeper");
}

static void *reader(void *arg)            /* read on a pipe */
{
    struct check *c = arg;
    setup(c);
    char b[8];
    ssize_t n = read(pipe_fds[0], b, sizeof b);
    CHECK(n == 5 && memcmp(b, "wake\n", 5) == 0, "reader: read returned %zd", n);
    return check_own(c, "reader");
}

int main(void)
{
    static struct check cs[3] = { { 101, SIGUSR1, 0 }, { 102, SIGUSR2, 0 }, { 103, SIGHUP, 0 } };
    void *(*fns[3])(void *) = { waiter, sleeper, reader };
    pthread_t t[3];
    tls_value = 100;
    CHECK(pipe(pipe_fds) == 0, "pipe");
    pthread_barrier_init(&started, NULL, 4);
    for (int i = 0; i < 3; i++)
        CHECK(pthread_create(&t[i], NULL, fns[i], &cs[i]) == 0, "pthread_create");
    pthread_barrier_wait(&started);
    ready();
    wait_go();
    CHECK(tls_value == 100, "main: TLS value %ld", tls_value);
    char name[16] = "";
    prctl(PR_GET_NAME, name);
    CHECK(strcmp(name, "threads") == 0, "main: name %s", name);
    pthread_mutex_lock(&mu);
    go_flag = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    atomic_store(&sleeper_go, 1);
    CHECK(write(pipe_fds[1], "wake\n", 5) == 5, "write to the reader");
    for (int i = 0; i < 3; i++)
        CHECK(pthread_join(t[i], NULL) == 0, "pthread_join %d", i);
    return finish();
}
