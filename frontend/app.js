// The page's behaviour: take an image (drop, file picker, camera, paste), show it, send it to
// POST {apiBase}/classify/ as multipart field `image`, and show the answer with its top-5 bars.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const dropZone = $("drop-zone");
  const fileInput = $("file-input");
  const cameraInput = $("camera-input");
  const preview = $("preview");
  const resultBox = $("result");
  const statusLine = $("status");
  const answerBox = $("answer");
  const predictionText = $("prediction");
  const top5List = $("top5");
  const metaText = $("meta");
  const errorText = $("error");

  function metaContent(name) {
    const tag = document.querySelector(`meta[name="${name}"]`);
    return tag ? tag.content.trim() : "";
  }

  // Where the API lives: ?api=... beats window.CIFAR100_CONFIG.apiBase beats <meta name="api-base">;
  // empty means this page's own server.
  function apiBase() {
    const fromQuery = new URLSearchParams(window.location.search).get("api");
    const fromWindow = window.CIFAR100_CONFIG && window.CIFAR100_CONFIG.apiBase;
    return (fromQuery || fromWindow || metaContent("api-base") || "").replace(/\/+$/, "");
  }

  function maxUploadBytes() {
    return Number(metaContent("max-upload-bytes")) || 10 * 1024 * 1024;
  }

  function formatBytes(n) {
    return n >= 1024 * 1024 ? `${(n / (1024 * 1024)).toFixed(1)} MB` : `${Math.ceil(n / 1024)} KB`;
  }

  function percent(p) {
    const value = 100 * p;
    return value >= 10 || value === 0 ? `${value.toFixed(0)}%` : `${value.toFixed(1)}%`;
  }

  let previewUrl = null;
  let requestNumber = 0; // a newer image makes an older answer stale

  function setBusy(busy) {
    resultBox.setAttribute("aria-busy", String(busy));
    dropZone.classList.toggle("busy", busy);
    document.body.classList.toggle("busy", busy);
  }

  function showError(message) {
    answerBox.hidden = true;
    statusLine.textContent = "Could not classify the image.";
    errorText.textContent = message;
    errorText.hidden = false;
    document.body.dataset.state = "error";
  }

  function showAnswer(answer) {
    errorText.hidden = true;
    predictionText.textContent = answer.prediction;
    top5List.replaceChildren();
    const top5 = Array.isArray(answer.top5) ? answer.top5 : [];
    for (const guess of top5) {
      const item = document.createElement("li");
      item.className = "guess";
      const name = document.createElement("span");
      name.className = "guess-name";
      name.textContent = guess.name;
      const value = document.createElement("span");
      value.className = "guess-value";
      value.textContent = percent(guess.probability);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, guess.probability)) * 100}%`;
      bar.append(fill);
      item.append(name, value, bar);
      top5List.append(item);
    }
    const details = [];
    if (answer.model_version) details.push(`model ${answer.model_version}`);
    if (typeof answer.time_ms === "number") details.push(`answered in ${Math.round(answer.time_ms)} ms`);
    metaText.textContent = details.join(" · ");
    answerBox.hidden = false;
    const first = top5[0];
    statusLine.textContent = first
      ? `Best guess: ${answer.prediction}, ${percent(first.probability)} sure.`
      : `Best guess: ${answer.prediction}.`;
    document.body.dataset.state = "answered";
  }

  // The adapter's errors are {"error": "..."}; anything else (a proxy's HTML page) gets a plain line.
  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body && (body.error || body.detail || body.message) || "";
    } catch (_) { /* not JSON */ }
    if (response.status === 413) {
      return message.startsWith("The image is too large") ? message
        : `The image is too large${message ? ` (${message})` : ""}. Try a smaller photo.`;
    }
    if (response.status === 503 || response.status === 502) {
      return `The classifier is not available right now. ${message}`.trim();
    }
    if (response.status === 504) {
      return "The classifier took too long to answer. Please try again.";
    }
    if (response.status === 400 || response.status === 415) {
      return `That file could not be read as an image.${message ? ` (Server: ${message})` : ""}`;
    }
    return message || `The server answered ${response.status} ${response.statusText}.`;
  }

  async function classify(file) {
    if (!file) return;
    const thisRequest = ++requestNumber;
    errorText.hidden = true;
    // Some systems give no type for a file; then the server decides whether it is an image.
    if (file.type && !file.type.startsWith("image/")) {
      showError(`“${file.name || "That file"}” is not an image (it is ${file.type}). Choose a photo or picture.`);
      return;
    }
    if (file.size === 0) {
      showError("That file is empty.");
      return;
    }
    if (file.size > maxUploadBytes()) {
      showError(`The image is too large: ${formatBytes(file.size)}; the limit is ${formatBytes(maxUploadBytes())}.`);
      return;
    }

    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.onload = () => {
      // CIFAR-size pictures (32x32) would blur when enlarged: show their pixels.
      preview.classList.toggle("pixelated", preview.naturalWidth < 96);
    };
    preview.src = previewUrl;
    preview.alt = file.name ? `Your image: ${file.name}` : "Your image";
    preview.hidden = false;
    dropZone.classList.add("has-image");

    setBusy(true);
    answerBox.hidden = true;
    statusLine.textContent = "Looking at your image…";
    document.body.dataset.state = "busy";

    const form = new FormData();
    form.append("image", file, file.name || "pasted-image");
    const url = `${apiBase()}/classify/`;
    try {
      let response;
      try {
        response = await fetch(url, { method: "POST", body: form });
      } catch (_) {
        if (thisRequest === requestNumber) {
          showError(`Cannot reach the classifier at ${url}. The server may be down; please try again later.`);
        }
        return;
      }
      if (thisRequest !== requestNumber) return;
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      let answer;
      try {
        answer = await response.json();
      } catch (_) {
        showError("The server sent an answer this page cannot read.");
        return;
      }
      if (!answer || typeof answer.prediction !== "string") {
        showError(answer && answer.error ? answer.error : "The server's answer has no prediction.");
        return;
      }
      showAnswer(answer);
    } finally {
      if (thisRequest === requestNumber) setBusy(false);
    }
  }

  function firstFile(list) {
    return list && list.length ? list[0] : null;
  }

  // File picker and camera.
  for (const input of [fileInput, cameraInput]) {
    input.addEventListener("change", () => {
      classify(firstFile(input.files));
      input.value = ""; // choosing the same file again fires `change` again
    });
  }

  // Keyboard: the drop zone acts as a button that opens the picker.
  dropZone.addEventListener("click", () => fileInput.click());
  // As a native button does: Enter acts on keydown, Space on keyup (Chromium grants the user
  // activation a file picker needs on Space's keyup, not its keydown).
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      fileInput.click();
    } else if (event.key === " ") {
      event.preventDefault(); // Space would scroll the page
    }
  });
  dropZone.addEventListener("keyup", (event) => {
    if (event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });

  // Drag and drop. Prevent the browser's default of opening a file dropped anywhere on the page.
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "dragend"]) {
    document.addEventListener(name, (event) => {
      if (event.target === document.documentElement || event.relatedTarget === null) {
        dropZone.classList.remove("dragging");
      }
    });
  }
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = event.dataTransfer && firstFile(event.dataTransfer.files);
    if (file) classify(file);
    else showError("Nothing to classify was dropped: drop an image file.");
  });

  // Paste: an image copied to the clipboard (a screenshot, "Copy image" in a browser).
  document.addEventListener("paste", (event) => {
    const data = event.clipboardData;
    if (!data) return;
    const file = firstFile(data.files) ||
      Array.from(data.items || []).filter((item) => item.kind === "file").map((item) => item.getAsFile())[0];
    if (!file) return; // pasted text: leave it alone
    event.preventDefault();
    classify(file);
  });
})();
