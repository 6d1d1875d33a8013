// The demo's main page: tasks, a timer synced across tabs, notifications and an event log.
import { api, createSocket, currentUser, login, logout } from "./common.js";

const state = {
  tasks: new Map(),
  session: null,
  settings: null,
  clockOffset: 0, // server time minus browser time, in ms
  endingSession: null,
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

function logEvent(event) {
  const item = document.createElement("li");
  item.dataset.type = event.type;
  if (event.id) item.dataset.id = event.id;
  if (event.data && typeof event.data === "object") {
    const key = event.data.id || event.data.taskId || event.data.sessionId;
    if (key) item.dataset.key = key;
  }
  const summary = event.data && (event.data.title || event.data.message || event.data.status || "");
  item.textContent = `${new Date(event.timestamp).toLocaleTimeString()} ${event.type} ${summary || ""}`;
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
    const buffered = fetching;
    fetching = null;
    buffered.forEach(apply);
    renderTasks();
    renderTimer();
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
  setInterval(renderTimer, 250);
  renderTimer();
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
