/* The world of `luahub test` (spec_impl.h): the real policy on a host of its
 * own, driven by a spec (docs/testing-policies.md).
 *
 * What the hub's sessions do around the policy (session.c, server.c) is
 * done here the same way, without sockets: a connect runs on_connect and
 * the subprotocol rules; a command is the client's text frame, decoded by
 * the hub's own decoder (proto.h), so a bad channel name or bad JSON gets
 * the hub's error and never reaches a hook; subscribe, unsubscribe,
 * publish and rpc call the hooks and answer as the sessions do; a close
 * (conn:close, a frame over max_message_size, text that is not UTF-8, the
 * client's disconnect) runs on_disconnect once the action is over, as the
 * hub does when the connection has closed.
 *
 * What the policy does is recorded: pushes and closes per connection, and
 * every publish (hub.publish, on_publish's messages, the HTTP API's) with
 * the connections it was delivered to. The clock is fake: hub.now() reads
 * it, and only advance() moves it, firing the hub.after timers due on the
 * way in order (policy.h: now_ms, timer_start). Every failure of the
 * policy is recorded with its text (policy.h: failed), not only logged.
 *
 * Not emulated (the broker's or the server's, not the policy's): history,
 * offsets, presence and join/leave events, allowed_origins, the per-IP and
 * rate limits.
 *
 * This file is the host: the connections and what they recorded, the
 * broker, the fake clock, the host interface, the log, the world's life.
 * The functions the spec state calls (connect, command, advance, what a
 * spec reads back) are spec_actions.c; what the two share is
 * spec_world.h. */
#include "spec_impl.h"
#include "spec_world.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/error.h"
#include "luahub/log.h"
#include "luahub/policy.h"
#include "luahub/util.h"

#define CLIENT_PREFIX "spec-"       /* client ids: spec-1, spec-2, ... */
#define RECORD_MAX (256u << 20)     /* bytes of deliveries one test may record */
#define FAILURES_MAX 10000          /* failures one test records (then counts) */

void *hub_spec_grow(void *p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return p;
    size_t c = *cap ? *cap : 8;
    while (c < need)
        c *= 2;
    *cap = c;
    return hub_xrealloc(p, c * size);
}

/* ---- recording ------------------------------------------------------------ */

static void add_failure(struct hub_spec_world *w, const char *hook, uint64_t conn,
                        const char *what)
{
    if (w->nfails >= FAILURES_MAX) {
        w->fails_dropped++;
        return;
    }
    w->fails = hub_spec_grow(w->fails, &w->capfails, w->nfails + 1, sizeof(*w->fails));
    w->fails[w->nfails++] = (struct failure){hub_xstrdup(hook), hub_xstrdup(what), conn, 0};
}

/* Counts `n` bytes of recordings; 0 once the test is over RECORD_MAX (a
 * failure says so, once). */
static int record(struct hub_spec_world *w, size_t n)
{
    if (w->recorded > RECORD_MAX)
        return 0;
    w->recorded += n;
    if (w->recorded <= RECORD_MAX)
        return 1;
    char what[160];
    snprintf(what, sizeof(what), "the test recorded more than %u MiB of deliveries: the "
             "later ones were not recorded", RECORD_MAX >> 20);
    add_failure(w, "spec", 0, what);
    return 0;
}

static void add_frame(struct hub_spec_world *w, struct sconn *c, char kind, unsigned code,
                      const char *channel, size_t clen, const char *text, size_t tlen)
{
    if (!record(w, clen + tlen + sizeof(struct frame)))
        return;
    c->frames = hub_spec_grow(c->frames, &c->capframes, c->nframes + 1, sizeof(*c->frames));
    c->frames[c->nframes++] = (struct frame){
        kind, 0, code, channel ? hub_xstrndup(channel, clen) : NULL, hub_xstrndup(text, tlen),
    };
}

static struct sconn *of_pc(const struct hub_policy_conn *pc)
{
    return hub_container_of(pc, struct sconn, pc);
}

/* The connection with this id that the hub would still know: open, or
 * closing until its on_disconnect has run. */
static struct sconn *live_conn(struct hub_spec_world *w, uint64_t id)
{
    if (id == 0 || id > w->nconns)
        return NULL;
    struct sconn *c = w->conns[id - 1];
    return c->state == C_OPEN || c->state == C_CLOSING ? c : NULL;
}

static int subscribed(const struct sconn *c, const char *ch, size_t len)
{
    for (size_t i = 0; i < c->nchans; i++)
        if (strlen(c->chans[i]) == len && !memcmp(c->chans[i], ch, len))
            return (int)i;
    return -1;
}

