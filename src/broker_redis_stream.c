/* History with the redis broker (issue 11; docs/broker.md, "History"):
 * the server-side scripts of history and presence, the publish of a
 * delivery on a history channel, history reads, and the decoding of the
 * history deliveries that come back on the subscriber connection.
 *
 * Per history channel C, on C's server (shard_of), under the prefix P:
 *
 *   P history_pos:C   hash {offset, epoch}: the stream's position, kept
 *                     max(history_ttl, HUB_STREAM_META_TTL) after the last
 *                     publish (history_ttl when only read);
 *   P history:C       stream of the closed delivery frames, entry id
 *                     "<offset>-0", field "d"; kept history_ttl after the
 *                     last publish, trimmed with MAXLEN ~ history_size.
 *
 * A publish is ONE script (EVALSHA): HINCRBY of the offset, the epoch set
 * if missing (HSETNX of a random candidate; a new epoch drops any stream
 * left from the old one), XADD, EXPIRE of both keys and the PUBLISH of
 * HUB_RFRAME_MARK "<epoch> <offset> " + frame on the channel, so every hub
 * gets the offset and the epoch with the message. The reply is {offset,
 * epoch, receivers}: the receivers count serves the acknowledgement like a
 * PUBLISH's (broker_redis_pub.c). Plain channels are untouched: a PUBLISH
 * of the bare frame. Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_redis.h"
#include "luahub/log.h"
#include "luahub/msg.h"

#define KEY_POS "history_pos:"
#define KEY_STREAM "history:"

/* KEYS: position, stream. ARGV: pub/sub channel, the open delivery
 * (without its closing brace), history_size, history_ttl, position ttl,
 * epoch candidate. Offsets are formatted with %d: Lua 5.1 prints numbers of
 * 15 digits and more with an exponent (docs/internals.md). */
static const char publish_lua[] =
    "local pos, stream = KEYS[1], KEYS[2]\n"
    "local off = redis.call('HINCRBY', pos, 'offset', 1)\n"
    "local epoch = redis.call('HGET', pos, 'epoch')\n"
    "if not epoch then\n"
    "  epoch = ARGV[6]\n"
    "  redis.call('HSET', pos, 'epoch', epoch)\n"
    "  redis.call('DEL', stream)\n"
    "end\n"
    "local id = string.format('%d', off)\n"
    "local frame = ARGV[2] .. ',\"offset\":' .. id .. '}'\n"
    "redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], id .. '-0', 'd', frame)\n"
    "redis.call('EXPIRE', stream, ARGV[4])\n"
    "redis.call('EXPIRE', pos, ARGV[5])\n"
    "local n = redis.call('PUBLISH', ARGV[1], '\\1' .. epoch .. ' ' .. id .. ' ' .. frame)\n"
    "return {off, epoch, n}\n";

/* KEYS: position, stream. ARGV: epoch candidate, history_ttl (for a
 * position this read creates), since, limit, reverse (1/0), history_size.
 * Returns {top, epoch, oldest, offset, frame, offset, frame, ...}. MAXLEN ~
 * keeps more than history_size entries (whole nodes): what lies below
 * top - history_size counts as trimmed. */
