// Shared by the demo's pages: the dev login, the JSON API and the socket.
import { PomoSocket } from "/ws/client.js";

const USER_KEY = "pomo-demo-user";
const TOKEN_KEY = "pomo-demo-token";

export function currentUser() {
  return localStorage.getItem(USER_KEY);
}

/** The team of a user named name@team (as the server reads it), or null. */
export function teamOf(user) {
  const at = user ? user.indexOf("@") : -1;
  return at > 0 && at < user.length - 1 ? user.slice(at + 1) : null;
}

/** The dev login: mint a token for a user name. Real apps get tokens from their own login. */
export async function login(name) {
  const response = await fetch("/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `Login failed (${response.status})`);
  localStorage.setItem(USER_KEY, body.userId);
  localStorage.setItem(TOKEN_KEY, body.token);
  return body.token;
}

export function logout() {
  localStorage.removeItem(USER_KEY);
  localStorage.removeItem(TOKEN_KEY);
}

/** The token provider of the socket: the stored token, or a fresh one when asked to refresh. */
export async function getToken({ refresh } = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  if (token && !refresh) return token;
  const user = currentUser();
  if (!user) throw new Error("Not logged in");
  return login(user);
}

/** Call the JSON API with the stored token; logs in again once on 401. */
export async function api(path, { method = "GET", body } = {}, retried = false) {
  const headers = { Authorization: `Bearer ${await getToken()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401 && !retried) {
    await getToken({ refresh: true });
    return api(path, { method, body }, true);
  }
  if (response.status === 204) return null;
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

/** Socket options can be tuned from the page URL, e.g. `/?minDelay=100&pingInterval=5000`. */
function optionsFromQuery() {
  const params = new URLSearchParams(location.search);
  const options = {};
  for (const key of ["minDelay", "maxDelay", "pingInterval", "pongTimeout", "stableAfter"]) {
    if (params.has(key)) options[key] = Number(params.get(key));
  }
  return options;
}

/** A PomoSocket on /ws, with the page's status indicator (#ws-status) and status history wired. */
export function createSocket() {
  const socket = new PomoSocket("/ws", { getToken, ...optionsFromQuery() });
  const indicator = document.getElementById("ws-status");
  const history = document.getElementById("status-history");
  socket.on("status", (status, detail) => {
    if (indicator) {
      indicator.dataset.status = status;
      indicator.querySelector(".label").textContent = status;
      indicator.title = detail && detail.reason ? `${status}: ${detail.reason}` : status;
    }
    if (history) {
      const item = document.createElement("li");
      item.textContent = status;
      history.append(item);
    }
  });
  window.pomoSocket = socket;
  return socket;
}

export function formatTime(date) {
  return new Date(date).toLocaleTimeString();
}
