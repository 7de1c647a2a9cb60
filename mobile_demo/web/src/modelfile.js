// Reads a .tflite flatbuffer without any TFLite runtime: the kc_keras
// metadata entry, the quantization of the input and output tensors, and
// a copy of the model with a fixed batch size. Runs in the browser and in
// Node (build.mjs validates the model with it). Field numbers follow the
// TFLite schema (tensorflow/compiler/mlir/lite/schema/schema.fbs).

export const METADATA_NAME = "kc_keras";

// Field indices of the TFLite schema tables read here.
const MODEL_SUBGRAPHS = 2;
const MODEL_BUFFERS = 4;
const MODEL_METADATA = 6;
const SUBGRAPH_TENSORS = 0;
const SUBGRAPH_INPUTS = 1;
const SUBGRAPH_OUTPUTS = 2;
const TENSOR_SHAPE = 0;
const TENSOR_TYPE = 1;
const TENSOR_QUANTIZATION = 4;
const TENSOR_SHAPE_SIGNATURE = 7;
const QUANTIZATION_SCALE = 2;
const QUANTIZATION_ZERO_POINT = 3;
const METADATA_ENTRY_NAME = 0;
const METADATA_ENTRY_BUFFER = 1;
const BUFFER_DATA = 0;
const BUFFER_OFFSET = 1;
const BUFFER_SIZE = 2;

// TensorType enum values of the TFLite schema.
const TENSOR_TYPES = { 0: "float32", 2: "int32", 3: "uint8", 9: "int8" };

/** An invalid model file or metadata; the message is shown to the user. */
export class ModelFileError extends Error {
  constructor(message) {
    super(message);
    this.name = "ModelFileError";
  }
}

class FlatBufferReader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  uoffset(pos) {
    return pos + this.view.getUint32(pos, true);
  }

  // Absolute position of a table field, or null when the field is absent.
  field(table, index) {
    const vtable = table - this.view.getInt32(table, true);
    const vtableSize = this.view.getUint16(vtable, true);
    const entry = 4 + 2 * index;
    if (entry >= vtableSize) return null;
    const offset = this.view.getUint16(vtable + entry, true);
    return offset ? table + offset : null;
  }

  // [start, length] of the vector that a table field points to.
  vector(fieldPos) {
    const start = this.uoffset(fieldPos);
    return [start + 4, this.view.getUint32(start, true)];
  }

  tables(table, index) {
    const pos = this.field(table, index);
    if (pos === null) return [];
    const [start, length] = this.vector(pos);
    const result = [];
    for (let i = 0; i < length; i++) result.push(this.uoffset(start + 4 * i));
    return result;
  }

  int32s(table, index) {
    const pos = this.field(table, index);
    if (pos === null) return null;
    const [start, length] = this.vector(pos);
    const result = [];
    for (let i = 0; i < length; i++) {
      result.push(this.view.getInt32(start + 4 * i, true));
    }
    return result;
  }

  firstFloat32(table, index) {
    const pos = this.field(table, index);
    if (pos === null) return null;
    const [start, length] = this.vector(pos);
    return length ? this.view.getFloat32(start, true) : null;
  }

  firstInt64(table, index) {
    const pos = this.field(table, index);
    if (pos === null) return null;
    const [start, length] = this.vector(pos);
    return length ? Number(this.view.getBigInt64(start, true)) : null;
  }

  string(table, index) {
    const pos = this.field(table, index);
    if (pos === null) return null;
    const [start, length] = this.vector(pos);
    return new TextDecoder().decode(this.bytes.subarray(start, start + length));
  }

  bufferBytes(buffer) {
    const dataPos = this.field(buffer, BUFFER_DATA);
    if (dataPos !== null) {
      const [start, length] = this.vector(dataPos);
      return this.bytes.subarray(start, start + length);
    }
    // Models over 2 GB keep buffer contents after the flatbuffer,
    // addressed by absolute offset and size.
    const offsetPos = this.field(buffer, BUFFER_OFFSET);
    const sizePos = this.field(buffer, BUFFER_SIZE);
    if (offsetPos === null || sizePos === null) return new Uint8Array(0);
    const offset = Number(this.view.getBigUint64(offsetPos, true));
    const size = Number(this.view.getBigUint64(sizePos, true));
    return this.bytes.subarray(offset, offset + size);
  }
}

function checkIdentifier(bytes) {
  const id = new TextDecoder().decode(bytes.subarray(4, 8));
  if (bytes.length < 8 || id !== "TFL3") {
    throw new ModelFileError(
      "Not a TFLite model: the file identifier 'TFL3' is missing at byte " +
        "4. Pick a .tflite file exported by `kc tflite`.",
    );
  }
}

function describeTensor(reader, tensor) {
  const typePos = reader.field(tensor, TENSOR_TYPE);
  const typeCode = typePos === null ? 0 : reader.view.getInt8(typePos);
  const quantization = reader.field(tensor, TENSOR_QUANTIZATION);
  let scale = 0;
  let zeroPoint = 0;
  if (quantization !== null) {
    const table = reader.uoffset(quantization);
    scale = reader.firstFloat32(table, QUANTIZATION_SCALE) ?? 0;
    zeroPoint = reader.firstInt64(table, QUANTIZATION_ZERO_POINT) ?? 0;
  }
  return {
    dtype: TENSOR_TYPES[typeCode] ?? `type ${typeCode}`,
    shape: reader.int32s(tensor, TENSOR_SHAPE) ?? [],
    scale,
    zeroPoint,
  };
}

