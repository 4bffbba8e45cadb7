// The drawing page: draw a digit on the pad and see what the model reads, while drawing.
// Strokes are kept as lists of points in pad units (0..1 across and down the square pad),
// so they can be redrawn at any size: on resize, on undo, and for the image sent to the API.

const BRUSH_WIDTH = 1 / 13; // of the pad width: about an MNIST stroke once the digit is scaled to 20x20
const MIN_POINT_GAP = 0.002; // pad units; closer points add nothing but weight
const EXPORT_SIZE = 280; // px; the server crops and rescales, so this only sets the anti-aliasing
const PREDICT_INTERVAL_MS = 130; // at most one prediction request this often while drawing
const RETRY_INTERVAL_MS = 3000;
const REQUEST_TIMEOUT_MS = 10000;
const UNSURE_BELOW = 0.6;
const INVITATION = "Draw a digit from 0 to 9 in the box.";

const pad = document.getElementById("pad");
const padFrame = document.getElementById("pad-frame");
const undoButton = document.getElementById("undo");
const clearButton = document.getElementById("clear");
const result = document.getElementById("result");
const digitView = document.getElementById("digit");
const statusView = document.getElementById("status");
const confidenceView = document.getElementById("confidence");
const barList = document.getElementById("probabilities");
const modelInfo = document.getElementById("model-info");

const strokes = [];
let activeStroke = null; // { pointerId, rect, points } while a pointer draws
let inkColor = "#111";
let renderQueued = false;

// Every change to the drawing gets a new version; an answer is shown only if it is about a
// newer drawing than the one on screen, so a slow answer never overwrites a fresher one.
let drawingVersion = 0;
let shownVersion = 0;
let predictTimer = null;
let inFlight = null; // AbortController of the one request allowed at a time
let resendWhenDone = false;
let retryTimer = null;

const percent = new Intl.NumberFormat("en", { style: "percent", maximumFractionDigits: 1 });
const wholePercent = new Intl.NumberFormat("en", { style: "percent", maximumFractionDigits: 0 });

class ServiceError extends Error {
  constructor(message, { transient }) {
    super(message);
    this.name = "ServiceError";
    this.transient = transient; // worth retrying the same drawing later
  }
}

// ---- Drawing -------------------------------------------------------------------------------

function pointFrom(event, rect) {
  return { x: (event.clientX - rect.left) / rect.width, y: (event.clientY - rect.top) / rect.height };
}

function addPoint(points, point) {
  const last = points.at(-1);
  if (last && Math.hypot(point.x - last.x, point.y - last.y) < MIN_POINT_GAP) return false;
  points.push(point);
  return true;
}

function beginStroke(event) {
  if (activeStroke || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  try {
    pad.setPointerCapture(event.pointerId);
  } catch {
    // A pointer that is already gone cannot be captured; the stroke still works while inside.
  }
  const rect = pad.getBoundingClientRect();
  activeStroke = { pointerId: event.pointerId, rect, points: [pointFrom(event, rect)] };
  strokes.push(activeStroke.points);
  drawingChanged();
}

function extendStroke(event) {
  if (event.pointerId !== activeStroke?.pointerId) return;
  const samples = event.getCoalescedEvents?.() ?? [];
  let added = false;
  for (const sample of samples.length > 0 ? samples : [event]) {
    added = addPoint(activeStroke.points, pointFrom(sample, activeStroke.rect)) || added;
  }
  if (added) drawingChanged();
}

function endStroke(event) {
  if (event.pointerId !== activeStroke?.pointerId) return;
  if (event.type === "pointerup") addPoint(activeStroke.points, pointFrom(event, activeStroke.rect));
  activeStroke = null;
  drawingChanged({ settled: true });
}

function undoLastStroke() {
  if (strokes.length === 0) return;
  if (activeStroke?.points === strokes.at(-1)) activeStroke = null;
  strokes.pop();
  drawingChanged({ settled: true });
}

function clearPad() {
  if (strokes.length === 0) return;
  strokes.length = 0;
  activeStroke = null;
  drawingChanged({ settled: true });
}

function drawingChanged({ settled = false } = {}) {
  drawingVersion += 1;
  pad.dataset.strokes = String(strokes.length);
  padFrame.classList.toggle("has-ink", strokes.length > 0);
  for (const button of [undoButton, clearButton]) {
    button.setAttribute("aria-disabled", String(strokes.length === 0));
  }
  requestRender();
  if (strokes.length === 0) showInvitation();
  else if (settled) predictNow();
  else schedulePrediction();
  markBusy();
}

// The result region is busy while its answer is about an older drawing: screen readers wait
// for it before announcing, and tests wait for it before reading the answer.
function markBusy() {
  const waiting = shownVersion !== drawingVersion && result.dataset.state !== "error";
  result.setAttribute("aria-busy", String(waiting));
}

// ---- Rendering -----------------------------------------------------------------------------

// Draws all strokes with quadratic curves through the midpoints of successive points, on a
// context whose transform maps pad units to pixels.
function paintStrokes(context, color) {
  context.strokeStyle = color;
  context.fillStyle = color;
  context.lineWidth = BRUSH_WIDTH;
  context.lineCap = "round";
  context.lineJoin = "round";
  for (const points of strokes) {
    const [first] = points;
    context.beginPath();
    if (points.length === 1) {
      context.arc(first.x, first.y, BRUSH_WIDTH / 2, 0, 2 * Math.PI);
      context.fill();
      continue;
    }
    context.moveTo(first.x, first.y);
    for (let i = 1; i < points.length - 1; i += 1) {
      const [control, next] = [points[i], points[i + 1]];
      context.quadraticCurveTo(control.x, control.y, (control.x + next.x) / 2, (control.y + next.y) / 2);
    }
    const last = points.at(-1);
    context.lineTo(last.x, last.y);
    context.stroke();
  }
}

function requestRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(render);
}

