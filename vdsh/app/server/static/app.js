// The page talks to the same API as any client: GET /stats, POST /search (multipart), item thumbnails.
"use strict";
const $ = (id) => document.getElementById(id);
let lastFile = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadStats() {
  try {
    const stats = await (await fetch("/stats")).json();
    $("stats").textContent = `${stats.items.toLocaleString()} images · ${stats.bits}-bit codes · ` +
      `${stats.index_kind} index · model ${stats.model_id}`;
  } catch (err) {
    $("stats").textContent = "could not reach the server";
  }
}

function clearResults() {
  $("results").replaceChildren();
  $("summary").textContent = "";
  $("far").hidden = true;
}

function showResults(body) {
  const list = $("results");
  clearResults();
  if (body.results.length && !body.close_match) {
    $("far").textContent = `No close match: the nearest item is at distance ${body.results[0].distance}, ` +
      `farther than ${body.far_distance} (99 % of the indexed images have a neighbour that close). ` +
      "These are only the least far items.";
    $("far").hidden = false;
  }
  for (const r of body.results) {
    const li = document.createElement("li");
    li.className = "result";
    const img = document.createElement("img");
    img.src = r.thumbnail_url;
    img.alt = `item ${r.id}`;
    const dist = document.createElement("div");
    dist.className = "distance";
    dist.textContent = `distance ${r.distance}`;
    const labels = document.createElement("div");
    labels.className = "labels";
    labels.textContent = r.labels.length ? r.labels.join(", ") : "(no label)";
    const source = document.createElement("div");
    source.className = "source";
    source.textContent = `#${r.id} ${r.source}`;
    li.append(img, dist, labels, source);
    list.append(li);
  }
  const t = body.timings;
  $("summary").textContent = `${body.results.length} neighbours in ${t.total_ms.toFixed(1)} ms ` +
    `(decode ${t.decode_ms.toFixed(1)}, encode ${t.encode_ms.toFixed(1)}, search ${t.search_ms.toFixed(1)} ms; ` +
    `round trip ${body.roundTripMs.toFixed(0)} ms) · query code ${body.query_code}`;
}

async function search(file) {
  if (!file) return;
  lastFile = file;
  $("again").disabled = false;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("k", $("k").value || "12");
  setStatus("searching…");
  const started = performance.now();
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      clearResults();  // the previous query's results do not belong to this image
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      setStatus(`Could not search: ${detail}`, true);
      return;
    }
    body.roundTripMs = performance.now() - started;
    showResults(body);
    setStatus("");
  } catch (err) {
    clearResults();
    setStatus(`Could not reach the server: ${err}`, true);
  }
}

$("file").addEventListener("change", (e) => search(e.target.files[0]));
$("again").addEventListener("click", () => search(lastFile));
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
for (const name of ["dragenter", "dragover"]) {
  $("drop").addEventListener(name, (e) => { e.preventDefault(); $("drop").classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  $("drop").addEventListener(name, (e) => { e.preventDefault(); $("drop").classList.remove("over"); });
}
$("drop").addEventListener("drop", (e) => search(e.dataTransfer.files[0]));
loadStats();
