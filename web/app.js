// The drawing page: write a digit or a number on the pad and see what the model reads, while
// drawing, then confirm or correct it. This module wires the parts together: the pad (pad.js),
// the service (api.js), the answer (answer.js) and the feedback on it (feedback.js); it decides
// when to ask the service, which answers to show, and which one to offer for feedback.

import { AnswerView } from "./answer.js";
import { describeModel, readDrawing, ServiceError } from "./api.js";
import { FeedbackView, NOT_A_DIGIT } from "./feedback.js";
import { DrawingPad } from "./pad.js";

const READ_INTERVAL_MS = 130; // at most one request this often while drawing
const RETRY_INTERVAL_MS = 3000;

const byId = (id) => document.getElementById(id);
const undoButton = byId("undo");
const clearButton = byId("clear");
const result = byId("result");

const pad = new DrawingPad(byId("pad"), byId("pad-frame"), drawingChanged);
const answer = new AnswerView({
  result,
  number: byId("number"),
  status: byId("status"),
  confidence: byId("confidence"),
  crops: byId("crops"),
  barsCaption: byId("bars-caption"),
  bars: byId("probabilities"),
}, pad);
const feedback = new FeedbackView(byId("feedback"));

// Every change to the drawing gets a new version; an answer is shown only if it is about a
// newer drawing than the one on screen, so a slow answer never overwrites a fresher one.
let drawingVersion = 0;
let shownVersion = 0;
let readTimer = null;
let inFlight = null; // AbortController of the one request allowed at a time
let resendWhenDone = false;
let retryTimer = null;

function drawingChanged({ settled }) {
  drawingVersion += 1;
  feedback.reset(); // feedback is about one drawing: drawing again starts over
  for (const button of [undoButton, clearButton]) {
    button.setAttribute("aria-disabled", String(pad.strokeCount === 0));
  }
  if (pad.strokeCount === 0) showInvitation();
  else if (settled) readNow();
  else scheduleRead();
  markBusy();
}

// The result region is busy while its answer is about an older drawing: screen readers wait
// for it before announcing, and tests wait for it before reading the answer.
function markBusy() {
  const waiting = shownVersion !== drawingVersion && answer.state !== "error";
  result.setAttribute("aria-busy", String(waiting));
}

// ---- Asking the service --------------------------------------------------------------------

function scheduleRead() {
  readTimer ??= setTimeout(readNow, READ_INTERVAL_MS);
}

function readNow() {
  clearTimeout(readTimer);
  readTimer = null;
  sendDrawing();
}

async function sendDrawing() {
  if (pad.strokeCount === 0) return;
  if (inFlight) {
    resendWhenDone = true;
    return;
  }
  const version = drawingVersion;
  const controller = new AbortController();
  inFlight = controller;
  try {
    const { image, width, height } = pad.exportImage();
    const reply = await readDrawing(image, controller.signal);
    if (version > shownVersion && pad.strokeCount > 0) {
      shownVersion = version;
      stopRetrying();
      show(reply, { width, height });
      // Feedback is offered on the answer about the drawing as it is once the stroke ends,
      // never on an answer about part of it.
      if (version === drawingVersion && !pad.drawing && reply.kind !== "no-digit") {
        feedback.offer(image, answerOf(reply));
      }
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
      sendDrawing();
    }
  }
}

function show(reply, size) {
  if (reply.kind === "number") answer.reading(reply, size);
  else if (reply.kind === "not-a-digit") answer.notADigit(reply.marks, size);
  else answer.noDigit();
}

// What the model answered, as POST /feedback records it.
function answerOf(reply) {
  const answer = reply.kind === "number"
    ? { text: reply.text, confidence: reply.confidence }
    : { text: NOT_A_DIGIT };
  const strays = reply.kind === "number" ? [] : reply.marks.filter((mark) => !mark.is_digit);
  if (strays.length === 1) answer.confidence = strays[0].confidence; // how sure it is none
  if (reply.modelVersion) answer.model_version = reply.modelVersion;
  return answer;
}

function showError(error) {
  const message = error instanceof ServiceError ? error.message : `Something went wrong: ${error.message}.`;
  const transient = !(error instanceof ServiceError) || error.transient;
  answer.error(transient ? `${message} Trying again…` : message);
  if (transient) startRetrying();
}

function startRetrying() {
  retryTimer ??= setInterval(() => {
    if (!inFlight) sendDrawing();
  }, RETRY_INTERVAL_MS);
}

function stopRetrying() {
  clearInterval(retryTimer);
  retryTimer = null;
}

function showInvitation() {
  inFlight?.abort();
  inFlight = null;
  clearTimeout(readTimer);
  readTimer = null;
  resendWhenDone = false;
  stopRetrying();
  shownVersion = drawingVersion;
  answer.invite();
}

// ---- Wiring --------------------------------------------------------------------------------

function onKeydown(event) {
  if (event.altKey || event.defaultPrevented) return;
  if (event.target.closest?.("input, textarea, select, [contenteditable]")) return; // typing
  if (feedback.handleKey(event)) return;
  const key = event.key.toLowerCase();
  const plain = !event.ctrlKey && !event.metaKey && !event.shiftKey;
  if (key === "z" && !event.shiftKey) {
    event.preventDefault();
    pad.undo();
  } else if (key === "escape" || (key === "c" && plain)) {
    event.preventDefault();
    pad.clear();
  }
}

undoButton.addEventListener("click", () => pad.undo());
clearButton.addEventListener("click", () => pad.clear());
document.addEventListener("keydown", onKeydown);
drawingChanged({ settled: true });
describeModel().then((sentence) => {
  if (sentence) byId("model-info").textContent = sentence;
});