static const char history_lua[] =
    "local pos, stream = KEYS[1], KEYS[2]\n"
    "if redis.call('HSETNX', pos, 'epoch', ARGV[1]) == 1 then\n"
    "  redis.call('DEL', stream)\n"
    "  redis.call('HSETNX', pos, 'offset', 0)\n"
    "  redis.call('EXPIRE', pos, ARGV[2])\n"
    "end\n"
    "local v = redis.call('HMGET', pos, 'offset', 'epoch')\n"
    "local top = tonumber(v[1]) or 0\n"
    "local oldest = top + 1\n"
    "local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)\n"
    "if first[1] then\n"
    "  local o = tonumber(string.match(first[1][1], '^%d+'))\n"
    "  local floor = top - tonumber(ARGV[6]) + 1\n"
    "  if o < floor then o = floor end\n"
    "  if o < oldest then oldest = o end\n"
    "end\n"
    "local from, limit = tonumber(ARGV[3]) + 1, tonumber(ARGV[4])\n"
    "if from < oldest then from = oldest end\n"
    "local out = {top, v[2], oldest}\n"
    "if limit > 0 and from <= top then\n"
    "  local n = top - from + 1\n"
    "  if n > limit then n = limit end\n"
    "  local f, r = string.format('%d', from)\n"
    "  if ARGV[5] == '1' then\n"
    "    r = redis.call('XREVRANGE', stream, '+', f, 'COUNT', n)\n"
    "  else\n"
    "    r = redis.call('XRANGE', stream, f, '+', 'COUNT', n)\n"
    "  end\n"
    "  for _, e in ipairs(r) do\n"
    "    out[#out + 1] = tonumber(string.match(e[1], '^%d+'))\n"
    "    out[#out + 1] = e[2][2]\n"
    "  end\n"
    "end\n"
    "return out\n";

/* Presence (broker_redis_presence.c), per channel C: P presence:C, a sorted
 * set client -> expiry (ms, Redis' clock); P presence_info:C, a hash client
 * -> "a<entry>" (anonymous) or "u<len>:<user><entry>"; P presence_users:C,
 * a hash user -> clients. An entry is removed by ZREM, so whoever removes
 * it (its hub, or a sweep of expired entries) does it once and publishes
 * its leave event once. TIME before writes needs effects replication
 * (docs/internals.md). Common head of both presence scripts: ARGV[1] is
 * the key prefix. */
#define PRESENCE_HEAD                                                                       \
    "if redis.replicate_commands then redis.replicate_commands() end\n"                     \
    "local t = redis.call('TIME')\n"                                                        \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"               \
    "local nows, prefix = string.format('%d', now), ARGV[1]\n"                               \
    "local function split(v)\n"                                                             \
    "  if string.sub(v, 1, 1) ~= 'u' then return nil, string.sub(v, 2) end\n"              \
    "  local c = string.find(v, ':', 2, true)\n"                                            \
    "  local n = tonumber(string.sub(v, 2, c - 1))\n"                                       \
    "  return string.sub(v, c + 1, c + n), string.sub(v, c + n + 1)\n"                      \
    "end\n"                                                                                 \
    "local function event(op, ch, entry)\n"                                                 \
    "  redis.call('PUBLISH', prefix .. ch,\n"                                               \
    "             '{\"op\":\"' .. op .. '\",\"channel\":\"' .. ch .. '\",' .. entry .. '}')\n" \
    "end\n"                                                                                 \
    "local function drop(z, h, u, ch, jl, id)\n"                                            \
    "  if redis.call('ZREM', z, id) == 0 then return 0 end\n"                               \
    "  local v = redis.call('HGET', h, id)\n"                                               \
    "  if not v then return 1 end\n"                                                        \
    "  redis.call('HDEL', h, id)\n"                                                         \
    "  local user, entry = split(v)\n"                                                      \
    "  if user and redis.call('HINCRBY', u, user, -1) > 0 then return 1 end\n"              \
    "  if user then redis.call('HDEL', u, user) end\n"                                      \
    "  if jl == '1' then event('leave', ch, entry) end\n"                                   \
    "  return 1\n"                                                                          \
    "end\n"                                                                                 \
    "local function sweep(z, h, u, ch, jl)\n"                                               \
    "  local n = 0\n"                                                                       \
    "  for _, id in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', nows, 'LIMIT', 0, 1000)) do\n" \
    "    n = n + drop(z, h, u, ch, jl, id)\n"                                               \
    "  end\n"                                                                               \
    "  return n\n"                                                                          \
    "end\n"

