/**
 * intaleq-call.js: the reference web client of intaleq-signal. One voice
 * call between a ride's driver and passenger: the signaling WebSocket and
 * one RTCPeerConnection, done the way docs/protocol.md, "For app
 * developers", tells apps to. A plain ES module, no dependency:
 *
 *   import {IntaleqCall} from "./intaleq-call.js";
 *   const call = new IntaleqCall({url: "wss://signal.example.org/ws",
 *     sessionId, userId, token});
 *   call.addEventListener("remotestream", (e) => { audio.srcObject = e.detail.stream; });
 *   call.addEventListener("ended", (e) => showEnded(e.detail.reason));
 *   await call.start();
 *   ...
 *   call.hangUp();
 *
 * What it does (docs/protocol.md, "The flow of a call"): authenticate
 * first, with the participant token; build the RTCPeerConnection from the
 * ice_servers of session_joined and hand later ones to setConfiguration;
 * the driver offers on participant_joined, the passenger answers (perfect
 * negotiation, the passenger polite); trickle ICE, remote candidates queued
 * until the remote description is set; heartbeat → pong; after a network
 * loss or close 1012, reconnect with jittered exponential backoff, keep the
 * RTCPeerConnection, and the driver re-offers with an ICE restart
 * (docs/protocol.md, "Reconnect and ICE restart"); report every change of
 * connectionState with media_state (docs/protocol.md, "media_state").
 * All times are milliseconds.
 */

/** Close codes after which the client never reconnects (docs/protocol.md, "Close codes"). */
const FINAL_CLOSES = new Set([1000, 1001, 4001, 4002]);
/** The connectionStates reported with media_state; "new" and "closed" are not. */
const REPORTED = new Set(["connecting", "connected", "disconnected", "failed"]);

/**
 * @typedef {object} IntaleqCallOptions
 * @property {string} url The signaling WebSocket, `wss://…/ws`.
 * @property {string} sessionId The `session_id` the backend gave the app.
 * @property {string} userId This participant's user id (the session's driver or passenger id).
 * @property {string} [token] This participant's token (`driver_token` or `passenger_token`),
 *   docs/protocol.md, "Participant tokens".
 * @property {"driver"|"passenger"} [role] The role the app expects; a `session_joined`
 *   with another one ends the call with reason `role_mismatch`.
 * @property {MediaStream} [stream] The local audio, from `getUserMedia`.
 * @property {MediaStreamTrack[]} [tracks] Or the local tracks; with neither,
 *   `start()` calls `getUserMedia({audio: true})`.
 * @property {RTCIceServer[]} [iceServers] Used only when the server sends no `ice_servers`.
 * @property {RTCIceTransportPolicy} [iceTransportPolicy] `"all"` (default) or `"relay"`.
 * @property {number} [heartbeatInterval=5000] ms between `heartbeat` messages.
 * @property {number} [heartbeatTimeout=5000] ms without any message (no `pong`, no
 *   `authenticated`, or a socket that never opens) after which the socket counts as lost.
 * @property {number} [reconnectDelay=500] ms, the base of the backoff: attempt n waits
 *   `min(reconnectMaxDelay, reconnectDelay * 2^n)`, times a random factor in [0.5, 1).
 *   After close 1012 the first attempt waits a random 0–`reconnectDelay` only.
 * @property {number} [reconnectMaxDelay=5000] ms, the longest wait between attempts.
 * @property {boolean} [stopTracks=true] Stop the local tracks when the call ends.
 * @property {typeof WebSocket} [WebSocket] The WebSocket class (a wrapper, in tests).
 */

/**
 * One call. Events (each a CustomEvent; the fields are in `event.detail`):
 *
 * - `statechange` `{state}`: the RTCPeerConnection's connectionState changed
 *   (`new`, `connecting`, `connected`, `disconnected`, `failed`, `closed`).
 * - `signaling` `{state, code?, reason?, attempt?, delay?}`: the socket's life:
 *   `connecting`, `joined` (after `session_joined`), `lost` (`code`: the close
 *   code, 1006 when the heartbeat failed), `reconnecting` (the `attempt`-th,
 *   from 0, in `delay` ms), `closed`.
 * - `peer` `{present, role}`: the other participant joined or left (left is
 *   not the end of the call: keep it up until `ended`).
 * - `remotestream` `{stream}`: the other side's audio, for an `<audio>` element.
 * - `ended` `{reason, code?}`: the call is over: an end reason of
 *   docs/protocol.md, "End reasons", an `unauthorized` reason, `replaced`,
 *   `role_mismatch` or `closed` (by `close()`). Fired once; nothing follows.
 * - `error` `{code, message}`: a server `error`, or a step of the client
 *   that failed (`code` `client`); the call goes on.
 */
