// The loraserve Playground: plain ES module, no build step. Talks to the same REST API as any client.

const STORE = { account: "loraserve.accountId", token: "loraserve.token", model: "loraserve.model" };
const $ = (id) => document.getElementById(id);

const el = {
  credentials: $("credentials"), account: $("account-id"), token: $("api-token"),
  forget: $("forget-credentials"), credStatus: $("credentials-status"),
  form: $("run-form"), model: $("model"), lora: $("lora"), system: $("system"), prompt: $("prompt"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), raw: $("raw"),
  run: $("run"), stop: $("stop"), runStatus: $("run-status"),
  error: $("error"), response: $("response"), usage: $("usage"),
  copy: $("copy-code"),
  uploadForm: $("upload-form"), ftName: $("finetune-name"), ftDescription: $("finetune-description"),
  ftConfig: $("adapter-config"), ftWeights: $("adapter-weights"), upload: $("upload"), uploadStatus: $("upload-status"),
};

let models = [];        // /models/search results
let controller = null;  // the running request's AbortController

// -- the API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function accountBase() {
  return `${location.origin}/client/v4/accounts/${encodeURIComponent(el.account.value.trim())}/ai`;
}

async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = { Authorization: `Bearer ${el.token.value.trim()}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  try {
    return await fetch(accountBase() + path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, 0, `Could not reach the server (${err.message}).`);
  }
}

// The error of a Workers AI envelope, whatever shape it came in.
function envelopeError(status, payload) {
  const first = payload && Array.isArray(payload.errors) ? payload.errors[0] : null;
  if (first && typeof first.message === "string") return new ApiError(status, first.code ?? 0, first.message);
  return new ApiError(status, 0, `Unexpected answer from the server: ${JSON.stringify(payload).slice(0, 200)}`);
}

async function readError(response) {
  const text = await response.text();
  try {
    return envelopeError(response.status, JSON.parse(text));
  } catch {
    return new ApiError(response.status, 0, text.slice(0, 300) || response.statusText || "Request failed");
  }
}

async function apiResult(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await readError(response);
  const payload = await response.json();
  if (!payload.success) throw envelopeError(response.status, payload);
  return payload.result;
}

// -- messages to the user ---------------------------------------------------------------------------

function showError(err) {
  el.error.replaceChildren();
  const title = document.createElement("strong");
  const known = err instanceof ApiError;
  title.textContent = known && err.code ? `Error ${err.code}` : "Error";
  const text = document.createElement("span");
  text.className = "message";
  text.textContent = err.message + (known && err.status ? ` (HTTP ${err.status})` : "");
  el.error.append(title, text);
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.error.replaceChildren();
}

// -- account, models, finetunes ---------------------------------------------------------------------

function hasCredentials() {
  return el.account.value.trim() !== "" && el.token.value.trim() !== "";
}

async function connect() {
  clearError();
  el.credStatus.textContent = "Connecting…";
  try {
    models = await apiResult("/models/search?per_page=1000");
    fillModels();
    await loadFinetunes();
    el.credStatus.textContent = `Connected: ${models.length} model${models.length === 1 ? "" : "s"}`;
  } catch (err) {
    el.credStatus.textContent = "Not connected";
    showError(err);
  }
  updateCode();
}

function property(model, id) {
  const found = (model.properties || []).find((p) => p.property_id === id);
  return found ? String(found.value) : undefined;
}

function fillModels() {
  const wanted = localStorage.getItem(STORE.model) || el.model.value;
  el.model.replaceChildren(...models.map((m) => {
    const option = new Option(m.name, m.name);
    option.title = m.description || "";
    return option;
  }));
  if (models.some((m) => m.name === wanted)) el.model.value = wanted;
  else {
    const lora = models.find((m) => property(m, "lora") === "true");
    if (lora) el.model.value = lora.name;
  }
}

function selectedModel() {
  return models.find((m) => m.name === el.model.value);
}

async function loadFinetunes(select) {
  const model = selectedModel();
  const keep = select ?? el.lora.value;
  const none = new Option("None (base model)", "");
  if (!model || property(model, "lora") !== "true") {
    none.text = model ? "None (this model takes no LoRA)" : "None (base model)";
    el.lora.replaceChildren(none);
    el.lora.disabled = Boolean(model);
    return;
  }
  el.lora.disabled = false;
  const finetunes = await apiResult("/finetunes");
  const usable = finetunes.filter((f) => f.model === model.name);
  el.lora.replaceChildren(none, ...usable.map((f) => {
    const option = new Option(f.name, f.name);
    option.title = `${f.id}${f.description ? " · " + f.description : ""}`;
    return option;
  }));
  if (usable.some((f) => f.name === keep)) el.lora.value = keep;
}

// -- the request, and code that makes the same one --------------------------------------------------

function numberField(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}

function runInputs() {
  const inputs = {};
  const prompt = el.prompt.value;
  if (el.raw.checked) {
    inputs.prompt = prompt;
    inputs.raw = true;
  } else {
    const system = el.system.value.trim();
    inputs.messages = [
      ...(system ? [{ role: "system", content: system }] : []),
      { role: "user", content: prompt },
    ];
  }
  const maxTokens = numberField(el.maxTokens);
  if (maxTokens !== undefined) inputs.max_tokens = maxTokens;
  const temperature = numberField(el.temperature);
  if (temperature !== undefined) inputs.temperature = temperature;
  if (el.lora.value) inputs.lora = el.lora.value;
  inputs.stream = true;
  return inputs;
}

function py(value, indent = 0) {
  const pad = "    ".repeat(indent + 1);
  const end = "    ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : "None";
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return "[\n" + value.map((v) => `${pad}${py(v, indent + 1)},\n`).join("") + end + "]";
  }
  const keys = Object.keys(value);
  if (keys.length === 0) return "{}";
  if (keys.every((k) => typeof value[k] !== "object" || value[k] === null)) {
    return "{" + keys.map((k) => `${JSON.stringify(k)}: ${py(value[k])}`).join(", ") + "}";
  }
  return "{\n" + keys.map((k) => `${pad}${JSON.stringify(k)}: ${py(value[k], indent + 1)},\n`).join("") + end + "}";
}

function kwargs(params, indent) {
  const pad = "    ".repeat(indent);
  return Object.entries(params).map(([k, v]) => `${pad}${k}=${py(v, indent)},\n`).join("");
}

function shellQuote(text) {
  return "'" + text.replaceAll("'", "'\\''") + "'";
}

function codeSnippets() {
  const model = el.model.value || "@cf/meta-llama/llama-2-7b-chat-hf-lora";
  const account = el.account.value.trim() || "YOUR_ACCOUNT_ID";
  const inputs = runInputs();
  const root = location.origin;
  const curl = [
    `curl -N ${root}/client/v4/accounts/${account}/ai/run/${model} \\`,
    `  -H "Authorization: Bearer $CLOUDFLARE_API_TOKEN" \\`,
    `  -d ${shellQuote(JSON.stringify(inputs, null, 2))}`,
  ].join("\n");

  const python = `import os

from loraserve.client import Client

ai = Client(account_id=${py(account)}, token=os.environ["CLOUDFLARE_API_TOKEN"], base_url=${py(root)})
stream = ai.run(${py(model)}, ${py(inputs)})
for text in stream:
    print(text, end="", flush=True)
print()
print(stream.usage)
`;

  const { stream: _stream, ...sdkParams } = inputs;
  const cloudflare = `import json
import os

from cloudflare import Cloudflare

client = Cloudflare(api_token=os.environ["CLOUDFLARE_API_TOKEN"], base_url=${py(root + "/client/v4")})
with client.ai.with_streaming_response.run(
    ${py(model)},
    account_id=${py(account)},
${kwargs({ ...sdkParams, stream: true }, 1)}) as response:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            print(json.loads(line[len("data: "):]).get("response", ""), end="", flush=True)
print()
`;

  const { lora, prompt, raw: _raw, messages, ...sampling } = sdkParams;
  const openaiModel = lora ? `${model}:${lora}` : model;
  const chat = messages !== undefined;
  const openaiParams = chat ? { messages, ...sampling, stream: true } : { prompt, ...sampling, stream: true };
  const openai = `import os

from openai import OpenAI

client = OpenAI(api_key=os.environ["CLOUDFLARE_API_TOKEN"], base_url=${py(`${root}/client/v4/accounts/${account}/ai/v1`)})
stream = client.${chat ? "chat.completions" : "completions"}.create(
    model=${py(openaiModel)},
${kwargs(openaiParams, 1)})
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].${chat ? "delta.content or \"\"" : "text"}, end="", flush=True)
print()
`;
  return { curl, python, cloudflare, openai };
}

function updateCode() {
  const snippets = codeSnippets();
  for (const [name, text] of Object.entries(snippets)) {
    $(`code-${name}`).querySelector("code").textContent = text;
  }
}

// -- running ----------------------------------------------------------------------------------------

function appendText(text) {
  el.response.append(document.createTextNode(text));
  el.response.scrollTop = el.response.scrollHeight;
}

function setRunning(running) {
  el.run.disabled = running;
  el.stop.disabled = !running;
  el.response.setAttribute("aria-busy", running ? "true" : "false");
}

// Reads a Workers AI event stream: `data: {...}` events, then `data: [DONE]`.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return true;
      if (data) onEvent(JSON.parse(data));
    }
  }
  return false;
}

async function run(event) {
  event.preventDefault();
  clearError();
  if (!hasCredentials()) {
    showError(new Error("Enter your account ID and API token first (top right), then Save."));
    return;
  }
  if (!el.model.value) {
    showError(new Error("Pick a model first."));
    return;
  }
  el.response.replaceChildren();
  el.usage.textContent = "";
  el.runStatus.textContent = "Running…";
  setRunning(true);
  controller = new AbortController();
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  try {
    const model = el.model.value;
    const response = await api(`/run/${model}`, { method: "POST", json: runInputs(), signal: controller.signal });
    if (!response.ok) throw await readError(response);
    const finished = await readEvents(response, (payload) => {
      if (payload.errors) throw envelopeError(response.status, payload); // a failure after the 200
      if (payload.response) {
        firstAt ??= performance.now();
        appendText(payload.response);
      }
      if (payload.usage) usage = payload.usage;
    });
    el.runStatus.textContent = finished ? "Done" : "The stream ended early";
  } catch (err) {
    if (err.name === "AbortError") el.runStatus.textContent = "Stopped";
    else {
      el.runStatus.textContent = "Failed";
      showError(err);
    }
  } finally {
    controller.abort(); // closes the connection if the stream failed midway; a no-op otherwise
    setRunning(false);
    controller = null;
  }
  if (usage) {
    const seconds = (performance.now() - started) / 1000;
    const ttft = firstAt === null ? "" : ` · first token ${Math.round(firstAt - started)} ms`;
    const rate = usage.completion_tokens / Math.max(seconds, 1e-3);
    el.usage.textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` +
      `${ttft} · ${seconds.toFixed(2)} s · ${rate.toFixed(1)} tokens/s`;
  }
}

