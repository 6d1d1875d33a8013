// pomo-ws.js: the browser client of starlette-pomo-ws.
//
// A dependency-free ES module. Serve it from the mount (`GET /ws/client.js`) or vendor this file.
//
//   import { PomoSocket } from "/ws/client.js";
//   const socket = new PomoSocket("/ws", { getToken: async () => (await fetch("/token")).text() });
//   socket.on("TASK_CREATED", (event) => addTask(event.data));
//   socket.on("resync", () => refetchEverything());
//   socket.on("status", (status) => indicator.textContent = status);
//   socket.connect();
//
// What it does for you:
// - sends the token as the subprotocol pair ["bearer", token], never in the URL;
// - reconnects with full-jitter exponential backoff, acting on each close code;
// - resumes with ?last_event_id=<cursor>, and calls `resync` listeners on RESYNC_REQUIRED;
// - answers TOKEN_EXPIRING with an in-band REFRESH_TOKEN, and fetches a fresh token after an
//   authentication close (1008);
// - detects a half-open connection with PING/PONG and replaces it;
// - drops an event it has already delivered (by `id`);
// - keeps the channels you subscribe to, and resumes them all with the one cursor after every
//   reconnect (?last_event_id=<cursor>&channels=a,b); tracks their presence.
//
//   socket.subscribe("team:42");
//   socket.on("TEAM_TIMER", (event) => event.channel === "team:42" && showTimer(event.data));
//   socket.on("presence", (channel, presence) => showMembers(presence.users));

/** Close reasons (code 1008) that a fresh token can fix. */
export const AUTH_REASONS = Object.freeze([
  "No authentication token provided",
  "Invalid authentication token",
  "Authentication token expired",
  "Token is for another user",
]);

/** Close reasons (code 1008) after which reconnecting cannot help: tell the user. */
export const FATAL_REASONS = Object.freeze(["Origin not allowed", "Too many connections for this user"]);

/** The close code used when the client itself replaces or drops a connection (reconnects). */
export const CLIENT_RECONNECT_CODE = 4000;

// The server's messages about a channel that carry it as `data.channel`.
const CHANNEL_CONTROL = new Set([
  "SUBSCRIBED",
  "UNSUBSCRIBED",
  "RESYNC_REQUIRED",
  "ERROR",
  "PRESENCE",
  "PRESENCE_JOIN",
  "PRESENCE_LEAVE",
]);

/** Status values, emitted as `status` events. */
export const Status = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

const DEFAULTS = Object.freeze({
  getToken: null, // async ({ refresh, reason }) => string
  token: null, // a fixed token, when there is no provider
  lastEventId: null, // resume from a stored cursor
  channels: [], // channels to subscribe to; resumed with lastEventId when it is given too
  protocols: null, // override the subprotocols (defaults to ["bearer", token])
  minDelay: 500, // ms: the base of the exponential backoff
  maxDelay: 30000, // ms: the cap of the exponential backoff
  throttledDelay: 60000, // ms: the minimum wait after "Too many messages"
  maxAuthFailures: 3, // consecutive authentication closes before giving up
  stableAfter: 5000, // ms a connection must stay open before the backoff resets
  pingInterval: 25000, // ms of silence before the client sends PING (0 turns liveness off)
  pongTimeout: 10000, // ms to wait for any message after a PING before replacing the connection
  connectTimeout: 15000, // ms to wait for CONNECTION_ESTABLISHED before replacing the attempt
  dedupSize: 2000, // how many event ids to remember for deduplication
  WebSocket: null, // the WebSocket constructor (defaults to globalThis.WebSocket)
  random: Math.random,
});

/**
 * A self-healing, authenticated WebSocket for starlette-pomo-ws.
 *
 * Events (subscribe with `on(name, listener)`, which returns an unsubscribe function):
 * - any event type, e.g. "TASK_CREATED": `listener(event)`;
 * - "message": every server message, after deduplication;
 * - "status": `listener(status, detail)` with one of `Status`;
 * - "resync": `listener(event)`: state may have been missed, refetch it;
 * - "error": `listener(errorOrEvent)` for ERROR events and token provider failures;
 * - "close": `listener({ code, reason, willReconnect, delay })` for every closed socket;
 * - "presence": `listener(channel, presence)` when the known members of a channel change;
 * - "unsubscribed": `listener(channel, reasonOrEvent)` when the server ends a subscription
 *   (a revoking UNSUBSCRIBED, or an ERROR forbidden / invalid_channel / too_many_channels).
 */
