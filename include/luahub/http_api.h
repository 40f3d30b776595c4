/* The routes of plain HTTP requests (http_api.c): the API, /healthz,
 * /metrics and static files. Loop thread only. */
#ifndef LUAHUB_HTTP_API_H
#define LUAHUB_HTTP_API_H

#include "luahub/http.h"

/* The `request` route of struct hub_http_routes; `ud` is the struct
 * hub_server. */
void hub_http_api_request(void *ud, struct hub_http_conn *c, const struct hub_request *r);

/* Opens the static_dir `dir` (may be NULL) for lookups below it. Returns
 * the directory fd, or -1 (logged) when there is none. */
int hub_http_api_static_open(const char *dir);

#endif
