// The server's own APIs, with the API key (kept in this tab's session storage only) and errors the page can show.
const KEY = "glmkit-api-key";
let authNeeded = () => {};

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function onAuthNeeded(callback) {
  authNeeded = callback;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let message = `HTTP ${response.status}`;
  try {
    const error = (await response.json()).error;
    message = (typeof error === "string" ? error : error && error.message) || message;
  } catch {
    // a body that is not JSON: the status says enough
  }
  if (response.status === 401) authNeeded(message);
  if (response.status === 503) message += " (the server is starting, draining or busy: try again shortly)";
  return new ApiError(message, response.status);
}

async function send(path, init) {
  try {
    return await fetch(path, { ...init, headers: headers() });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`the server cannot be reached (${e.message})`, 0);
  }
}

export async function getJSON(path) {
  const response = await send(path, { method: "GET" });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postJSON(path, body, signal) {
  const response = await send(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST and yield each server-sent event's JSON until "data: [DONE]"; an error event, or a stream that ends
// without [DONE] (the server went away), throws an ApiError.
export async function* stream(path, body, signal) {
  const response = await send(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new ApiError("the connection to the server was lost mid-stream", 0);
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) {
          const e = obj.error;
          throw new ApiError(typeof e === "string" ? e : e.message, (e && e.code) || 500);
        }
        yield obj;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new ApiError("the stream ended before the server finished it (did the server go away?)", 0);
}

// What to tell the user about a failed call; null for a stop the user asked for.
export function describe(error) {
  if (error.name === "AbortError") return null;
  if (error instanceof ApiError) return error.message;
  return `unexpected error: ${error.message}`;
}

// A number field's value, or a clear error naming the field.
export function number(id, { min = -Infinity, max = Infinity, integer = false } = {}) {
  const input = document.getElementById(id);
  const value = Number(input.value);
  const label = input.closest("label") ? input.closest("label").firstChild.textContent.trim() : id;
  if (input.value.trim() === "" || !Number.isFinite(value) || value < min || value > max) {
    throw new ApiError(`${label}: expected a number in [${min}, ${max}]`, 0);
  }
  if (integer && !Number.isInteger(value)) throw new ApiError(`${label}: expected a whole number`, 0);
  return value;
}