/**
 * Parses a .tflite file.
 *
 * @param {Uint8Array} bytes the model file.
 * @returns {{entries: Map<string, Uint8Array>, input: object, output: object}}
 *     the metadata entries by name and the first input and output tensor
 *     (dtype, shape, scale, zeroPoint).
 * @throws {ModelFileError} the bytes are not a TFLite flatbuffer.
 */
export function parseModel(bytes) {
  checkIdentifier(bytes);
  const reader = new FlatBufferReader(bytes);
  try {
    const model = reader.uoffset(0);
    const buffers = reader.tables(model, MODEL_BUFFERS);
    const entries = new Map();
    for (const entry of reader.tables(model, MODEL_METADATA)) {
      const name = reader.string(entry, METADATA_ENTRY_NAME);
      const bufferPos = reader.field(entry, METADATA_ENTRY_BUFFER);
      if (name === null || bufferPos === null) continue;
      const index = reader.view.getUint32(bufferPos, true);
      entries.set(name, reader.bufferBytes(buffers[index]));
    }
    const subgraph = reader.tables(model, MODEL_SUBGRAPHS)[0];
    const tensors = reader.tables(subgraph, SUBGRAPH_TENSORS);
    const inputIndex = reader.int32s(subgraph, SUBGRAPH_INPUTS)[0];
    const outputIndex = reader.int32s(subgraph, SUBGRAPH_OUTPUTS)[0];
    return {
      entries,
      input: describeTensor(reader, tensors[inputIndex]),
      output: describeTensor(reader, tensors[outputIndex]),
    };
  } catch (error) {
    if (error instanceof RangeError || error instanceof TypeError) {
      throw new ModelFileError(
        `Corrupt TFLite model: its structure could not be read (${error.message}). ` +
          "Re-export the model.",
      );
    }
    throw error;
  }
}

/**
 * Returns a copy of a model whose dynamic batch dimension is fixed to 1.
 *
 * Keras exports record the batch dimension as -1 in each tensor's
 * shape_signature. LiteRT.js 2.5.3 checks an input tensor against that
 * signature and rejects a [1, 28, 28, 1] tensor for a [-1, 28, 28, 1]
 * input. Python LiteRT runs the same model with batch 1, so setting -1 to
 * 1 in place changes nothing else.
 *
 * @param {Uint8Array} bytes the model file.
 * @returns {Uint8Array} the edited copy.
 */
export function fixBatchDimension(bytes) {
  const copy = new Uint8Array(bytes);
  const reader = new FlatBufferReader(copy);
  const model = reader.uoffset(0);
  for (const subgraph of reader.tables(model, MODEL_SUBGRAPHS)) {
    for (const tensor of reader.tables(subgraph, SUBGRAPH_TENSORS)) {
      const pos = reader.field(tensor, TENSOR_SHAPE_SIGNATURE);
      if (pos === null) continue;
      const [start, length] = reader.vector(pos);
      if (length > 0 && reader.view.getInt32(start, true) === -1) {
        reader.view.setInt32(start, 1, true);
      }
    }
  }
  return copy;
}

function requireKeys(metadata, keys, where) {
  for (const key of keys) {
    if (metadata[key] === undefined || metadata[key] === null) {
      throw new ModelFileError(
        `Invalid model metadata: "${where}${key}" is missing. Re-export ` +
          "the model with `kc tflite`.",
      );
    }
  }
}

/**
 * Reads and checks the kc_keras metadata of a parsed model.
 *
 * @param {object} parsed the result of parseModel.
 * @param {number} numOutputs size of the model's output vector.
 * @returns {object} the metadata JSON.
 * @throws {ModelFileError} the entry is missing or does not match the model.
 */
export function readKcMetadata(parsed, numOutputs) {
  const raw = parsed.entries.get(METADATA_NAME);
  if (raw === undefined) {
    throw new ModelFileError(
      `This model has no "${METADATA_NAME}" metadata, so its labels and ` +
        "preprocessing are unknown. Use a model exported by `kc tflite`.",
    );
  }
  let metadata;
  try {
    metadata = JSON.parse(new TextDecoder().decode(raw));
  } catch (error) {
    throw new ModelFileError(
      `The "${METADATA_NAME}" metadata is not valid JSON (${error.message}). ` +
        "Re-export the model with `kc tflite`.",
    );
  }
  requireKeys(metadata, ["labels", "output_classes", "taxonomy", "preprocessing"], "");
  requireKeys(metadata.preprocessing, ["height", "width", "channels"], "preprocessing.");
  requireKeys(metadata.taxonomy, ["classes", "verticals", "class_vertical"], "taxonomy.");
  checkAgainstModel(metadata, parsed, numOutputs);
  return metadata;
}

function checkAgainstModel(metadata, parsed, numOutputs) {
  if (metadata.labels.length !== numOutputs) {
    throw new ModelFileError(
      `The metadata lists ${metadata.labels.length} labels but the model ` +
        `has ${numOutputs} outputs. Re-export the model so that there is ` +
        "one label per output.",
    );
  }
  if (metadata.output_classes.length !== numOutputs) {
    throw new ModelFileError(
      `The metadata lists ${metadata.output_classes.length} output classes ` +
        `but the model has ${numOutputs} outputs. Re-export the model.`,
    );
  }
  const { height, width, channels } = metadata.preprocessing;
  if (![1, 3].includes(channels)) {
    throw new ModelFileError(
      `The metadata gives ${channels} input channels; the demo supports 1 ` +
        "(grayscale) or 3 (RGB).",
    );
  }
  const expected = [1, height, width, channels].join(", ");
  if (parsed.input.shape.join(", ") !== expected) {
    throw new ModelFileError(
      `The model input has shape [${parsed.input.shape.join(", ")}] but its ` +
        `metadata describes [${expected}]. Re-export the model.`,
    );
  }
}