// -- uploading a finetune ---------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  clearError();
  if (!hasCredentials() || !el.model.value) {
    showError(new Error("Connect with your account and token, and pick the finetune's model first."));
    return;
  }
  const name = el.ftName.value.trim();
  const files = [["adapter_config.json", el.ftConfig.files[0]], ["adapter_model.safetensors", el.ftWeights.files[0]]];
  el.upload.disabled = true;
  try {
    el.uploadStatus.textContent = "Creating the finetune…";
    const finetune = await apiResult("/finetunes", {
      method: "POST",
      json: { model: el.model.value, name, description: el.ftDescription.value },
    });
    for (const [fileName, file] of files) {
      el.uploadStatus.textContent = `Uploading ${fileName}…`;
      const form = new FormData();
      form.append("file_name", fileName);
      form.append("file", file, fileName);
      await apiResult(`/finetunes/${finetune.id}/finetune-assets`, { method: "POST", form });
    }
    el.uploadStatus.textContent = `Uploaded ${finetune.name} (${finetune.id})`;
    await loadFinetunes(finetune.name);
    updateCode();
  } catch (err) {
    el.uploadStatus.textContent = "Upload failed";
    showError(err);
  } finally {
    el.upload.disabled = false;
  }
}

// -- wiring -----------------------------------------------------------------------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

