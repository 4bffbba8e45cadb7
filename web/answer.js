// The answer view: the number read, in large type; a sentence saying what it is and how sure
// the model is; what the model saw (one small image per mark, left to right, each with its
// digit and confidence); and the ten probability bars of one digit, the one tapped, hovered or
// focused among those images (by default the least sure).

const UNSURE_BELOW = 0.6;
export const INVITATION = "Draw a digit or a number in the box.";
const NO_DIGIT = "No digit found yet. Keep drawing, a little bigger.";
const ASK_AGAIN = "Write a digit from 0 to 9, or a number.";
const LEAVE_A_GAP = "Leave a little gap between digits.";

const percent = new Intl.NumberFormat("en", { style: "percent", maximumFractionDigits: 1 });
const wholePercent = new Intl.NumberFormat("en", { style: "percent", maximumFractionDigits: 0 });
const ordinalRules = new Intl.PluralRules("en", { type: "ordinal" });
const ORDINAL_SUFFIXES = { one: "st", two: "nd", few: "rd", other: "th" };

// 1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th".
const ordinal = (n) => `${n}${ORDINAL_SUFFIXES[ordinalRules.select(n)]}`;
// "an 8", "a 3"; the no-break space keeps the digit on the line of its article.
const withArticle = (digit) => `${digit === 8 ? "an" : "a"}\u00a0${digit}`;
// ["a"] -> "a"; ["a", "b"] -> "a and b"; ["a", "b", "c"] -> "a, b and c".
const listed = (items) => (items.length < 2 ? items.join("")
  : `${items.slice(0, -1).join(", ")} and ${items.at(-1)}`);

function runnerUp(entry) {
  return entry.probabilities
    .map((probability, candidate) => ({ candidate, probability }))
    .filter(({ candidate }) => candidate !== entry.digit)
    .reduce((best, next) => (next.probability > best.probability ? next : best));
}

const isUnsure = (entry) => entry.isDigit && entry.confidence < UNSURE_BELOW;

export class AnswerView {
  // `elements`: result, number, status, confidence, crops, barsCaption, bars;
  // `pad`: the DrawingPad, which outlines the parts of the drawing the answer points at.
  constructor(elements, pad) {
    Object.assign(this, elements);
    this.pad = pad;
    this.entries = []; // the marks of the answer shown, left to right
    this.size = null; // { width, height } of the image that answer is about
    // Indexes of the marks tapped or clicked, hovered, and focused (null: none).
    this.picked = { pinned: null, hovered: null, focused: null };
    this.buildBars();
    this.crops.addEventListener("click", (event) => this.pick(event, "pinned"));
    this.crops.addEventListener("pointerover", (event) => this.pick(event, "hovered"));
    this.crops.addEventListener("focusin", (event) => this.pick(event, "focused"));
    this.crops.addEventListener("pointerout", (event) => this.unpick(event, "hovered"));
    this.crops.addEventListener("focusout", (event) => this.unpick(event, "focused"));
  }

  get state() {
    return this.result.dataset.state;
  }

  // ---- The states ----------------------------------------------------------------------------

  invite() {
    this.picked.pinned = null;
    this.showNothing(INVITATION);
  }

  noDigit() {
    this.showNothing(NO_DIGIT);
  }

  showNothing(message) {
    this.result.dataset.state = "idle";
    this.show([], null);
    this.setStatus(message, "");
  }

  // A digit or a number: `digits` as the service sends them, `size` the image's.
  reading({ text, confidence, digits }, size) {
    const entries = digits.map((entry) => ({ ...entry, isDigit: true }));
    const unsure = entries.filter(isUnsure);
    this.result.dataset.state = unsure.length > 0 ? "unsure" : "sure";
    this.show(entries, size);
    if (entries.length === 1) {
      const [entry] = entries;
      const second = runnerUp(entry);
      if (unsure.length > 0) {
        this.setStatus(
          `Not sure: ${withArticle(entry.digit)} or ${withArticle(second.candidate)}?`,
          `${percent.format(entry.confidence)} sure · runner-up ${second.candidate} at ${percent.format(second.probability)}`,
        );
      } else {
        this.setStatus(`Looks like ${withArticle(entry.digit)}.`, `${percent.format(entry.confidence)} sure`);
      }
      return;
    }
    const whole = `${percent.format(confidence)} sure of the whole number`;
    if (unsure.length === 0) {
      this.setStatus(`Reads ${text}.`, whole);
      return;
    }
    const weakest = this.defaultIndex();
    const second = runnerUp(entries[weakest]);
    const alternative = entries
      .map((entry, index) => (index === weakest ? second.candidate : entry.digit))
      .join("");
    this.setStatus(
      `Not sure: ${text} or ${alternative}?`,
      `${whole} · the ${ordinal(weakest + 1)} digit could be ${withArticle(second.candidate)} (${percent.format(second.probability)})`,
    );
  }

