/*
 * faultpkcs11: a PKCS#11 module that forwards every call to a real module (SoftHSM2, Kryoptic,
 * ...) and, on command, injects faults the real module never produces: return codes such as
 * CKR_DEVICE_REMOVED or CKR_SESSION_HANDLE_INVALID, added latency, and hangs. A test loads it
 * exactly as it would load a vendor's module ([hsm] module = ".../libfaultpkcs11.so").
 *
 * For keybroker's tests only. Built by hsm-fixtures/build.rs with the system C compiler.
 *
 * Environment (read once, at the first C_GetFunctionList):
 *   FAULTY_PKCS11_MODULE   the real module to forward to (required)
 *   FAULTY_PKCS11_CONTROL  the control file (optional; no file = no faults)
 *   FAULTY_PKCS11_LOG      a file that gets one line per injected fault or traced call (optional)
 *
 * The control file is re-read whenever it changes (checked with stat() on every call, so write
 * it with a rename to make a change atomic). Every change resets the rules' call counters and
 * time windows. One rule per line; '#' starts a comment:
 *
 *   fail  fn=NAMES rv=CODE [at=N] [count=K] [p=P] [after_ms=A] [for_ms=T] [latch]
 *   delay fn=NAMES ms=M    [at=N] [count=K] [p=P] [after_ms=A] [for_ms=T]
 *   hang  fn=NAMES [ms=M]  [at=N] [count=K] [p=P] [after_ms=A] [for_ms=T]
 *   trace fn=NAMES
 *   clock [slot=S] [value=TEXT]
 *   empty fn=C_FindObjects [at=N] [count=K] [p=P] [after_ms=A] [for_ms=T]
 *
 *   NAMES   comma-separated PKCS#11 function names (C_EncryptInit,C_Decrypt), or '*' for every
 *           function except C_GetFunctionList and C_Finalize (which is always forwarded, so an
 *           application can always tear down).
 *   CODE    a CKR_ name from the table below, or a number (0x32).
 *   at=N    the rule fires from the Nth matching call after the file was (re)loaded (default 1).
 *   count=K at most K times (default: no limit).
 *   p=P     each eligible call fires with probability P (default 1).
 *   after_ms/for_ms   a time window, relative to when the file was loaded.
 *   latch   once fired, every call (but C_Finalize) fails with CODE until the application
 *           calls C_Finalize and a C_Initialize that succeeds: a removed device that needs the
 *           library re-initialised, as many vendor modules do.
 *   hang    blocks the call until the control file changes (or for ms=M), then forwards it.
 *   trace   logs each call of the named functions (to observe re-initialisation, say).
 *   slot=S  (any rule) only calls whose first argument is slot id S: C_GetSlotInfo,
 *           C_GetTokenInfo, C_GetMechanismList, C_GetMechanismInfo, C_InitToken,
 *           C_OpenSession, C_CloseAllSessions, C_WaitForSlotEvent.
 *   clock   C_GetTokenInfo succeeds, but the answer claims a clock (CKF_CLOCK_ON_TOKEN) whose
 *           utcTime field holds TEXT, blank-padded to 16 bytes (default "15:10:01", what
 *           openCryptoki 3.8.1 writes instead of YYYYMMDDhhmmss00). Logged as "clock".
 *   empty   C_FindObjects is forwarded (the search advances as usual), but the answer reports
 *           0 objects found: a search finds nothing, as on a token whose storage is gone
 *           (SoftHSM2 with its token directory moved away). Only C_FindObjects can be named.
 *           Combine with "fail fn=C_EncryptInit,... rv=CKR_KEY_HANDLE_INVALID" for the rest of
 *           that symptom. Logged as "empty".
 *
 * Log lines: "<unix_ms> <pid> <fail|latched|delay|hang|trace|clock|empty> <function> <detail>".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef unsigned char CK_BBOOL;
typedef void *PTR;
typedef CK_RV (*CK_NOTIFY)(CK_ULONG, CK_ULONG, void *);
typedef struct {
    unsigned char major, minor;
} CK_VERSION;

#define CKR_OK 0x0UL
#define CKR_CRYPTOKI_ALREADY_INITIALIZED 0x191UL
#define CKF_CLOCK_ON_TOKEN 0x40UL

/* CK_TOKEN_INFO, as far as the clock rule needs it (PKCS#11 2.40 §3.2). */
typedef struct {
    unsigned char label[32], manufacturerID[32], model[16], serialNumber[16];
    CK_ULONG flags;
    CK_ULONG counts[10]; /* ulMaxSessionCount ... ulFreePrivateMemory */
    CK_VERSION hardwareVersion, firmwareVersion;
    unsigned char utcTime[16];
} TokenInfo;

