/* Measures whether a PKCS#11 token enforces CKA_UNWRAP_TEMPLATE (the step keybroker's
 * BackupKey/RestoreKey depends on: a domain key that unwraps backups must force the template of
 * what it unwraps, or anyone with the user PIN could restore a KEK as extractable, or with
 * wrap + decrypt, and extract it). Run by unwrap-template.sh; prints one line per case.
 *
 * Build: cc -I/usr/include/p11-kit-1 unwrap-template.c -ldl
 * Usage: unwrap-template MODULE TOKEN_LABEL PIN
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST *f;
static CK_BBOOL T = CK_TRUE, F = CK_FALSE;
static CK_OBJECT_CLASS SECRET = CKO_SECRET_KEY;
static CK_KEY_TYPE AES = CKK_AES;
static CK_ULONG LEN32 = 32;
/* RFC 5649: SoftHSM2 names it CKM_AES_KEY_WRAP_PAD (0x210A), Kryoptic CKM_AES_KEY_WRAP_KWP
 * (0x210B); the first that wraps is used. */
static CK_MECHANISM_TYPE kwp_mech = CKM_AES_KEY_WRAP_PAD;

#define A(t, v) {t, &v, sizeof(v)}

static void die(const char *what, CK_RV rv) {
    fprintf(stderr, "%s: 0x%lx\n", what, rv);
    exit(1);
}

/* The template the domain key forces on what it unwraps: a KEK as keybroker makes it for
 * backup (sensitive, extractable only under a trusted key, encrypt/decrypt only, fixed). */
static CK_ATTRIBUTE forced[] = {
    A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, T), A(CKA_WRAP_WITH_TRUSTED, T),
    A(CKA_ENCRYPT, T),   A(CKA_DECRYPT, T),     A(CKA_WRAP, F),
    A(CKA_UNWRAP, F),    A(CKA_DERIVE, F),      A(CKA_SIGN, F),
    A(CKA_VERIFY, F),    A(CKA_COPYABLE, F),
};
#define NFORCED (sizeof(forced) / sizeof(forced[0]))