function render() {
  renderQueued = false;
  const context = pad.getContext("2d");
  context.setTransform(1, 0, 0, 1, 0, 0);
  context.clearRect(0, 0, pad.width, pad.height);
  context.setTransform(pad.width, 0, 0, pad.height, 0, 0);
  paintStrokes(context, inkColor);
}

// Keeps the backing store at device pixels, so strokes stay crisp on high-DPI screens.
function fitBackingStore() {
  const width = Math.round(pad.clientWidth * devicePixelRatio);
  const height = Math.round(pad.clientHeight * devicePixelRatio);
  if (width === pad.width && height === pad.height) return;
  pad.width = width;
  pad.height = height;
  render();
}

function watchPixelRatio() {
  matchMedia(`(resolution: ${devicePixelRatio}dppx)`).addEventListener("change", () => {
    fitBackingStore();
    watchPixelRatio();
  }, { once: true });
}

function readInkColor() {
  inkColor = getComputedStyle(pad).getPropertyValue("--ink").trim() || inkColor;
  requestRender();
}

// The API gets black ink on white whatever the colour scheme on screen.
function exportImage() {
  const canvas = document.createElement("canvas");
  canvas.width = EXPORT_SIZE;
  canvas.height = EXPORT_SIZE;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, EXPORT_SIZE, EXPORT_SIZE);
  context.setTransform(EXPORT_SIZE, 0, 0, EXPORT_SIZE, 0, 0);
  paintStrokes(context, "#000");
  return canvas.toDataURL("image/png");
}

// ---- Talking to the service ----------------------------------------------------------------

function schedulePrediction() {
  predictTimer ??= setTimeout(predictNow, PREDICT_INTERVAL_MS);
}

function predictNow() {
  clearTimeout(predictTimer);
  predictTimer = null;
  sendPrediction();
}

async function sendPrediction() {
  if (strokes.length === 0) return;
  if (inFlight) {
    resendWhenDone = true;
    return;
  }
  const version = drawingVersion;
  const controller = new AbortController();
  inFlight = controller;
  try {
    const answer = await postPrediction(exportImage(), controller.signal);
    if (version > shownVersion && strokes.length > 0) {
      shownVersion = version;
      stopRetrying();
      if (answer === null) showNoDigit();
      else showPrediction(answer);
      markBusy();
    }
  } catch (error) {
    if (error.name !== "AbortError" && version > shownVersion) {
      showError(error);
      markBusy();
    }
  } finally {
    if (inFlight === controller) inFlight = null;
    if (resendWhenDone && !controller.signal.aborted) {
      resendWhenDone = false;
      sendPrediction();
    }
  }
}

// Resolves to the prediction, or to null when the service finds no digit in the drawing.
async function postPrediction(image, signal) {
  let response;
  try {
    response = await fetch("predict", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ image }),
      signal: AbortSignal.any([signal, AbortSignal.timeout(REQUEST_TIMEOUT_MS)]),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const message = error.name === "TimeoutError"
      ? "The digit service is taking too long to answer."
      : "Can't reach the digit service.";
    throw new ServiceError(message, { transient: true });
  }
  const body = await response.json().catch(() => null);
  if (response.ok && isPrediction(body)) return body;
  if (response.status === 422 && body?.reason === "no_digit") return null;
  throw errorFromResponse(response, body);
}

function isPrediction(body) {
  return Number.isInteger(body?.digit)
    && Array.isArray(body.probabilities)
    && body.probabilities.length === 10;
}

function errorFromResponse(response, body) {
  const { status } = response;
  const detail = typeof body?.error === "string" ? body.error : `HTTP ${status}`;
  const error = (message, transient) => new ServiceError(message, { transient });
  if (response.ok) return error("The digit service sent an answer this page does not understand.", false);
  if (status === 429 || status === 503) return error(`The digit service is busy (${detail}).`, true);
  if (status >= 500 || status === 408) return error(`The digit service failed: ${detail}.`, true);
  return error(`The digit service refused the drawing: ${detail}.`, false);
}

function startRetrying() {
  retryTimer ??= setInterval(() => {
    if (!inFlight) sendPrediction();
  }, RETRY_INTERVAL_MS);
}

function stopRetrying() {
  clearInterval(retryTimer);
  retryTimer = null;
}

