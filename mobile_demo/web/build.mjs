// Builds the offline web demo into one folder of static files.
//
//   node build.mjs --model RUN/tflite/student_qat-int8.tflite [--out dist]
//
// The folder contains the page, the model (as model.tflite), the LiteRT.js
// module and its WebAssembly files copied from node_modules, a web app
// manifest and a service worker that caches all of them. Nothing is loaded
// from another host at run time. The build is written to a temporary
// folder and renamed, so a failed build leaves the previous one in place.

import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { ModelFileError, parseModel, readKcMetadata } from "./src/modelfile.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SOURCE_FILES = [
  "index.html",
  "app.js",
  "classifier.js",
  "modelfile.js",
  "style.css",
  "manifest.webmanifest",
  "icon.svg",
];
// LiteRT.js loads litert_wasm_internal where the browser has relaxed SIMD
// and the compat build otherwise. The threaded and JSPI builds are loaded
// only when loadLiteRt is given the threads or jspi option, which the page
// does not use.
const WASM_FILES = [
  "litert_wasm_internal.js",
  "litert_wasm_internal.wasm",
  "litert_wasm_compat_internal.js",
  "litert_wasm_compat_internal.wasm",
];
const LITERT_VERSION = "2.5.3";

// LiteRT.js 2.5.3 maps only float32, int32 and uint8 tensors to typed
// arrays and rejects a model with an int8 tensor on load, although its
// WebAssembly runtime executes int8 models. The build adds the int8 entry.
const DATATYPES_ANCHOR = `  {
    dtype: "uint8",
    typedArrayConstructor: Uint8Array,
    elementType: ElementType.UINT8
  }
]);`;
const DATATYPES_PATCHED = `  {
    dtype: "uint8",
    typedArrayConstructor: Uint8Array,
    elementType: ElementType.UINT8
  },
  {
    dtype: "int8",
    typedArrayConstructor: Int8Array,
    elementType: ElementType.INT8
  }
]);`;

class BuildError extends Error {}

function packageFolder(name) {
  const folder = path.join(HERE, "node_modules", ...name.split("/"));
  if (!fs.existsSync(folder)) {
    throw new BuildError(`${name} is not installed in ${path.join(HERE, "node_modules")}; run \`npm ci\` in ${HERE}`);
  }
  return folder;
}

function readLiteRtCore() {
  const folder = packageFolder("@litertjs/core");
  const version = JSON.parse(fs.readFileSync(path.join(folder, "package.json"), "utf8")).version;
  if (version !== LITERT_VERSION) {
    throw new BuildError(
      `@litertjs/core ${version} is installed but the build patches ${LITERT_VERSION}; run \`npm ci\` in ${HERE}`,
    );
  }
  const source = fs.readFileSync(path.join(folder, "dist", "index.js"), "utf8");
  if (!source.includes(DATATYPES_ANCHOR)) {
    throw new BuildError("@litertjs/core dist/index.js has no DATATYPES table to add int8 to; check the LiteRT.js version");
  }
  return source.replace(DATATYPES_ANCHOR, DATATYPES_PATCHED);
}

function withoutSourceMap(source) {
  // The source maps are not copied, so drop the references to them.
  return source.replace(/\n\/\/# sourceMappingURL=.*\s*$/, "\n");
}

function checkModel(modelPath) {
  if (!fs.existsSync(modelPath)) {
    throw new BuildError(`model file not found: ${modelPath}; run \`make tflite\` first or pass another RUN=`);
  }
  const bytes = new Uint8Array(fs.readFileSync(modelPath));
  try {
    const parsed = parseModel(bytes);
    const numOutputs = parsed.output.shape[parsed.output.shape.length - 1];
    return { bytes, metadata: readKcMetadata(parsed, numOutputs) };
  } catch (error) {
    if (error instanceof ModelFileError) {
      throw new BuildError(`${modelPath}: ${error.message}`);
    }
    throw error;
  }
}

function writeBuild(folder, modelBytes, metadata, modelPath) {
  const files = new Map();
  for (const name of SOURCE_FILES) {
    files.set(name, fs.readFileSync(path.join(HERE, "src", name)));
  }
  files.set("vendor/litertjs-core.js", withoutSourceMap(readLiteRtCore()));
  const utils = path.join(packageFolder("@litertjs/wasm-utils"), "dist", "index.js");
  files.set("vendor/litertjs-wasm-utils.js", withoutSourceMap(fs.readFileSync(utils, "utf8")));
  const wasmFolder = path.join(packageFolder("@litertjs/core"), "wasm");
  for (const name of WASM_FILES) {
    files.set(`wasm/${name}`, fs.readFileSync(path.join(wasmFolder, name)));
  }
  files.set("model.tflite", modelBytes);
  const info = {
    model: path.basename(modelPath),
    name: metadata.name ?? null,
    mode: metadata.mode ?? null,
    labels: metadata.labels.length,
    litertjs: LITERT_VERSION,
  };
  files.set("build.json", JSON.stringify(info, null, 2) + "\n");

  // The cache name changes with any asset, so a new build replaces the
  // cached copy of the previous one.
  const hash = createHash("sha256");
  for (const [name, content] of [...files].sort()) {
    hash.update(name);
    hash.update(content);
  }
  const assets = ["./", ...files.keys()].map((name) => (name === "./" ? name : `./${name}`));
  const worker = fs
    .readFileSync(path.join(HERE, "src", "sw.js"), "utf8")
    .replace("__CACHE_NAME__", `kc-demo-${hash.digest("hex").slice(0, 16)}`)
    .replace("__ASSETS__", JSON.stringify(assets));
  files.set("sw.js", worker);

  for (const [name, content] of files) {
    const target = path.join(folder, name);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, content);
  }
  return info;
}

function build(modelPath, outFolder) {
  const { bytes, metadata } = checkModel(modelPath);
  const parent = path.dirname(outFolder);
  fs.mkdirSync(parent, { recursive: true });
  const temporary = fs.mkdtempSync(path.join(parent, `.${path.basename(outFolder)}.`));
  // mkdtemp creates the folder as 0700; a web server running as another
  // user must be able to read the finished build.
  fs.chmodSync(temporary, 0o755);
  let info;
  try {
    info = writeBuild(temporary, bytes, metadata, modelPath);
  } catch (error) {
    fs.rmSync(temporary, { recursive: true, force: true });
    throw error;
  }
  const previous = `${temporary}.previous`;
  if (fs.existsSync(outFolder)) fs.renameSync(outFolder, previous);
  fs.renameSync(temporary, outFolder);
  fs.rmSync(previous, { recursive: true, force: true });
  return info;
}

function main() {
  const { values } = parseArgs({
    options: {
      model: { type: "string" },
      out: { type: "string", default: path.join(HERE, "dist") },
    },
  });
  if (!values.model) {
    console.error("error: --model PATH is required (a .tflite file exported by `kc tflite`)");
    process.exit(2);
  }
  try {
    const info = build(path.resolve(values.model), path.resolve(values.out));
    console.error(`built ${values.out} with ${info.model} (${info.name}, ${info.labels} labels)`);
  } catch (error) {
    if (error instanceof BuildError) {
      console.error(`error: ${error.message}`);
      process.exit(2);
    }
    throw error;
  }
}

main();
