/* cxlfork-restorer: taking the checkpointed process's credentials (plan OP_CREDS; each
 * restored thread for itself before it parks). The record (cxlfork.state.creds.record):
 * u64 flags, ruid euid suid fsuid, rgid egid sgid fsgid, cap inh prm eff bnd amb,
 * securebits, no_new_privs, dumpable, last cap, group count, then the groups (u32).
 *
 * Order, so that no step lacks the privilege it needs: groups and gids (CAP_SETGID), the
 * bounding set (CAP_SETPCAP), SECBIT_NO_SETUID_FIXUP so that changing the uids keeps every
 * capability, the uids (CAP_SETUID), the inheritable set (still all of permitted), the
 * ambient set (needs permitted and inheritable), the securebits (CAP_SETPCAP), then the three
 * sets (permitted can only shrink), no_new_privs, and the dumpable flag (a change of uid or
 * gid resets it to suid_dumpable; the main thread sets it last). Only the flagged steps run:
 * a restore by the process's own user changes nothing. */
#include "restorer.h"

#define NR_setgroups 116
#define NR_setresuid 117
#define NR_setresgid 119
#define NR_setfsuid 122
#define NR_setfsgid 123
#define NR_capget 125
#define NR_capset 126

enum { F_GROUPS = 1, F_GID = 2, F_UID = 4, F_CAPS = 8, F_AMB = 16, F_SECBITS = 32,
       F_NNP = 64, F_DUMPABLE = 128 };
enum { C_FLAGS, C_RUID, C_EUID, C_SUID, C_FSUID, C_RGID, C_EGID, C_SGID, C_FSGID, C_INH,
       C_PRM, C_EFF, C_BND, C_AMB, C_SECBITS, C_NNP, C_DUMPABLE, C_LAST, C_NGROUPS,
       C_GROUPS };
#define SECBIT_NO_SETUID_FIXUP 4

struct cap_data { uint32_t eff, prm, inh; };

static long capset3(uint64_t eff, uint64_t prm, uint64_t inh)
{
    uint32_t hdr[2] = { 0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0 };
    struct cap_data d[2] = { { (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
                             { (uint32_t)(eff >> 32), (uint32_t)(prm >> 32),
                               (uint32_t)(inh >> 32) } };
    return sc(NR_capset, hdr, d, 0);
}

static long capget3(uint64_t *eff, uint64_t *prm)
{
    uint32_t hdr[2] = { 0x20080522, 0 };
    struct cap_data d[2];
    long r = sc(NR_capget, hdr, d, 0);
    *eff = d[0].eff | (uint64_t)d[1].eff << 32;
    *prm = d[0].prm | (uint64_t)d[1].prm << 32;
    return r;
}

/* what: the step that failed (NULL: done); *arg: what it was setting */
static const char *apply(const uint64_t *c, int main_thread, long *err, uint64_t *arg)
{
    uint64_t f = c[C_FLAGS];
    long r;
    *err = 0;
    if (f & F_GROUPS) {
        *arg = c[C_NGROUPS];
        if ((r = sc(NR_setgroups, c[C_NGROUPS], &c[C_GROUPS], 0)) < 0)
            return *err = r, "setgroups";
    }
    if (f & F_GID) {
        *arg = c[C_EGID];
        if ((r = sc(NR_setresgid, c[C_RGID], c[C_EGID], c[C_SGID])) < 0)
            return *err = r, "setresgid";
        sc(NR_setfsgid, c[C_FSGID], 0, 0);
        if ((uint64_t)sc(NR_setfsgid, -1, 0, 0) != c[C_FSGID])
            return *err = -1, *arg = c[C_FSGID], "setfsgid";
    }
    if (f & F_CAPS)
        for (uint64_t cap = 0; cap <= c[C_LAST] && cap < 64; cap++)
            if (!(c[C_BND] >> cap & 1) &&
                sc(NR_prctl, 23 /* PR_CAPBSET_READ */, cap, 0) == 1) {
                *arg = cap;
                if ((r = sc(NR_prctl, 24 /* PR_CAPBSET_DROP */, cap, 0)) < 0)
                    return *err = r, "prctl(PR_CAPBSET_DROP)";
            }
    if (f & F_UID) {
        *arg = SECBIT_NO_SETUID_FIXUP;
        if ((r = sc(NR_prctl, 28 /* PR_SET_SECUREBITS */, SECBIT_NO_SETUID_FIXUP, 0)) < 0)
            return *err = r, "prctl(PR_SET_SECUREBITS) for the change of uid";
        *arg = c[C_EUID];
        if ((r = sc(NR_setresuid, c[C_RUID], c[C_EUID], c[C_SUID])) < 0)
            return *err = r, "setresuid";
        sc(NR_setfsuid, c[C_FSUID], 0, 0);
        if ((uint64_t)sc(NR_setfsuid, -1, 0, 0) != c[C_FSUID])
            return *err = -1, *arg = c[C_FSUID], "setfsuid";
    }
    if (f & (F_CAPS | F_AMB)) {
        uint64_t eff, prm;
        if ((r = capget3(&eff, &prm)) < 0)
            return *err = r, "capget";
        *arg = c[C_INH];
        if ((r = capset3(eff, prm, c[C_INH])) < 0)
            return *err = r, "capset of the inheritable set";
    }
    if (f & F_AMB) {
        if ((r = sc6(NR_prctl, 47 /* PR_CAP_AMBIENT */, 4 /* CLEAR_ALL */, 0, 0, 0, 0)) < 0)
            return *err = r, *arg = 0, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)";
        for (uint64_t cap = 0; cap < 64; cap++)
            if (c[C_AMB] >> cap & 1) {
                *arg = cap;
                if ((r = sc6(NR_prctl, 47, 2 /* RAISE */, cap, 0, 0, 0)) < 0)
                    return *err = r, "prctl(PR_CAP_AMBIENT_RAISE)";
            }
    }
    if (f & F_SECBITS) {
        *arg = c[C_SECBITS];
        if ((r = sc(NR_prctl, 28 /* PR_SET_SECUREBITS */, c[C_SECBITS], 0)) < 0)
            return *err = r, "prctl(PR_SET_SECUREBITS)";
    }
    if (f & F_CAPS) {
        *arg = c[C_PRM];
        if ((r = capset3(c[C_EFF], c[C_PRM], c[C_INH])) < 0)
            return *err = r, "capset";
    }
    if (f & F_NNP) {
        *arg = 1;
        if ((r = sc6(NR_prctl, 38 /* PR_SET_NO_NEW_PRIVS */, 1, 0, 0, 0, 0)) < 0)
            return *err = r, "prctl(PR_SET_NO_NEW_PRIVS)";
    }
    if (main_thread && (f & F_DUMPABLE)) {
        *arg = c[C_DUMPABLE];
        if ((r = sc(NR_prctl, 4 /* PR_SET_DUMPABLE */, c[C_DUMPABLE], 0)) < 0)
            return *err = r, "prctl(PR_SET_DUMPABLE)";
    }
    return 0;
}

/* The main thread (OP_CREDS): 0 or -errno; on failure the step is named on the error fd. */
long cx_apply_creds(const uint64_t *c, long op)
{
    long err;
    uint64_t arg = 0;
    const char *what = apply(c, 1, &err, &arg);
    if (what)
        fail(what, op, arg, err);
    return 0;
}

/* A restored thread, for itself (index: its place in the plan) */
void cx_thread_creds(const uint64_t *c, long index)
{
    long err;
    uint64_t arg = 0;
    const char *what = apply(c, 0, &err, &arg);
    if (what)
        fail(what, index, arg, err);
}
