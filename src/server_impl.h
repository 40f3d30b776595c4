/* Private to the server (server.c: the wiring of the process; server_ws.c:
 * the lws glue). Not a public contract. Loop thread only. */
#ifndef LUAHUB_SERVER_IMPL_H
#define LUAHUB_SERVER_IMPL_H

#include <stddef.h>

#include "luahub/server.h"

/* Per-session data: lws allocates one per connection. lws sees WebSocket
 * connections only: plain HTTP is served by http.c. */
union pss {
    struct hub_session s;
};

/* The HTTP side's upgrade route (struct hub_http_routes): a complete
 * WebSocket upgrade request, checked, decided by on_connect and handed to
 * lws, or refused. `ud` is the server; `c` and `r` are borrowed. */
void hub_server_upgrade(void *ud, struct hub_http_conn *c, const struct hub_request *r);

/* The lws protocol callback of the "luahub" protocol: lws events into
 * session and writer calls. */
int hub_server_lws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                            void *in, size_t len);

#endif