static void show(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h) {
    CK_BBOOL v[7];
    CK_ATTRIBUTE q[] = {
        {CKA_EXTRACTABLE, &v[0], 1}, {CKA_WRAP_WITH_TRUSTED, &v[1], 1}, {CKA_WRAP, &v[2], 1},
        {CKA_DECRYPT, &v[3], 1},     {CKA_SENSITIVE, &v[4], 1},         {CKA_MODIFIABLE, &v[5], 1},
        {CKA_COPYABLE, &v[6], 1},
    };
    CK_RV rv = f->C_GetAttributeValue(s, h, q, 7);
    if (rv != CKR_OK) {
        printf("    (read back: 0x%lx)\n", rv);
        return;
    }
    printf("    got: extractable=%d wrap_with_trusted=%d wrap=%d decrypt=%d sensitive=%d "
           "modifiable=%d copyable=%d\n",
           v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
}

static void attempt(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE dom, CK_BYTE *blob, CK_ULONG n,
                    const char *what, CK_ATTRIBUTE *t, CK_ULONG tn) {
    CK_MECHANISM m = {kwp_mech, NULL, 0};
    CK_OBJECT_HANDLE h = 0;
    CK_RV rv = f->C_UnwrapKey(s, &m, dom, blob, n, t, tn, &h);
    printf("%-58s %s (0x%lx)\n", what, rv == CKR_OK ? "UNWRAPPED" : "refused", rv);
    if (rv == CKR_OK) {
        show(s, h);
        f->C_DestroyObject(s, h);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODULE TOKEN_LABEL PIN\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) die(dlerror(), 0);
    CK_RV (*gfl)(CK_FUNCTION_LIST **) = (CK_RV(*)(CK_FUNCTION_LIST **))dlsym(lib, "C_GetFunctionList");
    CK_RV rv = gfl(&f);
    if (rv) die("C_GetFunctionList", rv);
    if ((rv = f->C_Initialize(NULL))) die("C_Initialize", rv);
    CK_SLOT_ID slots[64];
    CK_ULONG ns = 64;
    if ((rv = f->C_GetSlotList(CK_TRUE, slots, &ns))) die("C_GetSlotList", rv);
    CK_SLOT_ID slot = (CK_SLOT_ID)-1;
    for (CK_ULONG i = 0; i < ns; i++) {
        CK_TOKEN_INFO ti;
        if (f->C_GetTokenInfo(slots[i], &ti) == CKR_OK) {
            char label[33];
            memcpy(label, ti.label, 32);
            label[32] = 0;
            for (int j = 31; j >= 0 && label[j] == ' '; j--) label[j] = 0;
            if (strcmp(label, argv[2]) == 0) slot = slots[i];
        }
    }
    if (slot == (CK_SLOT_ID)-1) die("no token with that label", 0);
    CK_SESSION_HANDLE s;
    if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s)))
        die("C_OpenSession", rv);
    if ((rv = f->C_Login(s, CKU_USER, (CK_BYTE *)argv[3], strlen(argv[3])))) die("C_Login", rv);

    /* The domain key: wrap/unwrap only, with the forced template. (Not CKA_TRUSTED: only the SO
     * can set that, and the unwrap side does not depend on it.) */
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ATTRIBUTE dt[] = {
        A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
        A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, F), A(CKA_WRAP, T), A(CKA_UNWRAP, T),
        A(CKA_ENCRYPT, F), A(CKA_DECRYPT, F),
        {CKA_UNWRAP_TEMPLATE, forced, sizeof(forced)},
    };
    CK_OBJECT_HANDLE dom;
    rv = f->C_GenerateKey(s, &gen, dt, sizeof(dt) / sizeof(dt[0]), &dom);
    printf("%-58s %s (0x%lx)\n", "create a domain key with CKA_UNWRAP_TEMPLATE",
           rv == CKR_OK ? "ok" : "FAILED", rv);
    if (rv) return 1;

    /* A key to back up: extractable (no WRAP_WITH_TRUSTED here: the wrapping key is not
     * trusted in this probe). */
    CK_ATTRIBUTE kt[] = {
        A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
        A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, T), A(CKA_ENCRYPT, T), A(CKA_DECRYPT, T),
    };
    CK_OBJECT_HANDLE k;
    if ((rv = f->C_GenerateKey(s, &gen, kt, sizeof(kt) / sizeof(kt[0]), &k))) die("generate K", rv);
    CK_MECHANISM kwp = {kwp_mech, NULL, 0};
    CK_BYTE blob[256];
    CK_ULONG n = sizeof(blob);
    if (f->C_WrapKey(s, &kwp, dom, k, blob, &n) != CKR_OK) {
        kwp_mech = kwp.mechanism = 0x210BUL;
        n = sizeof(blob);
        if ((rv = f->C_WrapKey(s, &kwp, dom, k, blob, &n))) die("C_WrapKey", rv);
    }

    CK_ATTRIBUTE exact[2 + NFORCED + 1];
    CK_ULONG en = 0;
    exact[en++] = (CK_ATTRIBUTE)A(CKA_CLASS, SECRET);
    exact[en++] = (CK_ATTRIBUTE)A(CKA_KEY_TYPE, AES);
    exact[en++] = (CK_ATTRIBUTE)A(CKA_TOKEN, F);
    for (CK_ULONG i = 0; i < NFORCED; i++) exact[en++] = forced[i];
    attempt(s, dom, blob, n, "1 template = the forced one", exact, en);

    CK_ATTRIBUTE with_mod[2 + NFORCED + 2];
    memcpy(with_mod, exact, en * sizeof(CK_ATTRIBUTE));
    with_mod[en] = (CK_ATTRIBUTE)A(CKA_MODIFIABLE, F);
    attempt(s, dom, blob, n, "2 the forced one + CKA_MODIFIABLE=false", with_mod, en + 1);

    CK_ATTRIBUTE bare[] = {A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_TOKEN, F)};
    attempt(s, dom, blob, n, "3 class and key type only (forced attributes omitted)", bare, 3);

    CK_ATTRIBUTE loose[] = {A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_TOKEN, F),
                            A(CKA_EXTRACTABLE, T), A(CKA_WRAP_WITH_TRUSTED, F)};
    attempt(s, dom, blob, n, "4 extractable without CKA_WRAP_WITH_TRUSTED", loose, 5);

    CK_ATTRIBUTE clulow[] = {A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_TOKEN, F),
                             A(CKA_WRAP, T), A(CKA_DECRYPT, T)};
    attempt(s, dom, blob, n, "5 wrap + decrypt (Clulow), rest omitted", clulow, 5);

    CK_ATTRIBUTE insens[] = {A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_TOKEN, F),
                             A(CKA_SENSITIVE, F)};
    attempt(s, dom, blob, n, "6 not sensitive, rest omitted", insens, 4);

    /* 7-9: a forced CKA_ALLOWED_MECHANISMS (so a copy restored under the wrong role could not
     * use ECB on another role's key material). */
    CK_MECHANISM_TYPE gcm_only[] = {CKM_AES_GCM};
    CK_MECHANISM_TYPE ecb_only[] = {CKM_AES_ECB};
    CK_ATTRIBUTE forced_m[NFORCED + 1];
    memcpy(forced_m, forced, sizeof(forced));
    forced_m[NFORCED] = (CK_ATTRIBUTE){CKA_ALLOWED_MECHANISMS, gcm_only, sizeof(gcm_only)};
    CK_ATTRIBUTE dtm[] = {
        A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
        A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, F), A(CKA_WRAP, T), A(CKA_UNWRAP, T),
        A(CKA_ENCRYPT, F), A(CKA_DECRYPT, F),
        {CKA_UNWRAP_TEMPLATE, forced_m, sizeof(forced_m)},
    };
    CK_OBJECT_HANDLE domm;
    rv = f->C_GenerateKey(s, &gen, dtm, sizeof(dtm) / sizeof(dtm[0]), &domm);
    printf("%-58s %s (0x%lx)\n", "create a domain key forcing CKA_ALLOWED_MECHANISMS",
           rv == CKR_OK ? "ok" : "FAILED", rv);
    if (rv == CKR_OK) {
        n = sizeof(blob);
        if ((rv = f->C_WrapKey(s, &kwp, domm, k, blob, &n))) die("C_WrapKey (7)", rv);
        CK_ATTRIBUTE em[2 + NFORCED + 2];
        memcpy(em, exact, en * sizeof(CK_ATTRIBUTE));
        em[en] = (CK_ATTRIBUTE){CKA_ALLOWED_MECHANISMS, gcm_only, sizeof(gcm_only)};
        attempt(s, domm, blob, n, "7 forced one incl. allowed mechanisms = [GCM]", em, en + 1);
        em[en] = (CK_ATTRIBUTE){CKA_ALLOWED_MECHANISMS, ecb_only, sizeof(ecb_only)};
        attempt(s, domm, blob, n, "8 same but allowed mechanisms = [ECB]", em, en + 1);
        attempt(s, domm, blob, n, "9 allowed mechanisms omitted", exact, en);
    }

    /* 10-11: CKA_WRAP_TEMPLATE (a domain key that only wraps keys of its own role). */
    CK_ATTRIBUTE wrap_req[] = {A(CKA_DECRYPT, T), A(CKA_WRAP, F)};
    CK_ATTRIBUTE dtw[] = {
        A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
        A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, F), A(CKA_WRAP, T), A(CKA_UNWRAP, T),
        A(CKA_ENCRYPT, F), A(CKA_DECRYPT, F),
        {CKA_WRAP_TEMPLATE, wrap_req, sizeof(wrap_req)},
    };
    CK_OBJECT_HANDLE domw;
    rv = f->C_GenerateKey(s, &gen, dtw, sizeof(dtw) / sizeof(dtw[0]), &domw);
    printf("%-58s %s (0x%lx)\n", "create a domain key with CKA_WRAP_TEMPLATE {decrypt, !wrap}",
           rv == CKR_OK ? "ok" : "FAILED", rv);
    if (rv == CKR_OK) {
        n = sizeof(blob);
        rv = f->C_WrapKey(s, &kwp, domw, k, blob, &n);
        printf("%-58s %s (0x%lx)\n", "10 wrap a key that matches (decrypt, not wrap)",
               rv == CKR_OK ? "WRAPPED" : "refused", rv);
        CK_ATTRIBUTE k2t[] = {
            A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
            A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, T), A(CKA_WRAP, T), A(CKA_UNWRAP, T),
            A(CKA_ENCRYPT, F), A(CKA_DECRYPT, F),
        };
        CK_OBJECT_HANDLE k2;
        if ((rv = f->C_GenerateKey(s, &gen, k2t, sizeof(k2t) / sizeof(k2t[0]), &k2)))
            die("generate K2", rv);
        n = sizeof(blob);
        rv = f->C_WrapKey(s, &kwp, domw, k2, blob, &n);
        printf("%-58s %s (0x%lx)\n", "11 wrap a key of another role (wrap, not decrypt)",
               rv == CKR_OK ? "WRAPPED" : "refused", rv);
    }

    /* 12-15: forcing CKA_MODIFIABLE=false and CKA_DESTROYABLE=true too (else a copy could be
     * unwrapped modifiable and given more roles afterwards, or indestructible). */
    CK_ATTRIBUTE forced_f[NFORCED + 3];
    memcpy(forced_f, forced, sizeof(forced));
    forced_f[NFORCED] = (CK_ATTRIBUTE){CKA_ALLOWED_MECHANISMS, gcm_only, sizeof(gcm_only)};
    forced_f[NFORCED + 1] = (CK_ATTRIBUTE)A(CKA_DESTROYABLE, T);
    forced_f[NFORCED + 2] = (CK_ATTRIBUTE)A(CKA_MODIFIABLE, F);
    CK_ATTRIBUTE dtf[] = {
        A(CKA_CLASS, SECRET), A(CKA_KEY_TYPE, AES), A(CKA_VALUE_LEN, LEN32), A(CKA_TOKEN, F),
        A(CKA_SENSITIVE, T), A(CKA_EXTRACTABLE, F), A(CKA_WRAP, T), A(CKA_UNWRAP, T),
        A(CKA_ENCRYPT, F), A(CKA_DECRYPT, F),
        {CKA_UNWRAP_TEMPLATE, forced_f, sizeof(forced_f)},
    };
    CK_OBJECT_HANDLE domf;
    rv = f->C_GenerateKey(s, &gen, dtf, sizeof(dtf) / sizeof(dtf[0]), &domf);
    printf("%-58s %s (0x%lx)\n", "create a domain key also forcing modifiable=F destroyable=T",
           rv == CKR_OK ? "ok" : "FAILED", rv);
    if (rv == CKR_OK) {
        n = sizeof(blob);
        if ((rv = f->C_WrapKey(s, &kwp, domf, k, blob, &n))) die("C_WrapKey (12)", rv);
        CK_ATTRIBUTE ef[3 + NFORCED + 3];
        CK_ULONG efn = 0;
        ef[efn++] = (CK_ATTRIBUTE)A(CKA_CLASS, SECRET);
        ef[efn++] = (CK_ATTRIBUTE)A(CKA_KEY_TYPE, AES);
        ef[efn++] = (CK_ATTRIBUTE)A(CKA_TOKEN, F);
        for (CK_ULONG i = 0; i < NFORCED + 3; i++) ef[efn++] = forced_f[i];
        attempt(s, domf, blob, n, "12 the forced one, modifiable=F last", ef, efn);
        ef[efn - 1] = (CK_ATTRIBUTE)A(CKA_MODIFIABLE, T);
        attempt(s, domf, blob, n, "13 same but modifiable=T", ef, efn);
        ef[efn - 1] = (CK_ATTRIBUTE)A(CKA_MODIFIABLE, F);
        ef[efn - 2] = (CK_ATTRIBUTE)A(CKA_DESTROYABLE, F);
        attempt(s, domf, blob, n, "14 same but destroyable=F", ef, efn);
        attempt(s, domf, blob, n, "15 modifiable and destroyable omitted", ef, efn - 2);
        /* 16: a copy unwrapped as forced cannot be given wrap afterwards. */
        ef[efn - 2] = (CK_ATTRIBUTE)A(CKA_DESTROYABLE, T);
        CK_OBJECT_HANDLE h = 0;
        CK_MECHANISM m = {kwp_mech, NULL, 0};
        rv = f->C_UnwrapKey(s, &m, domf, blob, n, ef, efn, &h);
        if (rv == CKR_OK) {
            CK_ATTRIBUTE add[] = {A(CKA_WRAP, T)};
            rv = f->C_SetAttributeValue(s, h, add, 1);
            printf("%-58s %s (0x%lx)\n", "16 then C_SetAttributeValue(CKA_WRAP=T)",
                   rv == CKR_OK ? "CHANGED" : "refused", rv);
            f->C_DestroyObject(s, h);
        }
    }

    CK_ATTRIBUTE q = {CKA_UNWRAP_TEMPLATE, NULL, 0};
    rv = f->C_GetAttributeValue(s, dom, &q, 1);
    printf("%-58s 0x%lx, %lu bytes (%lu attributes)\n", "read back the domain key's template", rv,
           q.ulValueLen, q.ulValueLen / sizeof(CK_ATTRIBUTE));
    f->C_Logout(s);
    f->C_CloseSession(s);
    f->C_Finalize(NULL);
    return 0;
}