/* KEYS: (presence, info, users) per group. ARGV: prefix, entry lifetime
 * ms, key ttl ms, then groups: kind, channel, join_leave (1/0), n, and n
 * (client, value) pairs. Kinds: a (add), f (refresh: the value is written
 * only when the entry is missing), r (remove), s (sweep the expired; n 0).
 * Returns {added, removed, swept}. */
static const char presence_lua[] =
    PRESENCE_HEAD
    "local exp, ttl = string.format('%d', now + tonumber(ARGV[2])), ARGV[3]\n"
    "local added, removed, swept, a, k = 0, 0, 0, 4, 1\n"
    "while a <= #ARGV do\n"
    "  local kind, ch, jl, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])\n"
    "  local z, h, u = KEYS[k], KEYS[k + 1], KEYS[k + 2]\n"
    "  a, k = a + 4, k + 3\n"
    "  if kind == 's' then\n"
    "    swept = swept + sweep(z, h, u, ch, jl)\n"
    "  else\n"
    "    for i = 1, n do\n"
    "      local id, v = ARGV[a], ARGV[a + 1]\n"
    "      a = a + 2\n"
    "      if kind == 'r' then\n"
    "        removed = removed + drop(z, h, u, ch, jl, id)\n"
    "      elseif redis.call('ZADD', z, exp, id) == 1 then\n"
    "        redis.call('HSET', h, id, v)\n"
    "        local user, entry = split(v)\n"
    "        if (not user or redis.call('HINCRBY', u, user, 1) == 1) and jl == '1' then\n"
    "          event('join', ch, entry)\n"
    "        end\n"
    "        added = added + 1\n"
    "      elseif kind == 'a' then\n"
    "        redis.call('HSET', h, id, v)\n"
    "      end\n"
    "    end\n"
    "    if kind ~= 'r' then\n"
    "      redis.call('PEXPIRE', z, ttl)\n"
    "      redis.call('PEXPIRE', h, ttl)\n"
    "      redis.call('PEXPIRE', u, ttl)\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return {added, removed, swept}\n";

/* KEYS: presence, info, users. ARGV: prefix, channel, join_leave, max.
 * Sweeps what expired (with leave events), then returns {clients, users,
 * truncated, entry, entry, ...} with at most max entries. */
static const char presence_read_lua[] =
    PRESENCE_HEAD
    "local z, h, u = KEYS[1], KEYS[2], KEYS[3]\n"
    "sweep(z, h, u, ARGV[2], ARGV[3])\n"
    "local live = '(' .. nows\n"
    "local out = {redis.call('ZCOUNT', z, live, '+inf'), redis.call('HLEN', u), 0}\n"
    "local max = tonumber(ARGV[4])\n"
    "if max > 0 then\n"
    "  local ids = redis.call('ZRANGEBYSCORE', z, live, '+inf', 'LIMIT', 0, max + 1)\n"
    "  if #ids > max then out[3] = 1; ids[#ids] = nil end\n"
    "  for i = 1, #ids, 1000 do\n"
    "    local vs = redis.call('HMGET', h, unpack(ids, i, math.min(i + 999, #ids)))\n"
    "    for _, v in ipairs(vs) do\n"
    "      if v then local _, e = split(v); out[#out + 1] = e end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

const char *hub_rbroker_script_text(int script)
{
    static const char *const text[SCRIPT_N] = {
        [SCRIPT_PUBLISH] = publish_lua,
        [SCRIPT_HISTORY] = history_lua,
        [SCRIPT_PRESENCE] = presence_lua,
        [SCRIPT_PRESENCE_READ] = presence_read_lua,
    };
    return text[script];
}

/* ------------------------------------------------------------------ */
/* Publish                                                            */
/* ------------------------------------------------------------------ */

static uint32_t pos_ttl(const struct hub_channel_opts *o)
{
    return o->history_ttl > HUB_STREAM_META_TTL ? o->history_ttl : HUB_STREAM_META_TTL;
}

