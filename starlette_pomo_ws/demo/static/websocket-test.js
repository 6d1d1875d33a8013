// The guide's /websocket-test page: status, a live log, and buttons to poke the connection.
import { api, createSocket, currentUser } from "./common.js";

const $ = (selector) => document.querySelector(selector);

function log(kind, text, attrs = {}) {
  const item = document.createElement("li");
  item.className = kind;
  Object.assign(item.dataset, attrs);
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("#log").prepend(item);
}

if (!currentUser()) {
  $("#need-login").hidden = false;
} else {
  // The buttons start disabled in the page, so that a logged-out visitor cannot press them.
  for (const button of document.querySelectorAll(".buttons button")) button.disabled = false;
  $("#user").textContent = currentUser();
  const socket = createSocket();
  socket.on("status", (status, detail) => log("status", `status: ${status}${detail && detail.delay !== undefined ? ` (retry in ${detail.delay} ms)` : ""}`, { status }));
  socket.on("message", (event) => {
    const attrs = { type: event.type };
    if (event.id) attrs.id = event.id;
    log("event", `${event.type} ${JSON.stringify(event.data)}`, attrs);
    $("#cursor").textContent = socket.lastEventId || "–";
  });
  socket.on("close", ({ code, reason, willReconnect }) => {
    $("#last-close").textContent = `${code} ${reason || ""}`;
    log("close", `closed ${code} ${reason || ""}${willReconnect ? ", reconnecting" : ""}`, { code: String(code) });
  });
  socket.on("error", (error) => log("error", `error: ${error.message || JSON.stringify(error.data)}`));
  socket.connect();
  $("#ping").addEventListener("click", () => {
    if (socket.ping()) log("sent", "sent PING");
    else log("error", "not connected");
  });
  $("#drop").addEventListener("click", () => {
    log("sent", "dropping the connection");
    socket.drop();
  });
  $("#notify").addEventListener("click", async () => {
    try {
      await api("/api/notifications", { method: "POST", body: { message: "Test notification from /websocket-test" } });
    } catch (error) {
      log("error", error.message);
    }
  });
  $("#clear").addEventListener("click", () => $("#log").replaceChildren());
}