export class PomoSocket {
  /**
   * @param {string} url  "/ws", "ws://host/ws" or "https://host/ws" (http(s) maps to ws(s)).
   * @param {object} [options]  See DEFAULTS above.
   */
  constructor(url, options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.url = url;
    this._listeners = new Map();
    this._status = Status.IDLE;
    this._ws = null;
    this._token = this.options.token;
    this._cursor = this.options.lastEventId;
    this._attempt = 0;
    this._authFailures = 0;
    this._stopped = true;
    this._reconnectTimer = null;
    this._idleTimer = null;
    this._deadTimer = null;
    this._connectTimer = null;
    this._openedAt = 0;
    this._everOpened = false;
    this._seen = new Set();
    this._seenOrder = [];
    this._pendingOpen = null;
    this._onOnline = null;
    // channel -> { since, active, askedOn, presence }. `active`: a SUBSCRIBED arrived, so the cursor
    // covers its events and it resumes in the URL; `askedOn`: the socket it was requested on.
    this._channels = new Map();
    this._urlChannels = [];
    const resumable = Boolean(this._cursor);
    for (const channel of this.options.channels || []) {
      this._channels.set(String(channel), { since: null, active: resumable, askedOn: null, presence: null });
    }
    this.lastClose = null;
  }

  /** The current status: "idle", "connecting", "open", "reconnecting" or "closed". */
  get status() {
    return this._status;
  }

  /** The resume cursor: the id of the last event seen (store it to resume after a reload). */
  get lastEventId() {
    return this._cursor;
  }

  /** The channels this socket holds or is subscribing to, in the order they were added. */
  get channels() {
    return [...this._channels.keys()];
  }

  /**
   * Subscribe to a channel: now when open, else as soon as the connection opens. The socket
   * remembers it and resumes it after every reconnect. Without `since`, the server sends the
   * channel's retained event (its state) after SUBSCRIBED; with `since` (an event id), the
   * channel's events after it come first. Subscribing to a channel already held does nothing.
   * @param {string} channel  e.g. "team:42"
   * @param {{since?: string}} [options]
   * @returns {PomoSocket} this
   */
  subscribe(channel, { since } = {}) {
    channel = String(channel);
    if (this._channels.has(channel)) return this;
    const entry = { since: since || null, active: false, askedOn: null, presence: null };
    this._channels.set(channel, entry);
    if (this._isOpen()) this._sendSubscribe(channel, entry);
    return this;
  }

  /**
   * Leave a channel: no event of it is delivered from now on, and it is not resumed.
   * @returns {boolean} whether the channel was held
   */
  unsubscribe(channel) {
    channel = String(channel);
    if (!this._channels.delete(channel)) return false;
    if (this._isOpen()) this.send("UNSUBSCRIBE", { channel });
    return true;
  }

  /**
   * The last known presence of a channel: `{ channel, count, truncated, users }`, where `users`
   * is `[{ userId, connections }]` (or `null` above the server's `presence_max_members`), or
   * `null` when nothing is known yet (not a presence channel, or no PRESENCE arrived).
   */
  presence(channel) {
    const entry = this._channels.get(String(channel));
    const known = entry && entry.presence;
    if (!known) return null;
    const users = known.users
      ? [...known.users].map(([userId, connections]) => ({ userId, connections }))
      : null;
    return { channel: String(channel), count: known.count, truncated: known.truncated, users };
  }

  /** Ask the server for a channel's presence again (answered with PRESENCE). Returns whether it was sent. */
  requestPresence(channel) {
    return this.send("PRESENCE", { channel: String(channel) });
  }

