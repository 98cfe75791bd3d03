/* Signals: a handler with SA_RESTART|SA_ONSTACK and a mask, an ignored signal, a blocked
 * mask, the alternate stack; after restore the handler must run on that stack. */
#include "conform.h"
#include <signal.h>
#include <stdint.h>

static char altstack[64 * 1024];
static volatile int hits;
static volatile uintptr_t handler_sp;

static void on_usr1(int s)
{
    int local;
    (void)s;
    hits++;
    handler_sp = (uintptr_t)&local;
}

int main(void)
{
    struct sigaction sa = { 0 };
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGUSR2, SIG_IGN);
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGWINCH);
    sigprocmask(SIG_BLOCK, &block, NULL);
    ready();
    wait_go();
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    CHECK(sigismember(&cur, SIGHUP) && sigismember(&cur, SIGWINCH) && !sigismember(&cur, SIGUSR1),
          "blocked mask");
    struct sigaction q;
    sigaction(SIGUSR1, NULL, &q);
    CHECK(q.sa_handler == on_usr1 && (q.sa_flags & SA_RESTART) && (q.sa_flags & SA_ONSTACK)
          && sigismember(&q.sa_mask, SIGTERM), "SIGUSR1 action");
    sigaction(SIGUSR2, NULL, &q);
    CHECK(q.sa_handler == SIG_IGN, "SIGUSR2 not ignored");
    raise(SIGUSR2);
    raise(SIGUSR1);
    CHECK(hits == 1, "handler ran %d times", hits);
    CHECK(handler_sp >= (uintptr_t)altstack && handler_sp < (uintptr_t)altstack + sizeof altstack,
          "handler not on the alternate stack");
    stack_t now;
    sigaltstack(NULL, &now);
    CHECK(now.ss_sp == altstack && now.ss_size == sizeof altstack, "sigaltstack");
    return finish();
}
