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

  // An http(s) address (absolute, or relative to this page), else "".
  function httpAddress(text) {
    try {
      return /^https?:$/.test(new URL(text, window.location.href).protocol) ? text : "";
    } catch (_) {
      return "";
    }
  }

  // Where the API lives: window.CIFAR100_CONFIG.apiBase beats <meta name="api-base"> beats ?api=...;
  // none: this page's own server. ?api= is for a copy of the page hosted elsewhere: the adapter's
  // own page (which the adapter marks <meta name="page-server" content="adapter">, adapter/page.py)
  // ignores it, as does a copy that names its API itself, or a crafted link would send users'
  // photos to another server and show its answers here.
  const apiBase = (() => {
    const configured = (window.CIFAR100_CONFIG && window.CIFAR100_CONFIG.apiBase) || metaContent("api-base");
    const fromQuery = metaContent("page-server") === "adapter" ? ""
      : httpAddress(new URLSearchParams(window.location.search).get("api") || "");
    return (configured || fromQuery || "").replace(/\/+$/, "");
  })();

  // The adapter's limits (GET {apiBase}/settings: max_upload_bytes, top_k, shrink), asked once at
  // start so that a too-large file is refused before it is sent and a large photo is shrunk first.
  // Unreachable: no check and no shrinking here, the adapter's own 413 still answers.
  const serverSettings = fetch(`${apiBase}/settings`)
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
    whyButton.removeAttribute("aria-disabled");
    whyCaption.hidden = true;
    whyCaption.textContent = "";
    whyCaption.classList.remove("why-failed");
  }

  function setBusy(busy) {
    resultBox.setAttribute("aria-busy", String(busy));
    dropZone.classList.toggle("busy", busy);
    document.body.classList.toggle("busy", busy);
  }

  // Text for a live region (#status, #error). The same text again is no change a screen reader
  // hears: then the region is emptied first and the text comes back 100 ms later (unless something
  // newer was said meanwhile).
  const pendingSay = new Map();
  function say(element, text) {
    clearTimeout(pendingSay.get(element));
    pendingSay.delete(element);
    if (text && element.textContent === text) {
      element.textContent = "";
      pendingSay.set(element, setTimeout(() => {
        pendingSay.delete(element);
        element.textContent = text;
      }, 100));
    } else {
      element.textContent = text;
    }
  }

  // The picture on show, its answer and its "Why?" view taken away: the page shows no image.
  function clearPicture() {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    preview.onload = null;
    preview.removeAttribute("src");
    preview.alt = "";
    preview.hidden = true;
    preview.classList.remove("pixelated");
    dropZone.classList.remove("has-image");
    sentText.hidden = true;
    sentText.textContent = "";
    currentUpload = null;
    currentAnswer = null;
    resetWhy();
  }

  // The picture could not be classified: no answer, the reason, and nothing left busy (an older
  // upload still on its way is stale, its late answer ignored).
  function showError(message) {
    answerBox.hidden = true;
    setBusy(false);
    say(statusLine, "Could not classify the image.");
    say(errorText, message);
    errorText.hidden = false;
    document.body.dataset.state = "error";
  }

  // A newly chosen picture refused before it is sent (not an image, empty, too large, not loaded):
  // an earlier picture's preview must not stand beside the error as if it were the one that failed.
  function refuse(message) {
    requestNumber++; // an answer still on its way is for an earlier picture
    clearPicture();
    showError(message);
  }

  // Something that is not a picture (a dropped text or link): said, and the answer on show stays.
  function notice(message) {
    say(errorText, message);
    errorText.hidden = false;
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
      say(statusLine, `${unsureText.textContent}. ${best}`);
    } else {
      unsureText.hidden = true;
      answerBox.classList.remove("is-unsure");
      say(statusLine, best);
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
      say(statusLine, `The server is busy; trying again in ${wait} s…`);
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
    // Some systems give no type for a file; then the server decides whether it is an image.
    if (file.type && !file.type.startsWith("image/")) {
      refuse(`“${file.name || "That file"}” is not an image (it is ${file.type}). Choose a photo or picture.`);
      return;
    }
    if (file.size === 0) {
      refuse("That file is empty.");
      return;
    }
    const thisRequest = ++requestNumber;
    errorText.hidden = true;
    const settings = await serverSettings;
    if (thisRequest !== requestNumber) return; // a newer image arrived while the settings were asked for
    const shrunk = await shrunkPhoto(file, settings.shrink);
    if (thisRequest !== requestNumber) return;
    const upload = shrunk ? { blob: shrunk.blob, name: `${baseName(file.name)}.jpg` }
      : { blob: file, name: file.name || "pasted-image" };
    const maxUploadBytes = Number(settings.max_upload_bytes) || 0;
    if (maxUploadBytes && upload.blob.size > maxUploadBytes) {
      refuse(`The image is too large: ${formatBytes(file.size)}; the limit is ${formatBytes(maxUploadBytes)}.`);
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
    say(statusLine, "Looking at your image…");
    document.body.dataset.state = "busy";

    const form = new FormData();
    form.append("image", upload.blob, upload.name);
    const url = `${apiBase}/classify/`;
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
        const message = await errorMessage(response);
        if (thisRequest === requestNumber) showError(message);
        return;
      }
      let answer;
      try {
        answer = await response.json();
      } catch (_) {
        if (thisRequest === requestNumber) showError("The server sent an answer this page cannot read.");
        return;
      }
      if (thisRequest !== requestNumber) return; // a newer picture was chosen while this answer was read
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
    whyCaption.classList.remove("why-failed");
    whyCaption.textContent = `Red and yellow mark the parts of the picture that made the model answer ` +
      `“${currentAnswer ? currentAnswer.prediction : "this"}” (Grad-CAM); the redder, the more they counted.`;
    whyCaption.hidden = false;
    say(statusLine, whyCaption.textContent);
  }

  // The explanation failed, not the answer: the answer stays, the reason goes beside the button
  // (and to screen readers), and the button keeps the keyboard focus for another try.
  function whyFailed(message) {
    whyCaption.textContent = `Could not show why: ${message}`;
    whyCaption.classList.add("why-failed");
    whyCaption.hidden = false;
    say(statusLine, whyCaption.textContent);
  }

  let explaining = false;

  async function why() {
    if (!currentUpload || explaining) return;
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
    const url = `${apiBase}/explain/`;
    // aria-disabled, not disabled: a disabled button would lose the keyboard focus.
    explaining = true;
    whyButton.setAttribute("aria-disabled", "true");
    whyCaption.hidden = true;
    say(statusLine, "Looking for what the answer came from…");
    try {
      let response;
      try {
        response = await postForm(url, form, () => thisRequest === requestNumber);
      } catch (_) {
        if (thisRequest === requestNumber) whyFailed(`cannot reach the classifier at ${url}. Please try again later.`);
        return;
      }
      if (thisRequest !== requestNumber) return;
      if (!response.ok) {
        const message = await errorMessage(response);
        if (thisRequest === requestNumber) whyFailed(message);
        return;
      }
      const answer = await response.json();
      const overlay = await colourHeatmap(answer.heatmap);
      if (thisRequest !== requestNumber) return;
      heatmapImage.src = overlay;
      heatmapFor = thisRequest;
      showWhy();
    } catch (err) {
      if (thisRequest === requestNumber) whyFailed(err.message);
    } finally {
      explaining = false;
      whyButton.removeAttribute("aria-disabled");
    }
  }

  whyButton.addEventListener("click", why);

  // The 100 things it knows, fetched the first time the list is opened.
  knownThings.addEventListener("toggle", async () => {
    if (!knownThings.open || classList.childElementCount) return;
    try {
      const response = await fetch(`${apiBase}/classes`);
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

  // A picture on this page's own server (an example, clicked or dragged onto the drop zone): fetched
  // and classified like a chosen file. A file chosen meanwhile wins.
  async function classifyFrom(src, description) {
    const asked = requestNumber;
    let blob;
    try {
      const response = await fetch(src);
      if (!response.ok) throw new Error(String(response.status));
      blob = await response.blob();
    } catch (_) {
      if (asked === requestNumber) refuse(`The picture ${src} could not be loaded.`);
      return;
    }
    if (asked !== requestNumber) return;
    const name = new URL(src, window.location.href).pathname.split("/").pop() || "picture";
    classify(new File([blob], name, { type: blob.type || "image/png" }), description);
  }

  // Example pictures.
  for (const button of document.querySelectorAll(".example")) {
    button.addEventListener("click", () => {
      const alt = button.querySelector("img").alt.replace(/^Example: /, "");
      classifyFrom(button.dataset.src, `Example: ${alt}`);
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
  // A picture dragged from this page (an example) brings its address, not a file: one on this
  // page's own origin is fetched. (Another site's would need its CORS consent: not tried.)
  function droppedUrl(data) {
    const lines = (data.getData("text/uri-list") || "").split(/\r?\n/)
      .map((line) => line.trim()).filter((line) => line && !line.startsWith("#"));
    if (!lines.length) return null;
    try {
      const url = new URL(lines[0], window.location.href);
      return url.origin === window.location.origin ? url : null;
    } catch (_) {
      return null;
    }
  }

  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const data = event.dataTransfer;
    const file = data && firstFile(data.files);
    if (file) {
      classify(file);
      return;
    }
    const url = data && droppedUrl(data);
    if (url) {
      const example = Array.from(document.querySelectorAll(".example img")).find((img) => img.src === url.href);
      classifyFrom(url.href, example ? example.alt : "");
      return;
    }
    notice("Nothing to classify was dropped: drop an image file or one of the example pictures.");
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
