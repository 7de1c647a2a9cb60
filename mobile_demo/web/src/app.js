// Page logic: loads the bundled model, classifies a picked photo or a
// camera frame, runs the benchmark, and exposes window.kcDemo for tests.

import * as litert from "@litertjs/core";

import { Classifier, rgbaToPixels } from "./classifier.js";

const DEFAULT_MODEL = "model.tflite";
// Only a file name in the page's own folder may be loaded, so a query
// string can never make the page download from another host.
const MODEL_NAME_PATTERN = /^[\w.-]+\.tflite$/;

const elements = Object.fromEntries(
  [
    "error",
    "model-info",
    "photo",
    "camera",
    "capture",
    "benchmark",
    "invert",
    "model-file",
    "video",
    "preview",
    "results",
    "timing",
    "benchmark-result",
  ].map((id) => [id, document.getElementById(id)]),
);

let classifier = null;
let runtimeReady = null;

function showError(message) {
  elements.error.textContent = message;
  elements.error.hidden = false;
}

function clearError() {
  elements.error.textContent = "";
  elements.error.hidden = true;
}

function setModelControls(enabled) {
  elements.camera.disabled = !enabled;
  elements.benchmark.disabled = !enabled;
  elements.photo.disabled = !enabled;
}

function renderResults(result) {
  const body = elements.results.tBodies[0];
  body.replaceChildren();
  result.top5.forEach((entry, rank) => {
    const row = body.insertRow();
    row.insertCell().textContent = String(rank + 1);
    row.insertCell().textContent = entry.label;
    row.insertCell().textContent = entry.vertical;
    const score = row.insertCell();
    score.className = "score";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(Math.max(0, Math.min(1, entry.score)) * 120)}px`;
    score.append(bar, entry.score.toFixed(3));
  });
  elements.timing.textContent = `Inference: ${result.inferenceMs.toFixed(1)} ms (LiteRT.js, CPU)`;
}

function drawPreview(pixels) {
  const { width, height, channels } = classifier;
  const image = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    for (let c = 0; c < 3; c++) {
      image.data[4 * i + c] = pixels[channels === 1 ? i : 3 * i + c];
    }
    image.data[4 * i + 3] = 255;
  }
  elements.preview.width = width;
  elements.preview.height = height;
  elements.preview.getContext("2d").putImageData(image, 0, 0);
}

async function classifyPixels(pixels) {
  if (classifier === null) throw new Error("No model is loaded.");
  drawPreview(pixels);
  const result = await classifier.classifyPixels(pixels);
  renderResults(result);
  return result;
}

// Center-crops a drawable source to the model's aspect ratio, resizes it to
// the model input and returns its pixels.
function sourceToPixels(source, sourceWidth, sourceHeight) {
  const { width, height, channels } = classifier;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const targetRatio = width / height;
  let cropWidth = sourceWidth;
  let cropHeight = sourceHeight;
  if (sourceWidth / sourceHeight > targetRatio) {
    cropWidth = sourceHeight * targetRatio;
  } else {
    cropHeight = sourceWidth / targetRatio;
  }
  const left = (sourceWidth - cropWidth) / 2;
  const top = (sourceHeight - cropHeight) / 2;
  context.imageSmoothingQuality = "high";
  context.drawImage(source, left, top, cropWidth, cropHeight, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  return rgbaToPixels(rgba, channels, elements.invert.checked);
}

async function classifyFile(file) {
  clearError();
  if (!file.type.startsWith("image/")) {
    showError(`"${file.name}" is not an image (type ${file.type || "unknown"}). Pick a JPEG, PNG or WebP photo.`);
    return null;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (error) {
    showError(`"${file.name}" could not be decoded as an image (${error.message}). Pick another photo.`);
    return null;
  }
  const pixels = sourceToPixels(bitmap, bitmap.width, bitmap.height);
  bitmap.close();
  return classifyPixels(pixels);
}

const CAMERA_ERRORS = {
  NotAllowedError: "Camera permission was denied. Allow camera access for this site in the browser settings, or pick a photo instead.",
  NotFoundError: "No camera was found on this device. Pick a photo instead.",
  NotReadableError: "The camera is in use by another application. Close it and try again.",
  SecurityError: "The camera needs a secure page: open the demo over https:// or from 127.0.0.1.",
};

async function startCamera() {
  clearError();
  if (!navigator.mediaDevices?.getUserMedia) {
    showError(CAMERA_ERRORS.SecurityError);
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment" },
      audio: false,
    });
    elements.video.srcObject = stream;
    elements.video.hidden = false;
    elements.capture.hidden = false;
    await elements.video.play();
  } catch (error) {
    showError(CAMERA_ERRORS[error.name] ?? `The camera could not be started (${error.name}: ${error.message}).`);
  }
}

async function captureFrame() {
  clearError();
  const video = elements.video;
  if (!video.videoWidth) {
    showError("The camera has not delivered a frame yet. Try again in a moment.");
    return null;
  }
  return classifyPixels(sourceToPixels(video, video.videoWidth, video.videoHeight));
}

async function runBenchmark() {
  clearError();
  elements.benchmark.disabled = true;
  elements["benchmark-result"].textContent = "Benchmarking…";
  try {
    const result = await classifier.benchmark();
    elements["benchmark-result"].textContent =
      `Benchmark: median ${result.medianMs.toFixed(3)} ms per inference ` +
      `(${result.samples} batches of ${result.runsPerSample} runs)`;
    return result;
  } finally {
    elements.benchmark.disabled = false;
  }
}

async function loadModelBytes(bytes, sourceName) {
  clearError();
  setModelControls(false);
  classifier = null;
  elements["model-info"].textContent = `Loading ${sourceName}…`;
  try {
    await runtimeReady;
    classifier = await Classifier.load(litert, bytes);
  } catch (error) {
    elements["model-info"].textContent = `No model loaded (${sourceName} failed).`;
    showError(`${sourceName}: ${error.message}`);
    throw error;
  }
  const metadata = classifier.metadata;
  const input = classifier.input;
  elements["model-info"].textContent =
    `${metadata.name ?? sourceName} (${metadata.mode ?? "unknown mode"}): ` +
    `${metadata.labels.length} classes in ${metadata.taxonomy.verticals.length} verticals, ` +
    `input ${classifier.width}×${classifier.height}×${classifier.channels} ${input.dtype}`;
  setModelControls(true);
  return metadata;
}

async function loadModelUrl(name) {
  if (!MODEL_NAME_PATTERN.test(name)) {
    const message = `Invalid model name "${name}": give a .tflite file name in the demo folder.`;
    showError(message);
    throw new Error(message);
  }
  const response = await fetch(name);
  if (!response.ok) {
    const message = `${name} could not be loaded (HTTP ${response.status}). Rebuild the demo with \`make web\`.`;
    showError(message);
    throw new Error(message);
  }
  return loadModelBytes(new Uint8Array(await response.arrayBuffer()), name);
}

