// The page of `legrad serve`: one image, prompts (a classifier: classes), the overlays and scores.
// Plain JS, no build step, no network access beyond this server's /v1/model and /v1/explain.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const fileInput = $("file");
  const drop = $("drop");
  const preview = $("preview");
  const dropText = $("drop-text");
  const fileName = $("file-name");
  const prompts = $("prompts");
  const alpha = $("alpha");
  const alphaValue = $("alpha-value");
  const explainButton = $("explain");
  const statusLine = $("status");
  const errorBox = $("error");
  const results = $("results");
  const template = $("result-template");

  let chosen = null; // the File to explain
  let previewUrl = null;
  let classifier = false; // the model folder is a classifier: `classes` instead of `prompts`

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function formatSize(size) {
    // legrad.json: an integer (a square, schema v1-v3) or [height, width]
    if (Array.isArray(size)) return size[0] === size[1] ? `${size[1]} px` : `${size[1]}×${size[0]} px`;
    return `${size} px`;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/model");
      const meta = await response.json();
      if (!response.ok) throw new Error(meta.error || `HTTP ${response.status}`);
      $("model-name").textContent = meta.model_name || "(unnamed)";
      document.title = `LeGrad · ${meta.model_name}`;
      const details = [];
      if (meta.pretrained) details.push(meta.pretrained);
      if (meta.image_size !== undefined) details.push(formatSize(meta.image_size));
      if (Array.isArray(meta.layers)) details.push(`layers ${meta.layers.join(", ")}`);
      classifier = Array.isArray(meta.classes);
      if (classifier) {
        details.push(`classifier, ${meta.classes.length} classes`);
        $("prompts-label").textContent = "Classes, one per line (names or ids)";
        $("prompts-hint").textContent = `Each line is a class name or id (0 to ${meta.classes.length - 1}). Ctrl+Enter explains.`;
        prompts.placeholder = meta.classes.slice(0, 2).join("\n");
        prompts.name = "classes";
        template.content.querySelector(".similarity-label").textContent = "logit";
      }
      $("model-details").textContent = details.length ? `(${details.join(" · ")})` : "";
    } catch (err) {
      $("model-name").textContent = "unavailable";
      showError(`Could not read the model: ${err.message}`);
    }
  }

  function choose(file) {
    if (!file) return;
    chosen = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    dropText.hidden = true;
    drop.classList.add("has-image");
    fileName.textContent = `${file.name} (${Math.max(1, Math.round(file.size / 1024))} KiB)`;
    clearError();
  }

  fileInput.addEventListener("change", () => choose(fileInput.files[0]));

  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    })
  );
  ["dragleave", "drop"].forEach((type) =>
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
    })
  );
  drop.addEventListener("drop", (event) => {
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) choose(files[0]);
  });

  // a file dropped beside the box must not make the browser leave the page to show it
  ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => event.preventDefault()));

  alpha.addEventListener("input", () => (alphaValue.textContent = Number(alpha.value).toFixed(2)));

  prompts.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  function lines() {
    return prompts.value
      .split("\n")
      .map((line) => line.trim())
      .filter((line) => line.length > 0);
  }

  function png(base64) {
    return `data:image/png;base64,${base64}`;
  }

  function safe(text) {
    return text.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^_+|_+$/g, "").slice(0, 60) || "map";
  }

  function render(data) {
    results.replaceChildren();
    const image = (data.images || [])[0];
    if (!image) {
      showError("The server answered without any image.");
      return;
    }
    if (image.error) {
      showError(`${image.name}: ${image.error}`);
      return;
    }
    const names = data.prompts || [];
    const base = safe((image.name || "image").replace(/\.[^.]*$/, ""));
    names.forEach((prompt, p) => {
      // a classifier's maps are named by class (each image's own, for top-K)
      const name = Array.isArray(image.labels) && image.labels[p] ? image.labels[p] : prompt;
      const card = template.content.firstElementChild.cloneNode(true);
      card.querySelector(".prompt").textContent = name;
      const overlay = card.querySelector("img.overlay");
      overlay.src = png(image.overlays[p]);
      overlay.alt = `Heatmap for “${name}” on ${image.name}`;
      const download = card.querySelector(".download");
      download.href = overlay.src;
      download.download = `${base}__${safe(name)}.png`;
      const sim = image.scores.similarity[p];
      const prob = image.scores.probability[p];
      card.querySelector(".similarity").textContent = Number(sim).toFixed(3);
      card.querySelector(".probability").textContent = Number(prob).toFixed(3);
      const figures = image.layers_figures;
      if (figures && figures[p]) {
        const layers = card.querySelector("img.layers");
        layers.src = png(figures[p]);
        layers.alt = `Per-layer heatmaps for “${name}”`;
        card.querySelector(".layers-box").hidden = false;
      }
      results.appendChild(card);
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    if (!chosen) {
      showError("Choose an image first: drop one on the box or click it.");
      return;
    }
    const body = new FormData();
    body.append("images", chosen, chosen.name);
    const field = classifier ? "classes" : "prompts";
    lines().forEach((line) => body.append(field, line));
    body.append("overlays", "true");
    body.append("layers_figure", $("layers-figure").checked ? "true" : "false");
    body.append("cmap", $("cmap").value);
    body.append("alpha", alpha.value);
    body.append("style", $("style").value);
    body.append("maps", "none");

    explainButton.disabled = true;
    form.setAttribute("aria-busy", "true");
    statusLine.textContent = "Explaining…";
    const started = performance.now();
    try {
      const response = await fetch("/v1/explain", { method: "POST", body });
      let data = null;
      try {
        data = await response.json();
      } catch (_) {
        data = null;
      }
      if (!response.ok || data === null || data.error) {
        const message = data && data.error ? data.error : `the server answered HTTP ${response.status}`;
        results.replaceChildren();
        showError(message);
        statusLine.textContent = "";
        return;
      }
      render(data);
      statusLine.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      statusLine.textContent = "";
    } finally {
      explainButton.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });

  loadModel();
})();