/* Subscribes: 1 now, 0 already, HUB_ELIMIT at max_channels_per_conn. */
int hub_spec_subscribe(struct hub_spec_world *w, struct sconn *c, const char *ch, size_t len)
{
    if (subscribed(c, ch, len) >= 0)
        return 0;
    if (c->nchans >= w->cfg.max_channels_per_conn)
        return HUB_ELIMIT;
    c->chans = hub_spec_grow(c->chans, &c->capchans, c->nchans + 1, sizeof(*c->chans));
    c->chans[c->nchans++] = hub_xstrndup(ch, len);
    return 1;
}

int hub_spec_unsubscribe(struct sconn *c, const char *ch, size_t len)
{
    int i = subscribed(c, ch, len);
    if (i < 0)
        return HUB_ENOTFOUND;
    free(c->chans[i]);
    memmove(c->chans + i, c->chans + i + 1, (c->nchans - (size_t)i - 1) * sizeof(*c->chans));
    c->nchans--;
    return 0;
}

/* The broker: records the publish and delivers it to every open
 * subscriber. Returns the local subscribers (closing ones included, as the
 * hub counts them). */
size_t hub_spec_publish(struct hub_spec_world *w, const char *ch, size_t len, const char *data,
                      size_t dlen)
{
    size_t n = 0;
    struct message m = {0};
    int rec = record(w, len + dlen + sizeof(m));

    if (rec) {
        m.channel = hub_xstrndup(ch, len);
        m.data = hub_xstrndup(data, dlen);
    }
    for (size_t i = 0; i < w->nconns; i++) {
        struct sconn *c = w->conns[i];
        if ((c->state != C_OPEN && c->state != C_CLOSING) || subscribed(c, ch, len) < 0)
            continue;
        n++;
        if (c->state != C_OPEN)
            continue; /* its close frame is queued: nothing more goes out */
        add_frame(w, c, 'm', 0, ch, len, data, dlen);
        if (rec) {
            m.to = hub_xrealloc(m.to, (m.nto + 1) * sizeof(*m.to));
            m.to[m.nto++] = c->pc.id;
        }
    }
    if (rec) {
        w->msgs = hub_spec_grow(w->msgs, &w->capmsgs, w->nmsgs + 1, sizeof(*w->msgs));
        w->msgs[w->nmsgs++] = m;
    }
    return n;
}

/* The hub closes the connection (a close frame with code and reason); the
 * rest (on_disconnect) happens in hub_spec_settle(). */
void hub_spec_close_conn(struct hub_spec_world *w, struct sconn *c, unsigned code,
                       const char *reason)
{
    if (c->state != C_OPEN)
        return;
    add_frame(w, c, 'c', code, NULL, 0, reason, strlen(reason));
    c->close_code = code;
    c->close_reason = hub_xstrdup(reason);
    c->state = C_CLOSING;
}

/* Connections closing since the action began have now closed: each one's
 * on_disconnect runs (it may close others), then it leaves its channels
 * and its Lua object dies, as in the hub's CLOSED path (session_host.c). */
void hub_spec_settle(struct hub_spec_world *w)
{
    for (int again = 1; again;) {
        again = 0;
        for (size_t i = 0; i < w->nconns; i++) {
            struct sconn *c = w->conns[i];
            if (c->state != C_CLOSING)
                continue;
            again = 1;
            if (hub_policy_has(w->policy, HUB_HOOK_DISCONNECT))
                hub_policy_on_disconnect(w->policy, &c->pc, c->close_code,
                                         c->close_reason ? c->close_reason : "");
            hub_policy_conn_gone(w->policy, &c->pc);
            for (size_t k = 0; k < c->nchans; k++)
                free(c->chans[k]);
            c->nchans = 0;
            c->state = C_GONE;
        }
    }
}

/* ---- the fake clock's timers: a min-heap by (due, seq) ------------------- */

