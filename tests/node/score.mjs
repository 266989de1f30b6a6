// Score PNG images with an anomalyvae model.onnx from Node.js, as an inspection line would.
//
//   node score.mjs model.onnx image1.png [image2.png ...]
//
// Prints JSON: the threshold and preprocessing read from the model's own metadata, and per
// image the score, normalized score and verdict. Preprocessing follows docs/onnx-contract.md:
// scale by the bit depth's maximum, BT.601 luma for one channel, antialiased bilinear resize
// (Pillow's algorithm), NCHW float32 in [0, 1].
import fs from "node:fs";
import ort from "onnxruntime-node";
import { PNG } from "pngjs";

// --- metadata_props straight from the ONNX protobuf (ModelProto field 14) -------------
function readVarint(buf, pos) {
  let value = 0, scale = 1, byte;
  do {
    byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    scale *= 128;
  } while (byte & 0x80);
  return [value, pos];
}

function fields(buf, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let tag;
    [tag, pos] = readVarint(buf, pos);
    const field = Math.floor(tag / 8), wire = tag % 8;
    if (wire === 0) { [, pos] = readVarint(buf, pos); }
    else if (wire === 1) { pos += 8; }
    else if (wire === 5) { pos += 4; }
    else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      visit(field, pos, pos + length);
      pos += length;
    } else { throw new Error(`unsupported protobuf wire type ${wire}`); }
  }
}

function readMetadata(path) {
  const buf = fs.readFileSync(path);
  const meta = {};
  fields(buf, 0, buf.length, (field, start, end) => {
    if (field !== 14) return;
    let key = "", value = "";
    fields(buf, start, end, (f, s, e) => {
      const text = buf.toString("utf8", s, e);
      if (f === 1) key = text; else if (f === 2) value = text;
    });
    meta[key] = value;
  });
  if (meta["anomalyvae.format"] !== "anomalyvae-onnx") {
    throw new Error(`${path} has no anomalyvae metadata`);
  }
  return meta;
}

// --- preprocessing ---------------------------------------------------------------------
function resampleCoefficients(inSize, outSize) {
  // Pillow's ImagingResample with the bilinear (triangle) filter, support 1.
  const scale = inSize / outSize, filterScale = Math.max(scale, 1), support = filterScale;
  const result = [];
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize);
    const weights = [];
    let total = 0;
    for (let x = xmin; x < xmax; x++) {
      const t = Math.abs((x - center + 0.5) / filterScale);
      const w = t < 1 ? 1 - t : 0;
      weights.push(w);
      total += w;
    }
    result.push({ xmin, weights: weights.map((w) => (total ? w / total : 0)) });
  }
  return result;
}

function resizePlane(plane, inW, inH, outW, outH) {
  let current = plane, width = inW;
  if (outW !== inW) {
    const coeffs = resampleCoefficients(inW, outW);
    const next = new Float64Array(outW * inH);
    for (let y = 0; y < inH; y++) {
      for (let x = 0; x < outW; x++) {
        const { xmin, weights } = coeffs[x];
        let acc = 0;
        for (let k = 0; k < weights.length; k++) acc += current[y * width + xmin + k] * weights[k];
        next[y * outW + x] = acc;
      }
    }
    current = next; width = outW;
  }
  if (outH !== inH) {
    const coeffs = resampleCoefficients(inH, outH);
    const next = new Float64Array(width * outH);
    for (let y = 0; y < outH; y++) {
      const { xmin, weights } = coeffs[y];
      for (let x = 0; x < width; x++) {
        let acc = 0;
        for (let k = 0; k < weights.length; k++) acc += current[(xmin + k) * width + x] * weights[k];
        next[y * width + x] = acc;
      }
    }
    current = next;
  }
  return current;
}

function preprocess(path, pre) {
  const png = PNG.sync.read(fs.readFileSync(path), { skipRescale: true });
  const max = png.depth === 16 ? 65535 : 255;
  const { width, height, data } = png;  // RGBA, one value per channel
  const planes = [];
  if (pre.channels === 1) {
    const gray = new Float64Array(width * height);
    for (let i = 0; i < width * height; i++) {
      const [r, g, b] = [data[4 * i], data[4 * i + 1], data[4 * i + 2]];
      gray[i] = r === g && g === b ? r / max : (0.299 * r + 0.587 * g + 0.114 * b) / max;
    }
    planes.push(gray);
  } else {
    for (let c = 0; c < 3; c++) {
      const plane = new Float64Array(width * height);
      for (let i = 0; i < width * height; i++) plane[i] = data[4 * i + c] / max;
      planes.push(plane);
    }
  }
  const out = new Float32Array(pre.channels * pre.height * pre.width);
  planes.forEach((plane, c) => {
    const resized = resizePlane(plane, width, height, pre.width, pre.height);
    for (let i = 0; i < resized.length; i++) {
      out[c * resized.length + i] = Math.min(1, Math.max(0, resized[i]));
    }
  });
  return out;
}

// --- run -------------------------------------------------------------------------------
const [modelPath, ...images] = process.argv.slice(2);
if (!modelPath || images.length === 0) {
  console.error("usage: node score.mjs model.onnx image.png [...]");
  process.exit(2);
}
const meta = readMetadata(modelPath);
const pre = JSON.parse(meta["anomalyvae.preprocessing"]);
if (pre.resize !== "bilinear") throw new Error(`this example implements bilinear resize only`);
// Severity 3: the "threshold input has a default" notice is by design, not a problem.
const session = await ort.InferenceSession.create(modelPath, { logSeverityLevel: 3 });
const size = pre.channels * pre.height * pre.width;
const batch = new Float32Array(images.length * size);
images.forEach((path, i) => batch.set(preprocess(path, pre), i * size));
const feeds = { image: new ort.Tensor("float32", batch, [images.length, pre.channels, pre.height, pre.width]) };
const out = await session.run(feeds);
console.log(JSON.stringify({
  threshold: Number(meta["anomalyvae.threshold"]),
  map_kind: meta["anomalyvae.map_kind"],
  preprocessing: pre,
  results: images.map((path, i) => ({
    path,
    score: out.score.data[i],
    normalized_score: out.normalized_score.data[i],
    is_anomaly: Boolean(out.is_anomaly.data[i]),
  })),
}, null, 1));
