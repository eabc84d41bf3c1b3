// What the page needs to know about a .tflite before MediaPipe loads it, read from the
// flatbuffer itself: the input size and type, and kdflax's own metadata entry (JSON: model
// name, precision, labels) when there is one.
//
//   const info = readModelInfo(bytes);   // {inputSize, inputType, hasStandardMetadata, kdflax}
//
// Throws ModelError with a one-line message for anything that is not a TFLite image model.

export class ModelError extends Error {}

const TYPES = {0: 'float32', 1: 'float16', 3: 'uint8', 9: 'int8'};

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  check(pos, size) {
    if (pos < 0 || pos + size > this.bytes.length) {
      throw new ModelError('the file is truncated or damaged (an offset points past its end)');
    }
  }
  u8(pos) { this.check(pos, 1); return this.view.getUint8(pos); }
  u16(pos) { this.check(pos, 2); return this.view.getUint16(pos, true); }
  u32(pos) { this.check(pos, 4); return this.view.getUint32(pos, true); }
  i32(pos) { this.check(pos, 4); return this.view.getInt32(pos, true); }
  /** Position of field `slot` of the table at `table`, or 0 when absent. */
  field(table, slot) {
    const vtable = table - this.i32(table);
    const size = this.u16(vtable);
    const at = 4 + 2 * slot;
    const off = at < size ? this.u16(vtable + at) : 0;
    return off ? table + off : 0;
  }
  ref(table, slot) {
    const pos = this.field(table, slot);
    return pos ? pos + this.u32(pos) : 0;
  }
  /** [start, length] of the vector at field `slot` ([0, 0] when absent). */
  vector(table, slot, width) {
    const v = this.ref(table, slot);
    if (!v) return [0, 0];
    const n = this.u32(v);
    this.check(v + 4, n * width);
    return [v + 4, n];
  }
  string(table, slot) {
    const [start, n] = this.vector(table, slot, 1);
    return new TextDecoder().decode(this.bytes.subarray(start, start + n));
  }
  table(vectorStart, i) { const p = vectorStart + 4 * i; return p + this.u32(p); }
}

/** Uint8Array of a .tflite -> {inputSize, inputType, hasStandardMetadata, kdflax}. */
export function readModelInfo(bytes) {
  if (bytes.length < 8 || new TextDecoder().decode(bytes.subarray(4, 8)) !== 'TFL3') {
    throw new ModelError('not a TFLite model (no TFL3 identifier)');
  }
  const r = new Reader(bytes);
  const model = r.u32(0);
  const [subgraphs, numSubgraphs] = r.vector(model, 2, 4);
  if (numSubgraphs < 1) throw new ModelError('the model has no subgraph');
  const graph = r.table(subgraphs, 0);
  const [tensors, numTensors] = r.vector(graph, 0, 4);
  const [inputs, numInputs] = r.vector(graph, 1, 4);
  const [, numOutputs] = r.vector(graph, 2, 4);
  if (numInputs !== 1 || numOutputs !== 1) {
    throw new ModelError(`expected one image input and one scores output, found ${numInputs} ` +
                         `and ${numOutputs}`);
  }
  const index = r.i32(inputs);
  if (index < 0 || index >= numTensors) throw new ModelError('the input tensor index is invalid');
  const tensor = r.table(tensors, index);
  const [shapeStart, rank] = r.vector(tensor, 0, 4);
  const shape = Array.from({length: rank}, (_, i) => r.i32(shapeStart + 4 * i));
  if (rank !== 4 || shape[3] !== 3 || shape[1] !== shape[2] || shape[1] < 1) {
    throw new ModelError(`expected a (1, S, S, 3) image input, found (${shape.join(', ')})`);
  }
  const typeField = r.field(tensor, 1);
  const inputType = TYPES[typeField ? r.u8(typeField) : 0] || 'other';
  const metadata = readMetadata(r, model);
  let kdflax = null;
  if (metadata.kdflax) {
    try { kdflax = JSON.parse(new TextDecoder().decode(metadata.kdflax)); } catch (e) { /* */ }
  }
  return {inputSize: shape[1], inputType, hasStandardMetadata: 'TFLITE_METADATA' in metadata,
          kdflax};
}

/** {name: bytes} of the model's metadata entries (those with an in-file buffer). */
function readMetadata(r, model) {
  const out = {};
  const [buffers, numBuffers] = r.vector(model, 4, 4);
  const [entries, numEntries] = r.vector(model, 6, 4);
  for (let i = 0; i < numEntries; i++) {
    const entry = r.table(entries, i);
    const name = r.string(entry, 0);
    const bufferField = r.field(entry, 1);
    const b = bufferField ? r.u32(bufferField) : 0;
    if (b >= numBuffers) continue;
    const [start, n] = r.vector(r.table(buffers, b), 0, 1);
    out[name] = r.bytes.subarray(start, start + n);
  }
  return out;
}
