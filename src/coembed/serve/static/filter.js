// The "Filter the collection" panel: every item scoring at least a minimum against a text, as a
// table and a CSV download (POST /filter). Self-contained: it shares only the page with app.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("filter-form");
  const text = $("filter-q");
  const minScore = $("filter-min");
  const limit = $("filter-k");
  const status = $("filter-status");
  const errorBox = $("filter-error");
  const table = $("filter-table");
  const rows = $("filter-results");
  const csvLink = $("filter-csv");
  let inFlight = null;
  let csvUrl = null;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    status.textContent = "";
    table.hidden = true;
    csvLink.hidden = true;
    rows.replaceChildren();
  }

  // RFC 4180: quote every field, double the quotes inside.
  function csvField(value) {
    return `"${String(value).replaceAll('"', '""')}"`;
  }

  function offerCsv(results) {
    const lines = [["rank", "score", "item", "caption"].map(csvField).join(",")];
    for (const row of results) {
      const caption = row.captions && row.captions.length ? row.captions[0] : "";
      lines.push([row.rank, row.score, row.item, caption].map(csvField).join(","));
    }
    if (csvUrl) URL.revokeObjectURL(csvUrl);
    csvUrl = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
    csvLink.href = csvUrl;
    csvLink.hidden = results.length === 0;
  }

  function render(results) {
    rows.replaceChildren(
      ...results.map((row) => {
        const tr = document.createElement("tr");
        tr.className = "filter-row";
        const rank = document.createElement("td");
        rank.textContent = String(row.rank);
        const score = document.createElement("td");
        score.className = "score";
        score.textContent = row.score.toFixed(3);
        const item = document.createElement("td");
        if (row.thumbnail) {
          const img = document.createElement("img");
          img.src = row.thumbnail;
          img.alt = "";
          img.width = 40;
          img.height = 40;
          img.loading = "lazy";
          img.style.objectFit = "cover";
          img.style.verticalAlign = "middle";
          img.style.marginRight = "0.5rem";
          item.append(img);
        }
        const name = document.createElement("span");
        name.className = "filter-name";
        name.textContent = row.name;
        name.title = row.item;
        item.append(name);
        tr.append(rank, score, item);
        return tr;
      }),
    );
    table.hidden = results.length === 0;
  }

  async function runFilter() {
    const query = text.value.trim();
    const threshold = Number(minScore.value);
    const k = Math.round(Number(limit.value));
    if (!query) {
      showError("Type a text to filter by.");
      text.focus();
      return;
    }
    if (minScore.value === "" || !Number.isFinite(threshold)) {
      showError("Give a minimum score between -1 and 1.");
      return;
    }
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    errorBox.hidden = true;
    status.textContent = "Filtering…";
    const payload = { query, min_score: threshold };
    if (Number.isFinite(k) && limit.value !== "") payload.k = k;
    try {
      const response = await fetch("/filter", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(payload),
        signal: controller.signal,
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        showError((body && body.error) || `The server answered ${response.status}.`);
        return;
      }
      render(body.results);
      offerCsv(body.results);
      const more = body.truncated ? " (more match: raise the limit or the minimum)" : "";
      status.textContent =
        `${body.count} item${body.count === 1 ? "" : "s"} score at least ` +
        `${threshold} for ${body.query}${more}`;
    } catch (err) {
      if (err.name !== "AbortError") showError(`Could not reach the server (${err.message}).`);
    } finally {
      if (inFlight === controller) inFlight = null;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runFilter();
  });
})();
