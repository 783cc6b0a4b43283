// The page's behaviour: take an image (drop, file picker, camera, paste, an example picture), show
// it, send it to POST {apiBase}/classify/ as multipart field `image`, and show the answer with its
// top-5 bars, saying so plainly when the model is unsure. "Why?" asks POST {apiBase}/explain/ for
// the answer's Grad-CAM heatmap and lays it over the preview; GET {apiBase}/classes lists the 100
// things the model knows; GET {apiBase}/settings gives the upload and pixel limits checked before
// sending (the pixels before showing), the rules for shrinking a large photo here, before it is
// uploaded (the preview stays full-size), and whether the server explains ("Why?" offered).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const dropZone = $("drop-zone");
  const fileInput = $("file-input");
  const cameraInput = $("camera-input");
  const preview = $("preview");
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
  // none: this page's own server, under the page's own path (an adapter published at https://host/cifar/
  // is asked at /cifar/classify/, not at the host's /classify/). ?api= is for a copy of the page hosted elsewhere: the adapter's
  // own page (which the adapter marks <meta name="page-server" content="adapter">, adapter/page.py)
  // ignores it, as does a copy that names its API itself, or a crafted link would send users'
  // photos to another server and show its answers here.
  const apiBase = (() => {
    const configured = (window.CIFAR100_CONFIG && window.CIFAR100_CONFIG.apiBase) || metaContent("api-base");
    const fromQuery = metaContent("page-server") === "adapter" ? ""
      : httpAddress(new URLSearchParams(window.location.search).get("api") || "");
    return (configured || fromQuery || new URL(".", window.location.href).pathname).replace(/\/+$/, "");
  })();

  // How long the page waits for GET /settings before it goes on without them, and for every other
  // answer. The adapter answers within BODY_TIMEOUT_S + SHRINK_WAIT_S + TS_PREDICT_TIMEOUT_S
  // (30 + 5 + 10 s) even when the model server hangs: past 60 s something on the way (a proxy, the
  // network) is stuck, and the page says so instead of waiting for ever.
  const SETTINGS_DEADLINE_S = 3;
  const ANSWER_DEADLINE_S = 60;

  // A signal aborted after `seconds` with a TimeoutError. AbortSignal.timeout where the browser has it; Safari
  // before 16 has not, and the script stopped at its first use (at start: nothing on the page answered).
  function timeoutSignal(seconds) {
    if (AbortSignal.timeout) return AbortSignal.timeout(seconds * 1000);
    const controller = new AbortController();
    setTimeout(() => controller.abort(new DOMException("The operation timed out.", "TimeoutError")), seconds * 1000);
    return controller.signal;
  }

  // The adapter's limits (GET {apiBase}/settings: max_upload_bytes, top_k, images, shrink, explain), asked
  // at start so that a too-large file is refused before it is sent (after its preview and an attempt to
  // shrink it) and a large photo is shrunk first. Unreachable or slow: this picture goes without them (the
  // adapter's own 413 still answers), and the next one asks again: a failure is not kept for the visit.
  let settingsAsked = null; // the answer's promise (of null when it failed); null: ask at the next picture
  let explainOffered = true; // false once the server said it gives no explanations ("Why?" hidden)

  function askSettings() {
    const asked = fetch(`${apiBase}/settings`, { signal: timeoutSignal(SETTINGS_DEADLINE_S) })
      .then((response) => (response.ok ? response.json() : null))
      .then((settings) => (settings && typeof settings === "object" ? settings : null))
      .catch(() => null);
    asked.then((settings) => {
      if (!settings && settingsAsked === asked) settingsAsked = null;
      if (settings && settings.explain === false) explainOffered = false;
    });
    return asked;
  }

  // The settings, or {} when they could not be had within SETTINGS_DEADLINE_S (an answer on its way is
  // waited for, not asked again).
  async function serverSettings() {
    settingsAsked = settingsAsked || askSettings();
    return (await settingsAsked) || {};
  }
  settingsAsked = askSettings();

  // In the units of the server's own 413, rounded as it rounds (adapter/upload.py binary_size): 10 MiB, 97.7 KiB.
  function formatBytes(n) {
    for (const [unit, scale] of [["MiB", 1024 * 1024], ["KiB", 1024]]) {
      const tenths = Math.floor((n * 10 + scale / 2) / scale);
      if (tenths >= 10) return `${Math.floor(tenths / 10)}${tenths % 10 ? "." + (tenths % 10) : ""} ${unit}`;
    }
    return `${n} bytes`;
  }

  // A whole percent from 10% (and 0%), one decimal below; chosen on the rounded value, so that
  // 9.98% shows "10%", not "10.0%", and 0.004% "0%", not "0.0%".
  function percent(p) {
    const tenths = Math.round(1000 * p) / 10;
    return tenths >= 10 || tenths === 0 ? `${Math.round(100 * p)}%` : `${tenths.toFixed(1)}%`;
  }

  // "30 s", "2 min": how long the server asked the user to wait.
  function waitInWords(seconds) {
    return seconds < 90 ? `${Math.ceil(seconds)} s` : `${Math.ceil(seconds / 60)} min`;
  }

  let previewUrl = null;
  let requestNumber = 0; // a newer image makes an older answer stale
  let pickAbort = new AbortController(); // the latest pick's requests (its "Why?" too)

  // A new pick: an older one's answers are stale, and its requests still on their way are cancelled,
  // or their uploads keep counting against this address's share at the adapter (a busy 503 for this one).
  function nextPick() {
    pickAbort.abort();
    pickAbort = new AbortController();
    return ++requestNumber;
  }

  // The request's signal: aborted when its pick is superseded, or after `seconds` (a TimeoutError).
  function withDeadline(signal, seconds) {
    const deadline = timeoutSignal(seconds);
    if (AbortSignal.any) return AbortSignal.any([signal, deadline]);
    const both = new AbortController(); // browsers without AbortSignal.any (Safari < 17.4)
    for (const one of [signal, deadline]) {
      if (one.aborted) both.abort(one.reason);
      else one.addEventListener("abort", () => both.abort(one.reason), { once: true });
    }
    return both.signal;
  }

  let currentUpload = null; // what was sent for the picture on show ({blob, name, signal: its pick's}), for "Why?"
  let currentAnswer = null;
  let heatmapFor = null; // the upload the overlay belongs to (null: none yet)

  // "a ray", "an apple": the unsure wording names two guesses in running text.
  function withArticle(name) {
    const lower = name.toLowerCase();
    return `${/^[aeiou]/.test(lower) ? "an" : "a"} ${lower}`;
  }

  function resetWhy() {
    heatmapImage.hidden = true;
    heatmapImage.removeAttribute("src");
    heatmapFor = null;
    whyButton.setAttribute("aria-pressed", "false");
    whyButton.removeAttribute("aria-disabled");
    whyCaption.hidden = true;
    whyCaption.textContent = "";
    whyCaption.classList.remove("why-failed");
  }

  // The answer hidden (busy, or an error). The keyboard focus on its "Why?" button would fall to
  // the page's start: it goes to the drop zone, where the next picture is chosen.
  function hideAnswer() {
    if (answerBox.contains(document.activeElement)) dropZone.focus();
    answerBox.hidden = true;
  }

  function setBusy(busy) {
    // On the answer, not on #result: a screen reader may hold back what a live region inside a busy
    // element says (#status: "Looking at your image…", "The server is busy; trying again…").
    answerBox.setAttribute("aria-busy", String(busy));
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
    hideAnswer();
    setBusy(false);
    say(statusLine, "Could not classify the image.");
    say(errorText, message);
    errorText.hidden = false;
    document.body.dataset.state = "error";
  }

  // A newly chosen picture refused before it is sent (not an image, empty, too large, not loaded):
  // an earlier picture's preview must not stand beside the error as if it were the one that failed.
  function refuse(message) {
    nextPick(); // an answer still on its way is for an earlier picture
    clearPicture();
    showError(message);
  }

  // Something that is not a picture (a dropped text or link): said, and the answer on show stays.
  function notice(message) {
    say(errorText, message);
    errorText.hidden = false;
  }

  // "Why?" offered unless the server said it gives no explanations (GET /settings `explain`, or a 501).
  // Its keyboard focus, when it goes, goes to the drop zone (not to the page's start).
  function offerWhy() {
    if (!explainOffered && document.activeElement === whyButton) dropZone.focus();
    whyButton.hidden = !explainOffered;
  }

  function showAnswer(answer) {
    errorText.hidden = true;
    offerWhy();
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

  // Retry-After in seconds (it may be a number of seconds or an HTTP date); NaN when there is none.
  function retryAfterSeconds(response) {
    const header = (response.headers.get("Retry-After") || "").trim();
    if (!header) return NaN;
    if (/^\d+$/.test(header)) return Number(header);
    const date = Date.parse(header);
    return Number.isNaN(date) ? NaN : Math.max(0, (date - Date.now()) / 1000);
  }

  // A 503 or 429 with Retry-After is the server's "busy: ask again in N s" (its shares and caps, or a
  // proxy's rate limit; not a server that is down): the page waits that long (at most BUSY_WAIT_MAX_S),
  // saying so, and asks again, up to BUSY_RETRIES times, while the answer is still wanted (`wanted()`).
  // Other answers return as they are. Each try has ANSWER_DEADLINE_S, the reading of its answer included.
  const BUSY_RETRIES = 2;
  const BUSY_WAIT_MAX_S = 5;
  const BUSY_STATUSES = [429, 503];

  // `signal`: the pick's, aborted when a newer pick makes the answer unwanted. `notify` shows the
  // busy notices (the status line by default; "Why?" puts them beside its button too).
  async function postForm(url, form, wanted, signal, notify = (text) => say(statusLine, text)) {
    for (let retry = 0; ; retry++) {
      const response = await fetch(url, { method: "POST", body: form, signal: withDeadline(signal, ANSWER_DEADLINE_S) });
      const seconds = retryAfterSeconds(response);
      if (!BUSY_STATUSES.includes(response.status) || !(seconds >= 0) || retry >= BUSY_RETRIES || !wanted()) {
        return response;
      }
      const wait = Math.ceil(Math.min(seconds, BUSY_WAIT_MAX_S));
      notify(`The server is busy; trying again in ${wait} s…`);
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      if (!wanted()) return response;
      notify("The server was busy; trying again…"); // the wait is over: not "in N s" any more
    }
  }

  // A fetch that failed outright: no answer within the deadline, or none at all.
  function unreachable(err, url) {
    return err && err.name === "TimeoutError"
      ? `The classifier at ${url} did not answer within ${ANSWER_DEADLINE_S} s. Please try again later.`
      : `Cannot reach the classifier at ${url}. The server may be down; please try again later.`;
  }

  // A 200's JSON as {answer}, or {unreadable: why not}: its reading ran past the deadline, or it is not JSON
  // (a proxy's page).
  async function readAnswer(response, url) {
    try {
      return { answer: await response.json() };
    } catch (err) {
      return { unreadable: err.name === "TimeoutError" ? unreachable(err, url) : "The server sent an answer this page cannot read." };
    }
  }

  // The adapter's errors are {"error": "..."}; anything else (a proxy's HTML page) gets a plain line.
  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body && (body.error || body.detail || body.message) || "";
    } catch (_) { /* not JSON */ }
    const seconds = retryAfterSeconds(response);
    const tryAgain = seconds >= 0 ? `Please try again in ${waitInWords(seconds)}.` : "";
    if (response.status === 429) {
      return ["Too many requests reach the classifier right now.", tryAgain || "Please try again later."].join(" ");
    }
    if (response.status === 413) {
      return message.startsWith("The image is too large") ? message
        : `The image is too large${message ? ` (${message})` : ""}. Try a smaller photo.`;
    }
    if (response.status === 503 || response.status === 502) {
      // The adapter's own busy messages say "try again shortly"; a proxy's page says nothing.
      return ["The classifier is not available right now.", message || tryAgain].filter(Boolean).join(" ");
    }
    if (response.status === 504) {
      return "The classifier took too long to answer. Please try again.";
    }
    if (response.status === 400 || response.status === 415) {
      return `That file could not be read as an image.${message ? ` (Server: ${message})` : ""}`;
    }
    return message || `The server answered ${[response.status, response.statusText].filter(Boolean).join(" ")}.`;
  }

  // True when any pixel of the canvas is not fully opaque.
  function hasTransparency(context, width, height) {
    const pixels = context.getImageData(0, 0, width, height).data;
    for (let i = 3; i < pixels.length; i += 4) {
      if (pixels[i] !== 255) return true;
    }
    return false;
  }

  // What a file's first bytes say it is, as a MIME type (Pillow's names, which GET /settings uses): its
  // type as given may be missing ("", some systems) or not the usual name ("image/jpg"). Each format
  // the server reads, by the bytes the server's Pillow knows it by, and HEIC/HEIF (phones' photos,
  // which it does not read); "" for the rest. (Which formats are read and shrunk is the server's to
  // say: GET /settings.)
  const SNIFF_BYTES = 64; // an ISO media file's brands (AVIF, HEIC) follow its first 16 bytes
  function sniffedType(head) {
    const bytes = new Uint8Array(head);
    const text = (from, to) => String.fromCharCode(...bytes.subarray(from, to));
    const format = (() => {
      if (bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return "jpeg";
      if (text(0, 8) === "\x89PNG\r\n\x1a\n") return "png";
      if (text(0, 4) === "RIFF" && text(8, 12) === "WEBP") return "webp";
      if (text(0, 6) === "GIF87a" || text(0, 6) === "GIF89a") return "gif";
      if (text(0, 2) === "BM") return "bmp";
      if (["MM\0*", "II*\0", "MM*\0", "II\0*", "MM\0+", "II+\0"].includes(text(0, 4))) return "tiff";
      if (/^P[0-6fy]/.test(text(0, 2))) return "x-portable-anymap";
      if (bytes.length >= 12 && text(4, 8) === "ftyp") {
        // An ISO media file: its brands (the major one, then the compatible ones) tell AVIF from HEIC.
        const end = Math.min(bytes.length, new DataView(head).getUint32(0));
        const brands = [text(8, 12)];
        for (let at = 16; at + 4 <= end; at += 4) brands.push(text(at, at + 4));
        if (brands.some((brand) => brand === "avif" || brand === "avis")) return "avif";
        if (brands.some((brand) => /^he(ic|ix|im|is|vc|vx|vm|vs)$/.test(brand))) return "heic";
        if (brands.includes("mif1") || brands.includes("msf1")) return "heif";
      }
      return "";
    })();
    return format && `image/${format}`;
  }

  // A MIME type as a format's name ("image/png" -> "PNG"), as the page and the server's refusals say it.
  function formatName(type) {
    if (type === "image/x-portable-anymap") return "PPM"; // netpbm, by the server's (Pillow's) name
    return type.replace(/^image\/(x-)?/, "").replace(/\+.*$/, "").toUpperCase();
  }

  // A format the server does not read, refused before anything is sent, in the server's own words
  // (GET /settings `images`: its formats and its refusal): an iPhone's HEIC photo was uploaded whole
  // and only then refused. `type`: from the file's bytes, else as given. "" when it may be read.
  function unreadFormat(file, type, rules) {
    if (!type || !rules || !Array.isArray(rules.types) || !rules.refusal || rules.types.includes(type)) return "";
    return `“${file.name || "That file"}” (${formatName(type)}) cannot be classified: ${rules.refusal}. ` +
      "Convert it to JPEG or PNG (photo apps can export it so) and choose that copy.";
  }

  // An image's width and height (upright) as its header gives them, or null when this browser cannot
  // read it. An <img> that is never shown reads the header only: its pixels are decoded when painted.
  function imageSize(url) {
    return new Promise((resolve) => {
      const probe = new Image();
      probe.onload = () => resolve({ width: probe.naturalWidth, height: probe.naturalHeight });
      probe.onerror = () => resolve(null);
      probe.src = url;
    });
  }

  // An image's width and height as its header gives them, for the files this browser cannot size: a PNG or BMP
  // with a side above what its decoder reads (libpng refuses a side above 1,000,000: a 31 KB 1 x 16,000,000),
  // and TIFF and netpbm files, which it does not read at all (else they were uploaded whole, then refused).
  // `head`: the file's first bytes; a TIFF's first directory is read on its own (bounded: it may follow the
  // pixels). null when the header cannot be read: a damaged file is the server's to refuse.
  async function headerSize(file, head, type, rules) {
    if (!head || head.byteLength < 8) return null;
    const view = new DataView(head);
    if (type === "image/png") {
      if (head.byteLength < 24 || view.getUint32(12) !== 0x49484452) return null; // "IHDR" first, else damaged
      return { width: view.getUint32(16), height: view.getUint32(20) };
    }
    if (type === "image/bmp" && head.byteLength >= 26) {
      if (view.getUint32(14, true) === 12) { // the OS/2 header: 16-bit sides
        return { width: view.getUint16(18, true), height: view.getUint16(20, true) };
      }
      return { width: Math.abs(view.getInt32(18, true)), height: Math.abs(view.getInt32(22, true)) }; // < 0: top-down
    }
    try { // (a file moved away meanwhile: the upload will say so)
      if (type === "image/x-portable-anymap") return netpbmSize(await file.slice(0, NETPBM_HEADER_BYTES).arrayBuffer());
      if (type === "image/tiff") return await tiffSize(file, view, Number(rules && rules.max_tiff_tags) || 0);
    } catch (_) {
      return null;
    }
    return null;
  }

  // A netpbm file's sides: its magic (P1-P6), then width and height as ASCII numbers between whitespace
  // and # comments (a comment may take the header past the first bytes read).
  const NETPBM_HEADER_BYTES = 4096;
  function netpbmSize(bytes) {
    const text = String.fromCharCode(...new Uint8Array(bytes));
    const fields = text.replace(/#[^\n\r]*/g, " ").split(/\s+/).filter(Boolean);
    if (!/^P[1-6]$/.test(fields[0] || "") || !/^\d+$/.test(fields[1] || "") || !/^\d+$/.test(fields[2] || "")) {
      return null;
    }
    return { width: Number(fields[1]), height: Number(fields[2]) };
  }

  // A TIFF's first image's sides: tags ImageWidth (256) and ImageLength (257) of its first directory, SHORT or
  // LONG (LONG8 too in a BigTIFF), in the file's byte order. As the server's Pillow reads the header: its first
  // byte gives the order ("II": little-endian), its third "+" a BigTIFF (8-byte offsets), whatever the 42 says
  // (sniffedType lets in only the headers Pillow accepts). A directory past the file's end gives null. Reads at most
  // maxEntries entries (GET /settings "images" max_tiff_tags: the server refuses a directory of more).
  const TIFF_SIDE_BYTES = { 3: 2, 4: 4, 16: 8 }; // SHORT, LONG, LONG8: the types a side's value may have
  async function tiffSize(file, view, maxEntries) {
    const little = view.getUint8(0) === 0x49;
    const offsetBytes = view.getUint8(2) === 0x2b ? 8 : 4; // BigTIFF: 8
    const read = (data, at, bytes) => (bytes === 2 ? data.getUint16(at, little)
      : bytes === 4 ? data.getUint32(at, little) : Number(data.getBigUint64(at, little)));
    const countBytes = offsetBytes === 8 ? 8 : 2;
    const entryBytes = 4 + 2 * offsetBytes; // tag, type, count, value (or its offset)
    const at = read(view, offsetBytes, offsetBytes);
    const ifd = new DataView(await file.slice(at, at + countBytes + entryBytes * maxEntries).arrayBuffer());
    if (ifd.byteLength < countBytes) return null;
    const entries = Math.min(read(ifd, 0, countBytes), Math.floor((ifd.byteLength - countBytes) / entryBytes));
    const sides = {};
    for (let i = 0; i < entries; i += 1) {
      const entry = countBytes + entryBytes * i;
      const tag = ifd.getUint16(entry, little);
      const bytes = TIFF_SIDE_BYTES[ifd.getUint16(entry + 2, little)];
      if ((tag === 256 || tag === 257) && bytes <= offsetBytes) sides[tag] = read(ifd, entry + 4 + offsetBytes, bytes);
    }
    return sides[256] !== undefined && sides[257] !== undefined ? { width: sides[256], height: sides[257] } : null;
  }

  // The server's refusal of an image (not a JPEG) with a side above its limit (GET /settings `images`
  // max_side: a thin PNG costs a decode far more than its pixels), in its words, before this browser
  // decodes it or anything is sent. "" when it fits.
  function sideTooLong(size, type, rules) {
    if (!size || !rules || type === "image/jpeg") return "";
    const limit = Number(rules.max_side);
    if (!(limit > 0) || Math.max(size.width, size.height) <= limit) return "";
    return `The image is too large: ${size.width} × ${size.height} pixels, a side above the ` +
      `${limit.toLocaleString("en-US")}-pixel limit for ${type ? formatName(type) : "these"} images. ` +
      "Crop or shrink it.";
  }

  // The server's refusal of an image above its pixel limit (GET /settings `images`: JPEGs are decoded
  // at 1/2-1/8 scale there, so their limit is higher), said before this browser decodes it: a small
  // file can declare a huge canvas (a 20000 x 20000 PNG of 389 KB is 1.6 GB decoded). "" when it fits.
  function tooManyPixels(size, type, rules) {
    if (!size || !rules) return "";
    const pixels = size.width * size.height;
    const jpeg = type === "image/jpeg";
    const limit = Number(jpeg ? rules.max_jpeg_pixels : rules.max_pixels);
    if (!(limit > 0) || pixels <= limit) return "";
    const megapixels = (n) => `${Math.round(n / 1e5) / 10} MP`;
    return `The image is too large: ${size.width} × ${size.height} pixels (${megapixels(pixels)}); the limit is ` +
      `${megapixels(limit)}${jpeg ? "" : ` (for a JPEG photo: ${megapixels(rules.max_jpeg_pixels)})`}. ` +
      "Try a smaller picture.";
  }

  // A large photo shrunk before upload, following the adapter's rules (GET /settings `shrink`):
  // its type (`type`, from its bytes) is one of `types`, it is larger than `min_bytes` or
  // `min_pixels`, and its shorter side (upright, after its EXIF orientation) is brought down to
  // `min_side`, the most the server decodes of it anyway; sent as `type` at `quality`. Returns
  // {blob, width, height}, or null to send the file as it is: small images, transparent ones (the
  // server lays those on white), and anything this browser cannot decode (the server decides).
  async function shrunkPhoto(file, type, rules) {
    if (!rules || !Array.isArray(rules.types) || !rules.types.includes(type)) return null;
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
      if (!context) return null; // no canvas to be had (out of memory, a privacy setting): sent as it is
      context.imageSmoothingEnabled = true;
      context.imageSmoothingQuality = "high";
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      if (type !== "image/jpeg" && hasTransparency(context, canvas.width, canvas.height)) return null;
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

  // Classify a chosen file. `ticket`: the requestNumber its pick took (an example picture takes one
  // when clicked, before it is fetched); none: it takes the next one now. `note`: said beside the
  // answer (several files were dropped).
  async function classify(file, description, ticket, note) {
    if (!file) return;
    const thisRequest = ticket || nextPick();
    try {
      await classifyPick(file, description, thisRequest, note);
    } catch (err) {
      // A step before the upload threw (a canvas or memory this browser would not give): said, not left busy.
      if (thisRequest === requestNumber) {
        const why = String((err && err.message) || err).replace(/\.$/, "");
        showError(`The picture could not be prepared: ${why}. Try another picture.`);
      }
    }
  }

  // Formats told by two bytes a text may start with ("BM", "Py"): not enough to overrule a stated type.
  const WEAK_SIGNATURES = ["image/bmp", "image/x-portable-anymap"];

  // classify's steps for the pick `thisRequest`: checked, shown, shrunk, sent, answered.
  async function classifyPick(file, description, thisRequest, note) {
    const signal = pickAbort.signal; // this pick's: aborted when a newer one starts
    if (file.size === 0) {
      refuse("That file is empty.");
      return;
    }
    // Its first bytes, read before anything is sent: a folder, or a file moved, deleted or not on
    // this device (a cloud placeholder) cannot be read, and must not look like a server that is down.
    let head, type;
    try {
      head = await file.slice(0, SNIFF_BYTES).arrayBuffer();
      type = sniffedType(head);
    } catch (_) {
      if (thisRequest === requestNumber) {
        refuse(`“${file.name || "That file"}” could not be read: is it a folder, or a file that was moved ` +
          "or is not on this device? Choose the picture itself.");
      }
      return;
    }
    if (thisRequest !== requestNumber) return; // a newer image arrived meanwhile
    // The bytes decide (some systems give no type, or application/octet-stream for a photo); the stated
    // type refuses only what they do not show to be an image.
    if ((!type || WEAK_SIGNATURES.includes(type)) && file.type && !file.type.startsWith("image/")) {
      refuse(`“${file.name || "That file"}” is not an image (it is ${file.type}). Choose a photo or picture.`);
      return;
    }

    // "Busy" at once: nothing above waits on the network. The earlier picture goes; this one is shown
    // once its size is known to be within the server's limit (showing it decodes it).
    clearPicture();
    errorText.hidden = true;
    hideAnswer();
    setBusy(true);
    say(statusLine, "Looking at your image…");
    document.body.dataset.state = "busy";
    previewUrl = URL.createObjectURL(file);

    const settings = await serverSettings(); // SETTINGS_DEADLINE_S at most (normally asked for at start)
    if (thisRequest !== requestNumber) return; // a newer image arrived while the settings were asked for
    const unread = unreadFormat(file, type || file.type, settings.images);
    if (unread) {
      refuse(unread);
      return;
    }
    const shownSize = await imageSize(previewUrl); // null: this browser cannot show it (a TIFF, netpbm)
    const size = shownSize || await headerSize(file, head, type, settings.images);
    if (thisRequest !== requestNumber) return;
    const tooLarge = sideTooLong(size, type, settings.images) || tooManyPixels(size, type, settings.images);
    if (tooLarge) {
      refuse(tooLarge);
      return;
    }
    // A picture this browser cannot show is not shown (it was a broken-image icon over the drop hint); the
    // answer says so. The server reads it all the same.
    const unshown = shownSize ? "" : `This browser cannot show ${type ? formatName(type) : "this kind of"} ` +
      `images: the answer is for “${file.name || "your image"}” as the server read it.`;
    if (shownSize) {
      preview.onload = () => {
        // CIFAR-size pictures (32x32) would blur when enlarged: show their pixels.
        preview.classList.toggle("pixelated", preview.naturalWidth < 96);
      };
      preview.src = previewUrl;
      preview.alt = description || (file.name ? `Your image: ${file.name}` : "Your image");
      preview.hidden = false;
      dropZone.classList.add("has-image");
    }

    const shrunk = await shrunkPhoto(file, type, settings.shrink);
    if (thisRequest !== requestNumber) return;
    const upload = shrunk ? { blob: shrunk.blob, name: `${baseName(file.name)}.jpg`, signal }
      : { blob: file, name: file.name || "pasted-image", signal };
    const maxUploadBytes = Number(settings.max_upload_bytes) || 0;
    if (maxUploadBytes && upload.blob.size > maxUploadBytes) {
      refuse(`The image is too large: ${formatBytes(file.size)}; the limit is ${formatBytes(maxUploadBytes)}.`);
      return;
    }

    // Say what travels (the preview keeps the original), and what was left out.
    sentText.textContent = [
      shrunk ? `Sent a ${shrunk.width} × ${shrunk.height} copy (${formatBytes(shrunk.blob.size)}) of your ` +
        `${formatBytes(file.size)} photo; the model looks at 32 × 32 pixels.` : "",
      unshown,
      note || "",
    ].filter(Boolean).join(" ");
    sentText.hidden = !sentText.textContent;
    currentUpload = upload;

    const form = new FormData();
    form.append("image", upload.blob, upload.name);
    const url = `${apiBase}/classify/`;
    try {
      let response;
      try {
        response = await postForm(url, form, () => thisRequest === requestNumber, signal);
      } catch (err) {
        if (thisRequest === requestNumber) showError(unreachable(err, url)); // (an aborted one is superseded)
        return;
      }
      if (thisRequest !== requestNumber) return;
      if (!response.ok) {
        const message = await errorMessage(response);
        if (thisRequest === requestNumber) showError(message);
        return;
      }
      const { answer, unreadable } = await readAnswer(response, url);
      if (thisRequest !== requestNumber) return; // a newer picture was chosen while this answer was read
      if (unreadable) {
        showError(unreadable);
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
        try { // (an image of no size, a canvas refused: else the promise never settled, "Why?" stuck busy)
          resolve(coloured(grey));
        } catch (err) {
          reject(err);
        }
      };
      grey.onerror = () => reject(new Error("the heatmap is not a readable image"));
      grey.src = dataUrl;
    });
  }

  // The grey heatmap as a see-through red-to-yellow overlay's PNG data URL.
  function coloured(grey) {
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
    return canvas.toDataURL("image/png");
  }

  // The words beside "Why?" (where sighted users look: the status line is hidden once answered), also
  // said to screen readers: its progress, what the heatmap shows, or why it failed (`failed`).
  function sayBesideWhy(text, failed = false) {
    whyCaption.textContent = text;
    whyCaption.classList.toggle("why-failed", failed);
    whyCaption.hidden = false;
    say(statusLine, text);
  }

  // updated: the model answered otherwise when asked why (a new version rolled out, a canary's share),
  // so the answer on show was replaced by the one the heatmap belongs to.
  function showWhy(updated = false) {
    heatmapImage.hidden = false;
    whyButton.setAttribute("aria-pressed", "true");
    sayBesideWhy((updated ? "The model has been updated since your picture was answered: the answer " +
      "above is its new one. " : "") + `Red and yellow mark the parts of the picture that made the model answer ` +
      `“${currentAnswer ? currentAnswer.prediction : "this"}” (Grad-CAM); the redder, the more they counted.`);
  }

  // The explanation failed, not the answer: the answer stays, the reason goes beside the button
  // (and to screen readers), and the button keeps the keyboard focus for another try.
  function whyFailed(message) {
    sayBesideWhy(`Could not show why: ${message}`, true);
  }

  let explainingFor = null; // the upload whose explanation is on its way (null: none)

  async function why() {
    const upload = currentUpload; // the picture on show: a newer one makes this explanation stale
    // (aborted: a newer pick began, and this picture is about to go; its "Why?" would fail as unreachable)
    if (!upload || explainingFor === upload || upload.signal.aborted) return;
    if (whyButton.getAttribute("aria-pressed") === "true") { // a second press hides the overlay
      heatmapImage.hidden = true;
      whyButton.setAttribute("aria-pressed", "false");
      whyCaption.hidden = true;
      return;
    }
    if (heatmapFor === upload) {
      showWhy();
      return;
    }
    // A newer pick aborts this one's signal before it takes the picture away (after reading the new file's
    // first bytes, or fetching an example): its cancelled request is no failure to tell.
    const stillShown = () => currentUpload === upload && !upload.signal.aborted;
    const form = new FormData();
    form.append("image", upload.blob, upload.name); // what /classify/ got
    const url = `${apiBase}/explain/`;
    // aria-disabled, not disabled: a disabled button would lose the keyboard focus.
    explainingFor = upload;
    whyButton.setAttribute("aria-disabled", "true");
    sayBesideWhy("Looking for what the answer came from…");
    try {
      let response;
      try {
        response = await postForm(url, form, stillShown, upload.signal, sayBesideWhy); // cancelled by a newer pick
      } catch (err) {
        if (stillShown()) whyFailed(unreachable(err, url));
        return;
      }
      if (!stillShown()) return;
      if (!response.ok) {
        const message = await errorMessage(response);
        if (response.status === 501) explainOffered = false; // this server never explains: not offered again
        if (stillShown()) {
          whyFailed(message);
          offerWhy();
        }
        return;
      }
      const { answer, unreadable } = await readAnswer(response, url);
      if (!stillShown()) return;
      if (unreadable) {
        whyFailed(unreadable);
        return;
      }
      if (!answer || typeof answer.prediction !== "string" || typeof answer.heatmap !== "string") {
        whyFailed(answer && answer.error ? answer.error : "The server's answer has no explanation.");
        return;
      }
      const overlay = await colourHeatmap(answer.heatmap);
      if (!stillShown()) return;
      // The heatmap is of the explanation's own answer: shown beside an older, different one, it would
      // explain an answer the page does not name.
      const updated = !currentAnswer || answer.prediction !== currentAnswer.prediction ||
        answer.model_version !== currentAnswer.model_version;
      if (updated) showAnswer(answer);
      heatmapImage.src = overlay;
      heatmapFor = upload;
      showWhy(updated);
    } catch (err) {
      if (stillShown()) {
        whyFailed(err.name === "TimeoutError" ? unreachable(err, url) : "The explanation could not be shown.");
      }
    } finally {
      if (explainingFor === upload) { // a newer picture's explanation, if one started, is not done
        explainingFor = null;
        whyButton.removeAttribute("aria-disabled");
      }
    }
  }

  whyButton.addEventListener("click", why);

  // The 100 things it knows, fetched the first time the list is opened (again on the next opening when
  // that failed; once while a fetch is under way).
  let classesState = "none"; // "loading", "loaded"
  knownThings.addEventListener("toggle", async () => {
    if (!knownThings.open || classesState !== "none") return;
    classesState = "loading";
    try {
      const response = await fetch(`${apiBase}/classes`, { signal: timeoutSignal(ANSWER_DEADLINE_S) });
      if (!response.ok) throw new Error(String(response.status));
      const classes = await response.json();
      classList.replaceChildren(...classes.map((item) => {
        const li = document.createElement("li");
        li.textContent = item.name;
        return li;
      }));
      classesState = "loaded";
    } catch (_) {
      const li = document.createElement("li");
      li.textContent = "The list could not be loaded from the server. Close and open it to try again.";
      classList.replaceChildren(li);
      classesState = "none";
    }
  });

  // A picture on this page's own server (an example, clicked or dragged onto the drop zone): fetched
  // and classified like a chosen file. Its ticket is taken now: whatever is picked after it (another
  // example whose fetch ends sooner, a file) wins, and nothing picked before it does.
  async function classifyFrom(src, description) {
    const asked = nextPick();
    // Busy at once: the earlier answer is not the one asked for any more, though its file is still on its way.
    setBusy(true);
    say(statusLine, "Looking at your image…");
    document.body.dataset.state = "busy";
    let blob;
    try {
      const response = await fetch(src, { signal: withDeadline(pickAbort.signal, ANSWER_DEADLINE_S) });
      if (!response.ok) throw new Error(`the server answered ${response.status}`);
      blob = await response.blob();
    } catch (err) {
      if (asked === requestNumber) {
        const why = err.name === "TimeoutError" ? `no answer within ${ANSWER_DEADLINE_S} s`
          : err.message.startsWith("the server answered") ? err.message : "the server could not be reached";
        refuse(`The picture ${src} could not be loaded: ${why}.`);
      }
      return;
    }
    if (asked !== requestNumber) return;
    const name = new URL(src, window.location.href).pathname.split("/").pop() || "picture";
    classify(new File([blob], name, { type: blob.type || "image/png" }), description, asked);
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

  // The first of the files dropped or pasted; beside its answer the page says the others were left out.
  function classifyFirst(files) {
    const file = files[0];
    const note = files.length > 1
      ? `${files.length} files came at once; only the first, “${file.name || "pasted-image"}”, was classified.` : "";
    classify(file, "", undefined, note);
  }

  // "Take photo". A phone's browser opens its camera for the `capture` input; a desktop's ignores
  // `capture` (it has no such property) and opened the file picker, as "Choose photo" does. There the
  // page takes the photo itself from a camera the browser reports (getUserMedia, in a dialog), and
  // offers no "Take photo" while it reports none (none plugged in, or a page not on https).
  const cameraLabel = $("camera-label");
  const cameraDialog = $("camera");
  const cameraView = $("camera-view");
  const cameraStatus = $("camera-status");
  const shootButton = $("camera-shoot");
  let cameraStream = null;

  function offerCamera(offered) {
    cameraLabel.hidden = !offered;
    cameraInput.hidden = !offered; // out of the tab order too (and no input without a label shown)
  }

  async function cameraPresent() {
    const media = navigator.mediaDevices;
    if (!media || !media.getUserMedia || !media.enumerateDevices) return false;
    try {
      return (await media.enumerateDevices()).some((device) => device.kind === "videoinput");
    } catch (_) {
      return false;
    }
  }

  function stopCamera() {
    if (cameraStream) cameraStream.getTracks().forEach((track) => track.stop());
    cameraStream = null;
    cameraView.srcObject = null;
  }

  let cameraAsk = 0; // the latest opening's number: an earlier one's late stream is stopped, not kept
  async function openCamera() {
    if (cameraDialog.open) return;
    const ask = ++cameraAsk;
    shootButton.disabled = true;
    cameraStatus.textContent = "Starting the camera…";
    cameraDialog.showModal();
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (err) {
      if (ask !== cameraAsk) return;
      cameraStatus.textContent = err && err.name === "NotAllowedError"
        ? "The camera may not be used here: allow it in the browser's settings for this site, or choose a photo."
        : "The camera could not be started (another program may be using it). Choose a photo instead.";
      return;
    }
    if (!cameraDialog.open || ask !== cameraAsk) { // cancelled (and maybe opened again) while the browser asked
      stream.getTracks().forEach((track) => track.stop());
      return;
    }
    cameraStream = stream;
    cameraView.srcObject = stream;
    await cameraView.play().catch(() => {});
    if (ask !== cameraAsk) return; // cancelled meanwhile: that closing let this stream go
    cameraStatus.textContent = "";
    shootButton.disabled = false;
    shootButton.focus();
  }

  if (!("capture" in cameraInput)) {
    offerCamera(false);
    const check = async () => offerCamera(await cameraPresent());
    check();
    if (navigator.mediaDevices) navigator.mediaDevices.addEventListener("devicechange", check);
    // The label (a click) and the input (the keyboard) both click the input: the camera, not the picker.
    cameraInput.addEventListener("click", (event) => {
      event.preventDefault();
      openCamera();
    });
  }
  cameraDialog.addEventListener("close", stopCamera); // Cancel, Escape, or a photo taken
  $("camera-cancel").addEventListener("click", () => cameraDialog.close());
  let shooting = false; // a photo on its way from the canvas: another press takes none
  shootButton.addEventListener("click", () => {
    const width = cameraView.videoWidth;
    const height = cameraView.videoHeight;
    if (!cameraStream || !width || !height || shooting) return;
    shooting = true;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(cameraView, 0, 0, width, height);
    canvas.toBlob((blob) => {
      shooting = false;
      if (!cameraDialog.open) return; // cancelled (Cancel, Escape) while the photo was being made
      cameraDialog.close();
      if (blob) classify(new File([blob], "camera-photo.jpg", { type: "image/jpeg" }), "Your photo from the camera");
      else refuse("The camera gave no picture; try again.");
    }, "image/jpeg");
  });

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
      return url.protocol === "http:" || url.protocol === "https:" ? url : null;
    } catch (_) {
      return null;
    }
  }

  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const data = event.dataTransfer;
    const files = data ? Array.from(data.files) : [];
    if (files.length) {
      // A folder comes as a File that cannot be read (classify says so too, on browsers without entries).
      const item = Array.from(data.items || []).find((entry) => entry.kind === "file");
      const entry = item && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry && entry.isDirectory) {
        notice(`“${entry.name}” is a folder: drop a picture from it, not the folder itself.`);
        return;
      }
      classifyFirst(files);
      return;
    }
    const url = data && droppedUrl(data);
    if (url && url.origin === window.location.origin) {
      const example = Array.from(document.querySelectorAll(".example img")).find((img) => img.src === url.href);
      classifyFrom(url.href, example ? example.alt : "");
      return;
    }
    if (url) { // another site's picture: its server would not let this page read it (and fetching it is not ours to do)
      notice("A picture from another website cannot be taken from here: save it, then drop or choose the file.");
      return;
    }
    notice("Nothing to classify was dropped: drop an image file or one of the example pictures.");
  });

  // Paste: an image copied to the clipboard (a screenshot, "Copy image" in a browser). The page has
  // no text fields, so pasted text is nothing to classify: said, as for a dropped text.
  document.addEventListener("paste", (event) => {
    const data = event.clipboardData;
    if (!data) return;
    const files = data.files && data.files.length ? Array.from(data.files)
      : Array.from(data.items || []).filter((item) => item.kind === "file").map((item) => item.getAsFile()).filter(Boolean);
    event.preventDefault();
    if (files.length) {
      classifyFirst(files);
    } else {
      notice("Nothing to classify was pasted: copy an image itself (not its address or a text), then paste it here.");
    }
  });
})();
