// The demo's main page: tasks, a timer synced across tabs, notifications and an event log; for a
// user named name@team, also the team's timer, board and "who's here" (the channel team:<team>).
import { api, createSocket, currentUser, login, logout, teamOf } from "./common.js";

const state = {
  tasks: new Map(),
  session: null,
  settings: null,
  clockOffset: 0, // server time minus browser time, in ms
  endingSession: null,
  team: null, // { name, channel, tasks: Map, timer, focusing: Map(userId -> endsAt) }
};
let socket = null;
let fetching = null; // events that arrive while a snapshot is being fetched
const $ = (selector) => document.querySelector(selector);

// -- rendering -----------------------------------------------------------------------------------

function renderTasks() {
  const list = $("#tasks");
  list.replaceChildren();
  for (const task of state.tasks.values()) {
    const item = document.createElement("li");
    item.className = `task ${task.status}`;
    item.dataset.taskId = task.id;
    const done = document.createElement("input");
    done.type = "checkbox";
    done.checked = task.status === "completed";
    done.title = "Done";
    done.addEventListener("change", () =>
      api(`/api/tasks/${task.id}/status`, { method: "POST", body: { status: done.checked ? "completed" : "pending" } }),
    );
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = task.title;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = `${task.completedPomodoros}/${task.estimatedPomodoros}`;
    const focus = document.createElement("button");
    focus.textContent = "Focus";
    focus.className = "focus";
    focus.addEventListener("click", () => startSession("work", task.id));
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.className = "delete";
    remove.title = "Delete";
    remove.addEventListener("click", () => api(`/api/tasks/${task.id}`, { method: "DELETE" }));
    item.append(done, title, count, focus, remove);
    list.append(item);
  }
  $("#task-count").textContent = String(state.tasks.size);
}

function renderTimer() {
  const timer = $("#timer");
  const session = state.session;
  let remaining = state.settings ? state.settings.workDuration * 60 : 25 * 60;
  if (session) {
    const end = Date.parse(session.startTime) + session.duration * 1000;
    // The clock offset is an estimate: never show more than the session's own length.
    const left = Math.ceil((end - (Date.now() + state.clockOffset)) / 1000);
    remaining = Math.min(session.duration, Math.max(0, left));
    if (remaining === 0 && state.endingSession !== session.id) {
      // Every tab may try; the server ends a session once and ignores the rest.
      state.endingSession = session.id;
      api(`/api/sessions/${session.id}/end`, { method: "POST", body: { completed: true } }).catch(() => {});
    }
  }
  const text = `${String(Math.floor(remaining / 60)).padStart(2, "0")}:${String(remaining % 60).padStart(2, "0")}`;
  if (timer.textContent !== text) timer.textContent = text;
  timer.dataset.remaining = String(remaining);
  timer.dataset.running = session ? "true" : "false";
  const task = session && session.taskId ? state.tasks.get(session.taskId) : null;
  $("#session-type").textContent = session ? session.type.replace("_", " ") : "ready";
  $("#focus-task").textContent = task ? task.title : "";
  for (const item of document.querySelectorAll("#tasks li")) {
    item.classList.toggle("active", Boolean(task) && item.dataset.taskId === task.id);
  }
  $("#start").hidden = Boolean(session);
  $("#stop").hidden = !session;
  document.title = session ? `${text} · Pomofocus demo` : "Pomofocus demo";
}

// -- the team -------------------------------------------------------------------------------------

const serverNow = () => Date.now() + state.clockOffset;

function renderBoard() {
  const list = $("#board");
  list.replaceChildren();
  for (const task of state.team.tasks.values()) {
    const item = document.createElement("li");
    item.className = task.status;
    item.dataset.taskId = task.id;
    const done = document.createElement("input");
    done.type = "checkbox";
    done.checked = task.status === "completed";
    done.title = "Done";
    done.addEventListener("change", () =>
      api(`/api/team/tasks/${task.id}/status`, {
        method: "POST",
        body: { status: done.checked ? "completed" : "pending" },
      }).catch((error) => notify(error.message)),
    );
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = task.title;
    const by = document.createElement("span");
    by.className = "by";
    by.textContent = task.createdBy;
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.className = "delete";
    remove.title = "Delete";
    remove.addEventListener("click", () =>
      api(`/api/team/tasks/${task.id}`, { method: "DELETE" }).catch((error) => notify(error.message)),
    );
    item.append(done, title, by, remove);
    list.append(item);
  }
}