  /**
   * Subscribe to an event; returns a function that unsubscribes.
   * @param {string} name
   * @param {Function} listener
   */
  on(name, listener) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    return () => this.off(name, listener);
  }

  /** Remove a listener added with `on`. */
  off(name, listener) {
    const set = this._listeners.get(name);
    if (set) set.delete(listener);
  }

  /** Open the connection (idempotent). Returns this, for chaining. */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._attempt = 0;
    this._authFailures = 0;
    this._everOpened = false;
    if (typeof globalThis.addEventListener === "function" && !this._onOnline) {
      // Back online: skip the rest of the backoff.
      this._onOnline = () => this._reconnectNow();
      globalThis.addEventListener("online", this._onOnline);
    }
    this._open(false, null);
    return this;
  }

  /** Close for good (code 1000); no reconnect. `connect()` starts again. */
  close(reason = "Client closed") {
    this._stopped = true;
    this._clearTimers();
    this._removeOnline();
    this._detach(1000, reason);
    this._setStatus(Status.CLOSED, { code: 1000, reason });
  }

  /**
   * Drop the current socket and reconnect as after a network failure (resuming from the cursor).
   * Useful for testing and for a "reconnect now" button.
   */
  drop() {
    if (this._stopped) return;
    this._handleClose(CLIENT_RECONNECT_CODE, "Dropped by the client", true);
  }

  /** Send `{type, data}` if the socket is open. Returns whether it was sent. */
  send(type, data) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    const message = data === undefined ? { type } : { type, data };
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Send PING; the server answers PONG. Returns whether it was sent. */
  ping() {
    return this.send("PING");
  }

  // -- connection lifecycle -------------------------------------------------------------------

  async _open(refreshToken, reason) {
    const reconnecting = this._attempt > 0 || this._everOpened;
    this._setStatus(reconnecting ? Status.RECONNECTING : Status.CONNECTING);
    let token;
    try {
      token = await this._getToken(refreshToken, reason);
    } catch (error) {
      if (this._stopped) return;
      this._emit("error", error);
      this._scheduleReconnect(false, "token provider failed");
      return;
    }
    if (this._stopped) return;
    const Impl = this.options.WebSocket || globalThis.WebSocket;
    const protocols = this.options.protocols || (token ? ["bearer", token] : undefined);
    let ws;
    try {
      ws = protocols ? new Impl(this._buildUrl(), protocols) : new Impl(this._buildUrl());
    } catch (error) {
      this._emit("error", error);
      this._scheduleReconnect(false, "invalid URL or token");
      return;
    }
    this._ws = ws;
    for (const channel of this._urlChannels) {
      const entry = this._channels.get(channel);
      if (entry) entry.askedOn = ws;
    }
    this._openedAt = 0;
    ws.onmessage = (message) => {
      if (this._ws === ws) this._onMessage(message);
    };
    ws.onclose = (close) => {
      if (this._ws === ws) this._handleClose(close.code, close.reason, false);
    };
    ws.onerror = () => {
      // A close event always follows; it carries the code.
    };
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws) this._handleClose(CLIENT_RECONNECT_CODE, "Connect timeout", true);
    }, this.options.connectTimeout);
  }

  async _getToken(refresh, reason) {
    const provider = this.options.getToken;
    if (provider && (refresh || !this._token)) this._token = await provider({ refresh, reason });
    return this._token;
  }

  _buildUrl() {
    const base = globalThis.location ? globalThis.location.href : "http://localhost/";
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (this._cursor) url.searchParams.set("last_event_id", this._cursor);
    else url.searchParams.delete("last_event_id");
    // With a cursor, only channels already held resume in the URL (their events after the cursor
    // are replayed); the others subscribe once open, so that they get their retained state. Without
    // a cursor every channel without its own `since` goes in the URL: a fresh subscribe.
    const inUrl = [];
    for (const [channel, entry] of this._channels) {
      if (this._cursor ? entry.active : !entry.since) inUrl.push(channel);
    }
    this._urlChannels = inUrl;
    if (inUrl.length) url.searchParams.set("channels", inUrl.join(","));
    else url.searchParams.delete("channels");
    return url.toString();
  }

  _isOpen() {
    return Boolean(this._ws) && this._ws.readyState === 1 && this._status === Status.OPEN;
  }

  _sendSubscribe(channel, entry) {
    const data = entry.since ? { channel, since: entry.since } : { channel };
    if (this.send("SUBSCRIBE", data)) entry.askedOn = this._ws;
  }

  _channelOf(event) {
    if (typeof event.channel === "string") return event.channel;
    // Only the server's own messages name their channel in `data`: an app event's data is the app's.
    if (!CHANNEL_CONTROL.has(event.type)) return null;
    const data = event.data;
    return data && typeof data === "object" && typeof data.channel === "string" ? data.channel : null;
  }

  /** What a channel message does to the channel set; returns false when the message must be dropped. */
  _onChannelMessage(event) {
    const type = event.type;
    const data = event.data && typeof event.data === "object" ? event.data : {};
    const channel = this._channelOf(event);
    if (channel === null) return true;
    const entry = this._channels.get(channel);
    if (type === "SUBSCRIBED") {
      if (!entry) return false; // unsubscribed meanwhile
      entry.active = true;
      entry.since = null; // from now on the cursor covers it
      return true;
    }
    if (type === "UNSUBSCRIBED") {
      const reason = data.reason || event.reason;
      if (reason && entry) {
        this._channels.delete(channel); // revoked by the server
        this._emit("unsubscribed", channel, reason);
      }
      return true;
    }
    if (type === "ERROR") {
      if (entry && ["forbidden", "invalid_channel", "too_many_channels"].includes(data.code)) {
        this._channels.delete(channel);
        this._emit("unsubscribed", channel, event);
      }
      return true;
    }
    if (type === "RESYNC_REQUIRED") return Boolean(entry);
    if (!entry) return false; // an event of a channel left: in flight before UNSUBSCRIBE
    if (type === "PRESENCE") {
      const users = Array.isArray(data.users)
        ? new Map(data.users.map((user) => [String(user.userId), Number(user.connections) || 1]))
        : null;
      const count = typeof data.count === "number" ? data.count : users ? users.size : 0;
      entry.presence = { users, count, truncated: Boolean(data.truncated) || !users };
      this._emit("presence", channel, this.presence(channel));
    } else if ((type === "PRESENCE_JOIN" || type === "PRESENCE_LEAVE") && entry.presence && entry.presence.users) {
      const users = entry.presence.users;
      const userId = String(data.userId);
      if (type === "PRESENCE_JOIN") users.set(userId, users.get(userId) || 1);
      else users.delete(userId);
      entry.presence.count = users.size;
      this._emit("presence", channel, this.presence(channel));
    }
    return true;
  }

  _onMessage(message) {
    if (typeof message.data !== "string") return;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (!event || typeof event !== "object" || typeof event.type !== "string") return;
    this._alive();
    const type = event.type;
    if (type === "CONNECTION_ESTABLISHED") {
      clearTimeout(this._connectTimer);
      this._connectTimer = null;
      this._openedAt = Date.now();
      this._everOpened = true;
      this._authFailures = 0;
      if (event.id) this._cursor = event.id;
      this._setStatus(Status.OPEN);
      // Channels that were not in the URL: subscribe now (with their own `since`, if any).
      for (const [channel, entry] of this._channels) {
        if (entry.askedOn !== this._ws) this._sendSubscribe(channel, entry);
      }
    } else if (type === "RESYNC_REQUIRED" && this._channelOf(event) !== null) {
      // One channel's `since` could not be recovered: its state must be refetched. The id is the
      // server's current position, possibly ahead of events still in flight: not a cursor.
      if (!this._onChannelMessage(event)) return;
    } else if (type === "RESYNC_REQUIRED") {
      if (event.id) this._cursor = event.id;
      this._seen.clear();
      this._seenOrder = [];
    } else if (type === "TOKEN_EXPIRING") {
      this._refreshInBand();
    } else if (type === "SUBSCRIBED" || type === "UNSUBSCRIBED" || event.retained === true) {
      // SUBSCRIBED's id is informational, and a retained event is state, not a position: neither
      // moves the cursor nor is deduplicated.
      if (!this._onChannelMessage(event)) return;
    } else if (event.id) {
      if (this._seen.has(event.id)) return;
      this._remember(event.id);
      this._cursor = event.id;
      if (!this._onChannelMessage(event)) return;
    } else if (!this._onChannelMessage(event)) {
      return;
    }
    this._emit("message", event);
    if (type === "RESYNC_REQUIRED") this._emit("resync", event);
    if (type === "ERROR") this._emit("error", event);
    this._emit(type, event);
  }

  async _refreshInBand() {
    const ws = this._ws;
    if (!this.options.getToken) return;
    try {
      const token = await this._getToken(true, "TOKEN_EXPIRING");
      if (this._ws === ws && token) this.send("REFRESH_TOKEN", { token });
    } catch (error) {
      // The server closes at expiry with 1008; we then fetch a token again before reconnecting.
      this._emit("error", error);
    }
  }

  _remember(id) {
    this._seen.add(id);
    this._seenOrder.push(id);
    while (this._seenOrder.length > this.options.dedupSize) this._seen.delete(this._seenOrder.shift());
  }

  _handleClose(code, reason, byClient) {
    const ws = this._ws;
    const livedLong = this._openedAt > 0 && Date.now() - this._openedAt >= this.options.stableAfter;
    this._clearTimers();
    if (ws) this._detach(byClient ? CLIENT_RECONNECT_CODE : undefined, reason);
    if (livedLong) this._attempt = 0;
    this.lastClose = { code, reason };
    if (this._stopped) return;

    let willReconnect = true;
    let refresh = false;
    let minimum = 0;
    // daphne lets a server close only with 1000 or 3000-4999: there 1008 arrives as 4008 (and no reason).
    // The client's own closes (4000, to replace a connection) always reconnect.
    const meaning = !byClient && code >= 4000 && code < 5000 ? code - 3000 : code;
    if (meaning === 1000 || meaning === 1009 || (meaning === 1008 && FATAL_REASONS.includes(reason))) {
      willReconnect = false;
    } else if (meaning === 1008 && reason === "Too many messages") {
      minimum = this.options.throttledDelay;
    } else if (meaning === 1008) {
      // An authentication reason (or an unknown 1008): get a fresh token, then reconnect.
      refresh = true;
      this._authFailures += 1;
      if (this._authFailures > this.options.maxAuthFailures) willReconnect = false;
    }

    if (!willReconnect) {
      this._stopped = true;
      this._removeOnline();
      this._emit("close", { code, reason, willReconnect: false, delay: null });
      this._setStatus(Status.CLOSED, { code, reason });
      return;
    }
    const delay = this._scheduleReconnect(refresh, reason, minimum);
    this._emit("close", { code, reason, willReconnect: true, delay });
  }

  _scheduleReconnect(refresh, reason, minimum = 0) {
    const { minDelay, maxDelay, random } = this.options;
    // Full jitter: a uniform delay between 0 and the exponential ceiling (AWS architecture blog).
    const ceiling = Math.min(maxDelay, minDelay * 2 ** this._attempt);
    const delay = Math.max(minimum, Math.floor(random() * ceiling));
    this._attempt += 1;
    this._setStatus(Status.RECONNECTING, { delay });
    clearTimeout(this._reconnectTimer);
    this._pendingOpen = [refresh, reason];
    this._reconnectTimer = setTimeout(() => this._reconnectNow(), delay);
    return delay;
  }

  _reconnectNow() {
    if (this._stopped || this._reconnectTimer === null) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const [refresh, reason] = this._pendingOpen || [false, null];
    this._open(refresh, reason);
  }

  _removeOnline() {
    if (this._onOnline && typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    this._onOnline = null;
  }

  _detach(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (!ws) return;
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    ws.onopen = null;
    if (ws.readyState === 0 || ws.readyState === 1) {
      try {
        ws.close(code === undefined ? 1000 : code, reason ? String(reason).slice(0, 120) : undefined);
      } catch {
        // Already closing.
      }
    }
  }

  // -- liveness ------------------------------------------------------------------------------

  _alive() {
    clearTimeout(this._deadTimer);
    this._deadTimer = null;
    clearTimeout(this._idleTimer);
    const { pingInterval, pongTimeout } = this.options;
    if (!pingInterval) return;
    const ws = this._ws;
    this._idleTimer = setTimeout(() => {
      if (this._ws !== ws) return;
      this.ping();
      this._deadTimer = setTimeout(() => {
        // No PONG, HEARTBEAT or event: the connection is half-open. Replace it.
        if (this._ws === ws) this._handleClose(CLIENT_RECONNECT_CODE, "No response to PING", true);
      }, pongTimeout);
    }, pingInterval);
  }

  _clearTimers() {
    for (const name of ["_reconnectTimer", "_idleTimer", "_deadTimer", "_connectTimer"]) {
      clearTimeout(this[name]);
      this[name] = null;
    }
  }

  // -- events --------------------------------------------------------------------------------

  _setStatus(status, detail = {}) {
    if (this._status === status) return;
    this._status = status;
    this._emit("status", status, detail);
  }

  _emit(name, ...args) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (error) {
        // A listener's bug must not break the connection.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
}

export default PomoSocket;
