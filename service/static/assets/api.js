// The service's JSON API, with the API key when the service asks for one (API_KEYS).
// The key stays in this tab (sessionStorage) unless the person asks to remember it.

const KEY = "dashboard.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.error) || `http_${status}`;
    this.fields = (body && body.fields) || {};
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

export function setApiKey(key, remember) {
  sessionStorage.setItem(KEY, key);
  if (remember) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export function forgetApiKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method, signal, cache: "no-store", credentials: "same-origin",
      headers: { Accept: "application/json", ...authHeaders(),
                 ...(body === undefined ? {} : { "Content-Type": "application/json" }), ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { error: "network", message: "The service could not be reached." });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const failure = new ApiError(response.status, data || { message: response.statusText });
    if (response.status === 401) window.dispatchEvent(new CustomEvent("api-unauthorized"));
    throw failure;
  }
  return data;
}

const id = encodeURIComponent;

// Every read takes an optional AbortSignal: a view that is left cancels what it asked for.
export const api = {
  config: (signal) => request("/api/dashboard/config", { signal }),
  health: (minutes, signal) => request(`/api/dashboard/health?minutes=${minutes}`, { signal }),
  models: (signal) => request("/api/dashboard/models", { signal }),
  search: (q, signal) => request(`/api/dashboard/search?q=${id(q)}`, { signal }),
  jobs: (params, signal) => request(`/api/jobs?${new URLSearchParams(params)}`, { signal }),
  job: (job, signal) => request(`/api/jobs/${id(job)}`, { signal }),
  timeline: (job, signal) => request(`/api/dashboard/jobs/${id(job)}/timeline`, { signal }),
  outputs: (job, signal) => request(`/api/dashboard/jobs/${id(job)}/outputs`, { signal }),
  event: (position, signal) => request(`/api/dashboard/events/${position}`, { signal }),
  create: (body, key) => request("/api/jobs", { method: "POST", body, headers: { "Idempotency-Key": key } }),
  cancel: (job) => request(`/api/jobs/${id(job)}/cancel`, { method: "POST" }),
  retry: (job) => request(`/api/jobs/${id(job)}/retry`, { method: "POST" }),
};