/* Every PKCS#11 2.40 function, in CK_FUNCTION_LIST order: X(name, parameters, arguments).
 * Pointer parameters are forwarded untouched, so their types do not matter here. */
#define PKCS11_FUNCTIONS(X)                                                                        \
    X(C_Initialize, (PTR a), (a))                                                                  \
    X(C_Finalize, (PTR a), (a))                                                                    \
    X(C_GetInfo, (PTR a), (a))                                                                     \
    X(C_GetFunctionList, (PTR a), (a))                                                             \
    X(C_GetSlotList, (CK_BBOOL a, PTR b, PTR c), (a, b, c))                                        \
    X(C_GetSlotInfo, (CK_ULONG a, PTR b), (a, b))                                                  \
    X(C_GetTokenInfo, (CK_ULONG a, PTR b), (a, b))                                                 \
    X(C_GetMechanismList, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                   \
    X(C_GetMechanismInfo, (CK_ULONG a, CK_ULONG b, PTR c), (a, b, c))                              \
    X(C_InitToken, (CK_ULONG a, PTR b, CK_ULONG c, PTR d), (a, b, c, d))                           \
    X(C_InitPIN, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                       \
    X(C_SetPIN, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, CK_ULONG e), (a, b, c, d, e))               \
    X(C_OpenSession, (CK_ULONG a, CK_ULONG b, PTR c, CK_NOTIFY d, PTR e), (a, b, c, d, e))         \
    X(C_CloseSession, (CK_ULONG a), (a))                                                           \
    X(C_CloseAllSessions, (CK_ULONG a), (a))                                                       \
    X(C_GetSessionInfo, (CK_ULONG a, PTR b), (a, b))                                               \
    X(C_GetOperationState, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                  \
    X(C_SetOperationState, (CK_ULONG a, PTR b, CK_ULONG c, CK_ULONG d, CK_ULONG e),                \
      (a, b, c, d, e))                                                                             \
    X(C_Login, (CK_ULONG a, CK_ULONG b, PTR c, CK_ULONG d), (a, b, c, d))                          \
    X(C_Logout, (CK_ULONG a), (a))                                                                 \
    X(C_CreateObject, (CK_ULONG a, PTR b, CK_ULONG c, PTR d), (a, b, c, d))                        \
    X(C_CopyObject, (CK_ULONG a, CK_ULONG b, PTR c, CK_ULONG d, PTR e), (a, b, c, d, e))           \
    X(C_DestroyObject, (CK_ULONG a, CK_ULONG b), (a, b))                                           \
    X(C_GetObjectSize, (CK_ULONG a, CK_ULONG b, PTR c), (a, b, c))                                 \
    X(C_GetAttributeValue, (CK_ULONG a, CK_ULONG b, PTR c, CK_ULONG d), (a, b, c, d))              \
    X(C_SetAttributeValue, (CK_ULONG a, CK_ULONG b, PTR c, CK_ULONG d), (a, b, c, d))              \
    X(C_FindObjectsInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                               \
    X(C_FindObjects, (CK_ULONG a, PTR b, CK_ULONG c, PTR d), (a, b, c, d))                         \
    X(C_FindObjectsFinal, (CK_ULONG a), (a))                                                       \
    X(C_EncryptInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                   \
    X(C_Encrypt, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))                   \
    X(C_EncryptUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))             \
    X(C_EncryptFinal, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                       \
    X(C_DecryptInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                   \
    X(C_Decrypt, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))                   \
    X(C_DecryptUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))             \
    X(C_DecryptFinal, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                       \
    X(C_DigestInit, (CK_ULONG a, PTR b), (a, b))                                                   \
    X(C_Digest, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))                    \
    X(C_DigestUpdate, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                  \
    X(C_DigestKey, (CK_ULONG a, CK_ULONG b), (a, b))                                               \
    X(C_DigestFinal, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                        \
    X(C_SignInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                      \
    X(C_Sign, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))                      \
    X(C_SignUpdate, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                    \
    X(C_SignFinal, (CK_ULONG a, PTR b, PTR c), (a, b, c))                                          \
    X(C_SignRecoverInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                               \
    X(C_SignRecover, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))               \
    X(C_VerifyInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                    \
    X(C_Verify, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, CK_ULONG e), (a, b, c, d, e))               \
    X(C_VerifyUpdate, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                  \
    X(C_VerifyFinal, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                   \
    X(C_VerifyRecoverInit, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                             \
    X(C_VerifyRecover, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))             \
    X(C_DigestEncryptUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))       \
    X(C_DecryptDigestUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))       \
    X(C_SignEncryptUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))         \
    X(C_DecryptVerifyUpdate, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, PTR e), (a, b, c, d, e))       \
    X(C_GenerateKey, (CK_ULONG a, PTR b, PTR c, CK_ULONG d, PTR e), (a, b, c, d, e))               \
    X(C_GenerateKeyPair,                                                                           \
      (CK_ULONG a, PTR b, PTR c, CK_ULONG d, PTR e, CK_ULONG f, PTR g, PTR h),                     \
      (a, b, c, d, e, f, g, h))                                                                    \
    X(C_WrapKey, (CK_ULONG a, PTR b, CK_ULONG c, CK_ULONG d, PTR e, PTR f), (a, b, c, d, e, f))    \
    X(C_UnwrapKey, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, CK_ULONG e, PTR f, CK_ULONG g, PTR h),   \
      (a, b, c, d, e, f, g, h))                                                                    \
    X(C_DeriveKey, (CK_ULONG a, PTR b, CK_ULONG c, PTR d, CK_ULONG e, PTR f), (a, b, c, d, e, f))  \
    X(C_SeedRandom, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                    \
    X(C_GenerateRandom, (CK_ULONG a, PTR b, CK_ULONG c), (a, b, c))                                \
    X(C_GetFunctionStatus, (CK_ULONG a), (a))                                                      \
    X(C_CancelFunction, (CK_ULONG a), (a))                                                         \
    X(C_WaitForSlotEvent, (CK_ULONG a, PTR b, PTR c), (a, b, c))

/* The function list: a version, then the 68 entry points. */
#define MEMBER(name, params, args) CK_RV(*name) params;
typedef struct {
    CK_VERSION version;
    PKCS11_FUNCTIONS(MEMBER)
} FunctionList;

/* Function indices and names. */
#define INDEX(name, params, args) IX_##name,
enum { PKCS11_FUNCTIONS(INDEX) NFUNCS };
#define NAME(name, params, args) #name,
static const char *const FN_NAMES[NFUNCS] = {PKCS11_FUNCTIONS(NAME)};

static const struct {
    const char *name;
    CK_RV value;
} RV_NAMES[] = {
    {"CKR_GENERAL_ERROR", 0x05},         {"CKR_FUNCTION_FAILED", 0x06},
    {"CKR_HOST_MEMORY", 0x02},           {"CKR_DEVICE_ERROR", 0x30},
    {"CKR_DEVICE_MEMORY", 0x31},         {"CKR_DEVICE_REMOVED", 0x32},
    {"CKR_FUNCTION_CANCELED", 0x50},     {"CKR_KEY_HANDLE_INVALID", 0x60},
    {"CKR_KEY_FUNCTION_NOT_PERMITTED", 0x68},
    {"CKR_OBJECT_HANDLE_INVALID", 0x82}, {"CKR_SESSION_CLOSED", 0xB0},
    {"CKR_SESSION_COUNT", 0xB1},         {"CKR_SESSION_HANDLE_INVALID", 0xB3},
    {"CKR_TOKEN_NOT_PRESENT", 0xE0},     {"CKR_TOKEN_NOT_RECOGNIZED", 0xE1},
    {"CKR_USER_NOT_LOGGED_IN", 0x101},   {"CKR_CRYPTOKI_NOT_INITIALIZED", 0x190},
};

enum Kind { FAIL, DELAY, HANG, TRACE, CLOCK, EMPTY };

typedef struct {
    enum Kind kind;
    unsigned char fns[NFUNCS];
    CK_RV rv;
    long at, count, ms, after_ms, for_ms;
    double p;
    int latch;
    int has_slot;
    CK_ULONG slot;
    char value[17];
    long seen, fired; /* matching calls seen, times fired (since the file was loaded) */
} Rule;

#define MAX_RULES 64

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FunctionList *real;       /* the real module's list */
static FunctionList ours;        /* what we hand out */
static const char *control_path; /* FAULTY_PKCS11_CONTROL */
static int log_fd = -1;          /* FAULTY_PKCS11_LOG */
static Rule rules[MAX_RULES];
static int nrules;
static unsigned long generation; /* bumped on every (re)load of the control file */
static long loaded_at;           /* monotonic ms of the last (re)load */
static struct stat last_stat;
static int have_stat;
static int latched;
static CK_RV latched_rv;
static uint64_t rng_state;

static long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double rand01(void) { /* xorshift64*, under the lock */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static void log_line(const char *kind, int idx, const char *detail) {
    if (log_fd < 0) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char buf[256];
    int n = snprintf(buf, sizeof buf, "%ld %d %s %s %s\n",
                     (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, (int)getpid(), kind,
                     idx >= 0 ? FN_NAMES[idx] : "-", detail);
    if (n > 0) {
        ssize_t w = write(log_fd, buf, (size_t)(n < (int)sizeof buf ? n : (int)sizeof buf - 1));
        (void)w;
    }
}

static const char *rv_name(CK_RV rv) {
    for (size_t i = 0; i < sizeof RV_NAMES / sizeof RV_NAMES[0]; i++)
        if (RV_NAMES[i].value == rv) return RV_NAMES[i].name;
    return "CKR_?";
}

static int parse_rv(const char *s, CK_RV *out) {
    for (size_t i = 0; i < sizeof RV_NAMES / sizeof RV_NAMES[0]; i++)
        if (strcmp(RV_NAMES[i].name, s) == 0) {
            *out = RV_NAMES[i].value;
            return 1;
        }
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || *end || end == s) return 0;
    *out = v;
    return 1;
}

static int parse_fns(char *s, unsigned char *fns) {
    memset(fns, 0, NFUNCS);
    if (strcmp(s, "*") == 0) {
        memset(fns, 1, NFUNCS);
        fns[IX_C_GetFunctionList] = 0;
        fns[IX_C_Finalize] = 0;
        return 1;
    }
    for (char *tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
        int found = 0;
        for (int i = 0; i < NFUNCS; i++)
            if (strcmp(FN_NAMES[i], tok) == 0) {
                fns[i] = 1;
                found = 1;
            }
        if (!found) return 0;
    }
    return 1;
}

static void complain(int line, const char *what) {
    fprintf(stderr, "faultpkcs11: %s line %d: %s (line ignored)\n", control_path, line, what);
    char d[128];
    snprintf(d, sizeof d, "control-file-line-%d:%s", line, what);
    for (char *c = d; *c; c++)
        if (*c == ' ') *c = '_';
    log_line("error", -1, d);
}

/* Parses one line into *r; returns 1 for a rule, 0 for a blank/comment line, -1 for an error. */
static int parse_line(char *line, Rule *r, int lineno) {
    char *hash = strchr(line, '#');
    if (hash) *hash = 0;
    char *save = NULL;
    char *word = strtok_r(line, " \t\r\n", &save);
    if (!word) return 0;
    memset(r, 0, sizeof *r);
    r->at = 1;
    r->p = 1.0;
    if (strcmp(word, "fail") == 0) r->kind = FAIL;
    else if (strcmp(word, "delay") == 0) r->kind = DELAY;
    else if (strcmp(word, "hang") == 0) r->kind = HANG;
    else if (strcmp(word, "trace") == 0) r->kind = TRACE;
    else if (strcmp(word, "empty") == 0) r->kind = EMPTY;
    else if (strcmp(word, "clock") == 0) {
        r->kind = CLOCK;
        r->fns[IX_C_GetTokenInfo] = 1;
        strcpy(r->value, "15:10:01");
    } else {
        complain(lineno, "unknown rule kind");
        return -1;
    }
    int have_fn = 0, have_rv = 0, have_ms = 0;
    while ((word = strtok_r(NULL, " \t\r\n", &save))) {
        char *eq = strchr(word, '=');
        if (!eq) {
            if (strcmp(word, "latch") == 0) {
                r->latch = 1;
                continue;
            }
            complain(lineno, "expected key=value");
            return -1;
        }
        *eq = 0;
        const char *k = word;
        char *v = eq + 1;
        char *end = NULL;
        if (strcmp(k, "fn") == 0) {
            if (!parse_fns(v, r->fns)) {
                complain(lineno, "unknown function name");
                return -1;
            }
            have_fn = 1;
        } else if (strcmp(k, "rv") == 0) {
            if (!parse_rv(v, &r->rv)) {
                complain(lineno, "unknown return value");
                return -1;
            }
            have_rv = 1;
        } else if (strcmp(k, "p") == 0) {
            r->p = strtod(v, &end);
        } else if (strcmp(k, "value") == 0) {
            if (strlen(v) > 16) {
                complain(lineno, "value longer than 16 bytes");
                return -1;
            }
            strcpy(r->value, v);
        } else if (strcmp(k, "slot") == 0) {
            r->slot = strtoul(v, &end, 10);
            r->has_slot = 1;
        } else {
            long n = strtol(v, &end, 10);
            if (strcmp(k, "at") == 0) r->at = n;
            else if (strcmp(k, "count") == 0) r->count = n;
            else if (strcmp(k, "ms") == 0) r->ms = n, have_ms = 1;
            else if (strcmp(k, "after_ms") == 0) r->after_ms = n;
            else if (strcmp(k, "for_ms") == 0) r->for_ms = n;
            else {
                complain(lineno, "unknown key");
                return -1;
            }
        }
        if (end && *end) {
            complain(lineno, "bad number");
            return -1;
        }
    }
    if (r->kind == CLOCK) have_fn = 1;
    if (r->kind == EMPTY && have_fn) {
        for (int i = 0; i < NFUNCS; i++)
            if (r->fns[i] && i != IX_C_FindObjects) {
                complain(lineno, "empty applies to C_FindObjects only");
                return -1;
            }
    }
    if (!have_fn || (r->kind == FAIL && !have_rv) || (r->kind == DELAY && !have_ms)) {
        complain(lineno, "missing fn=, rv= or ms=");
        return -1;
    }
    return 1;
}

/* Re-reads the control file if it changed. Called with the lock held. */
static void reload_if_changed(void) {
    if (!control_path) return;
    struct stat st;
    int exists = stat(control_path, &st) == 0;
    if (exists == have_stat &&
        (!exists || (st.st_ino == last_stat.st_ino && st.st_size == last_stat.st_size &&
                     st.st_mtim.tv_sec == last_stat.st_mtim.tv_sec &&
                     st.st_mtim.tv_nsec == last_stat.st_mtim.tv_nsec &&
                     st.st_ctim.tv_nsec == last_stat.st_ctim.tv_nsec)))
        return;
    have_stat = exists;
    if (exists) last_stat = st;
    nrules = 0;
    generation++;
    loaded_at = mono_ms();
    if (!exists) return;
    FILE *f = fopen(control_path, "r");
    if (!f) return;
    char line[1024];
    int lineno = 0;
    while (fgets(line, sizeof line, f) && nrules < MAX_RULES) {
        lineno++;
        if (parse_line(line, &rules[nrules], lineno) == 1) nrules++;
    }
    fclose(f);
}

/* Whether function idx takes a slot id as its first argument. */
static int takes_slot(int idx) {
    return idx == IX_C_GetSlotInfo || idx == IX_C_GetTokenInfo || idx == IX_C_GetMechanismList ||
           idx == IX_C_GetMechanismInfo || idx == IX_C_InitToken || idx == IX_C_OpenSession ||
           idx == IX_C_CloseAllSessions || idx == IX_C_WaitForSlotEvent;
}

/* Decides what to do with a call of function idx (first argument `first`). Returns 1 (and
 * *out) to fail it; otherwise applies any delay or hang and returns 0 to forward it, with
 * *clock set to the text a clock rule wants in the answer's utcTime (or left empty) and
 * *empty set if an empty rule wants the answer to report no objects. */
static int decide(int idx, CK_ULONG first, CK_RV *out, char *clock, int *empty) {
    long delay = 0, hang_ms = -1;
    unsigned long hang_gen = 0;
    int fail = 0;
    pthread_mutex_lock(&lock);
    reload_if_changed();
    if (latched && idx != IX_C_Finalize && idx != IX_C_Initialize) {
        *out = latched_rv;
        log_line("latched", idx, rv_name(latched_rv));
        pthread_mutex_unlock(&lock);
        return 1;
    }
    long now = mono_ms();
    for (int i = 0; i < nrules && !fail; i++) {
        Rule *r = &rules[i];
        if (!r->fns[idx]) continue;
        if (r->has_slot && (!takes_slot(idx) || first != r->slot)) continue;
        if (r->kind == TRACE) {
            log_line("trace", idx, "call");
            continue;
        }
        if (now < loaded_at + r->after_ms) continue;
        if (r->for_ms > 0 && now >= loaded_at + r->after_ms + r->for_ms) continue;
        r->seen++;
        if (r->seen < r->at) continue;
        if (r->count > 0 && r->fired >= r->count) continue;
        if (r->p < 1.0 && rand01() >= r->p) continue;
        r->fired++;
        char d[64];
        switch (r->kind) {
        case FAIL:
            *out = r->rv;
            fail = 1;
            if (r->latch) {
                latched = 1;
                latched_rv = r->rv;
            }
            log_line("fail", idx, rv_name(r->rv));
            break;
        case DELAY:
            delay += r->ms;
            snprintf(d, sizeof d, "%ldms", r->ms);
            log_line("delay", idx, d);
            break;
        case HANG:
            hang_ms = r->ms;
            hang_gen = generation;
            snprintf(d, sizeof d, "%ldms", r->ms);
            log_line("hang", idx, r->ms ? d : "until-the-control-file-changes");
            break;
        case CLOCK:
            strcpy(clock, r->value);
            log_line("clock", idx, r->value);
            break;
        case EMPTY:
            *empty = 1;
            log_line("empty", idx, "0-objects");
            break;
        case TRACE:
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (fail) return 1;
    if (delay > 0) {
        struct timespec ts = {delay / 1000, (delay % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
        }
    }
    if (hang_ms >= 0) {
        long start = mono_ms();
        for (;;) {
            struct timespec ts = {0, 10 * 1000000L};
            nanosleep(&ts, NULL);
            pthread_mutex_lock(&lock);
            reload_if_changed();
            int changed = generation != hang_gen;
            pthread_mutex_unlock(&lock);
            if (changed || (hang_ms > 0 && mono_ms() - start >= hang_ms)) break;
        }
    }
    return 0;
}

/* The first argument of a call as a number (a slot id for the functions takes_slot names). */
#define FIRST_ARG(a, ...) ((CK_ULONG)(uintptr_t)(a))

/* Rewrites a C_GetTokenInfo answer for a clock rule. */
static void set_clock(int idx, CK_RV rv, PTR info, const char *clock) {
    if (idx != IX_C_GetTokenInfo || rv != CKR_OK || !info || !clock[0]) return;
    TokenInfo *t = info;
    t->flags |= CKF_CLOCK_ON_TOKEN;
    memset(t->utcTime, ' ', sizeof t->utcTime);
    memcpy(t->utcTime, clock, strlen(clock));
}

/* Rewrites a C_FindObjects answer for an empty rule: no objects found. */
static void set_empty(int idx, CK_RV rv, PTR count, int empty) {
    if (idx != IX_C_FindObjects || rv != CKR_OK || !count || !empty) return;
    *(CK_ULONG *)count = 0;
}

/* The fourth argument, as a pointer (C_FindObjects' count of objects found). */
#define FOURTH_PTR(a, b, c, d, ...) ((PTR)(uintptr_t)(d))
#define FOURTH_ARG_OR_NULL(...) FOURTH_PTR(__VA_ARGS__, 0, 0, 0, 0)

/* The second argument, as a pointer (C_GetTokenInfo's answer). */
#define SECOND_PTR(a, b, ...) ((PTR)(uintptr_t)(b))
#define SECOND_ARG_OR_NULL(...) SECOND_PTR(__VA_ARGS__, 0, 0)

/* The wrappers. C_Initialize clears a latch when it succeeds; C_GetFunctionList is ours. */
#define WRAPPER(name, params, args)                                                                \
    __attribute__((unused)) static CK_RV w_##name params {                                         \
        CK_RV rv;                                                                                  \
        char clock[17] = "";                                                                       \
        int empty = 0;                                                                             \
        if (decide(IX_##name, FIRST_ARG args, &rv, clock, &empty)) return rv;                      \
        if (!real->name) return 0x54; /* CKR_FUNCTION_NOT_SUPPORTED */                             \
        rv = real->name args;                                                                      \
        set_clock(IX_##name, rv, SECOND_ARG_OR_NULL args, clock);                                  \
        set_empty(IX_##name, rv, FOURTH_ARG_OR_NULL args, empty);                                  \
        if (IX_##name == IX_C_Initialize &&                                                        \
            (rv == CKR_OK || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)) {                            \
            pthread_mutex_lock(&lock);                                                             \
            latched = 0;                                                                           \
            pthread_mutex_unlock(&lock);                                                           \
        }                                                                                          \
        return rv;                                                                                 \
    }
PKCS11_FUNCTIONS(WRAPPER)

CK_RV C_GetFunctionList(FunctionList **list);

static CK_RV load(void) {
    const char *path = getenv("FAULTY_PKCS11_MODULE");
    if (!path || !*path) {
        fprintf(stderr, "faultpkcs11: FAULTY_PKCS11_MODULE (the real module) is not set\n");
        return 0x05;
    }
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "faultpkcs11: cannot load %s: %s\n", path, dlerror());
        return 0x05;
    }
    CK_RV (*get)(FunctionList **) = (CK_RV(*)(FunctionList **))dlsym(lib, "C_GetFunctionList");
    if (!get) {
        fprintf(stderr, "faultpkcs11: %s has no C_GetFunctionList\n", path);
        return 0x05;
    }
    CK_RV rv = get(&real);
    if (rv != CKR_OK) return rv;
    const char *c = getenv("FAULTY_PKCS11_CONTROL");
    control_path = (c && *c) ? strdup(c) : NULL;
    const char *l = getenv("FAULTY_PKCS11_LOG");
    if (l && *l) log_fd = open(l, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    rng_state = ((uint64_t)getpid() << 32) ^ (uint64_t)mono_ms() ^ 0x9E3779B97F4A7C15ULL;
    ours.version.major = 2;
    ours.version.minor = 40;
#define ASSIGN(name, params, args) ours.name = w_##name;
    PKCS11_FUNCTIONS(ASSIGN)
    ours.C_GetFunctionList = (CK_RV(*)(PTR))C_GetFunctionList;
    return CKR_OK;
}

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_RV load_rv;
static void load_once_fn(void) { load_rv = load(); }

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(FunctionList **list) {
    pthread_once(&load_once, load_once_fn);
    if (load_rv != CKR_OK) return load_rv;
    if (!list) return 0x07; /* CKR_ARGUMENTS_BAD */
    *list = &ours;
    return CKR_OK;
}