async function showModelInfo() {
  try {
    const response = await fetch("info", { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const info = await response.json();
    const facts = [];
    const version = info.registry_version ?? info.model_version;
    if (version !== undefined && version !== null) facts.push(`model version ${version}`);
    if (typeof info.test_accuracy === "number") {
      facts.push(`${percent.format(info.test_accuracy)} accuracy on the MNIST test set`);
    }
    if (facts.length > 0) {
      modelInfo.textContent = `A convolutional network served by BentoML: ${facts.join(", ")}.`;
    }
  } catch {
    // Without /info the footer keeps its general description.
  }
}

// ---- Showing the answer --------------------------------------------------------------------

// "an 8", "a 3"; the no-break space keeps the digit on the line of its article.
const withArticle = (digit) => `${digit === 8 ? "an" : "a"}\u00a0${digit}`;

function setStatus(text) {
  if (statusView.textContent !== text) statusView.textContent = text;
}

function showInvitation() {
  inFlight?.abort();
  inFlight = null;
  clearTimeout(predictTimer);
  predictTimer = null;
  resendWhenDone = false;
  stopRetrying();
  shownVersion = drawingVersion;
  result.dataset.state = "idle";
  digitView.textContent = "";
  confidenceView.textContent = "";
  setStatus(INVITATION);
  updateBars(null);
}

function showPrediction({ digit, probabilities, confidence = probabilities[digit] }) {
  const runnerUp = probabilities
    .map((probability, candidate) => ({ candidate, probability }))
    .filter(({ candidate }) => candidate !== digit)
    .reduce((best, entry) => (entry.probability > best.probability ? entry : best));
  const unsure = confidence < UNSURE_BELOW;
  result.dataset.state = unsure ? "unsure" : "sure";
  digitView.textContent = String(digit);
  if (unsure) {
    setStatus(`Not sure: ${withArticle(digit)} or ${withArticle(runnerUp.candidate)}?`);
    const runnerUpText = `runner-up ${runnerUp.candidate} at ${percent.format(runnerUp.probability)}`;
    confidenceView.textContent = `${percent.format(confidence)} sure · ${runnerUpText}`;
  } else {
    setStatus(`Looks like ${withArticle(digit)}.`);
    confidenceView.textContent = `${percent.format(confidence)} sure`;
  }
  updateBars(probabilities, digit, unsure ? runnerUp.candidate : null);
}

function showNoDigit() {
  result.dataset.state = "idle";
  digitView.textContent = "";
  confidenceView.textContent = "";
  setStatus("No digit found yet. Keep drawing, a little bigger.");
  updateBars(null);
}

function showError(error) {
  result.dataset.state = "error";
  confidenceView.textContent = "";
  const message = error instanceof ServiceError
    ? error.message
    : `Something went wrong: ${error.message}.`;
  const transient = !(error instanceof ServiceError) || error.transient;
  setStatus(transient ? `${message} Trying again…` : message);
  if (transient) startRetrying();
}

function buildBars() {
  const bars = Array.from({ length: 10 }, (_, digit) => {
    const bar = document.createElement("li");
    bar.className = "bar";
    bar.dataset.digit = String(digit);
    bar.innerHTML = `<span class="bar-digit">${digit}</span><span class="bar-value"></span>`
      + '<span class="bar-track" aria-hidden="true"><span class="bar-fill"></span></span>';
    return bar;
  });
  barList.replaceChildren(...bars);
  updateBars(null);
}

function updateBars(probabilities, top = null, runnerUp = null) {
  for (const bar of barList.children) {
    const digit = Number(bar.dataset.digit);
    const probability = probabilities?.[digit] ?? 0;
    bar.dataset.probability = probability.toFixed(4);
    bar.style.setProperty("--probability", String(probability));
    const label = probability >= 0.005 ? wholePercent.format(probability) : ""; // no "0%" clutter
    bar.querySelector(".bar-value").textContent = label;
    bar.classList.toggle("is-top", digit === top);
    bar.classList.toggle("is-runner-up", digit === runnerUp);
  }
}

// ---- Wiring --------------------------------------------------------------------------------

function onKeydown(event) {
  if (event.altKey || event.defaultPrevented) return;
  const key = event.key.toLowerCase();
  const plain = !event.ctrlKey && !event.metaKey && !event.shiftKey;
  if (key === "z" && !event.shiftKey) {
    event.preventDefault();
    undoLastStroke();
  } else if (key === "escape" || (key === "c" && plain)) {
    event.preventDefault();
    clearPad();
  }
}

function start() {
  buildBars();
  new ResizeObserver(fitBackingStore).observe(pad);
  watchPixelRatio();
  readInkColor();
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", readInkColor);
  pad.addEventListener("pointerdown", beginStroke);
  pad.addEventListener("pointermove", extendStroke);
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);
  pad.addEventListener("lostpointercapture", endStroke);
  undoButton.addEventListener("click", undoLastStroke);
  clearButton.addEventListener("click", clearPad);
  document.addEventListener("keydown", onKeydown);
  drawingChanged();
  showModelInfo();
}

start();
