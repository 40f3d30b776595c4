/* Levelled logs on stderr: "2026-11-28T00:40:01.123Z INFO message". */
#include "luahub/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static int log_level = HUB_LOG_INFO;
static char log_tag[40];
static const char *const names[] = {"error", "warn", "info", "debug"};
static const char *const tags[] = {"ERROR", "WARN", "INFO", "DEBUG"};
static hub_log_sink_fn sink;
static void *sink_ud;

void hub_log_set_sink(hub_log_sink_fn fn, void *ud)
{
    sink = fn;
    sink_ud = ud;
}

void hub_log_set_tag(const char *tag)
{
    if (tag)
        snprintf(log_tag, sizeof(log_tag), "[%s] ", tag);
    else
        log_tag[0] = '\0';
}

void hub_log_set_level(int level)
{
    log_level = level;
}

int hub_log_get_level(void)
{
    return log_level;
}

int hub_log_level_parse(const char *name)
{
    for (int i = 0; i < (int)(sizeof(names) / sizeof(names[0])); i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

const char *hub_log_level_name(int level)
{
    if (level < 0 || level > HUB_LOG_DEBUG)
        return "?";
    return names[level];
}

void hub_log(int level, const char *fmt, ...)
{
    if (level & HUB_LOG_ALWAYS)
        level &= ~HUB_LOG_ALWAYS;
    else if (level > log_level)
        return;
    if (level < 0)
        level = 0;
    if (level > HUB_LOG_DEBUG)
        level = HUB_LOG_DEBUG;

    char line[2048];
    if (sink) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        if (m >= 0)
            sink(sink_ud, level, line, (size_t)m < sizeof(line) ? (size_t)m : sizeof(line) - 1);
        return;
    }
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03dZ %s %s",
                          (int)(tv.tv_usec / 1000), tags[level], log_tag);

    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += (size_t)m;
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    /* One write per line so lines of concurrent workers do not interleave. */
    fwrite(line, 1, n, stderr);
    fflush(stderr);
}
