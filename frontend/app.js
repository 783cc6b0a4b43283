// The page's behaviour: take an image (drop, file picker, camera, paste, an example picture), show
// it, send it to POST {apiBase}/classify/ as multipart field `image`, and show the answer with its
// top-5 bars, saying so plainly when the model is unsure. "Why?" asks POST {apiBase}/explain/ for
// the answer's Grad-CAM heatmap and lays it over the preview; GET {apiBase}/classes lists the 100
// things the model knows; GET {apiBase}/settings gives the upload limit checked before sending and
// the rules for shrinking a large photo here, before it is uploaded (the preview stays full-size).
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
  const sentText = $("sent");
  const errorText = $("error");
  const unsureText = $("unsure");
  const heatmapImage = $("heatmap");
  const whyButton = $("why-button");
  const whyCaption = $("why-caption");
  const knownThings = $("known-things");
  const classList = $("class-list");

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

  // The adapter's limits (GET {apiBase}/settings: max_upload_bytes, top_k, shrink), asked once at
  // start so that a too-large file is refused before it is sent and a large photo is shrunk first.
  // Unreachable: no check and no shrinking here, the adapter's own 413 still answers.
  const serverSettings = fetch(`${apiBase()}/settings`)
    .then((response) => (response.ok ? response.json() : {}))
    .catch(() => ({}));

  function formatBytes(n) {
    return n >= 1024 * 1024 ? `${(n / (1024 * 1024)).toFixed(1)} MB` : `${Math.ceil(n / 1024)} KB`;
  }

  function percent(p) {
    const value = 100 * p;
    return value >= 10 || value === 0 ? `${value.toFixed(0)}%` : `${value.toFixed(1)}%`;
  }

  let previewUrl = null;
  let requestNumber = 0; // a newer image makes an older answer stale
  let currentUpload = null; // what was sent for the picture on show ({blob, name}), for "Why?"
  let currentAnswer = null;
  let heatmapFor = 0; // the requestNumber the overlay belongs to (0: none yet)

  // "a ray", "an apple": the unsure wording names two guesses in running text.
  function withArticle(name) {
    const lower = name.toLowerCase();
    return `${/^[aeiou]/.test(lower) ? "an" : "a"} ${lower}`;
  }

  function resetWhy() {
    heatmapImage.hidden = true;
    heatmapImage.removeAttribute("src");
    heatmapFor = 0;
    whyButton.setAttribute("aria-pressed", "false");
    whyButton.disabled = false;
    whyCaption.hidden = true;
    whyCaption.textContent = "";
  }

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
    currentAnswer = answer;
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
    const best = first
      ? `Best guess: ${answer.prediction}, ${percent(first.probability)} sure.`
      : `Best guess: ${answer.prediction}.`;
    if (answer.unsure) {
      const names = top5.slice(0, 2).map((guess) => withArticle(guess.name));
      unsureText.textContent = names.length === 2 ? `Not sure — maybe ${names[0]} or ${names[1]}`
        : `Not sure — maybe ${withArticle(answer.prediction)}`;
      unsureText.hidden = false;
      answerBox.classList.add("is-unsure");
      statusLine.textContent = `${unsureText.textContent}. ${best}`;
    } else {
      unsureText.hidden = true;
      answerBox.classList.remove("is-unsure");
      statusLine.textContent = best;
    }
    document.body.dataset.state = "answered";
  }

  // A 503 with Retry-After is the server's "busy: ask again in N s" (its shares and caps, not a server
  // that is down): the page waits that long (at most BUSY_WAIT_MAX_S), saying so, and asks again, up to
  // BUSY_RETRIES times, while the answer is still wanted (`wanted()`). Other answers return as they are.
  const BUSY_RETRIES = 2;
  const BUSY_WAIT_MAX_S = 5;

  async function postForm(url, form, wanted) {
    for (let retry = 0; ; retry++) {
      const response = await fetch(url, { method: "POST", body: form });
      const header = response.headers.get("Retry-After");
      const seconds = header === null ? NaN : Number(header); // an HTTP date: no retry
      if (response.status !== 503 || !(seconds >= 0) || retry >= BUSY_RETRIES || !wanted()) return response;
      const wait = Math.min(seconds, BUSY_WAIT_MAX_S);
      statusLine.textContent = `The server is busy; trying again in ${wait} s…`;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      if (!wanted()) return response;
    }
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

  // True when any pixel of the canvas is not fully opaque.
  function hasTransparency(context, width, height) {
    const pixels = context.getImageData(0, 0, width, height).data;
    for (let i = 3; i < pixels.length; i += 4) {
      if (pixels[i] !== 255) return true;
    }
    return false;
  }

  // A large photo shrunk before upload, following the adapter's rules (GET /settings `shrink`):
  // its type is one of `types`, it is larger than `min_bytes` or `min_pixels`, and its shorter side
  // (upright, after its EXIF orientation) is brought down to `min_side`, the most the server
  // decodes of it anyway; sent as `type` at `quality`. Returns {blob, width, height}, or null to
  // send the file as it is: small images, transparent ones (the server lays those on white),
  // and anything this browser cannot decode (the server decides about those).
  async function shrunkPhoto(file, rules) {
    if (!rules || !Array.isArray(rules.types) || !rules.types.includes(file.type)) return null;
    let bitmap;
    try {
      // The file's own pixel values, as the server reads them (no colour-profile conversion).
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none" });
    } catch (_) {
      return null;
    }
    try {
      const { width, height } = bitmap;
      const shorter = Math.min(width, height);
      const large = file.size > rules.min_bytes || width * height > rules.min_pixels;
      if (!large || shorter <= rules.min_side) return null;
      const scale = rules.min_side / shorter;
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(width * scale));
      canvas.height = Math.max(1, Math.round(height * scale));
      const context = canvas.getContext("2d", { willReadFrequently: true });
      context.imageSmoothingEnabled = true;
      context.imageSmoothingQuality = "high";
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      if (file.type !== "image/jpeg" && hasTransparency(context, canvas.width, canvas.height)) return null;
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, rules.type, rules.quality));
      if (!blob || blob.size >= file.size) return null;
      return { blob, width: canvas.width, height: canvas.height };
    } finally {
      bitmap.close();
    }
  }

  function baseName(name) {
    return (name || "pasted-image").replace(/\.[^.]*$/, "");
  }

  async function classify(file, description) {
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
    const settings = await serverSettings;
    if (thisRequest !== requestNumber) return; // a newer image arrived while the settings were asked for
    const shrunk = await shrunkPhoto(file, settings.shrink);
    if (thisRequest !== requestNumber) return;
    const upload = shrunk ? { blob: shrunk.blob, name: `${baseName(file.name)}.jpg` }
      : { blob: file, name: file.name || "pasted-image" };
    const maxUploadBytes = Number(settings.max_upload_bytes) || 0;
    if (maxUploadBytes && upload.blob.size > maxUploadBytes) {
      showError(`The image is too large: ${formatBytes(file.size)}; the limit is ${formatBytes(maxUploadBytes)}.`);
      return;
    }

    // Say what travels: the preview keeps the original.
    sentText.textContent = shrunk
      ? `Sent a ${shrunk.width} × ${shrunk.height} copy (${formatBytes(shrunk.blob.size)}) of your ` +
        `${formatBytes(file.size)} photo; the model looks at 32 × 32 pixels.`
      : "";
    sentText.hidden = !shrunk;
    currentUpload = upload;
    currentAnswer = null;
    resetWhy();
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.onload = () => {
      // CIFAR-size pictures (32x32) would blur when enlarged: show their pixels.
      preview.classList.toggle("pixelated", preview.naturalWidth < 96);
    };
    preview.src = previewUrl;
    preview.alt = description || (file.name ? `Your image: ${file.name}` : "Your image");
    preview.hidden = false;
    dropZone.classList.add("has-image");

    setBusy(true);
    answerBox.hidden = true;
    statusLine.textContent = "Looking at your image…";
    document.body.dataset.state = "busy";

    const form = new FormData();
    form.append("image", upload.blob, upload.name);
    const url = `${apiBase()}/classify/`;
    try {
      let response;
      try {
        response = await postForm(url, form, () => thisRequest === requestNumber);
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

  // The heatmap PNG (grey, 255 = most responsible) -> a see-through red-to-yellow layer of the same size.
  function colourHeatmap(dataUrl) {
    return new Promise((resolve, reject) => {
      const grey = new Image();
      grey.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = grey.naturalWidth;
        canvas.height = grey.naturalHeight;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(grey, 0, 0);
        const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
        const d = pixels.data;
        for (let i = 0; i < d.length; i += 4) {
          const v = d[i] / 255;
          d[i] = 255;
          d[i + 1] = Math.round(230 * (1 - v));
          d[i + 2] = 0;
          d[i + 3] = Math.round(210 * v);
        }
        ctx.putImageData(pixels, 0, 0);
        resolve(canvas.toDataURL("image/png"));
      };
      grey.onerror = () => reject(new Error("the heatmap is not a readable image"));
      grey.src = dataUrl;
    });
  }

  function showWhy() {
    heatmapImage.hidden = false;
    whyButton.setAttribute("aria-pressed", "true");
    whyCaption.textContent = `Red and yellow mark the parts of the picture that made the model answer ` +
      `“${currentAnswer ? currentAnswer.prediction : "this"}” (Grad-CAM); the redder, the more they counted.`;
    whyCaption.hidden = false;
    statusLine.textContent = whyCaption.textContent;
  }

  async function why() {
    if (!currentUpload) return;
    if (whyButton.getAttribute("aria-pressed") === "true") { // a second press hides the overlay
      heatmapImage.hidden = true;
      whyButton.setAttribute("aria-pressed", "false");
      whyCaption.hidden = true;
      return;
    }
    const thisRequest = requestNumber;
    if (heatmapFor === thisRequest) {
      showWhy();
      return;
    }
    const form = new FormData();
    form.append("image", currentUpload.blob, currentUpload.name); // what /classify/ got
    const url = `${apiBase()}/explain/`;
    whyButton.disabled = true;
    statusLine.textContent = "Looking for what the answer came from…";
    try {
      let response;
      try {
        response = await postForm(url, form, () => thisRequest === requestNumber);
      } catch (_) {
        if (thisRequest === requestNumber) showError(`Cannot reach the classifier at ${url}. Please try again later.`);
        return;
      }
      if (thisRequest !== requestNumber) return;
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      const answer = await response.json();
      const overlay = await colourHeatmap(answer.heatmap);
      if (thisRequest !== requestNumber) return;
      heatmapImage.src = overlay;
      heatmapFor = thisRequest;
      showWhy();
    } catch (err) {
      if (thisRequest === requestNumber) showError(`Could not show why: ${err.message}`);
    } finally {
      whyButton.disabled = false;
    }
  }

  whyButton.addEventListener("click", why);

  // The 100 things it knows, fetched the first time the list is opened.
  knownThings.addEventListener("toggle", async () => {
    if (!knownThings.open || classList.childElementCount) return;
    try {
      const response = await fetch(`${apiBase()}/classes`);
      if (!response.ok) throw new Error(String(response.status));
      const classes = await response.json();
      classList.replaceChildren(...classes.map((item) => {
        const li = document.createElement("li");
        li.textContent = item.name;
        return li;
      }));
    } catch (_) {
      const li = document.createElement("li");
      li.textContent = "The list could not be loaded from the server.";
      classList.replaceChildren(li);
    }
  });

  // Example pictures: fetched from this page's server and classified like a chosen file.
  for (const button of document.querySelectorAll(".example")) {
    button.addEventListener("click", async () => {
      const src = button.dataset.src;
      try {
        const response = await fetch(src);
        if (!response.ok) throw new Error(String(response.status));
        const blob = await response.blob();
        const alt = button.querySelector("img").alt.replace(/^Example: /, "");
        classify(new File([blob], src.split("/").pop(), { type: blob.type || "image/png" }), `Example: ${alt}`);
      } catch (_) {
        showError(`The example picture ${src} could not be loaded.`);
      }
    });
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
