/* Helpers shared by the fuzz targets (fuzz.h). */
#include "fuzz.h"

#include <fcntl.h>
#include <ftw.h>
#include <string.h>
#include <unistd.h>

int fuzz_utf8_valid(const void *s, size_t n)
{
    const unsigned char *p = s;
    size_t i = 0;

    while (i < n) {
        unsigned c = p[i];
        unsigned lo = 0x80, hi = 0xBF;
        size_t more;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF)
            more = 1;
        else if (c >= 0xE0 && c <= 0xEF)
            more = 2;
        else if (c >= 0xF0 && c <= 0xF4)
            more = 3;
        else
            return 0;
        if (c == 0xE0)
            lo = 0xA0;          /* overlong */
        else if (c == 0xED)
            hi = 0x9F;          /* surrogates */
        else if (c == 0xF0)
            lo = 0x90;          /* overlong */
        else if (c == 0xF4)
            hi = 0x8F;          /* past U+10FFFF */
        if (n - i - 1 < more)
            return 0;
        if (p[i + 1] < lo || p[i + 1] > hi)
            return 0;
        for (size_t k = 2; k <= more; k++)
            if (p[i + k] < 0x80 || p[i + k] > 0xBF)
                return 0;
        i += more + 1;
    }
    return 1;
}

int fuzz_skip(const char *check)
{
    const char *list = getenv("FUZZ_SKIP");
    size_t n = strlen(check);

    while (list && *list) {
        const char *end = strchr(list, ',');
        size_t len = end ? (size_t)(end - list) : strlen(list);
        if (len == n && !memcmp(list, check, n))
            return 1;
        list = end ? end + 1 : NULL;
    }
    return 0;
}

static char tmpdir[4096];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void rm_tmpdir(void)
{
    if (tmpdir[0])
        nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *fuzz_tmpdir(void)
{
    if (tmpdir[0])
        return tmpdir;
    /* tmpfs when there is one: rewriting a file per input on a disk file
     * system waits for the disk (ext4 flushes a truncated file on close). */
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(tmpdir, sizeof(tmpdir), "%s/luahub-fuzz.XXXXXX", base);
    FUZZ_CHECK(mkdtemp(tmpdir) != NULL, "mkdtemp %s failed", tmpdir);
    atexit(rm_tmpdir);
    return tmpdir;
}

void fuzz_write_file(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FUZZ_CHECK(fd >= 0, "cannot create %s", path);
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        FUZZ_CHECK(w > 0, "cannot write %s", path);
        c += w;
        n -= (size_t)w;
    }
    close(fd);
}
