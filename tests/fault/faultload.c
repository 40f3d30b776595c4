/* faultload: a steady, counted publish for the fault suite. The rules it
 * counts by are in faultload.h. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "faultload.h"
#include "redistest.h"

#define WS_WINDOW 64            /* WebSocket publishes awaiting their reply, at most */

enum { ST_PENDING = 0, ST_OK, ST_REFUSED, ST_NOANSWER };

struct fl_pub {
    struct fl_run *r;
    int p, hub;
    unsigned char *st;          /* per seq: ST_* */
    int64_t *sent;              /* per seq: when it was sent (ms) */
    uint64_t *ackoff;           /* per seq: offset of a 200 on a history channel (HTTP) */
    signed char *on;            /* per seq: hub index it was sent to */
    int n, nok, nref, nnoans;   /* under r->mu */
};

/* One connection of a subscriber: from when its subscription was
 * confirmed, on which hub, and the last seq of each publisher it had
 * received before (the gap a reconnection may leave starts after it). */
struct fl_conn {
    int64_t up_at;
    int hub;
    int gap_from[FL_MAXPUB];
};

struct fl_sub {
    struct fl_run *r;
    int i;
    struct ws *c;
    int64_t *pos[FL_MAXPUB];    /* per seq: position in this stream (from 1), 0: not received */
    uint64_t *off[FL_MAXPUB];   /* per seq: the offset it came with (history) */
    int last[FL_MAXPUB];        /* highest seq received per publisher, -1 */
    int64_t npos;               /* messages received */
    uint64_t last_off;          /* history: the offset deliveries go on after */
    char epoch[64];                /* the epoch deliveries belong to (history) */
    int64_t reset_pos[FL_MAXRESET];
    int nreset, new_epoch;
    struct fl_conn conn[FL_MAXCONN];
    int nconn;
    int ended[FL_MAXPUB], nends;
    long long dup, reordered, offset_errors, other, recoveries, unrecovered;
    char first_err[400];
    long long next_id;
};

struct fl_run {
    struct fl_spec s;
    const char *channel;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
    char inst[FL_MAXHUB][32];
    int ninst;
    struct {
        int64_t from, to;       /* to: INT64_MAX while open */
    } win[FL_MAXWIN];
    int nwin;
    int strict_from[FL_MAXPUB]; /* seqs from here on must reach everyone (fl_fault_begin) */
    char why[200];              /* what a run_wait predicate still waits for */
    struct fl_pub pub[FL_MAXPUB];
    struct fl_sub sub[FL_MAXSUB];
    pthread_t tp[FL_MAXPUB], ts[FL_MAXSUB];
};

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */
/* ------------------------------------------------------------------ */

int fl_healthz(int port)
{
    struct http_resp hr;
    int st = http_request(port, "GET", "/healthz", NULL, NULL, &hr);
    http_resp_free(&hr);
    return st;
}

void fl_wait_healthz(int port, int want, int times, int timeout_ms)
{
    int64_t dl = ht_now_ms() + timeout_ms;
    int row = 0, st = 0;
    while (row < times) {
        st = fl_healthz(port);
        row = st == want ? row + 1 : 0;
        ck_assert_msg(row >= times || ht_now_ms() < dl,
                      "/healthz of port %d still %d after %d ms, expected %d", port, st,
                      timeout_ms, want);
        if (row < times)
            sleep_ms(10);
    }
}

