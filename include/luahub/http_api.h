/* The routes of plain HTTP requests (http_api.c): the API, /healthz,
 * /metrics and static files. It reaches the rest of the hub only through
 * the pointers below, all borrowed from the embedder (server.c) and valid
 * until hub_http_api_free(); it keeps no other state. Loop thread only. */
#ifndef LUAHUB_HTTP_API_H
#define LUAHUB_HTTP_API_H

#include "luahub/config.h"
#include "luahub/http.h"
#include "luahub/hub.h"
#include "luahub/session.h"

struct hub_http_api {
    const struct hub_config *cfg;
    struct hub *hub;                /* publishes; /healthz asks its broker whether it is up */
    struct hub_sessions *sessions;  /* the registry, shutting_down, protocol error counts */
    int static_fd;                  /* static_dir, opened O_PATH; -1: none */
    /* POST /api/reload: rebuilds the policy; 0, or -1 with every problem in
     * `errs` (the old policy stays). Called from the request callback. */
    int (*reload)(void *ud, struct hub_config_errors *errs);
    void *ud;
};

/* Fills `api` and opens cfg->static_dir (a warning is logged, and no static
 * files served, when it cannot be opened). */
void hub_http_api_init(struct hub_http_api *api, const struct hub_config *cfg,
                       struct hub *hub, struct hub_sessions *sessions,
                       int (*reload)(void *ud, struct hub_config_errors *errs), void *ud);

/* Closes the static directory. */
void hub_http_api_free(struct hub_http_api *api);

/* The `request` route of struct hub_http_routes; `ud` is the struct
 * hub_http_api. Answers every request, now or (API calls that wait for the
 * broker) later, holding the connection until then. */
void hub_http_api_request(void *ud, struct hub_http_conn *c, const struct hub_request *r);

#endif
