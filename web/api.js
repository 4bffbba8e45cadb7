// Talking to the service: POST /read for the drawing, POST /feedback for a correction or a
// confirmation of its answer, GET /info for the footer.

const REQUEST_TIMEOUT_MS = 10000;

export class ServiceError extends Error {
  constructor(message, { transient }) {
    super(message);
    this.name = "ServiceError";
    this.transient = transient; // worth retrying the same drawing later
  }
}

// Reads the drawing (a PNG data URL). Resolves to one of
//   { kind: "number", text, confidence, digits, modelVersion }   the service read a digit or a number;
//   { kind: "not-a-digit", marks, modelVersion }   some marks are not digits (each has is_digit);
//   { kind: "no-digit" }                           the drawing holds nothing to read yet;
// and rejects with a ServiceError when the service fails or refuses, or with an AbortError.
export async function readDrawing(image, signal) {
  let response;
  try {
    response = await fetch("read", {
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
  if (response.ok && isReading(body)) {
    return {
      kind: "number",
      text: body.text,
      confidence: body.confidence,
      digits: body.digits,
      modelVersion: versionOf(body),
    };
  }
  if (response.status === 422 && body?.reason === "no_digit") return { kind: "no-digit" };
  if (response.status === 422 && body?.reason === "not_a_digit" && areMarks(body.marks)) {
    return { kind: "not-a-digit", marks: body.marks, modelVersion: versionOf(body) };
  }
  throw errorFromResponse(response, body);
}

const versionOf = (body) => (typeof body.model_version === "string" ? body.model_version : null);

const isEntry = (entry) => Array.isArray(entry?.probabilities)
  && entry.probabilities.length === 10
  && typeof entry.confidence === "number"
  && typeof entry.box === "object" && entry.box !== null;

function isReading(body) {
  return typeof body?.text === "string"
    && typeof body.confidence === "number"
    && Array.isArray(body.digits)
    && body.digits.length > 0
    && body.digits.every((entry) => isEntry(entry) && Number.isInteger(entry.digit));
}

function areMarks(marks) {
  return Array.isArray(marks)
    && marks.length > 0
    && marks.every((mark) => isEntry(mark) && typeof mark.is_digit === "boolean");
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

// Sends what the drawing really is, to be reviewed and perhaps trained on: `image` is the data
// URL sent to /read, `label` the right digits ("7", "2026") or "not_a_digit" (a confirmation
// sends the model's own answer), `answer` what the model answered ({ text, confidence,
// model_version }) or null. Resolves to { id } once stored; rejects with a ServiceError whose
// message says why not (the service's own sentence: too many corrections, storage full...).
export async function sendFeedback({ image, label, answer }) {
  const body = answer ? { image, label, answer } : { image, label };
  let response;
  try {
    response = await fetch("feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (error) {
    const message = error.name === "TimeoutError"
      ? "the digit service is taking too long to answer"
      : "can't reach the digit service";
    throw new ServiceError(message, { transient: true });
  }
  const reply = await response.json().catch(() => null);
  if (response.status === 201 && typeof reply?.id === "string") return { id: reply.id };
  const { status } = response;
  let message = typeof reply?.error === "string" ? reply.error.replace(/\.$/, "") : `HTTP ${status}`;
  if (response.ok) message = "the digit service sent an answer this page does not understand";
  else if (status === 404 || status === 405) message = "this service does not take corrections";
  throw new ServiceError(message, { transient: status === 429 || status >= 500 });
}

// A sentence about the model serving the page, or null when /info does not answer.
export async function describeModel() {
  const percent = new Intl.NumberFormat("en", { style: "percent", maximumFractionDigits: 1 });
  try {
    const response = await fetch("info", { headers: { Accept: "application/json" } });
    if (!response.ok) return null;
    const info = await response.json();
    const facts = [];
    const version = info.registry_version ?? info.model_version;
    if (version !== undefined && version !== null) facts.push(`model version ${version}`);
    if (typeof info.test_accuracy === "number") {
      facts.push(`${percent.format(info.test_accuracy)} accuracy on the MNIST test set`);
    }
    return facts.length > 0 ? `A convolutional network served by BentoML: ${facts.join(", ")}.` : null;
  } catch {
    return null; // without /info the footer keeps its general description
  }
}
