/* History and presence with the redis broker (issue 11): not built yet.
 * Every call fails as unavailable; presence changes are dropped. */
#include "broker_redis.h"

int hub_rbroker_stream_publish(struct rbroker *b, const char *channel, size_t len,
                               struct hub_msg *m, const struct hub_channel_opts *o,
                               hub_broker_publish_cb cb, void *ud)
{
    (void)b, (void)channel, (void)len, (void)m, (void)o, (void)cb, (void)ud;
    return HUB_EUNAVAILABLE;
}

int hub_rbroker_history(struct hub_broker *hb, const char *channel, size_t len,
                        const struct hub_channel_opts *o, const struct hub_history_query *q,
                        hub_broker_history_cb cb, void *ud)
{
    (void)hb, (void)channel, (void)len, (void)o, (void)q, (void)cb, (void)ud;
    return HUB_EUNAVAILABLE;
}

void hub_rbroker_presence_add(struct hub_broker *hb, const char *channel, size_t len,
                              const struct hub_channel_opts *o, const char *client,
                              const char *user, size_t user_len, const char *entry,
                              size_t entry_len)
{
    (void)hb, (void)channel, (void)len, (void)o, (void)client, (void)user, (void)user_len;
    (void)entry, (void)entry_len;
}

void hub_rbroker_presence_remove(struct hub_broker *hb, const char *channel, size_t len,
                                 const struct hub_channel_opts *o, const char *client)
{
    (void)hb, (void)channel, (void)len, (void)o, (void)client;
}

int hub_rbroker_presence(struct hub_broker *hb, const char *channel, size_t len,
                         const struct hub_channel_opts *o, uint32_t max,
                         hub_broker_presence_cb cb, void *ud)
{
    (void)hb, (void)channel, (void)len, (void)o, (void)max, (void)cb, (void)ud;
    return HUB_EUNAVAILABLE;
}