export class IntaleqCall extends EventTarget {
  /** @param {IntaleqCallOptions} options */
  constructor(options) {
    super();
    this.options = {heartbeatInterval: 5000, heartbeatTimeout: 5000, reconnectDelay: 500,
                    reconnectMaxDelay: 5000, stopTracks: true, iceServers: [], ...options};
    /** @type {RTCPeerConnection|null} created on the first `session_joined`. */
    this.pc = null;
    /** @type {"driver"|"passenger"|null} from `session_joined`. */
    this.role = null;
    /** @type {boolean} the other participant is connected to the server. */
    this.peerPresent = false;
    this.ended = false;
    this.ws = null;
    this.joined = false;        // the current socket got session_joined
    this.outbox = [];           // messages made while no socket was joined
    this.pending = [];          // remote candidates waiting for the remote description
    this.chain = Promise.resolve();      // server messages, one at a time, in order
    this.reports = Promise.resolve();    // media_state reports, in order, beside the chain
    this.mediaReports = true;   // false once the server turned media_state down (too old)
    this.offered = false;       // the driver made its first offer: later ones restart ICE
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.endOfGeneration = new Set();    // ufrags whose "" marker was sent
    this.attempt = 0;           // reconnect attempts since the last session_joined
    this.timer = null;          // the pending reconnect
    this.ticker = null;         // the heartbeat
    this.waitingSince = null;   // when the socket started waiting for an answer
    this.unauthorized = null;   // the reason of the last `unauthorized`
    this.hungUp = false;        // hangUp() was called
  }

  /**
   * Get the microphone if no stream or tracks were given, then connect.
   * @returns {Promise<void>} resolves on the first `session_joined`, rejects
   *   with the reason if the call ends before it.
   */
  async start() {
    const {stream, tracks} = this.options;
    this.stream = stream || (tracks ? new MediaStream(tracks)
                                    : await navigator.mediaDevices.getUserMedia({audio: true}));
    const joined = new Promise((resolve, reject) => {
      this.addEventListener("signaling", (e) => e.detail.state === "joined" && resolve());
      this.addEventListener("ended", (e) => reject(new Error(e.detail.reason)), {once: true});
    });
    this.connect();
    return joined;
  }

  /** End the call for both (`end_call`); `ended` follows with `user_terminated`. */
  hangUp() {
    this.hungUp = true;  // whatever happens to the socket now, no reconnect
    if (this.joined) this.sendNow({type: "end_call"});
    else this.finish("user_terminated");  // no socket: end here; the peer's grace runs out
  }

  /** Leave without ending the call (the other side sees the participant leave). */
  close() {
    this.finish("closed");
  }

