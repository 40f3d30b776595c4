/* Lookups over a loaded conf (include/luahub/config.h): pure, no Lua, so
 * the hub core uses them without the loader. */
#include <string.h>

#include "luahub/config.h"

const struct hub_channel_opts *hub_config_channel(const struct hub_config *c,
                                                  const char *name, size_t len)
{
    const struct hub_channel_opts *best = NULL;
    for (size_t i = 0; i < c->nchannels; i++) {
        const struct hub_channel_opts *o = &c->channels[i];
        if (!o->prefix) {
            if (o->len == len && !memcmp(o->pattern, name, len))
                return o;               /* exact beats any prefix */
            continue;
        }
        if (o->len <= len && !memcmp(o->pattern, name, o->len) && (!best || o->len > best->len))
            best = o;
    }
    return best;
}