static int before(const struct stimer *a, const struct stimer *b)
{
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_swap(struct hub_spec_world *w, size_t i, size_t j)
{
    struct stimer t = w->heap[i];
    w->heap[i] = w->heap[j];
    w->heap[j] = t;
}

static void sift_up(struct hub_spec_world *w, size_t i)
{
    while (i > 0 && before(&w->heap[i], &w->heap[(i - 1) / 2])) {
        heap_swap(w, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void sift_down(struct hub_spec_world *w, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < w->nheap && before(&w->heap[l], &w->heap[m]))
            m = l;
        if (r < w->nheap && before(&w->heap[r], &w->heap[m]))
            m = r;
        if (m == i)
            return;
        heap_swap(w, i, m);
        i = m;
    }
}

void hub_spec_heap_remove(struct hub_spec_world *w, size_t i)
{
    w->heap[i] = w->heap[--w->nheap];
    if (i < w->nheap) {
        sift_down(w, i);
        sift_up(w, i);
    }
}

/* ---- the host interface (policy.h) ---------------------------------------- */

static struct hub_policy_conn *h_conn(void *ud, uint64_t id)
{
    struct sconn *c = live_conn(ud, id);
    return c ? &c->pc : NULL;
}

static struct hub_policy_conn *h_conn_named(void *ud, const char *client)
{
    size_t n = strlen(CLIENT_PREFIX);
    char *end;
    if (strncmp(client, CLIENT_PREFIX, n) || client[n] < '1' || client[n] > '9')
        return NULL;
    unsigned long long id = strtoull(client + n, &end, 10);
    return *end ? NULL : h_conn(ud, id);
}

void hub_spec_conn_name(void *ud, uint64_t id, char *out, size_t n)
{
    snprintf(out, n, CLIENT_PREFIX "%llu", (unsigned long long)id);
}

static void h_conn_addr(void *ud, const struct hub_policy_conn *c, char *out, size_t n)
{
    snprintf(out, n, "%s", of_pc(c)->addr);
}

static int h_conn_closing(void *ud, const struct hub_policy_conn *c)
{
    return of_pc(c)->state != C_OPEN;
}

static void h_conn_send(void *ud, struct hub_policy_conn *c, const char *json, size_t len)
{
    add_frame(ud, of_pc(c), 'p', 0, NULL, 0, json, len);
}

static void h_conn_close(void *ud, struct hub_policy_conn *c, unsigned code, const char *reason)
{
    hub_spec_close_conn(ud, of_pc(c), code, reason);
}

static int h_conn_subscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    return hub_spec_subscribe(ud, of_pc(c), ch, len);
}

static int h_conn_unsubscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    return hub_spec_unsubscribe(of_pc(c), ch, len);
}

static void h_conn_channels(void *ud, const struct hub_policy_conn *c,
                            void (*fn)(void *arg, const char *ch, size_t len), void *arg)
{
    const struct sconn *s = of_pc(c);
    for (size_t i = 0; i < s->nchans; i++)
        fn(arg, s->chans[i], strlen(s->chans[i]));
}

static void h_each_conn(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg)
{
    struct hub_spec_world *w = ud;
    for (size_t i = 0; i < w->nconns; i++)
        if (live_conn(w, i + 1))
            fn(arg, &w->conns[i]->pc);
}

static size_t h_publish(void *ud, const char *ch, size_t len, const char *data, size_t dlen)
{
    return hub_spec_publish(ud, ch, len, data, dlen);
}

static void h_presence_local(void *ud, const char *ch, size_t len, uint64_t *clients,
                             uint64_t *users)
{
    struct hub_spec_world *w = ud;
    *clients = *users = 0;
    for (size_t i = 0; i < w->nconns; i++) {
        struct sconn *c = live_conn(w, i + 1);
        if (!c || subscribed(c, ch, len) < 0)
            continue;
        ++*clients;
        if (!c->pc.user)
            continue;
        int dup = 0; /* a user in two connections counts once */
        for (size_t k = 0; k < i && !dup; k++) {
            struct sconn *o = live_conn(w, k + 1);
            dup = o && o->pc.user && !strcmp(o->pc.user, c->pc.user) &&
                  subscribed(o, ch, len) >= 0;
        }
        *users += !dup;
    }
}

static size_t h_subscribers(void *ud, const char *ch, size_t len)
{
    uint64_t clients, users;
    h_presence_local(ud, ch, len, &clients, &users);
    return (size_t)clients;
}

static int h_shutting_down(void *ud)
{
    return 0;
}

double hub_spec_now_ms(void *ud)
{
    return (double)((struct hub_spec_world *)ud)->now;
}

static void h_timer_start(void *ud, struct hub_ptimer *t, uint64_t ms)
{
    struct hub_spec_world *w = ud;
    w->heap = hub_spec_grow(w->heap, &w->capheap, w->nheap + 1, sizeof(*w->heap));
    w->heap[w->nheap] = (struct stimer){t, w->now + ms, w->seq++};
    sift_up(w, w->nheap++);
}

static void h_timer_stop(void *ud, struct hub_ptimer *t)
{
    struct hub_spec_world *w = ud;
    for (size_t i = 0; i < w->nheap; i++)
        if (w->heap[i].t == t) {
            hub_spec_heap_remove(w, i);
            return;
        }
}

static void h_failed(void *ud, const char *hook, uint64_t conn_id, const char *what)
{
    add_failure(ud, hook, conn_id, what);
}