  // Some marks are not digits: `marks` as the service sends them (each with is_digit, and
  // several_digits when the model saw digits touching that the reader could not split).
  notADigit(marks, size) {
    const entries = marks.map((mark) => ({ ...mark, isDigit: mark.is_digit }));
    this.result.dataset.state = "not-a-digit";
    this.show(entries, size);
    const strays = entries.flatMap((entry, index) => (entry.isDigit ? [] : [index]));
    const touching = strays.length > 0 && strays.every((index) => entries[index].several_digits);
    // "the 2nd mark from the left, outlined on the pad"
    const where = `the ${listed(strays.map((index) => ordinal(index + 1)))} ${strays.length === 1 ? "mark" : "marks"} from the left, outlined on the pad`;
    if (touching && entries.length === 1) {
      this.setStatus(`These digits touch, so they could not be told apart. ${LEAVE_A_GAP}`, "");
    } else if (touching) {
      this.setStatus(`Some digits touch (${where}), so they could not be told apart. ${LEAVE_A_GAP}`, "");
    } else if (entries.length === 1) {
      this.setStatus(`That is not a digit. ${ASK_AGAIN}`, `${percent.format(entries[0].confidence)} sure it is not a digit`);
    } else if (strays.length === entries.length) {
      this.setStatus(`None of this is a digit. ${ASK_AGAIN}`, "");
    } else {
      this.setStatus(`Part of the drawing is not a digit: ${where}.`, "");
    }
  }

  // The service failed or refused: says so over the last answer, which stays dimmed.
  error(message) {
    this.result.dataset.state = "error";
    this.setStatus(message, "");
  }

  setStatus(text, confidence) {
    if (this.status.textContent !== text) this.status.textContent = text;
    this.confidence.textContent = confidence;
  }

  // ---- The marks -----------------------------------------------------------------------------

  show(entries, size) {
    this.entries = entries;
    this.size = size;
    for (const [which, index] of Object.entries(this.picked)) {
      if (index !== null && index >= entries.length) this.picked[which] = null;
    }
    this.renderNumber();
    this.renderCrops();
    this.renderChoice();
  }

  // The mark whose bars show when nobody picked one: the first that is not a digit, else the
  // least sure digit.
  defaultIndex() {
    const stray = this.entries.findIndex((entry) => !entry.isDigit);
    if (stray >= 0) return stray;
    return this.entries.reduce(
      (weakest, entry, index) => (entry.confidence < this.entries[weakest].confidence ? index : weakest),
      0,
    );
  }

  // The mark someone points at: hovered, else focused, else tapped; null when none.
  pickedIndex() {
    const { hovered, focused, pinned } = this.picked;
    return hovered ?? focused ?? pinned;
  }

  shownIndex() {
    if (this.entries.length === 0) return null;
    return this.pickedIndex() ?? this.defaultIndex();
  }

  renderNumber() {
    const characters = this.entries.map((entry) => {
      const character = document.createElement("span");
      character.textContent = entry.isDigit ? String(entry.digit) : "?";
      character.classList.toggle("is-unsure", isUnsure(entry));
      character.classList.toggle("is-not-digit", !entry.isDigit);
      return character;
    });
    this.number.replaceChildren(...characters);
    this.number.dataset.length = String(characters.length);
  }