int fl_fd_count(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    ck_assert_msg(d != NULL, "%s: %s", path, strerror(errno));
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static int64_t json_int(yajl_val v, const char *key, int64_t dflt)
{
    yajl_val x = json_get(v, key);
    return x && YAJL_IS_INTEGER(x) ? YAJL_GET_INTEGER(x) : dflt;
}

/* Waits (bounded) until pred(r, ud) holds; pred runs under r->mu and may
 * say in r->why what it still waits for. */
static void run_wait(struct fl_run *r, int (*pred)(struct fl_run *, void *), void *ud,
                     const char *what)
{
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    pthread_mutex_lock(&r->mu);
    while (!pred(r, ud)) {
        if (ht_now_ms() >= dl) {
            pthread_mutex_unlock(&r->mu);
            ck_abort_msg("%s: timed out (%d ms) waiting for %s%s", r->s.what, FL_LONG_MS, what,
                         r->why);
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
    }
    pthread_mutex_unlock(&r->mu);
}

/* ------------------------------------------------------------------ */
/* Connections                                                          */
/* ------------------------------------------------------------------ */

/* Index of the instance named in c's welcome ("client":"<instance>-<n>"),
 * numbered in the order the run meets them. */
static int instance_of(struct fl_run *r, const struct ws *c)
{
    yajl_val v = json_parse(c->welcome);
    const char *id = json_get_str(v, "client");
    ck_assert_msg(id && strrchr(id, '-'), "welcome without a client id: %s", c->welcome);
    int len = (int)(strrchr(id, '-') - id), k;
    pthread_mutex_lock(&r->mu);
    for (k = 0; k < r->ninst; k++)
        if ((int)strlen(r->inst[k]) == len && !strncmp(r->inst[k], id, (size_t)len))
            break;
    if (k == r->ninst) {
        ck_assert_msg(k < FL_MAXHUB, "%s: more than %d hub instances", r->s.what, FL_MAXHUB);
        snprintf(r->inst[k], sizeof r->inst[k], "%.*s", len, id);
        r->ninst++;
    }
    pthread_mutex_unlock(&r->mu);
    yajl_tree_free(v);
    return k;
}

const char *fl_instance(struct fl_run *r, int k)
{
    return k < r->ninst ? r->inst[k] : "";
}

/* A WebSocket on hub index `k` (-1: any hub), which it returns in *hub.
 * Retries a refused or dropped upgrade (a worker dying) within a bound. */
static struct ws *connect_on(struct fl_run *r, int k, int *hub)
{
    int port = r->s.shared_port || k < 0 ? r->s.port[0] : r->s.port[k];
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    for (int attempt = 0;; attempt++) {
        struct ws *c = NULL;
        int st = ws_handshake(port, NULL, &c, NULL);
        if (st == 101) {
            int h = instance_of(r, c);
            if (k < 0 || h == k) {
                *hub = h;
                return c;
            }
            ws_free(c);
        }
        ck_assert_msg(ht_now_ms() < dl && attempt < 2000,
                      "%s: no connection landed on hub %d of port %d (last status %d)",
                      r->s.what, k, port, st);
        if (st != 101)
            sleep_ms(20);
    }
}

/* ------------------------------------------------------------------ */
/* Subscribers                                                          */
/* ------------------------------------------------------------------ */

static void sub_error(struct fl_sub *s, const char *fmt, const char *text)
{
    if (!s->first_err[0])
        snprintf(s->first_err, sizeof s->first_err, fmt, text);
}

/* Subscribes (with recovery from where the stream stopped when
 * `recover`) and returns once the reply came; retries `unavailable` when
 * `recover` (a worker just restarted may not have reached Redis yet). */
static void sub_subscribe(struct fl_sub *s, int recover)
{
    struct fl_run *r = s->r;
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    for (;;) {
        char cmd[300];
        long long id = ++s->next_id;
        if (r->s.history && recover)
            snprintf(cmd, sizeof cmd,
                     "{\"op\":\"subscribe\",\"channel\":\"%s\",\"recover\":{\"offset\":%llu,"
                     "\"epoch\":\"%s\"},\"id\":%lld}",
                     r->channel, (unsigned long long)s->last_off, s->epoch, id);
        else
            snprintf(cmd, sizeof cmd, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":%lld}",
                     r->channel, id);
        ws_send_text(s->c, cmd);
        char *t = ws_recv_text(s->c);
        yajl_val v = json_parse(t);
        yajl_val ok = json_get(v, "ok");
        ck_assert_msg(json_int(v, "id", -1) == id && ok,
                      "%s: subscriber %d: expected the subscribe reply, got %s", r->s.what, s->i,
                      t);
        if (YAJL_IS_TRUE(ok)) {
            if (r->s.history) {
                const char *e = json_get_str(v, "epoch");
                int64_t off = json_int(v, "offset", -1);
                ck_assert_msg(e && *e && off >= 0, "%s: history subscribe reply without its "
                              "position: %s", r->s.what, t);
                if (!recover) {
                    s->last_off = (uint64_t)off;
                    snprintf(s->epoch, sizeof s->epoch, "%s", e);
                } else {
                    yajl_val rec = json_get(v, "recovered");
                    ck_assert_msg(rec && (YAJL_IS_TRUE(rec) || YAJL_IS_FALSE(rec)),
                                  "%s: recovery reply without recovered: %s", r->s.what, t);
                    s->recoveries++;
                    if (YAJL_IS_FALSE(rec)) {
                        /* the client must reload: the stream goes on after `offset` */
                        s->unrecovered++;
                        pthread_mutex_lock(&r->mu);
                        ck_assert_int_lt(s->nreset, FL_MAXRESET);
                        s->reset_pos[s->nreset++] = ++s->npos;
                        pthread_mutex_unlock(&r->mu);
                        s->last_off = (uint64_t)off;
                        if (strcmp(e, s->epoch))
                            s->new_epoch++;
                        snprintf(s->epoch, sizeof s->epoch, "%s", e);
                    }
                }
            }
            yajl_tree_free(v);
            free(t);
            return;
        }
        const char *code = json_get_str(v, "error", "code");
        ck_assert_msg(recover && code && !strcmp(code, "unavailable") && ht_now_ms() < dl,
                      "%s: subscriber %d: subscribe to %s answered %s%s", r->s.what, s->i,
                      r->channel, t,
                      r->s.history ? " (history channels with the redis broker: "
                                     "docs/broker.md, History)" : "");
        yajl_tree_free(v);
        free(t);
        sleep_ms(50);
    }
}

static void sub_connect(struct fl_sub *s, int hub_want, int recover)
{
    struct fl_run *r = s->r;
    ck_assert_msg(s->nconn < FL_MAXCONN, "%s: subscriber %d reconnected too often", r->s.what,
                  s->i);
    struct fl_conn *k = &s->conn[s->nconn];
    s->c = connect_on(r, hub_want, &k->hub);
    for (int p = 0; p < FL_MAXPUB; p++)
        k->gap_from[p] = s->last[p];
    sub_subscribe(s, recover);
    pthread_mutex_lock(&r->mu);
    k->up_at = ht_now_ms();
    s->nconn++;
    pthread_mutex_unlock(&r->mu);
}

/* One message of the subscriber's stream. */
static void sub_take(struct fl_sub *s, const char *text)
{
    struct fl_run *r = s->r;
    yajl_val v = json_parse(text);
    const char *op = json_get_str(v, "op"), *ch = json_get_str(v, "channel");
    if (!op || !ch || strcmp(ch, r->channel)) {
        s->other++;
        sub_error(s, "unexpected message %s", text);
        goto out;
    }
    if (!strcmp(op, "reset") && r->s.history) {
        const char *e = json_get_str(v, "epoch");
        int64_t off = json_int(v, "offset", -1);
        if (!e || off < 0) {
            s->other++;
            sub_error(s, "malformed reset %s", text);
            goto out;
        }
        pthread_mutex_lock(&r->mu);
        ck_assert_int_lt(s->nreset, FL_MAXRESET);
        s->reset_pos[s->nreset++] = ++s->npos;
        pthread_mutex_unlock(&r->mu);
        if (strcmp(e, s->epoch))
            s->new_epoch++;
        snprintf(s->epoch, sizeof s->epoch, "%s", e);
        s->last_off = (uint64_t)off;
        goto out;
    }
    int64_t p = json_int(json_get(v, "data"), "p", -9), q = json_int(json_get(v, "data"), "s", -9);
    int64_t off = json_int(v, "offset", -1);
    if (strcmp(op, "message") || p < 0 || p >= r->s.npub || q < -1 || q >= FL_MAXN ||
        (r->s.history ? off < 1 : json_get(v, "offset") != NULL)) {
        s->other++;
        sub_error(s, "unexpected message %s", text);
        goto out;
    }
    if (r->s.history) {
        if ((uint64_t)off != s->last_off + 1) {
            s->offset_errors++;
            char why[400];
            snprintf(why, sizeof why, "offset %lld after %llu without a reset: %%s",
                     (long long)off, (unsigned long long)s->last_off);
            sub_error(s, why, text);
        }
        s->last_off = (uint64_t)off;
    }
    pthread_mutex_lock(&r->mu);
    s->npos++;
    if (q == -1) {
        if (s->ended[p]) {
            s->dup++;
            sub_error(s, "sentinel twice: %s", text);
        } else {
            s->ended[p] = 1;
            s->nends++;
        }
    } else if (s->pos[p][q]) {
        s->dup++;
        sub_error(s, "duplicate: %s", text);
    } else {
        if (q < s->last[p]) {
            s->reordered++;
            sub_error(s, "out of order: %s", text);
        }
        s->pos[p][q] = s->npos;
        s->off[p][q] = (uint64_t)off;
        if (q > s->last[p])
            s->last[p] = (int)q;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
out:
    yajl_tree_free(v);
}

static void *sub_reader(void *arg)
{
    struct fl_sub *s = arg;
    struct fl_run *r = s->r;
    while (s->nends < r->s.npub) {
        struct ws_frame f;
        int rr = ws_recv_msg(s->c, &f, FL_LONG_MS);
        if (rr == 1 && f.opcode == WS_TEXT) {
            sub_take(s, f.data);
            ws_frame_free(&f);
            continue;
        }
        int code = rr == 1 ? f.close_code : 0;
        if (rr == 1)
            ws_frame_free(&f);
        ck_assert_msg(rr != 0, "%s: subscriber %d: nothing for %d ms, %d of %d sentinels",
                      r->s.what, s->i, FL_LONG_MS, s->nends, r->s.npub);
        ck_assert_msg(r->s.reconnect, "%s: subscriber %d lost its connection (close %d)",
                      r->s.what, s->i, code);
        ws_free(s->c);
        sub_connect(s, -1, 1);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Publishers                                                           */
/* ------------------------------------------------------------------ */

static int stopping(struct fl_run *r)
{
    pthread_mutex_lock(&r->mu);
    int s = r->stop;
    pthread_mutex_unlock(&r->mu);
    return s;
}

static void pub_record(struct fl_pub *p, int seq, int st, uint64_t off)
{
    pthread_mutex_lock(&p->r->mu);
    p->st[seq] = (unsigned char)st;
    p->ackoff[seq] = off;
    p->nok += st == ST_OK;
    p->nref += st == ST_REFUSED;
    p->nnoans += st == ST_NOANSWER;
    pthread_cond_broadcast(&p->r->cv);
    pthread_mutex_unlock(&p->r->mu);
}

/* Takes a seq number; returns it, or -1 when the bound is reached. */
static int pub_next(struct fl_pub *p, int hub)
{
    pthread_mutex_lock(&p->r->mu);
    int seq = p->n < FL_MAXN ? p->n++ : -1;
    if (seq >= 0) {
        p->sent[seq] = ht_now_ms();
        p->on[seq] = (signed char)hub;
    }
    pthread_mutex_unlock(&p->r->mu);
    return seq;
}

/* A WebSocket reply to a publish: the seq (its id) and the outcome. */
static int ws_reply(struct fl_pub *p, const char *text, int *st)
{
    yajl_val v = json_parse(text);
    yajl_val ok = json_get(v, "ok");
    int64_t id = json_int(v, "id", -1);
    const char *code = json_get_str(v, "error", "code");
    ck_assert_msg(ok && id >= 0 && id < FL_MAXN &&
                      (YAJL_IS_TRUE(ok) || (code && !strcmp(code, "unavailable"))),
                  "%s: publisher %d: unexpected reply %s", p->r->s.what, p->p, text);
    *st = YAJL_IS_TRUE(ok) ? ST_OK : ST_REFUSED;
    yajl_tree_free(v);
    return (int)id;
}

static void *pub_ws(void *arg)
{
    struct fl_pub *p = arg;
    struct fl_run *r = p->r;
    int hub, outstanding = 0, low = 0;
    struct ws *c = connect_on(r, p->hub, &hub);
    int64_t period = 1000 / r->s.rate, next = ht_now_ms(), dl = 0;
    char msg[200];
    for (;;) {
        int stop = stopping(r);
        int64_t now = ht_now_ms();
        if (stop && !outstanding)
            break;
        if (!stop && outstanding < WS_WINDOW && now >= next) {
            int seq = pub_next(p, hub);
            if (seq >= 0) {
                snprintf(msg, sizeof msg,
                         "{\"op\":\"publish\",\"channel\":\"%s\",\"data\":{\"p\":%d,\"s\":%d},"
                         "\"id\":%d}", r->channel, p->p, seq, seq);
                ws_send_text(c, msg);
                outstanding++;
            }
            next = next + period < now - period ? now : next + period;
            continue;
        }
        if (!outstanding) {
            sleep_ms((int)(next - now > 0 ? (next - now < 100 ? next - now : 100) : 1));
            continue;
        }
        if (stop && !dl)
            dl = now + FL_LONG_MS;
        ck_assert_msg(!dl || now < dl, "%s: publisher %d: %d replies missing %d ms after the "
                      "end", r->s.what, p->p, outstanding, FL_LONG_MS);
        int wait = stop || outstanding >= WS_WINDOW ? 100 : (int)(next - now > 0 ? next - now : 1);
        struct ws_frame f;
        int rr = ws_recv_msg(c, &f, wait);
        if (rr == 0)
            continue;
        if (rr == 1 && f.opcode == WS_TEXT) {
            int st, seq = ws_reply(p, f.data, &st);
            ws_frame_free(&f);
            ck_assert_msg(seq < p->n && p->st[seq] == ST_PENDING, "%s: publisher %d: a reply "
                          "for %d, never sent or answered already", r->s.what, p->p, seq);
            pub_record(p, seq, st, 0);
            outstanding--;
            continue;
        }
        if (rr == 1)
            ws_frame_free(&f);
        /* its hub died: what was not answered never will be */
        ck_assert_msg(r->s.reconnect, "%s: publisher %d lost its connection", r->s.what, p->p);
        for (int s = low; s < p->n; s++)
            if (p->st[s] == ST_PENDING)
                pub_record(p, s, ST_NOANSWER, 0);
        low = p->n;
        outstanding = 0;
        ws_free(c);
        c = connect_on(r, -1, &hub);
    }
    /* the sentinel, until it is acknowledged */
    snprintf(msg, sizeof msg,
             "{\"op\":\"publish\",\"channel\":\"%s\",\"data\":{\"p\":%d,\"s\":-1},\"id\":\"end\"}",
             r->channel, p->p);
    for (int k = 0;; k++) {
        ck_assert_msg(k < 500, "%s: publisher %d: sentinel never acknowledged", r->s.what,
                      p->p);
        ws_send_text(c, msg);
        char *t = ws_recv_text(c);
        int ok = strncmp(t, "{\"id\":\"end\",\"ok\":true}", 22) == 0;
        ck_assert_msg(ok || strstr(t, "\"unavailable\""), "%s: publisher %d: sentinel answered "
                      "%s", r->s.what, p->p, t);
        free(t);
        if (ok)
            break;
        sleep_ms(20);
    }
    ws_free(c);
    return NULL;
}

/* POST /api/publish; the status; on 200 on a history channel the offset. */
static int api_publish(struct fl_run *r, int port, const char *data, uint64_t *off)
{
    char body[200];
    snprintf(body, sizeof body, "{\"channel\":\"%s\",\"data\":%s}", r->channel, data);
    struct http_resp hr;
    int st = http_request(port, "POST", "/api/publish", "Content-Type: application/json\r\n",
                          body, &hr);
    yajl_val v = json_parse(hr.body);
    const char *code = json_get_str(v, "error", "code");
    ck_assert_msg(st == 200 || (st == 503 && code && !strcmp(code, "unavailable")),
                  "%s: POST /api/publish answered %d %s", r->s.what, st, hr.body);
    *off = 0;
    if (st == 200 && r->s.history) {
        int64_t o = json_int(v, "offset", -1);
        ck_assert_msg(o > 0 && json_get_str(v, "epoch"), "%s: 200 on a history channel "
                      "without offset and epoch: %s", r->s.what, hr.body);
        *off = (uint64_t)o;
    }
    yajl_tree_free(v);
    http_resp_free(&hr);
    return st;
}

static void *pub_http(void *arg)
{
    struct fl_pub *p = arg;
    struct fl_run *r = p->r;
    int port = r->s.port[p->hub];
    int64_t period = 1000 / r->s.rate, next = ht_now_ms();
    char data[64];
    uint64_t off;
    while (!stopping(r)) {
        int64_t now = ht_now_ms();
        if (now < next) {
            sleep_ms((int)(next - now < 100 ? next - now : 100));
            continue;
        }
        next = next + period < now - period ? now : next + period;
        int seq = pub_next(p, p->hub);
        if (seq < 0)
            continue;
        snprintf(data, sizeof data, "{\"p\":%d,\"s\":%d}", p->p, seq);
        int st = api_publish(r, port, data, &off);
        pub_record(p, seq, st == 200 ? ST_OK : ST_REFUSED, off);
    }
    snprintf(data, sizeof data, "{\"p\":%d,\"s\":-1}", p->p);
    for (int k = 0; api_publish(r, port, data, &off) != 200; k++) {
        ck_assert_msg(k < 500, "%s: publisher %d: sentinel never acknowledged", r->s.what,
                      p->p);
        sleep_ms(20);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* The run                                                              */
/* ------------------------------------------------------------------ */

struct fl_run *fl_start(const struct fl_spec *spec)
{
    ck_assert(spec->npub >= 1 && spec->npub <= FL_MAXPUB && spec->nsub >= 1 &&
              spec->nsub <= FL_MAXSUB && spec->nhubs >= 1 && spec->nhubs <= FL_MAXHUB &&
              spec->rate >= 1 && spec->rate <= 1000);
    struct fl_run *r = calloc(1, sizeof *r);
    ck_assert(r != NULL);
    r->s = *spec;
    r->channel = spec->history ? "h:load" : "f:load";
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    /* hub indexes follow the ports when they differ */
    if (!spec->shared_port)
        for (int k = 0; k < spec->nhubs; k++) {
            struct ws *c = ws_connect(spec->port[k]);
            ck_assert_int_eq(instance_of(r, c), k);
            ws_free(c);
        }
    for (int i = 0; i < spec->nsub; i++) {
        struct fl_sub *s = &r->sub[i];
        s->r = r;
        s->i = i;
        for (int p = 0; p < FL_MAXPUB; p++) {
            s->pos[p] = calloc(FL_MAXN, sizeof(int64_t));
            s->off[p] = calloc(FL_MAXN, sizeof(uint64_t));
            ck_assert(s->pos[p] && s->off[p]);
            s->last[p] = -1;
        }
        sub_connect(s, i % spec->nhubs, 0);
    }
    for (int i = 0; i < spec->nsub; i++)
        ck_assert_int_eq(pthread_create(&r->ts[i], NULL, sub_reader, &r->sub[i]), 0);
    for (int p = 0; p < spec->npub; p++) {
        struct fl_pub *pb = &r->pub[p];
        pb->r = r;
        pb->p = p;
        pb->hub = p % spec->nhubs;
        pb->st = calloc(FL_MAXN, 1);
        pb->sent = calloc(FL_MAXN, sizeof(int64_t));
        pb->ackoff = calloc(FL_MAXN, sizeof(uint64_t));
        pb->on = calloc(FL_MAXN, 1);
        ck_assert(pb->st && pb->sent && pb->ackoff && pb->on);
        ck_assert_int_eq(pthread_create(&r->tp[p], NULL,
                                        spec->kind[p] == FL_HTTP ? pub_http : pub_ws, pb), 0);
    }
    return r;
}

static int pred_ok(struct fl_run *r, void *ud)
{
    const int *want = ud;
    for (int p = 0; p < r->s.npub; p++)
        if (r->pub[p].nok < want[p] && r->pub[p].n < FL_MAXN)
            return 0;
    return 1;
}

void fl_more_ok(struct fl_run *r, int more)
{
    int want[FL_MAXPUB];
    pthread_mutex_lock(&r->mu);
    for (int p = 0; p < r->s.npub; p++)
        want[p] = r->pub[p].nok + more;
    pthread_mutex_unlock(&r->mu);
    run_wait(r, pred_ok, want, "more acknowledged publishes");
}

long long fl_not_ok(struct fl_run *r)
{
    long long n = 0;
    pthread_mutex_lock(&r->mu);
    for (int p = 0; p < r->s.npub; p++)
        n += r->pub[p].nref + r->pub[p].nnoans;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Every publish since strict_from, up to `upto`, is answered, and every
 * acknowledged one reached every subscriber. */
static int pred_delivered(struct fl_run *r, void *ud)
{
    const int *upto = ud;
    for (int p = 0; p < r->s.npub; p++)
        for (int q = r->strict_from[p]; q < upto[p]; q++) {
            if (r->pub[p].st[q] == ST_PENDING) {
                snprintf(r->why, sizeof r->why, " (publisher %d: no answer to %d)", p, q);
                return 0;
            }
            if (r->pub[p].st[q] == ST_OK)
                for (int i = 0; i < r->s.nsub; i++)
                    if (!r->sub[i].pos[p][q]) {
                        snprintf(r->why, sizeof r->why, " (subscriber %d has not got "
                                 "acknowledged message %d/%d)", i, p, q);
                        return 0;
                    }
        }
    return 1;
}

void fl_fault_begin(struct fl_run *r)
{
    int upto[FL_MAXPUB];
    pthread_mutex_lock(&r->mu);
    ck_assert_int_lt(r->nwin, FL_MAXWIN);
    r->win[r->nwin].from = ht_now_ms();
    r->win[r->nwin].to = INT64_MAX;
    r->nwin++;
    for (int p = 0; p < r->s.npub; p++)
        upto[p] = r->pub[p].n;
    pthread_mutex_unlock(&r->mu);
    run_wait(r, pred_delivered, upto, "every acknowledged message to reach every subscriber "
             "before the fault");
}

void fl_fault_end(struct fl_run *r)
{
    pthread_mutex_lock(&r->mu);
    ck_assert(r->nwin > 0 && r->win[r->nwin - 1].to == INT64_MAX);
    r->win[r->nwin - 1].to = ht_now_ms();
    for (int p = 0; p < r->s.npub; p++)
        r->strict_from[p] = r->pub[p].n;
    pthread_mutex_unlock(&r->mu);
}

/* Hub of subscriber s when `t` happened. */
static int sub_hub_at(const struct fl_sub *s, int64_t t)
{
    int k = 0;
    while (k + 1 < s->nconn && s->conn[k + 1].up_at <= t)
        k++;
    return s->conn[k].hub;
}

/* Why subscriber s may have lost publisher p's message q; NULL: it may not. */
static const char *excuse(const struct fl_run *r, const struct fl_sub *s, int p, int q,
                          const int64_t *prev_pos, const int64_t *next_pos)
{
    const struct fl_pub *pb = &r->pub[p];
    if (r->s.history) {
        for (int k = 0; k < s->nreset; k++)
            if (s->reset_pos[k] > prev_pos[q] && s->reset_pos[k] < next_pos[q])
                return "reset";
        return NULL;
    }
    for (int k = 1; k < s->nconn; k++)
        if (q > s->conn[k].gap_from[p] && pb->sent[q] < s->conn[k].up_at)
            return "reconnect";
    if (sub_hub_at(s, pb->sent[q]) != pb->on[q])
        for (int w = 0; w < r->nwin; w++)
            if (pb->sent[q] >= r->win[w].from && pb->sent[q] < r->win[w].to)
                return "window";
    return NULL;
}

static void run_free(struct fl_run *r)
{
    for (int i = 0; i < FL_MAXSUB; i++) {
        ws_free(r->sub[i].c);
        for (int p = 0; p < FL_MAXPUB; p++) {
            free(r->sub[i].pos[p]);
            free(r->sub[i].off[p]);
        }
    }
    for (int p = 0; p < FL_MAXPUB; p++) {
        free(r->pub[p].st);
        free(r->pub[p].sent);
        free(r->pub[p].ackoff);
        free(r->pub[p].on);
    }
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

/* Counts subscriber i's stream into `t`; returns how many acknowledged
 * messages it lost. The first problem seen goes to `example` (if empty).
 * `prev_pos` and `next_pos` are scratch arrays of FL_MAXN + 1. */
static long long count_sub(const struct fl_run *r, int i, struct fl_totals *t,
                           int64_t *prev_pos, int64_t *next_pos, char *example, size_t cap)
{
    const struct fl_sub *s = &r->sub[i];
    long long lost = 0;
    for (int p = 0; p < r->s.npub; p++) {
        const struct fl_pub *pb = &r->pub[p];
        /* positions of this publisher's neighbours around each seq */
        int64_t m = 0;
        for (int q = 0; q < pb->n; q++) {
            prev_pos[q] = m;
            if (s->pos[p][q] > m)
                m = s->pos[p][q];
        }
        m = INT64_MAX;
        for (int q = pb->n - 1; q >= 0; q--) {
            next_pos[q] = m;
            if (s->pos[p][q] && s->pos[p][q] < m)
                m = s->pos[p][q];
        }
        for (int q = 0; q < pb->n; q++) {
            if (pb->st[q] != ST_OK) {
                t->unacked_delivered += s->pos[p][q] != 0;
                continue;
            }
            t->expected++;
            if (s->pos[p][q]) {
                t->delivered++;
                if (pb->ackoff[q] && s->off[p][q] != pb->ackoff[q]) {
                    t->offset_mismatch++;
                    if (!example[0])
                        snprintf(example, cap, "subscriber %d got %d/%d with offset %llu, its "
                                 "publish was answered offset %llu", i, p, q,
                                 (unsigned long long)s->off[p][q],
                                 (unsigned long long)pb->ackoff[q]);
                }
                continue;
            }
            t->lost++;
            lost++;
            const char *why = excuse(r, s, p, q, prev_pos, next_pos);
            if (!why) {
                t->lost_unexplained++;
                if (!example[0])
                    snprintf(example, cap, "subscriber %d (hub %d) never got acknowledged "
                             "message %d/%d (sent to hub %d, %lld ms after the start of the "
                             "run) and nothing excuses it", i, s->conn[s->nconn - 1].hub, p, q,
                             pb->on[q], (long long)(pb->sent[q] - pb->sent[0]));
            } else if (!strcmp(why, "reset")) {
                t->lost_reset++;
            } else if (!strcmp(why, "reconnect")) {
                t->lost_reconnect++;
            } else {
                t->lost_window++;
            }
        }
    }
    t->duplicated += s->dup;
    t->reordered += s->reordered;
    t->offset_errors += s->offset_errors;
    t->other += s->other;
    t->resets += s->nreset - s->unrecovered;
    t->new_epoch_resets += s->new_epoch;
    t->subs_with_new_epoch += s->new_epoch > 0;
    t->recoveries += s->recoveries;
    t->unrecovered += s->unrecovered;
    t->reconnects += s->nconn - 1;
    if (s->first_err[0] && !example[0])
        snprintf(example, cap, "subscriber %d: %s", i, s->first_err);
    return lost;
}

void fl_finish(struct fl_run *r, struct fl_totals *t)
{
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    for (int p = 0; p < r->s.npub; p++)
        ck_assert_int_eq(pthread_join(r->tp[p], NULL), 0);
    for (int i = 0; i < r->s.nsub; i++)
        ck_assert_int_eq(pthread_join(r->ts[i], NULL), 0);

    memset(t, 0, sizeof *t);
    for (int p = 0; p < r->s.npub; p++) {
        t->published += r->pub[p].n;
        t->acked += r->pub[p].nok;
        t->refused += r->pub[p].nref;
        t->unanswered += r->pub[p].nnoans;
    }
    char example[600] = "", per_sub[400] = "";
    int64_t *prev_pos = calloc(FL_MAXN + 1, sizeof(int64_t));
    int64_t *next_pos = calloc(FL_MAXN + 1, sizeof(int64_t));
    ck_assert(prev_pos && next_pos);
    for (int i = 0; i < r->s.nsub; i++) {
        long long lost = count_sub(r, i, t, prev_pos, next_pos, example, sizeof example);
        snprintf(per_sub + strlen(per_sub), sizeof per_sub - strlen(per_sub), "%s%lld",
                 i ? " " : "", lost);
    }
    free(prev_pos);
    free(next_pos);

    printf("[fault] %s, %s channel: %lld publishes (%lld acknowledged, %lld refused, %lld "
           "unanswered); %d subscribers: %lld of %lld acknowledged deliveries made, lost %lld "
           "(%lld by another hub in the fault window, %lld while reconnecting, %lld covered by "
           "a reset, %lld unexplained; per subscriber %s), duplicated %lld, reordered %lld, "
           "offsets out of sequence %lld, resets %lld (%lld naming a new epoch), recoveries "
           "%lld (%lld not recovered), reconnects %lld, unacknowledged but delivered %lld\n",
           r->s.what, r->s.history ? "history" : "plain", t->published, t->acked, t->refused,
           t->unanswered, r->s.nsub, t->delivered, t->expected, t->lost, t->lost_window,
           t->lost_reconnect, t->lost_reset, t->lost_unexplained, per_sub, t->duplicated,
           t->reordered, t->offset_errors, t->resets, t->new_epoch_resets, t->recoveries,
           t->unrecovered, t->reconnects, t->unacked_delivered);
    fflush(stdout);
    char what[200];
    snprintf(what, sizeof what, "%s", r->s.what);
    int history = r->s.history;
    run_free(r);

    ck_assert_msg(t->acked > 0, "%s: nothing was acknowledged", what);
    ck_assert_msg(!t->lost_unexplained && !t->duplicated && !t->reordered && !t->offset_errors &&
                      !t->offset_mismatch && !t->other,
                  "%s: %lld lost without excuse, %lld duplicated, %lld reordered, %lld offsets "
                  "out of sequence, %lld unlike the publish answer, %lld unexpected; e.g. %s",
                  what, t->lost_unexplained, t->duplicated, t->reordered, t->offset_errors,
                  t->offset_mismatch, t->other, example);
    ck_assert_msg(history || !t->resets, "%s: a reset on a plain channel", what);
}
