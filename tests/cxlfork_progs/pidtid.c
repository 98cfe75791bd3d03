/* PIDs and thread IDs (restore --pidns new): the process and its two threads record getpid()
 * and gettid() before the checkpoint; afterwards each must read the same ids, and
 * pthread_kill (glibc's cached tid) must reach the right thread. Threads wait on a
 * condition variable; the main thread blocks in read. */
#include "conform.h"
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#define NT 2
static pid_t pid0, tid0[NT], hit[NT];
static pthread_t th[NT];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go_flag, up;
static __thread int me = -1;

static void on_usr1(int s) { (void)s; if (me >= 0) hit[me] = (pid_t)syscall(SYS_gettid); }

static void *run(void *arg)
{
    me = (int)(long)arg;
    pthread_mutex_lock(&mu);
    tid0[me] = (pid_t)syscall(SYS_gettid);
    up++;
    pthread_cond_broadcast(&cv);
    while (!go_flag)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    CHECK(syscall(SYS_gettid) == tid0[me], "thread %d: gettid %ld, was %d", me,
          syscall(SYS_gettid), tid0[me]);
    for (int k = 0; k < 2000 && !hit[me]; k++)    /* a lost signal: report, do not hang */
        usleep(1000);
    return NULL;
}

int main(void)
{
    signal(SIGUSR1, on_usr1);
    pid0 = getpid();
    for (long i = 0; i < NT; i++)
        pthread_create(&th[i], NULL, run, (void *)i);
    pthread_mutex_lock(&mu);
    while (up < NT)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    ready();
    wait_go();
    CHECK(getpid() == pid0, "getpid %d, was %d", getpid(), pid0);
    CHECK(syscall(SYS_gettid) == pid0, "main gettid %ld, was %d", syscall(SYS_gettid), pid0);
    pthread_mutex_lock(&mu);
    go_flag = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < NT; i++) {
        int e = pthread_kill(th[i], SIGUSR1);
        CHECK(e == 0, "pthread_kill of thread %d: %s", i, strerror(e));
    }
    for (int i = 0; i < NT; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < NT; i++)
        CHECK(hit[i] == tid0[i], "SIGUSR1 for thread %d (tid %d) ran in tid %d", i, tid0[i],
              hit[i]);
    return finish();
}
