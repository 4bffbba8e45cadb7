// Feedback on the answer shown: under it, the person confirms it ("Right"), corrects it (types
// or taps the right digits, then sends), or says that the drawing is not a digit. The page sends
// that to POST /feedback with the image the answer is about and says whether it was saved.
// Nothing here is trusted: the service keeps every correction for a person to review.
//
// Keys, while an answer is offered and the focus is not in a text field: Y confirms, N says it
// is not a digit, a digit key opens the correction with that digit typed (Enter sends, Esc
// cancels).

import { sendFeedback } from "./api.js";

export const NOT_A_DIGIT = "not_a_digit"; // the label of a drawing that is not a digit
const KEYPAD = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"];

export class FeedbackView {
  // `root`: the #feedback element of index.html.
  constructor(root) {
    this.root = root;
    const part = (name) => root.querySelector(`[data-testid="${name}"]`);
    this.question = root.querySelector(".feedback-question");
    this.rightButton = part("feedback-right");
    this.wrongButton = part("feedback-wrong");
    this.notDigitButton = part("feedback-not-digit");
    this.form = part("feedback-fix");
    this.input = part("feedback-label");
    this.keypad = part("keypad");
    this.status = part("feedback-status");
    this.subject = null; // { image, answer }: the answer offered for feedback, or null
    this.sending = false;

    this.buildKeypad();
    this.rightButton.addEventListener("click", () => this.confirm());
    this.wrongButton.addEventListener("click", () => this.toggleCorrection());
    this.notDigitButton.addEventListener("click", () => this.send(NOT_A_DIGIT));
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submitCorrection();
    });
    part("feedback-cancel").addEventListener("click", () => this.closeCorrection({ refocus: true }));
    this.input.addEventListener("input", () => {
      const digits = this.input.value.replace(/\D+/g, "");
      if (digits !== this.input.value) this.input.value = digits;
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        this.closeCorrection({ refocus: true });
      }
    });
  }

  // True while an answer waits for feedback (asked, being corrected or being sent).
  get offered() {
    return this.subject !== null && this.root.dataset.step !== "saved";
  }

  get correcting() {
    return this.offered && !this.form.hidden;
  }

  // ---- The steps -----------------------------------------------------------------------------

  // Asks about an answer: `image`, the data URL the answer is about; `answer`, what the model
  // answered: { text, confidence, model_version }, text NOT_A_DIGIT for a refusal.
  offer(image, answer) {
    this.reset();
    this.subject = { image, answer };
    const refused = answer.text === NOT_A_DIGIT;
    this.question.textContent = refused ? "Not a digit: is that right?" : "Is this right?";
    this.notDigitButton.hidden = refused; // "Right" says it then
    this.wrongButton.setAttribute(
      "aria-label",
      refused ? "Wrong: it is a digit or a number; type it" : "Wrong: type the right digit or number",
    );
    this.rightButton.setAttribute(
      "aria-label",
      refused ? "Right: it is not a digit" : `Right: it is ${answer.text}`,
    );
    this.root.dataset.step = "ask";
    this.root.hidden = false;
  }

  // Hides everything: the drawing changed, or there is no answer to talk about.
  reset() {
    this.subject = null;
    this.sending = false;
    this.root.hidden = true;
    this.root.dataset.step = "";
    this.form.hidden = true;
    this.wrongButton.setAttribute("aria-expanded", "false");
    this.input.value = "";
    this.setStatus("", "");
    this.setBusy(false);
  }

  confirm() {
    if (!this.offered) return;
    const { text } = this.subject.answer;
    this.send(text, text === NOT_A_DIGIT ? "not a digit" : `${text} is right`);
  }

  toggleCorrection() {
    if (this.correcting) this.closeCorrection({ refocus: false });
    else this.openCorrection("");
  }

  // Opens the correction with `digits` typed; the text field takes the focus where a keyboard
  // is likely (not on touch screens, where it would pop up the on-screen keyboard over the
  // keypad).
  openCorrection(digits, { focus = matchMedia("(pointer: fine)").matches } = {}) {
    if (!this.offered || this.sending) return;
    this.form.hidden = false;
    this.wrongButton.setAttribute("aria-expanded", "true");
    this.root.dataset.step = "correct";
    this.type(digits);
    if (focus) this.input.focus();
  }

  closeCorrection({ refocus }) {
    if (this.form.hidden) return;
    const hadFocus = this.form.contains(document.activeElement);
    this.form.hidden = true;
    this.input.value = ""; // a correction opened again starts afresh
    this.wrongButton.setAttribute("aria-expanded", "false");
    this.root.dataset.step = "ask";
    if (refocus || hadFocus) this.wrongButton.focus();
  }

  type(digits) {
    const room = this.input.maxLength > 0 ? this.input.maxLength : Infinity;
    this.input.value = (this.input.value + digits).slice(0, room);
  }

  submitCorrection() {
    const label = this.input.value;
    if (!/^\d+$/.test(label)) {
      this.setStatus("Type or tap the right digits first, or choose “Not a digit”.", "is-error");
      if (matchMedia("(pointer: fine)").matches) this.input.focus();
      return;
    }
    this.send(label, `it is ${label}`);
  }

  // Sends `label` about the offered answer, then says whether the service kept it. `saying`
  // repeats what was sent, in words.
  async send(label, saying = "not a digit") {
    if (!this.offered || this.sending) return;
    const subject = this.subject;
    this.sending = true;
    this.setBusy(true);
    this.setStatus("Saving…", "");
    try {
      await sendFeedback({ image: subject.image, label, answer: subject.answer });
      if (this.subject !== subject) return; // drawn again meanwhile: nothing to say
      const hadFocus = this.root.contains(document.activeElement);
      this.root.dataset.step = "saved";
      this.form.hidden = true;
      this.setStatus(`Thanks — saved for review: ${saying}.`, "is-saved");
      if (hadFocus) this.status.focus();
    } catch (error) {
      if (this.subject !== subject) return;
      this.setStatus(`Not saved: ${error.message}.`, "is-error");
    } finally {
      if (this.subject === subject) {
        this.sending = false;
        this.setBusy(false);
      }
    }
  }

  // ---- Keys ----------------------------------------------------------------------------------

  // Handles a key pressed outside text fields; returns true when it was feedback's.
  handleKey(event) {
    if (!this.offered || event.ctrlKey || event.metaKey || event.altKey) return false;
    const { key } = event;
    const onButton = event.target instanceof HTMLButtonElement;
    let handled = true;
    if (/^\d$/.test(key)) {
      if (!this.sending) {
        this.openCorrection(key, { focus: true });
      }
    } else if (key.toLowerCase() === "y" && !this.correcting) this.confirm();
    else if (key.toLowerCase() === "n") this.send(NOT_A_DIGIT); // also agrees with a refusal
    else if (key === "Escape" && this.correcting) this.closeCorrection({ refocus: true });
    else if (key === "Enter" && this.correcting && !onButton) this.submitCorrection();
    else if (key === "Backspace" && this.correcting && !onButton) {
      this.input.value = this.input.value.slice(0, -1);
    } else handled = false;
    if (handled) event.preventDefault();
    return handled;
  }

  // ---- Drawing -------------------------------------------------------------------------------

  buildKeypad() {
    const keys = KEYPAD.map((digit) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "key";
      button.textContent = digit;
      button.dataset.key = digit;
      button.addEventListener("click", () => this.type(digit));
      return button;
    });
    const erase = document.createElement("button");
    erase.type = "button";
    erase.className = "key key-erase";
    erase.dataset.key = "Backspace";
    erase.setAttribute("aria-label", "Delete the last digit");
    erase.innerHTML = '<svg aria-hidden="true" viewBox="0 0 24 24"><path d="M9 5h11v14H9l-6-7z"/>'
      + '<path d="m12 9 5 6"/><path d="m17 9-5 6"/></svg>';
    erase.addEventListener("click", () => {
      this.input.value = this.input.value.slice(0, -1);
    });
    this.keypad.replaceChildren(...keys, erase);
  }

  setBusy(busy) {
    this.root.setAttribute("aria-busy", String(busy));
    for (const button of this.root.querySelectorAll("button")) {
      button.setAttribute("aria-disabled", String(busy));
    }
  }

  setStatus(text, kind) {
    this.status.textContent = text;
    this.status.className = `feedback-status ${kind}`.trim();
  }
}