function wire() {
  el.account.value = localStorage.getItem(STORE.account) || "";
  el.token.value = localStorage.getItem(STORE.token) || "";
  el.credentials.addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(STORE.account, el.account.value.trim());
    localStorage.setItem(STORE.token, el.token.value.trim());
    connect();
  });
  el.forget.addEventListener("click", () => {
    for (const key of Object.values(STORE)) localStorage.removeItem(key);
    el.account.value = "";
    el.token.value = "";
    el.credStatus.textContent = "Forgotten";
    updateCode();
  });
  el.model.addEventListener("change", async () => {
    localStorage.setItem(STORE.model, el.model.value);
    try {
      await loadFinetunes();
    } catch (err) {
      showError(err);
    }
    updateCode();
  });
  for (const input of [el.lora, el.system, el.prompt, el.maxTokens, el.temperature, el.raw, el.account]) {
    input.addEventListener("input", updateCode);
    input.addEventListener("change", updateCode);
  }
  el.form.addEventListener("submit", run);
  el.stop.addEventListener("click", () => controller?.abort());
  el.uploadForm.addEventListener("submit", upload);
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      selectTab(next);
      next.focus();
    });
  });
  el.copy.addEventListener("click", async () => {
    const panel = document.querySelector('[role="tabpanel"]:not([hidden]) code');
    try {
      await navigator.clipboard.writeText(panel.textContent);
      el.copy.textContent = "Copied";
    } catch {
      el.copy.textContent = "Select and copy";
    }
    setTimeout(() => { el.copy.textContent = "Copy"; }, 1500);
  });
  updateCode();
  if (hasCredentials()) connect();
}

wire();