/* A call of `script` on the stream of `channel`: its two keys, and
 * `epoch` filled with a new random candidate. */
static struct hub_rcall *stream_call(const struct rbroker *b, int script, const char *channel,
                                     size_t len, char epoch[17])
{
    hub_random_hex(epoch, 8);
    struct hub_rcall *c = hub_rbroker_call_new(script);
    hub_rbroker_call_arg(c, "2", 1);
    hub_rbroker_call_key(c, b, KEY_POS, channel, len);
    hub_rbroker_call_key(c, b, KEY_STREAM, channel, len);
    return c;
}

int hub_rbroker_stream_publish(struct rbroker *b, const char *channel, size_t len,
                               struct hub_msg *m, const struct hub_channel_opts *o,
                               hub_broker_publish_cb cb, void *ud)
{
    char epoch[17];
    struct hub_rcall *c = stream_call(b, SCRIPT_PUBLISH, channel, len, epoch);
    hub_rbroker_call_key(c, b, "", channel, len);           /* the pub/sub channel */
    hub_rbroker_call_arg(c, hub_msg_payload(m), m->payload_len);
    hub_rbroker_call_argf(c, "%u", o->history_size);
    hub_rbroker_call_argf(c, "%u", o->history_ttl);
    hub_rbroker_call_argf(c, "%u", pos_ttl(o));
    hub_rbroker_call_arg(c, epoch, 16);
    return hub_rbroker_publish_call(b, channel, len, c, cb, ud);
}

/* ------------------------------------------------------------------ */
/* Reads                                                              */
/* ------------------------------------------------------------------ */

struct hread {
    struct rbroker *b;
    struct shard *sh;
    hub_broker_history_cb cb;
    void *ud;
};

/* The read script's reply as a result (msgs: new references in `v`);
 * returns 0, or -1 when it is not of that shape. */
static int history_parse(const redisReply *r, struct hub_history_result *res,
                         struct hub_msg ***v)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || (r->elements - 3) % 2 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[0]->integer < 0 ||
        r->element[1]->type != REDIS_REPLY_STRING || r->element[1]->len == 0 ||
        r->element[1]->len > HUB_EPOCH_MAX || r->element[2]->type != REDIS_REPLY_INTEGER ||
        r->element[2]->integer < 1)
        return -1;
    memset(res, 0, sizeof(*res));
    res->top.offset = (uint64_t)r->element[0]->integer;
    memcpy(res->top.epoch, r->element[1]->str, r->element[1]->len);
    res->oldest = (uint64_t)r->element[2]->integer;
    size_t n = (r->elements - 3) / 2;
    for (size_t i = 0; i < n; i++) {
        const redisReply *o = r->element[3 + 2 * i], *f = r->element[4 + 2 * i];
        if (o->type != REDIS_REPLY_INTEGER || o->integer < 1 || f->type != REDIS_REPLY_STRING)
            return -1;
    }
    *v = n ? hub_xmalloc(n * sizeof(**v)) : NULL;
    for (size_t i = 0; i < n; i++) {
        const redisReply *o = r->element[3 + 2 * i], *f = r->element[4 + 2 * i];
        struct hub_msg *m = hub_msg_text(f->str, f->len);
        m->offset = (uint64_t)o->integer;
        (*v)[i] = m;
    }
    res->msgs = *v;
    res->n = n;
    return 0;
}

