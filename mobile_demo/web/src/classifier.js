// Image classification with a kc-keras TFLite export in LiteRT.js: pixel
// preprocessing, input quantization, output dequantization and top-k.
// The arithmetic mirrors mobile_demo/benchmark.py (TFLiteModel), so the page
// and Python LiteRT feed the model identical tensors.

import { ModelFileError, fixBatchDimension, parseModel, readKcMetadata } from "./modelfile.js";

const INTEGER_RANGES = { int8: [-128, 127], uint8: [0, 255] };

/** Rounds half to even, like numpy.round. */
export function roundHalfEven(value) {
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (fraction > 0.5) return floor + 1;
  if (fraction < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

/**
 * Converts pixels in [0, 255] to the model's input tensor data.
 *
 * @param {ArrayLike<number>} pixels height * width * channels values.
 * @param {{dtype: string, scale: number, zeroPoint: number}} input the
 *     model's input tensor.
 * @returns {Int8Array|Uint8Array|Float32Array} the tensor data.
 */
export function quantizeInput(pixels, input) {
  if (input.dtype === "float32") return Float32Array.from(pixels);
  const range = INTEGER_RANGES[input.dtype];
  if (range === undefined) {
    throw new ModelFileError(
      `The model input has dtype ${input.dtype}; the demo supports int8, ` +
        "uint8 and float32 inputs.",
    );
  }
  const data = input.dtype === "int8" ? new Int8Array(pixels.length) : new Uint8Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) {
    const value = roundHalfEven(pixels[i] / input.scale) + input.zeroPoint;
    data[i] = Math.min(range[1], Math.max(range[0], value));
  }
  return data;
}

/** Converts raw output values to float scores (probabilities or logits). */
export function dequantizeOutput(raw, output) {
  if (output.dtype === "float32") return Array.from(raw);
  return Array.from(raw, (value) => (value - output.zeroPoint) * output.scale);
}

/** Returns the indices of the k highest scores; ties keep index order. */
export function topK(scores, k) {
  const indices = scores.map((_, i) => i);
  indices.sort((a, b) => scores[b] - scores[a] || a - b);
  return indices.slice(0, k);
}

/**
 * Converts RGBA canvas pixels to the model's pixel layout.
 *
 * @param {Uint8ClampedArray} rgba width * height * 4 values.
 * @param {number} channels 1 for grayscale (ITU-R BT.601 luma weights
 *     0.299, 0.587, 0.114, rounded) or 3 for RGB.
 * @param {boolean} invert replace each value v by 255 - v, for photos of
 *     dark shapes on a light background when the model was trained on
 *     light shapes on black (MNIST-style data).
 * @returns {Uint8Array} height * width * channels pixels.
 */
export function rgbaToPixels(rgba, channels, invert = false) {
  const count = rgba.length / 4;
  const pixels = new Uint8Array(count * channels);
  for (let i = 0; i < count; i++) {
    const r = rgba[4 * i];
    const g = rgba[4 * i + 1];
    const b = rgba[4 * i + 2];
    if (channels === 1) {
      pixels[i] = Math.round((r * 299 + g * 587 + b * 114) / 1000);
    } else {
      pixels.set([r, g, b], 3 * i);
    }
  }
  if (invert) {
    for (let i = 0; i < pixels.length; i++) pixels[i] = 255 - pixels[i];
  }
  return pixels;
}

/** A loaded model with its metadata, ready to classify pixel arrays. */
export class Classifier {
  constructor(litert, compiled, parsed, metadata) {
    this.litert = litert;
    this.compiled = compiled;
    this.input = parsed.input;
    this.output = parsed.output;
    this.metadata = metadata;
    const { height, width, channels } = metadata.preprocessing;
    this.height = height;
    this.width = width;
    this.channels = channels;
  }

  /**
   * Loads and checks a model file.
   *
   * @param {object} litert the @litertjs/core module, already initialised.
   * @param {Uint8Array} bytes the .tflite file.
   * @returns {Promise<Classifier>}
   * @throws {ModelFileError} the file or its metadata is invalid.
   */
  static async load(litert, bytes) {
    const parsed = parseModel(bytes);
    const numOutputs = parsed.output.shape[parsed.output.shape.length - 1];
    const metadata = readKcMetadata(parsed, numOutputs);
    const compiled = await litert.loadAndCompile(fixBatchDimension(bytes), {
      accelerator: "wasm",
    });
    return new Classifier(litert, compiled, parsed, metadata);
  }

  get pixelCount() {
    return this.height * this.width * this.channels;
  }

  makeTensor(pixels) {
    if (pixels.length !== this.pixelCount) {
      throw new RangeError(
        `Got ${pixels.length} pixel values; the model expects ` +
          `${this.height} x ${this.width} x ${this.channels} = ${this.pixelCount}.`,
      );
    }
    const data = quantizeInput(pixels, this.input);
    return new this.litert.Tensor(data, [1, this.height, this.width, this.channels]);
  }

  async runTensor(tensor) {
    const outputs = await this.compiled.run(tensor);
    const raw = outputs[0].toTypedArray().slice();
    for (const output of outputs) output.delete();
    return raw;
  }

  /** Describes output `index`: its label, class and vertical. */
  describeOutput(index, score) {
    const classIndex = this.metadata.output_classes[index];
    const taxonomy = this.metadata.taxonomy;
    const vertical = classIndex >= 0 ? taxonomy.verticals[taxonomy.class_vertical[classIndex]] : "other vertical";
    return { index, classIndex, label: this.metadata.labels[index], vertical, score };
  }

  /**
   * Classifies one image.
   *
   * @param {ArrayLike<number>} pixels height * width * channels values in
   *     [0, 255], row-major, channels last.
   * @returns {Promise<{top5: object[], scores: number[], raw: number[],
   *     inferenceMs: number}>}
   */
  async classifyPixels(pixels) {
    const tensor = this.makeTensor(pixels);
    try {
      const start = performance.now();
      const raw = await this.runTensor(tensor);
      const inferenceMs = performance.now() - start;
      const scores = dequantizeOutput(raw, this.output);
      const top5 = topK(scores, 5).map((i) => this.describeOutput(i, scores[i]));
      return { top5, scores, raw: Array.from(raw), inferenceMs };
    } finally {
      tensor.delete();
    }
  }

  /**
   * Measures the median latency of one inference.
   *
   * The page timer may resolve only 0.1 ms, so each sample times a batch
   * of runs long enough to measure and divides by its size.
   *
   * @param {number} samples number of timed batches.
   * @param {number} minBatchMs minimum duration of one batch.
   * @returns {Promise<{medianMs: number, runsPerSample: number,
   *     samples: number}>}
   */
  async benchmark(samples = 15, minBatchMs = 50) {
    const tensor = this.makeTensor(new Uint8Array(this.pixelCount));
    try {
      // Warm up for minBatchMs (the first runs compile and allocate),
      // then grow the batch until it lasts minBatchMs.
      const warmUpStart = performance.now();
      while (performance.now() - warmUpStart < minBatchMs) {
        await this.runTensor(tensor);
      }
      let runs = 1;
      for (;;) {
        const start = performance.now();
        for (let i = 0; i < runs; i++) await this.runTensor(tensor);
        if (performance.now() - start >= minBatchMs || runs >= 1 << 16) break;
        runs *= 2;
      }
      const times = [];
      for (let s = 0; s < samples; s++) {
        const start = performance.now();
        for (let i = 0; i < runs; i++) await this.runTensor(tensor);
        times.push((performance.now() - start) / runs);
      }
      times.sort((a, b) => a - b);
      const middle = Math.floor(samples / 2);
      const medianMs = samples % 2 ? times[middle] : (times[middle - 1] + times[middle]) / 2;
      return { medianMs, runsPerSample: runs, samples };
    } finally {
      tensor.delete();
    }
  }
}
