/* TEMPORARY allow-all stand-in until the Lua host lands (being written now). */
#include "luahub/policy.h"
int hub_policy_check(const struct hub_config *cfg, struct hub_config_errors *errs){(void)cfg;(void)errs;return 0;}
struct hub_policy *hub_policy_new(struct hub_server *srv, struct hub_config_errors *errs){(void)srv;(void)errs;static int x; return (struct hub_policy*)&x;}
void hub_policy_free(struct hub_policy *p){(void)p;}
int hub_policy_reload(struct hub_server *srv, struct hub_config_errors *errs){(void)srv;(void)errs;return 0;}
int hub_policy_has(const struct hub_policy *p, enum hub_hook h){(void)p;(void)h;return 0;}
enum hub_verdict hub_policy_on_connect(struct hub_policy *p, struct lws *wsi, uint64_t id, struct hub_connect_result *res){return HUB_ALLOW;}
enum hub_verdict hub_policy_on_subscribe(struct hub_policy *p, struct hub_conn *c, const char *channel, size_t len, char *out, size_t *out_len, char *reason, size_t reason_len){return HUB_ALLOW;}
enum hub_verdict hub_policy_on_publish(struct hub_policy *p, struct hub_conn *c, const char *channel, size_t channel_len, const char *data, size_t data_len, hub_emit_fn emit, void *ud, char *reason, size_t reason_len){return HUB_ALLOW;}
enum hub_verdict hub_policy_on_rpc(struct hub_policy *p, struct hub_conn *c, const char *method, size_t method_len, const char *data, size_t data_len, struct hub_buf *result, char *reason, size_t reason_len){return HUB_ALLOW;}
void hub_policy_on_unsubscribe(struct hub_policy *p, struct hub_conn *c, const char *channel, size_t len){}
void hub_policy_on_disconnect(struct hub_policy *p, struct hub_conn *c, unsigned code, const char *reason){}
void hub_policy_conn_gone(struct hub_policy *p, struct hub_conn *c){}
void hub_policy_metrics(const struct hub_policy *p, struct hub_buf *b){}