static void on_history_reply(void *ud, int status, const redisReply *r)
{
    struct hread *op = ud;
    struct rbroker *b = op->b;
    hub_broker_history_cb cb = op->cb;
    void *cud = op->ud;
    struct hub_history_result res;
    struct hub_msg **v = NULL;
    int ok = status == HUB_OK && history_parse(r, &res, &v) == 0;
    if (status == HUB_OK && !ok)
        hub_log(HUB_LOG_WARN, "%s: history read failed: %s", op->sh->tag,
                r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    free(op);
    if (ok)
        b->history_reads++;
    else
        b->history_read_errors++;
    cb(cud, ok ? HUB_OK : HUB_EUNAVAILABLE, ok ? &res : NULL);
    for (size_t i = 0; ok && i < res.n; i++)
        hub_msg_unref(v[i]);
    free(v);
}

int hub_rbroker_history(struct hub_broker *hb, const char *channel, size_t len,
                        const struct hub_channel_opts *o, const struct hub_history_query *q,
                        hub_broker_history_cb cb, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (b->stopped || !o || !o->history_size) {
        b->history_read_errors++;
        return HUB_EUNAVAILABLE;
    }
    char epoch[17];
    struct hub_rcall *c = stream_call(b, SCRIPT_HISTORY, channel, len, epoch);
    hub_rbroker_call_arg(c, epoch, 16);
    hub_rbroker_call_argf(c, "%u", o->history_ttl);
    hub_rbroker_call_argf(c, "%llu", (unsigned long long)q->since);
    hub_rbroker_call_argf(c, "%u", q->limit);
    hub_rbroker_call_arg(c, q->reverse ? "1" : "0", 1);
    hub_rbroker_call_argf(c, "%u", o->history_size);
    struct hread *op = hub_xmalloc(sizeof(*op));
    op->b = b;
    op->sh = shard_of(b, channel, len);
    op->cb = cb;
    op->ud = ud;
    if (hub_rbroker_call(op->sh, c, on_history_reply, op) < 0) {
        free(op);
        b->history_read_errors++;
        return HUB_EUNAVAILABLE;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* History deliveries from the subscriber connection                  */
/* ------------------------------------------------------------------ */

int hub_rbroker_stream_message(struct shard *sh, const char *name, size_t nlen,
                               const char *s, size_t n)
{
    struct rbroker *b = sh->b;
    const char *p = s + 1, *end = s + n;
    char epoch[HUB_EPOCH_MAX + 1];
    size_t el = 0;
    uint64_t off = 0;
    for (; p < end && *p > ' ' && *p < 0x7f && el < HUB_EPOCH_MAX; p++)
        epoch[el++] = *p;
    epoch[el] = '\0';
    if (el == 0 || p >= end || *p != ' ')
        goto bad;
    for (p++; p < end && *p >= '0' && *p <= '9' && off < UINT64_MAX / 10; p++)
        off = off * 10 + (uint64_t)(*p - '0');
    if (off == 0 || p >= end - 1 || *p != ' ')
        goto bad;
    p++;
    struct hub_msg *m = hub_msg_text(p, (size_t)(end - p));
    m->offset = off;
    /* `name` lives in the reply: deliver may make the channel's entry go. */
    b->base.deliver(b->base.ud, name, nlen, m, epoch);
    hub_msg_unref(m);
    return 0;
bad:
    /* Not one of ours (someone published these bytes on the channel
     * directly): the caller delivers it as it is. */
    b->bad_frames++;
    return -1;
}

void hub_rbroker_stream_metrics(const struct rbroker *b, struct hub_buf *out)
{
    hub_metric_one(out, "luahub_history_reads_total", "counter",
                   "History reads answered by Redis (recoveries, rewinds, catch-ups, history "
                   "calls).", b->history_reads);
    hub_metric_one(out, "luahub_history_read_errors_total", "counter",
                   "History reads that failed (Redis unavailable, timed out, an error).",
                   b->history_read_errors);
    hub_metric_one(out, "luahub_broker_script_reloads_total", "counter",
                   "Script calls answered NOSCRIPT and sent again with EVAL.",
                   b->script_reloads);
    hub_metric_one(out, "luahub_broker_bad_frames_total", "counter",
                   "Messages from Redis that started like history deliveries but did not "
                   "decode (delivered as they are).", b->bad_frames);
}