static const struct hub_policy_host_ops spec_ops = {
    .conn = h_conn,
    .conn_named = h_conn_named,
    .conn_name = hub_spec_conn_name,
    .conn_addr = h_conn_addr,
    .conn_closing = h_conn_closing,
    .conn_send = h_conn_send,
    .conn_close = h_conn_close,
    .conn_subscribe = h_conn_subscribe,
    .conn_unsubscribe = h_conn_unsubscribe,
    .conn_channels = h_conn_channels,
    .each_conn = h_each_conn,
    .publish = h_publish,
    .subscribers = h_subscribers,
    .presence_local = h_presence_local,
    .shutting_down = h_shutting_down,
    .now_ms = hub_spec_now_ms,
    .timer_start = h_timer_start,
    .timer_stop = h_timer_stop,
    .failed = h_failed,
};

/* ---- the log -------------------------------------------------------------- */

static void on_log(void *ud, int level, const char *msg, size_t len)
{
    struct hub_spec_world *w = ud;
    char line[2100];

    snprintf(line, sizeof(line), "%s %.*s", hub_log_level_name(level), (int)len, msg);
    if (w->building) {
        if (level <= HUB_LOG_WARN) {
            w->warnings = hub_xrealloc(w->warnings, (w->nwarnings + 1) * sizeof(*w->warnings));
            w->warnings[w->nwarnings++] = hub_xstrdup(line);
        }
        return;
    }
    size_t i = w->nlogs++ % LOG_LINES;
    free(w->logs[i]);
    w->logs[i] = hub_xstrdup(line);
}

void hub_spec_world_warnings(const struct hub_spec_world *w,
                             void (*fn)(void *ud, const char *line), void *ud)
{
    for (size_t i = 0; i < w->nwarnings; i++)
        fn(ud, w->warnings[i]);
}

/* ---- the world ---------------------------------------------------------------- */

struct hub_spec_world *hub_spec_world_new(const struct hub_config *cfg,
                                          struct hub_lua_limits *lim)
{
    struct hub_spec_world *w = hub_xcalloc(1, sizeof(*w));
    w->base = cfg;
    w->cfg = *cfg;
    w->lim = lim;
    w->host = (struct hub_policy_host){.ops = &spec_ops, .ud = w, .cfg = &w->cfg};
    hub_log_set_sink(on_log, w);
    return w;
}

/* Drops everything a test made: the policy first (its timers stop), then
 * what the host recorded. */
static void clear(struct hub_spec_world *w)
{
    w->nheap = 0; /* the policy's timers stop with it: nothing to look for */
    hub_policy_free(w->policy);
    w->policy = NULL;
    for (size_t i = 0; i < w->nconns; i++) {
        struct sconn *c = w->conns[i];
        for (size_t k = 0; k < c->nchans; k++)
            free(c->chans[k]);
        for (size_t k = 0; k < c->nframes; k++) {
            free(c->frames[k].channel);
            free(c->frames[k].text);
        }
        free(c->chans);
        free(c->frames);
        free(c->pc.user);
        free(c->pc.info_json);
        free(c->pc.protocol);
        free(c->close_reason);
        free(c);
    }
    w->nconns = 0;
    for (size_t i = 0; i < w->nmsgs; i++) {
        free(w->msgs[i].channel);
        free(w->msgs[i].data);
        free(w->msgs[i].to);
    }
    w->nmsgs = 0;
    w->recorded = 0;
    for (size_t i = 0; i < w->nfails; i++) {
        free(w->fails[i].hook);
        free(w->fails[i].what);
    }
    w->nfails = 0;
    w->fails_dropped = 0;
    for (size_t i = 0; i < w->nwarnings; i++)
        free(w->warnings[i]);
    w->nwarnings = 0;
    for (size_t i = 0; i < LOG_LINES; i++) {
        free(w->logs[i]);
        w->logs[i] = NULL;
    }
    w->nlogs = 0;
}

void hub_spec_world_free(struct hub_spec_world *w)
{
    if (!w)
        return;
    clear(w);
    hub_log_set_sink(NULL, NULL);
    free(w->conns);
    free(w->msgs);
    free(w->heap);
    free(w->fails);
    free(w->warnings);
    free(w->vars);
    free(w);
}

int hub_spec_world_reset(struct hub_spec_world *w, const char *vars_json, double start_ms,
                         struct hub_config_errors *errs)
{
    clear(w);
    free(w->vars);
    w->vars = vars_json ? hub_xstrdup(vars_json) : NULL;
    w->cfg.policy_vars = vars_json ? w->vars : w->base->policy_vars;
    w->now = (uint64_t)llround(start_ms);
    w->seq = 0;
    w->building = 1;
    w->policy = hub_policy_new(&w->host, errs);
    w->building = 0;
    return w->policy ? 0 : -1;
}