function bindControls() {
  elements.photo.addEventListener("change", () => {
    const file = elements.photo.files[0];
    if (file) classifyFile(file).catch((error) => showError(error.message));
  });
  elements["model-file"].addEventListener("change", async () => {
    const file = elements["model-file"].files[0];
    if (!file) return;
    const bytes = new Uint8Array(await file.arrayBuffer());
    loadModelBytes(bytes, file.name).catch(() => {});
  });
  elements.camera.addEventListener("click", () => startCamera());
  elements.capture.addEventListener("click", () => captureFrame().catch((error) => showError(error.message)));
  elements.benchmark.addEventListener("click", () => runBenchmark().catch((error) => showError(error.message)));
}

function registerServiceWorker() {
  if (!("serviceWorker" in navigator)) return;
  navigator.serviceWorker.register("sw.js").catch((error) => {
    // The page still works online without offline caching.
    console.warn(`Service worker registration failed: ${error.message}`);
  });
}

async function main() {
  bindControls();
  registerServiceWorker();
  runtimeReady = litert.loadLiteRt("./wasm/");
  const name = new URLSearchParams(location.search).get("model") ?? DEFAULT_MODEL;
  return loadModelUrl(name);
}

// Rejects values that a Uint8Array would silently wrap, such as 256 or -1.
function checkedPixels(pixels) {
  const values = Array.from(pixels);
  const invalid = values.findIndex((value) => !Number.isInteger(value) || value < 0 || value > 255);
  if (invalid >= 0) {
    throw new RangeError(`Pixel ${invalid} is ${values[invalid]}; pixels must be integers in [0, 255].`);
  }
  return Uint8Array.from(values);
}

const ready = main();
ready.catch(() => {});

// A small API for tests and the browser console.
window.kcDemo = {
  ready,
  get metadata() {
    return classifier?.metadata ?? null;
  },
  get error() {
    return elements.error.hidden ? null : elements.error.textContent;
  },
  classifyPixels: async (pixels) => classifyPixels(checkedPixels(pixels)),
  classifyFile,
  benchmark: runBenchmark,
  loadModelUrl,
  startCamera,
};
