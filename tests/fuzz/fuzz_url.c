/* Fuzz target: the broker URL parser (src/broker.c, hub_broker_url_valid),
 * which the conf loader runs on the `broker` key: "memory", or redis://
 * URLs with credentials (%-escapes), IPv6 hosts, ports, databases and
 * options, several separated by spaces or commas. Checks that a refusal
 * always says why, and that the answer does not depend on the error
 * buffer (a short one truncates the message, nothing more). */
#include <string.h>

#include "fuzz.h"
#include "luahub/broker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *url = malloc(size + 1);
    char err[256], err2[256];

    memcpy(url, data, size);
    url[size] = '\0';
    err[0] = '\0';
    int rc = hub_broker_url_valid(url, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == -1, "hub_broker_url_valid returned %d", rc);
    if (rc < 0)
        FUZZ_CHECK(err[0] && memchr(err, '\0', sizeof(err)), "refused without a message");
    FUZZ_CHECK(hub_broker_url_valid(url, err2, 8) == rc, "answer depends on errlen");
    if (rc < 0)
        FUZZ_CHECK(strlen(err2) <= 7 && !strncmp(err, err2, strlen(err2)),
                   "short message '%s' is not the start of '%s'", err2, err);
    FUZZ_CHECK(hub_broker_url_valid(url, NULL, 0) == rc, "answer depends on err");
    free(url);
    return 0;
}
