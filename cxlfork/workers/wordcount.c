/* wordcount: a C worker for the cxlfork porter (newline-delimited JSON on stdin/stdout).
 *
 *   {"init": {...}}               -> {"ready":true}
 *   {"id": N, "input": "text"}    -> {"id":N,"output":{"bytes":B,"words":W,"lines":L,
 *                                     "fnv1a":"<16 hex>"}}
 *   anything else                 -> {"id":N,"error":"..."}
 *
 * The input string's JSON escapes are decoded (\uXXXX counts as one byte '?'); the counts
 * and the FNV-1a hash are over the decoded bytes. Single-threaded, no sockets: cxlfork can
 * checkpoint it while it waits in read().
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *skip_ws(const char *p) { while (*p && isspace((unsigned char)*p)) p++; return p; }

/* Value start of top-level-ish key "key" (first occurrence as a key), or NULL. */
static const char *find_key(const char *line, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = line;
    while ((p = strstr(p, pat)) != NULL) {
        const char *q = skip_ws(p + strlen(pat));
        if (*q == ':') return skip_ws(q + 1);
        p++;
    }
    return NULL;
}

int main(void) {
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int inited = 0;
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    while ((n = getline(&line, &cap, stdin)) > 0) {
        if (!inited) {
            if (!find_key(line, "init")) {
                printf("{\"error\":\"the first line must be {\\\"init\\\": {...}}\"}\n");
                fflush(stdout);
                return 1;
            }
            inited = 1;
            printf("{\"ready\":true}\n");
            fflush(stdout);
            continue;
        }
        const char *idp = find_key(line, "id");
        if (!idp || !(isdigit((unsigned char)*idp) || *idp == '-')) {
            printf("{\"id\":null,\"error\":\"request line is not {\\\"id\\\": N, \\\"input\\\": ...}\"}\n");
            fflush(stdout);
            continue;
        }
        long long id = strtoll(idp, NULL, 10);
        const char *s = find_key(line, "input");
        if (!s || *s != '"') {
            printf("{\"id\":%lld,\"error\":\"input must be a string\"}\n", id);
            fflush(stdout);
            continue;
        }
        unsigned long long h = 1469598103934665603ULL, bytes = 0, words = 0, lines = 0;
        int inword = 0, ok = 0;
        for (s++; *s; s++) {
            unsigned char c = (unsigned char)*s;
            if (c == '"') { ok = 1; break; }
            if (c == '\\') {
                s++;
                switch (*s) {
                case 'n': c = '\n'; break; case 't': c = '\t'; break; case 'r': c = '\r'; break;
                case 'b': c = '\b'; break; case 'f': c = '\f'; break;
                case 'u': c = '?'; for (int k = 0; k < 4 && s[1]; k++) s++; break;
                case '\0': s--; continue;
                default: c = (unsigned char)*s;
                }
            }
            bytes++;
            h = (h ^ c) * 1099511628211ULL;
            if (c == '\n') lines++;
            if (isspace(c)) inword = 0;
            else if (!inword) { inword = 1; words++; }
        }
        if (!ok)
            printf("{\"id\":%lld,\"error\":\"unterminated input string\"}\n", id);
        else
            printf("{\"id\":%lld,\"output\":{\"bytes\":%llu,\"words\":%llu,\"lines\":%llu,"
                   "\"fnv1a\":\"%016llx\"}}\n", id, bytes, words, lines, h);
        fflush(stdout);
    }
    free(line);
    return 0;
}
