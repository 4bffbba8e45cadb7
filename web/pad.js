// The drawing pad: strokes drawn with a mouse, a finger or a pen, painted on screen and
// exported as the PNG the service reads.
//
// Points are kept in pad heights: y runs from 0 (top) to 1 (bottom) and x from 0 to the pad's
// aspect ratio (3 on a 3:1 pad). One unit is the same length across and down, so strokes can
// be redrawn at any size: on resize, on undo, and for the image sent to the service. The
// aspect ratio comes from the stylesheet (--pad-aspect): a wide pad on screens with room, a
// taller one on phones.

const BRUSH_WIDTH = 1 / 13; // of the pad height: about an MNIST stroke once a digit is 20x20
// The pen of the image sent is at most this share of the ink's height: MNIST's (its median
// stroke, 2.64 px, in a digit's 20-px box). On screen the pen stays BRUSH_WIDTH; a digit written
// a quarter of the pad high with it is a blot to the model, which refused such a 7 as not a
// digit, 98.5% sure.
const MNIST_STROKE = 0.13;
const THINNEST_EXPORT_BRUSH = BRUSH_WIDTH / 4; // so that a dot or a dash keeps some ink
const MIN_POINT_GAP = 0.002; // pad heights; closer points add nothing but weight
// px; the image sent is EXPORT_HEIGHT high and as wide as the pad's aspect ratio makes it
// (840 on a 3:1 pad). The server crops and rescales each digit, so this only sets the
// anti-aliasing.
export const EXPORT_HEIGHT = 280;
const DEFAULT_ASPECT = 3;
const OUTLINE_MARGIN_PX = 6; // CSS px around an outlined part of the drawing

