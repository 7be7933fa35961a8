// The search page: one form, one drop zone, one result grid. Plain DOM, no dependencies.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const q = $("q");
  const k = $("k");
  const fileInput = $("file");
  const dropZone = $("drop-zone");
  const preview = $("query-preview");
  const status = $("status");
  const errorBox = $("error");
  const results = $("results");
  const template = $("result-template");

  let inFlight = null; // the AbortController of the request whose answer we are waiting for
  let previewUrl = null;

  function kValue() {
    const n = Math.round(Number(k.value));
    return Number.isFinite(n) && n >= 1 ? Math.min(n, 1000) : 24;
  }

  // A failed search shows only its error: results left under it would look like its answer.
  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    status.textContent = "";
    results.replaceChildren();
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  // Every search goes through here: a newer search aborts an older one, so a slow answer can
  // never overwrite a newer one on the page.
  async function run(url, options, label) {
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    clearError();
    status.textContent = `Searching ${label}…`;
    results.setAttribute("aria-busy", "true");
    try {
      const response = await fetch(url, { ...options, signal: controller.signal });
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      if (!response.ok) {
        showError((body && body.error) || `The server answered ${response.status}.`);
        return false;
      }
      render(body.results);
      const n = body.results.length;
      const ms = body.took_ms < 10 ? body.took_ms.toFixed(1) : Math.round(body.took_ms);
      status.textContent = `${n} result${n === 1 ? "" : "s"} for ${body.query} in ${ms} ms`;
      return true;
    } catch (err) {
      if (err.name !== "AbortError") showError(`Could not reach the server (${err.message}).`);
      return false;
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        results.removeAttribute("aria-busy");
      }
    }
  }

  function searchJson(payload, label) {
    return run(
      "/search",
      {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...payload, k: kValue() }),
      },
      label,
    );
  }

  function render(rows) {
    const items = rows.map((row) => {
      const node = template.content.firstElementChild.cloneNode(true);
      const link = node.querySelector(".thumb");
      const img = node.querySelector("img");
      const captions = row.captions || [];
      const caption = captions.length ? captions[0] : "";
      if (row.thumbnail) {
        link.href = row.url;
        img.src = row.thumbnail;
        img.alt = `Result ${row.rank}: ${row.name}${caption ? ` (${caption})` : ""}`;
      } else {
        // A text index: the item is the text itself.
        const text = document.createElement("p");
        text.className = "text-item";
        text.textContent = row.item;
        link.replaceWith(text);
      }
      node.querySelector(".score").textContent = row.score.toFixed(3);
      const name = node.querySelector(".name");
      name.textContent = row.name;
      name.title = row.item;
      const captionLine = node.querySelector(".caption");
      if (caption) {
        // The first caption shows (a few lines at most); the tooltip holds every one in full.
        captionLine.textContent = caption;
        captionLine.title = captions.join("\n");
      } else {
        captionLine.remove();
      }
      const more = node.querySelector(".more");
      more.dataset.id = String(row.id);
      more.setAttribute("aria-label", `More like this: ${row.name}`);
      node.dataset.id = String(row.id);
      return node;
    });
    results.replaceChildren(...items);
  }

  function remember(params) {
    const url = new URL(window.location.href);
    url.search = new URLSearchParams(params).toString();
    if (url.href !== window.location.href) history.pushState(params, "", url);
  }

  function searchText(text, push = true) {
    if (!text.trim()) {
      showError("Type something to search for, or drop an image.");
      q.focus();
      return;
    }
    if (push) remember({ q: text });
    searchJson({ query: text }, `“${text}”`);
  }

  async function moreLikeThis(id) {
    q.value = `image:${id}`;
    remember({ q: q.value });
    if (await searchJson({ id: Number(id) }, `like item ${id}`)) results.focus();
  }

  function searchFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name} is not an image (${file.type}).`);
      return;
    }
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Query image: ${file.name || "pasted image"}`;
    preview.hidden = false;
    const data = new FormData();
    data.append("file", file, file.name || "pasted.png");
    data.append("k", String(kValue()));
    run("/search/image", { method: "POST", body: data }, `like ${file.name || "the pasted image"}`);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    searchText(q.value);
  });

  results.addEventListener("click", (event) => {
    const button = event.target.closest("button.more");
    if (button) moreLikeThis(button.dataset.id);
  });

  fileInput.addEventListener("change", () => {
    searchFile(fileInput.files[0]);
    fileInput.value = ""; // choosing the same file again searches again
  });

  // Drag and drop anywhere on the zone; the page itself must not open a dropped file.
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) searchFile(files[0]);
    else showError("Drop an image file (not a link or text).");
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) =>
      f.type.startsWith("image/"),
    );
    if (file) {
      event.preventDefault();
      searchFile(file);
    }
  });

  // "/" jumps to the search box, as on many search pages (not while typing somewhere).
  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement;
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
      event.preventDefault();
      q.focus();
      q.select();
    }
  });

  // A link to a <details> section (the query syntax) opens it: a jump alone leaves it closed.
  function openDetails(hash) {
    const target = hash.length > 1 ? document.getElementById(decodeURIComponent(hash.slice(1))) : null;
    if (target instanceof HTMLDetailsElement) target.open = true;
  }
  document.addEventListener("click", (event) => {
    const link = event.target.closest('a[href^="#"]');
    if (link) openDetails(link.hash); // before the jump, so it lands on the opened section
  });
  window.addEventListener("hashchange", () => openDetails(window.location.hash));
  openDetails(window.location.hash);

  function fromLocation() {
    const text = new URLSearchParams(window.location.search).get("q");
    if (text) {
      q.value = text;
      searchText(text, false);
    }
  }
  window.addEventListener("popstate", fromLocation);

  fetch("/health")
    .then((response) => response.json())
    .then((info) => {
      const what = info.modality === "image" ? "images" : "texts";
      $("summary").textContent =
        `Search ${info.items.toLocaleString()} ${what} by text, by image, or by both ` +
        `(${info.kind} index, ${info.dim}-d).`;
    })
    .catch(() => {});
  fromLocation();
})();