let hereShown = "";
/** "Who's here": the channel's presence, with who is focusing now (their own work session). */
function renderHere() {
  const presence = socket.presence(state.team.channel);
  const users = presence && presence.users ? presence.users.map((user) => user.userId).sort() : [];
  const now = serverNow();
  const rows = users.map((userId) => {
    const until = state.team.focusing.get(userId);
    return [userId, until && Date.parse(until) > now ? until : null];
  });
  const shown = JSON.stringify([presence && presence.count, rows]);
  if (shown === hereShown) return;
  hereShown = shown;
  const list = $("#here");
  list.replaceChildren();
  for (const [userId, until] of rows) {
    const item = document.createElement("li");
    item.dataset.userId = userId;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = userId;
    item.append(name);
    if (userId === currentUser()) {
      const me = document.createElement("span");
      me.className = "me";
      me.textContent = "(you)";
      item.append(me);
    }
    if (until) {
      const focusing = document.createElement("span");
      focusing.className = "focusing";
      focusing.textContent = `focusing until ${new Date(Date.parse(until) - state.clockOffset).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
      item.append(focusing);
      item.dataset.focusing = "true";
    }
    list.append(item);
  }
  $("#here-count").textContent = String(presence ? presence.count : 0);
}

function renderTeamTimer() {
  const timer = state.team.timer;
  const element = $("#team-timer");
  let remaining = 25 * 60;
  let running = false;
  let caption = "";
  if (timer && timer.running) {
    // The server decided the end time; every member's page counts down to the same instant.
    const left = Math.ceil((Date.parse(timer.endsAt) - serverNow()) / 1000);
    remaining = Math.min(timer.duration, Math.max(0, left));
    running = left > 0;
    caption = running ? `started by ${timer.startedBy}` : "Team focus complete";
  } else if (timer && timer.stoppedBy) {
    caption = `stopped by ${timer.stoppedBy}`;
  }
  const text = `${String(Math.floor(remaining / 60)).padStart(2, "0")}:${String(remaining % 60).padStart(2, "0")}`;
  if (element.textContent !== text) element.textContent = text;
  element.dataset.remaining = String(remaining);
  element.dataset.running = String(running);
  element.dataset.endsAt = timer && timer.running ? timer.endsAt : "";
  $("#team-timer-by").textContent = caption;
  $("#team-start").hidden = running;
  $("#team-stop").hidden = !running;
}

function renderTeam() {
  if (!state.team) return;
  renderBoard();
  renderHere();
  renderTeamTimer();
}

/** Apply one event of the team's channel (live, replayed, or the retained timer). */
function applyTeam(event) {
  const data = event.data || {};
  const team = state.team;
  switch (event.type) {
    case "TEAM_TASK_CREATED":
    case "TEAM_TASK_UPDATED":
      team.tasks.set(data.id, data);
      break;
    case "TEAM_TASK_DELETED":
      team.tasks.delete(data.taskId);
      break;
    case "TEAM_TIMER":
      team.timer = data;
      break;
    case "MEMBER_FOCUS":
      if (data.focusing) team.focusing.set(data.userId, data.endsAt);
      else team.focusing.delete(data.userId);
      break;
    default:
      return;
  }
  renderTeam();
}

function logEvent(event) {
  const item = document.createElement("li");
  item.dataset.type = event.type;
  if (event.id) item.dataset.id = event.id;
  if (event.channel) item.dataset.channel = event.channel;
  if (event.retained) item.dataset.retained = "true";
  if (event.data && typeof event.data === "object") {
    const key = event.data.id || event.data.taskId || event.data.sessionId;
    if (key) item.dataset.key = key;
  }
  const data = event.data || {};
  const summary = data.title || data.message || data.status || data.userId || data.channel || "";
  item.textContent = `${new Date(event.timestamp).toLocaleTimeString()} ${event.type} ${summary}${event.retained ? " (retained)" : ""}`;
  $("#event-log").prepend(item);
}

function notify(message) {
  const toast = document.createElement("div");
  toast.className = "toast";
  toast.textContent = message;
  $("#toasts").append(toast);
  setTimeout(() => toast.remove(), 5000);
}

// -- state ---------------------------------------------------------------------------------------

function apply(event) {
  if (event.channel) {
    if (state.team && event.channel === state.team.channel) applyTeam(event);
    return;
  }
  const data = event.data || {};
  switch (event.type) {
    case "TASK_CREATED":
    case "TASK_UPDATED":
      state.tasks.set(data.id, data);
      break;
    case "TASK_DELETED":
      state.tasks.delete(data.taskId);
      break;
    case "TASK_STATUS_CHANGED": {
      const task = state.tasks.get(data.taskId);
      if (task) state.tasks.set(data.taskId, { ...task, status: data.status });
      break;
    }
    case "SESSION_START":
      state.session = {
        id: data.sessionId,
        type: data.type,
        duration: data.duration,
        startTime: data.startTime,
        taskId: data.taskId,
      };
      break;
    case "SESSION_END": {
      if (state.session && state.session.id === data.sessionId) state.session = null;
      const task = data.taskId && state.tasks.get(data.taskId);
      if (task) state.tasks.set(data.taskId, { ...task, completedPomodoros: data.completedPomodoros });
      break;
    }
    case "SETTINGS_UPDATED":
      state.settings = data;
      $("#work-duration").value = data.workDuration;
      break;
    default:
      return;
  }
  renderTasks();
  renderTimer();
}

/** Fetch a snapshot; events that arrive meanwhile are replayed on top of it, in order. */
async function refetch() {
  if (fetching) return;
  fetching = [];
  try {
    const before = Date.now();
    const snapshot = await api("/api/state");
    state.clockOffset = snapshot.serverTime - (before + Date.now()) / 2;
    state.tasks = new Map(snapshot.tasks.map((task) => [task.id, task]));
    state.session = snapshot.session
      ? { ...snapshot.session, id: snapshot.session.id }
      : null;
    state.settings = snapshot.settings;
    $("#work-duration").value = snapshot.settings.workDuration;
    if (state.team && snapshot.team) {
      state.team.tasks = new Map(snapshot.team.tasks.map((task) => [task.id, task]));
      state.team.timer = snapshot.team.timer;
      state.team.focusing = new Map(Object.entries(snapshot.team.focusing));
    }
    const buffered = fetching;
    fetching = null;
    buffered.forEach(apply);
    renderTasks();
    renderTimer();
    renderTeam();
    document.body.dataset.synced = String(Number(document.body.dataset.synced || 0) + 1);
  } catch (error) {
    fetching = null;
    notify(`Could not load your data: ${error.message}`);
  }
}

async function startSession(type, taskId) {
  try {
    await api("/api/sessions", { method: "POST", body: { type, taskId: taskId || null } });
  } catch (error) {
    notify(error.message);
  }
}

// -- wiring --------------------------------------------------------------------------------------

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#user").textContent = currentUser();
  socket = createSocket();
  const team = teamOf(currentUser());
  if (team) {
    state.team = { name: team, channel: `team:${team}`, tasks: new Map(), timer: null, focusing: new Map() };
    $("#team").hidden = false;
    $("#team-name").textContent = team;
    // Subscribed before connecting: the first handshake carries ?channels=team:<team>, and every
    // reconnect resumes it with the same cursor as the personal events.
    socket.subscribe(state.team.channel);
    socket.on("presence", (channel) => channel === state.team.channel && renderHere());
    socket.on("unsubscribed", (channel) => notify(`You can no longer see ${channel}`));
  }
  let firstOpen = true;
  socket.on("message", (event) => {
    logEvent(event);
    if (event.type === "NOTIFICATION") notify(event.data && event.data.message);
    if (fetching) fetching.push(event);
    else apply(event);
  });
  socket.on("status", (status) => {
    if (status === "open" && firstOpen) {
      firstOpen = false;
      refetch();
    }
  });
  socket.on("resync", () => {
    notify("Resynchronising after missed events");
    refetch();
  });
  socket.connect();
  setInterval(() => {
    renderTimer();
    if (state.team) {
      renderTeamTimer();
      renderHere();
    }
  }, 250);
  renderTimer();
  renderTeam();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await login($("#name").value.trim());
    start();
  } catch (error) {
    $("#login-error").textContent = error.message;
  }
});
$("#logout").addEventListener("click", () => {
  logout();
  location.reload();
});
$("#task-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const title = $("#task-title").value.trim();
  if (!title) return;
  const estimatedPomodoros = Number($("#task-estimate").value) || 1;
  $("#task-title").value = "";
  try {
    await api("/api/tasks", { method: "POST", body: { title, estimatedPomodoros } });
  } catch (error) {
    notify(error.message);
  }
});
$("#start").addEventListener("click", () => startSession("work", null));
$("#board-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const title = $("#board-title").value.trim();
  if (!title) return;
  $("#board-title").value = "";
  try {
    await api("/api/team/tasks", { method: "POST", body: { title } });
  } catch (error) {
    notify(error.message);
  }
});
$("#team-start").addEventListener("click", () =>
  api("/api/team/timer", { method: "POST", body: {} }).catch((error) => notify(error.message)),
);
$("#team-stop").addEventListener("click", () =>
  api("/api/team/timer/stop", { method: "POST", body: {} }).catch((error) => notify(error.message)),
);
$("#stop").addEventListener("click", () => {
  if (state.session) api(`/api/sessions/${state.session.id}/end`, { method: "POST", body: { completed: false } });
});
$("#settings-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("/api/settings", { method: "PUT", body: { workDuration: Number($("#work-duration").value) } });
  } catch (error) {
    notify(error.message);
  }
});

if (currentUser()) start();