export class DrawingPad {
  // `onChange({ settled })` is called after every change to the strokes: `settled` is true
  // when a stroke ends, or on undo and clear, false while a stroke grows.
  constructor(canvas, frame, onChange) {
    this.canvas = canvas;
    this.frame = frame;
    this.onChange = onChange;
    this.strokes = [];
    this.activeStroke = null; // { pointerId, rect, points } while a pointer draws
    this.aspect = DEFAULT_ASPECT;
    this.inkColor = "#111";
    this.renderQueued = false;
    this.outlines = frame.querySelector(".pad-outlines");

    canvas.addEventListener("pointerdown", (event) => this.beginStroke(event));
    canvas.addEventListener("pointermove", (event) => this.extendStroke(event));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(type, (event) => this.endStroke(event));
    }
    new ResizeObserver(() => this.fitBackingStore()).observe(canvas);
    this.watchPixelRatio();
    this.readStyle();
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.readStyle());
  }

  get strokeCount() {
    return this.strokes.length;
  }

  // True while a pointer is drawing a stroke.
  get drawing() {
    return this.activeStroke !== null;
  }

  // ---- Strokes -----------------------------------------------------------------------------

  pointFrom(event, rect) {
    return {
      x: ((event.clientX - rect.left) / rect.width) * this.aspect,
      y: (event.clientY - rect.top) / rect.height,
    };
  }

  beginStroke(event) {
    if (this.activeStroke || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    try {
      this.canvas.setPointerCapture(event.pointerId);
    } catch {
      // A pointer that is already gone cannot be captured; the stroke still works while inside.
    }
    const rect = this.canvas.getBoundingClientRect();
    this.activeStroke = { pointerId: event.pointerId, rect, points: [this.pointFrom(event, rect)] };
    this.strokes.push(this.activeStroke.points);
    this.changed({ settled: false });
  }

  extendStroke(event) {
    const stroke = this.activeStroke;
    if (event.pointerId !== stroke?.pointerId) return;
    const samples = event.getCoalescedEvents?.() ?? [];
    let added = false;
    for (const sample of samples.length > 0 ? samples : [event]) {
      added = addPoint(stroke.points, this.pointFrom(sample, stroke.rect)) || added;
    }
    if (added) this.changed({ settled: false });
  }

  endStroke(event) {
    const stroke = this.activeStroke;
    if (event.pointerId !== stroke?.pointerId) return;
    if (event.type === "pointerup") addPoint(stroke.points, this.pointFrom(event, stroke.rect));
    this.activeStroke = null;
    this.changed({ settled: true });
  }

  undo() {
    if (this.strokes.length === 0) return;
    if (this.activeStroke?.points === this.strokes.at(-1)) this.activeStroke = null;
    this.strokes.pop();
    this.changed({ settled: true });
  }

  clear() {
    if (this.strokes.length === 0) return;
    this.strokes.length = 0;
    this.activeStroke = null;
    this.changed({ settled: true });
  }

  changed({ settled }) {
    this.canvas.dataset.strokes = String(this.strokes.length);
    this.frame.classList.toggle("has-ink", this.strokes.length > 0);
    this.requestRender();
    this.onChange({ settled });
  }

  // ---- Painting ----------------------------------------------------------------------------

  // Draws every stroke with quadratic curves through the midpoints of successive points, on a
  // context whose transform maps pad heights to pixels.
  paintStrokes(context, color, brush = BRUSH_WIDTH) {
    context.strokeStyle = color;
    context.fillStyle = color;
    context.lineWidth = brush;
    context.lineCap = "round";
    context.lineJoin = "round";
    for (const points of this.strokes) {
      const [first] = points;
      context.beginPath();
      if (points.length === 1) {
        context.arc(first.x, first.y, brush / 2, 0, 2 * Math.PI);
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

  requestRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => this.render());
  }

  render() {
    this.renderQueued = false;
    const { canvas } = this;
    const context = canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.setTransform(canvas.width / this.aspect, 0, 0, canvas.height, 0, 0);
    this.paintStrokes(context, this.inkColor);
  }

  // Keeps the backing store at device pixels, so strokes stay crisp on high-DPI screens.
  fitBackingStore() {
    this.readAspect();
    const width = Math.round(this.canvas.clientWidth * devicePixelRatio);
    const height = Math.round(this.canvas.clientHeight * devicePixelRatio);
    if (width === this.canvas.width && height === this.canvas.height) return;
    this.canvas.width = width;
    this.canvas.height = height;
    this.render();
  }

  watchPixelRatio() {
    matchMedia(`(resolution: ${devicePixelRatio}dppx)`).addEventListener("change", () => {
      this.fitBackingStore();
      this.watchPixelRatio();
    }, { once: true });
  }

  readAspect() {
    const aspect = Number.parseFloat(getComputedStyle(this.frame).getPropertyValue("--pad-aspect"));
    this.aspect = aspect > 0 ? aspect : DEFAULT_ASPECT;
  }

  readStyle() {
    this.inkColor = getComputedStyle(this.canvas).getPropertyValue("--ink").trim() || this.inkColor;
    this.readAspect();
    this.requestRender();
  }

  // The service gets black ink on white whatever the colour scheme on screen: what is on the
  // pad, EXPORT_HEIGHT pixels high. Returns the PNG as a data URL and its size in pixels.
  exportImage() {
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(EXPORT_HEIGHT * this.aspect);
    canvas.height = EXPORT_HEIGHT;
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.setTransform(EXPORT_HEIGHT, 0, 0, EXPORT_HEIGHT, 0, 0);
    this.paintStrokes(context, "#000", this.exportBrush());
    return { image: canvas.toDataURL("image/png"), width: canvas.width, height: canvas.height };
  }

  // The pen for the image sent: BRUSH_WIDTH, or thinner for a drawing less high than about
  // 0.6 of the pad, so the pen is MNIST_STROKE of the ink's height, the pen included.
  exportBrush() {
    let top = Infinity;
    let bottom = -Infinity;
    for (const points of this.strokes) {
      for (const { y } of points) {
        top = Math.min(top, y);
        bottom = Math.max(bottom, y);
      }
    }
    if (top > bottom) return BRUSH_WIDTH; // nothing drawn
    const height = bottom - top;
    const matched = (MNIST_STROKE * height) / (1 - MNIST_STROKE);
    return Math.min(BRUSH_WIDTH, Math.max(THINNEST_EXPORT_BRUSH, matched));
  }

  // ---- Outlines ----------------------------------------------------------------------------

  // Outlines parts of the drawing: `outlines` are { box, size, kind, label }, where `box` is
  // { x, y, width, height } in the pixels of an exported image of `size` { width, height }.
  outline(outlines) {
    const shown = outlines.map(({ box, size, kind, label }) => {
      const element = document.createElement("div");
      element.className = `pad-outline is-${kind}`;
      element.dataset.testid = `outline-${kind}`;
      // A little larger than the box, so the outline does not cover the ink.
      Object.assign(element.style, {
        left: `calc(${(box.x / size.width) * 100}% - ${OUTLINE_MARGIN_PX}px)`,
        top: `calc(${(box.y / size.height) * 100}% - ${OUTLINE_MARGIN_PX}px)`,
        width: `calc(${(box.width / size.width) * 100}% + ${2 * OUTLINE_MARGIN_PX}px)`,
        height: `calc(${(box.height / size.height) * 100}% + ${2 * OUTLINE_MARGIN_PX}px)`,
      });
      if (label) {
        const tag = document.createElement("span");
        tag.className = "pad-outline-label";
        tag.textContent = label;
        element.append(tag);
      }
      return element;
    });
    this.outlines.replaceChildren(...shown);
  }
}

function addPoint(points, point) {
  const last = points.at(-1);
  if (last && Math.hypot(point.x - last.x, point.y - last.y) < MIN_POINT_GAP) return false;
  points.push(point);
  return true;
}