  // Updates the crop buttons in place (adding or removing at the end), so a focused one keeps
  // its focus while the answer changes under it.
  renderCrops() {
    const count = this.entries.length;
    while (this.crops.children.length > count) this.crops.lastElementChild.remove();
    while (this.crops.children.length < count) this.crops.append(newCrop(this.crops.children.length));
    this.crops.hidden = count === 0;
    this.entries.forEach((entry, index) => {
      const button = this.crops.children[index].firstElementChild;
      const image = button.querySelector("img");
      const source = typeof entry.input === "string" && entry.input.startsWith("data:image/") ? entry.input : "";
      if (image.getAttribute("src") !== source) image.src = source;
      button.querySelector(".crop-digit").textContent = entry.isDigit ? String(entry.digit) : "?";
      const note = entry.isDigit ? wholePercent.format(entry.confidence) : "not a digit";
      button.querySelector(".crop-note").textContent = note;
      button.classList.toggle("is-unsure", isUnsure(entry));
      button.classList.toggle("is-not-digit", !entry.isDigit);
      button.dataset.digit = entry.isDigit ? String(entry.digit) : "";
      const what = entry.isDigit
        ? `${withArticle(entry.digit)}, ${percent.format(entry.confidence)} sure`
        : "not a digit";
      button.setAttribute(
        "aria-label",
        count === 1 ? `What the model saw: ${what}` : `Mark ${index + 1} of ${count}: ${what}`,
      );
    });
  }

  // Which mark's bars show, and which parts of the pad are outlined.
  renderChoice() {
    const shown = this.shownIndex();
    for (const [index, item] of [...this.crops.children].entries()) {
      item.firstElementChild.setAttribute("aria-pressed", String(index === shown));
    }
    const entry = shown === null ? null : this.entries[shown];
    const count = this.entries.length;
    if (entry === null) {
      this.barsCaption.textContent = "";
      this.updateBars(null);
    } else {
      const second = runnerUp(entry);
      this.updateBars(
        entry.probabilities,
        entry.isDigit ? entry.digit : null,
        isUnsure(entry) ? second.candidate : null,
      );
      const which = count === 1 ? "It" : `The ${ordinal(shown + 1)} mark`;
      if (!entry.isDigit) {
        this.barsCaption.textContent = `${which} is not a digit (${percent.format(entry.confidence)} sure). Were it one:`;
      } else {
        this.barsCaption.textContent = count === 1 ? "" : `${which}, ${withArticle(entry.digit)}:`;
      }
    }
    this.bars.classList.toggle("is-unsure", entry !== null && isUnsure(entry));
    this.outlineMarks(shown);
  }

  outlineMarks(shown) {
    if (this.size === null) {
      this.pad.outline([]);
      return;
    }
    const picked = this.pickedIndex();
    const outlines = this.entries.flatMap((entry, index) => {
      if (!entry.isDigit) return [{ box: entry.box, size: this.size, kind: "not-digit", label: "not a digit" }];
      if (index === picked && index === shown && this.entries.length > 1) {
        return [{ box: entry.box, size: this.size, kind: "picked", label: "" }];
      }
      return [];
    });
    this.pad.outline(outlines);
  }

  pick(event, which) {
    const button = event.target.closest?.("button[data-index]");
    if (!button) return;
    this.picked[which] = Number(button.dataset.index);
    this.renderChoice();
  }

  unpick(event, which) {
    const leaving = event.target.closest?.("button[data-index]");
    const entering = event.relatedTarget?.closest?.("button[data-index]");
    if (!leaving || leaving === entering) return;
    this.picked[which] = null;
    this.renderChoice();
  }

  // ---- The bars ------------------------------------------------------------------------------

  buildBars() {
    const bars = Array.from({ length: 10 }, (_, digit) => {
      const bar = document.createElement("li");
      bar.className = "bar";
      bar.dataset.digit = String(digit);
      bar.innerHTML = `<span class="bar-digit">${digit}</span><span class="bar-value"></span>`
        + '<span class="bar-track" aria-hidden="true"><span class="bar-fill"></span></span>';
      return bar;
    });
    this.bars.replaceChildren(...bars);
    this.updateBars(null);
  }

  updateBars(probabilities, top = null, second = null) {
    for (const bar of this.bars.children) {
      const digit = Number(bar.dataset.digit);
      const probability = probabilities?.[digit] ?? 0;
      bar.dataset.probability = probability.toFixed(4);
      bar.style.setProperty("--probability", String(probability));
      const label = probability >= 0.005 ? wholePercent.format(probability) : ""; // no "0%" clutter
      bar.querySelector(".bar-value").textContent = label;
      bar.classList.toggle("is-top", digit === top);
      bar.classList.toggle("is-runner-up", digit === second);
    }
  }
}

function newCrop(index) {
  const item = document.createElement("li");
  item.innerHTML = `<button type="button" class="crop" data-index="${index}" data-testid="crop">`
    + '<img alt="" width="28" height="28"><span class="crop-digit"></span>'
    + '<span class="crop-note"></span></button>';
  return item;
}