  // -- the socket ------------------------------------------------------------

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, {detail}));
  }

  connect() {
    this.timer = null;
    const ws = new (this.options.WebSocket || WebSocket)(this.options.url);
    this.ws = ws;
    this.joined = false;
    this.unauthorized = null;
    this.waitingSince = Date.now();
    this.emit("signaling", {state: "connecting"});
    ws.onopen = () => this.authenticate();
    ws.onmessage = (event) => {
      this.waitingSince = null;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return this.fail("invalid JSON from the server", err);
      }
      this.chain = this.chain.then(() => this.handle(msg)).catch((err) => this.fail(msg.type, err));
    };
    ws.onclose = (event) => this.lost(event.code, event.reason);
    clearInterval(this.ticker);
    this.ticker = setInterval(() => this.beat(), this.options.heartbeatInterval);
  }

  /** The first message of every socket: docs/protocol.md, rule 1. */
  authenticate() {
    const auth = {type: "authenticate", session_id: this.options.sessionId, user_id: this.options.userId};
    if (this.options.token) auth.token = this.options.token;
    this.sendNow(auth);
  }

  /** Heartbeat: docs/protocol.md, rule 8, and "Reconnect and ICE restart". */
  beat() {
    if (this.waitingSince !== null && Date.now() - this.waitingSince > this.options.heartbeatTimeout) {
      this.lost(1006, "heartbeat");
    } else if (this.joined && this.waitingSince === null) {
      this.waitingSince = Date.now();
      this.sendNow({type: "heartbeat"});
    }
  }

  /** The current socket is gone (closed, or silent): reconnect unless the call is over. */
  lost(code, reason) {
    const ws = this.ws;
    if (!ws || this.ended) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (ws.readyState < WebSocket.CLOSING) ws.close();
    this.ws = null;
    this.joined = false;
    clearInterval(this.ticker);
    this.emit("signaling", {state: "lost", code, reason});
    if (this.hungUp) return this.finish("user_terminated", code);
    if (code === 4001 && this.unauthorized === "auth_timeout") code = 1006;  // worth another try
    if (FINAL_CLOSES.has(code)) {
      // A call the server ended closes with 1000 and the end reason; the
      // socket may close before the `call_ended` before it was handled.
      const why = {1000: reason || "closed", 1001: "server_shutdown", 4002: "replaced"}[code];
      return this.finish(this.unauthorized || why, code);
    }
    const {reconnectDelay, reconnectMaxDelay} = this.options;
    const delay = code === 1012 && this.attempt === 0
      ? Math.random() * reconnectDelay
      : Math.min(reconnectMaxDelay, reconnectDelay * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.emit("signaling", {state: "reconnecting", attempt: this.attempt, delay});
    this.attempt += 1;
    this.timer = setTimeout(() => this.connect(), delay);
  }

  sendNow(msg) {
    this.ws.send(JSON.stringify(msg));
  }

  /** Send now if joined, else after the next `session_joined`. */
  send(msg) {
    if (this.joined && this.ws.readyState === WebSocket.OPEN) this.sendNow(msg);
    else this.outbox.push(msg);
  }

  fail(where, err) {
    if (this.ended) return;  // a step cut short by the end
    this.emit("error", {code: "client", message: `${where}: ${err && err.message ? err.message : err}`});
  }

  /** Everything stops: socket, timers, peer connection, tracks; `ended` once. */
  finish(reason, code) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    this.timer = null;
    clearInterval(this.ticker);
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
      this.ws.close(1000);
      this.ws = null;
    }
    if (this.pc) this.pc.close();
    if (this.stream && this.options.stopTracks) for (const track of this.stream.getTracks()) track.stop();
    this.emit("signaling", {state: "closed"});
    this.emit("ended", {reason, code});
  }

  // -- server messages (docs/protocol.md, "Server → client") --------------------

  async handle(msg) {
    if (this.ended) return;
    switch (msg.type) {
      case "session_joined":
        if (this.options.role && msg.role !== this.options.role) return this.finish("role_mismatch");
        this.role = msg.role;
        this.useIceServers(msg.ice_servers);
        this.joined = true;
        this.attempt = 0;
        this.emit("signaling", {state: "joined"});
        for (const queued of this.outbox.splice(0)) this.sendNow(queued);
        break;
      case "participant_joined":
        this.peerPresent = true;
        this.useIceServers(msg.ice_servers);
        this.emit("peer", {present: true, role: msg.role});
        // The driver offers; after a reconnect of either side it re-offers
        // with an ICE restart. The passenger never offers.
        if (this.role === "driver") await this.offer(this.offered);
        break;
      case "participant_left":
        this.peerPresent = false;
        this.emit("peer", {present: false, role: msg.role});
        break;
      case "offer":
      case "answer":
        await this.description({type: msg.type, sdp: msg.sdp});
        break;
      case "ice_candidate":
        if (this.pc.remoteDescription) await this.addCandidate(msg.candidate);
        else this.pending.push(msg.candidate);
        break;
      case "call_ended":
      case "call_timeout":
        this.finish(msg.reason);  // the server closes the socket next
        break;
      case "unauthorized":
        this.unauthorized = msg.reason;  // close 4001 follows
        break;
      case "error":
        if (msg.code === "unknown_type") this.mediaReports = false;  // a server without media_state
        else if (msg.code === "unavailable") {  // several instances: try the same socket again
          const ws = this.ws;
          setTimeout(() => this.ws === ws && this.authenticate(), 1000 + Math.random() * 500);
        } else if (!["replaced", "already_authenticated", "peer_not_connected"].includes(msg.code)) {
          this.emit("error", {code: msg.code, message: msg.message});
        }
        break;
      default:  // authenticated, pong
    }
  }

  // -- the peer connection ---------------------------------------------------

  /** Build the RTCPeerConnection with these ICE servers, or give them to it. */
  useIceServers(iceServers) {
    if (this.pc) {
      // Fresh TURN credentials before any ICE restart: docs/protocol.md, "ICE servers".
      if (iceServers) this.pc.setConfiguration({...this.pc.getConfiguration(), iceServers});
      return;
    }
    const config = {iceServers: iceServers || this.options.iceServers,
                    iceTransportPolicy: this.options.iceTransportPolicy || "all"};
    const pc = new RTCPeerConnection(config);
    this.pc = pc;
    for (const track of this.stream.getTracks()) pc.addTrack(track, this.stream);
    pc.onicecandidate = (event) => this.localCandidate(event.candidate);
    pc.ontrack = (event) => {
      this.emit("remotestream", {stream: event.streams[0] || new MediaStream([event.track])});
    };
    pc.onconnectionstatechange = () => {
      const state = pc.connectionState;
      this.emit("statechange", {state});
      if (REPORTED.has(state)) this.report(state);
      // Another pair while connected (an ICE restart onto a relay, say): connected again.
      const ice = state === "connected" && pc.getSenders()[0]?.transport?.iceTransport;
      if (ice && !ice.onselectedcandidatepairchange) {
        ice.onselectedcandidatepairchange = () => pc.connectionState === "connected" && this.report("connected");
      }
      // ICE failed (a network change, say): the offering side restarts it.
      if (state === "failed" && this.role === "driver" && this.peerPresent) {
        this.chain = this.chain.then(() => this.offer(true)).catch((err) => this.fail("ice restart", err));
      }
    };
  }

  /** The driver's offer; `iceRestart` after the first. */
  async offer(iceRestart) {
    const pc = this.pc;
    try {
      this.makingOffer = true;
      // An earlier offer never answered: roll it back first.
      if (pc.signalingState !== "stable") await pc.setLocalDescription({type: "rollback"});
      await pc.setLocalDescription(await pc.createOffer({iceRestart}));
      this.offered = true;
      this.send({type: "offer", sdp: pc.localDescription.sdp});
    } finally {
      this.makingOffer = false;
    }
  }

  /** Perfect negotiation, with the passenger as the polite peer. */
  async description(description) {
    const pc = this.pc;
    if (description.type === "answer" && pc.signalingState === "stable") return;  // to an offer rolled back
    const collision = description.type === "offer" && (this.makingOffer || pc.signalingState !== "stable");
    this.ignoreOffer = this.role === "driver" && collision;
    if (this.ignoreOffer) return;
    await pc.setRemoteDescription(description);  // the polite side rolls its own offer back
    for (const candidate of this.pending.splice(0)) await this.addCandidate(candidate);
    if (description.type === "offer") {
      await pc.setLocalDescription(await pc.createAnswer());
      this.send({type: "answer", sdp: pc.localDescription.sdp});
    }
  }

  /** `null`: end of candidates; `""`: end of a generation; else one candidate. */
  async addCandidate(candidate) {
    try {
      await (candidate === null ? this.pc.addIceCandidate() : this.pc.addIceCandidate(candidate));
    } catch (err) {
      if (!this.ignoreOffer) this.fail("addIceCandidate", err);
    }
  }

  /** Trickle ICE, each generation closed by `""` and gathering by `null`. */
  localCandidate(candidate) {
    if (candidate) {
      if (!candidate.candidate) this.endOfGeneration.add(candidate.usernameFragment);
      return this.send({type: "ice_candidate", candidate: candidate.toJSON()});
    }
    const sdp = this.pc.localDescription ? this.pc.localDescription.sdp : "";
    const ufrag = (/^a=ice-ufrag:(\S+)/m.exec(sdp) || [])[1];
    if (ufrag && !this.endOfGeneration.has(ufrag)) {
      // Chromium gives no "" candidate of its own: mark the generation's end.
      this.endOfGeneration.add(ufrag);
      const first = this.pc.getTransceivers()[0];
      this.send({type: "ice_candidate", candidate: {candidate: "", sdpMid: first ? first.mid : null,
                                                    sdpMLineIndex: 0, usernameFragment: ufrag}});
    }
    this.send({type: "ice_candidate", candidate: null});
  }

  /**
   * media_state for a connectionState change, or a new selected pair while
   * connected: with `connected`, the selected pair's local candidate type and
   * round-trip time (ms) from getStats (docs/protocol.md, "media_state").
   * Reports stay in order among themselves; signaling never waits for them.
   */
  report(state) {
    this.reports = this.reports.then(async () => {
      if (!this.mediaReports || this.ended) return;
      const msg = {type: "media_state", state};
      if (state === "connected") Object.assign(msg, await this.selectedPair());
      this.send(msg);
    }).catch((err) => this.fail("media_state", err));
  }

  /** `{candidate_type, rtt_ms}` of the selected candidate pair, as far as known. */
  async selectedPair() {
    const stats = await this.pc.getStats();
    const found = {};
    stats.forEach((report) => {
      if (report.type !== "transport" || !report.selectedCandidatePairId) return;
      const pair = stats.get(report.selectedCandidatePairId);
      const local = pair && stats.get(pair.localCandidateId);
      if (local && ["host", "srflx", "prflx", "relay"].includes(local.candidateType)) {
        found.candidate_type = local.candidateType;
      }
      const rtt = pair && pair.currentRoundTripTime * 1000;
      if (rtt >= 0 && rtt <= 60000) found.rtt_ms = Math.round(rtt * 10) / 10;
    });
    return found;
  }
}
