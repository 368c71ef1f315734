// The playground: plain DOM + fetch against the server's own API (no build step). Text from the server is always
// inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function key() { return $("key").value.trim(); }
function userId() { return $("user").value || $("user-id").value.trim(); }

function status(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + key() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({ error: { message: r.statusText } }));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

async function loadUsers() {
  try {
    const { users } = await api("GET", "/v1/users");
    const sel = $("user");
    const keep = sel.value;
    sel.replaceChildren(new Option("(choose a user)", ""));
    for (const u of users) sel.add(new Option(`${u.user_id} (${u.items} items)`, u.user_id));
    sel.value = keep;
    status(`${users.length} users`);
  } catch (e) { status(e.message, true); }
}

async function createUser() {
  try {
    const id = $("user-id").value.trim();
    const u = await api("POST", "/v1/users", id ? { user_id: id } : {});
    $("newkey").textContent = `created ${u.user_id}; its key (shown once): ${u.api_key}`;
    await loadUsers();
    $("user").value = u.user_id;
    await loadItems();
  } catch (e) { status(e.message, true); }
}

async function loadItems(used) {
  const uid = userId();
  const list = $("items");
  list.replaceChildren();
  $("count").textContent = "";
  if (!uid) return;
  try {
    const { items } = await api("GET", `/v1/users/${encodeURIComponent(uid)}/items`);
    $("count").textContent = `(${items.length} items, newest first)`;
    for (const it of items) {
      const li = document.createElement("li");
      if (used && used.includes(it.item_id)) li.classList.add("used");
      const body = document.createElement("div");
      body.className = "body";
      if (it.title) { const b = document.createElement("b"); b.textContent = it.title + "\n"; body.append(b); }
      body.append(document.createTextNode(it.text));
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `#${it.item_id}` + (it.date ? ` · ${it.date}` : "") + (used && used.includes(it.item_id)
        ? " · used in the last prompt" : "");
      body.append(meta);
      const del = document.createElement("button");
      del.textContent = "Delete";
      del.onclick = async () => {
        try { await api("DELETE", `/v1/users/${encodeURIComponent(uid)}/items/${it.item_id}`); await loadItems(); }
        catch (e) { status(e.message, true); }
      };
      li.append(body, del);
      list.append(li);
    }
  } catch (e) { status(e.message, true); }
}

async function addItem() {
  const uid = userId();
  if (!uid) return status("choose or type a user first", true);
  const item = { text: $("item-text").value };
  if ($("item-title").value.trim()) item.title = $("item-title").value.trim();
  if ($("item-date").value.trim()) item.date = $("item-date").value.trim();
  try {
    await api("POST", `/v1/users/${encodeURIComponent(uid)}/items`, item);
    $("item-text").value = "";
    $("item-title").value = "";
    await loadItems();
  } catch (e) { status(e.message, true); }
}

// Reads the SSE stream of /v1/generate: events are "data: {json}" blocks separated by a blank line.
async function generate() {
  const uid = userId();
  if (!uid) return status("choose or type a user first", true);
  const req = { user_id: uid, input: $("input").value, stream: true,
                max_new_tokens: parseInt($("max-new").value, 10) || undefined,
                temperature: parseFloat($("temperature").value) };
  if (!Number.isFinite(req.temperature)) delete req.temperature;
  $("output").textContent = "";
  status("waiting for the model ...");
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false;
  try {
    const r = await fetch("/v1/generate", { method: "POST", signal: controller.signal,
      headers: { "Authorization": "Bearer " + key(), "Content-Type": "application/json" },
      body: JSON.stringify(req) });
    if (!r.ok) {
      const data = await r.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!block.startsWith("data: ")) continue;
        const payload = block.slice(6);
        if (payload === "[DONE]") continue;
        const ev = JSON.parse(payload);
        if (ev.error) throw new Error(ev.error.message);
        $("output").append(document.createTextNode(ev.text));
        if (ev.usage) {
          status(`${ev.finish_reason} · prompt ${ev.usage.prompt_tokens} tokens, wrote ` +
                 `${ev.usage.completion_tokens} · used items ${ev.retrieved.map((i) => "#" + i).join(", ") || "none"}`);
          await loadItems(ev.retrieved);
        }
      }
    }
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
  } finally {
    controller = null;
    $("generate").disabled = false; $("stop").disabled = true;
  }
}

$("key").value = sessionStorage.getItem("flythinker-key") || "";
$("key").onchange = () => sessionStorage.setItem("flythinker-key", key());
$("load-users").onclick = loadUsers;
$("create-user").onclick = createUser;
$("user").onchange = () => loadItems();
$("user-id").onchange = () => { if (!$("user").value) loadItems(); };
$("add-item").onclick = addItem;
$("generate").onclick = generate;
$("stop").onclick = () => controller && controller.abort();
fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = `${h.model} · ${h.db}`; })
  .catch(() => {});
