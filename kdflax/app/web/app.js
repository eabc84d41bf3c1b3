// The page: load the model (model.json + model.tflite beside this file, or a .tflite the user
// picks), then classify each photo taken or chosen: decode -> the evaluation view
// (eval_view.js, the pixels `kdflax predict` feeds) -> MediaPipe ImageClassifier (CPU) ->
// the top classes with their probabilities and the inference time.
//
// `window.kdflax` is the page's state, read by tests and tools: `ready` (a Promise),
// `info`, `results` ({file, index, label, score, scores, ms}, in order), `errors` (messages
// shown), `bench(runs)`; with `?keep_pixels` in the address each result also keeps `decoded`
// (the photo's RGBA pixels as this browser decoded them) and `view` (the model's input).
//
// Delegate: CPU only. The GPU delegate in a software-WebGL browser (headless Chromium's
// SwiftShader) returns wrong scores without any error; the page cannot check a delegate, so it
// uses the one that gives the exported model's numbers.

import {FilesetResolver, ImageClassifier} from './mediapipe/vision_bundle.mjs';
import {evalBox, evalView} from './eval_view.js';
import {ModelError, readModelInfo} from './tflite_info.js';

const params = new URLSearchParams(location.search);
const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const state = {ready: null, info: null, classifier: null, results: [], errors: [],
               keepPixels: params.has('keep_pixels'), lastView: null, busy: Promise.resolve()};
window.kdflax = state;

function showError(message) {
  state.errors.push(message);
  $('error').textContent = message;
  $('error').hidden = false;
}

function setPickers(enabled) {
  for (const id of ['camera', 'photos']) {
    $(id).disabled = !enabled;
    $(`${id}-button`).classList.toggle('disabled', !enabled);
  }
}

/** Loads `bytes` (a .tflite) as the classifier; throws ModelError with a one-line message. */
async function loadModel(bytes, fileName, about = {}) {
  let info;
  try {
    info = readModelInfo(bytes);
  } catch (e) {
    throw new ModelError(`${fileName}: ${e.message}`);
  }
  const meta = info.kdflax || {};
  let classifier;
  try {
    const fileset = await FilesetResolver.forVisionTasks('./mediapipe/wasm');
    classifier = await ImageClassifier.createFromOptions(fileset, {
      baseOptions: {modelAssetBuffer: bytes, delegate: 'CPU'}, maxResults: -1,
      runningMode: 'IMAGE'});
  } catch (e) {
    throw new ModelError(`${fileName}: MediaPipe cannot load this model ` +
                         `(${String(e.message || e).split('\n')[0]})`);
  }
  const size = info.inputSize;
  const grey = new ImageData(new Uint8ClampedArray(size * size * 4).fill(128), size, size);
  const categories = classifier.classify(grey).classifications[0].categories;
  if (!categories.length || categories.some((c) => !c.categoryName)) {
    classifier.close();
    throw new ModelError(`${fileName}: the model has no class names (no labels file in its ` +
                         'standard metadata); export it with labels, e.g. kdflax export');
  }
  if (state.classifier) state.classifier.close();
  state.classifier = classifier;
  state.info = {file: fileName, name: about.name || meta.model || fileName,
                precision: about.precision || meta.precision || '', bytes: bytes.length,
                inputSize: size, numClasses: categories.length};
  const i = state.info;
  $('title').textContent = about.title || 'Leaf classifier';
  $('model-line').textContent = [i.name, i.precision, `${(i.bytes / 1e6).toFixed(2)} MB`,
                                 `${size} px`, `${i.numClasses} classes`]
      .filter(Boolean).join(' · ');
  state.lastView = grey;
}

/** Decodes `file` -> {rgba, width, height, bitmap}; throws with a one-line message. */
async function decode(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, {colorSpaceConversion: 'none',
                                            premultiplyAlpha: 'none'});
  } catch (e) {
    throw new Error(`${file.name}: not an image this browser can read (JPEG, PNG, WebP, GIF ` +
                    'or BMP)');
  }
  const {width, height} = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(bitmap, 0, 0);
  return {rgba: ctx.getImageData(0, 0, width, height).data, width, height, bitmap};
}

async function classifyFile(file) {
  const size = state.info.inputSize;
  const photo = await decode(file);
  const view = new ImageData(evalView(photo.rgba, photo.width, photo.height, size), size, size);
  const start = performance.now();
  const result = state.classifier.classify(view);
  const ms = performance.now() - start;
  const scores = new Array(state.info.numClasses).fill(0);
  const labels = new Array(state.info.numClasses).fill('');
  for (const c of result.classifications[0].categories) {
    scores[c.index] = c.score;
    labels[c.index] = c.categoryName;
  }
  const top = scores.map((s, i) => i).sort((a, b) => scores[b] - scores[a] || a - b);
  const record = {file: file.name, index: top[0], label: labels[top[0]], score: scores[top[0]],
                  scores, ms, width: photo.width, height: photo.height};
  if (state.keepPixels) {
    record.decoded = photo.rgba;
    record.view = view.data;
  }
  state.lastView = view;
  state.results.push(record);
  render(record, top.slice(0, TOP_K), labels, photo);
  photo.bitmap.close();
}

function render(record, top, labels, photo) {
  const li = document.createElement('li');
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 192;
  const box = evalBox(photo.height, photo.width, state.info.inputSize);
  canvas.getContext('2d').drawImage(photo.bitmap, box.left, box.top, box.side, box.side,
                                    0, 0, 192, 192);
  const div = document.createElement('div');
  div.className = 'scores';
  div.innerHTML = `<div class="file"></div>`;
  div.firstChild.textContent = record.file;
  for (const i of top) {
    const row = document.createElement('div');
    row.className = 'row';
    const pct = (100 * record.scores[i]).toFixed(1);
    row.innerHTML = `<span class="label"></span><span class="bar"><span style="width:${pct}%">` +
                    `</span></span><span class="pct">${pct}%</span>`;
    row.firstChild.textContent = labels[i];
    div.appendChild(row);
  }
  const ms = document.createElement('div');
  ms.className = 'ms';
  ms.textContent = `${record.ms.toFixed(1)} ms on this device`;
  div.appendChild(ms);
  li.append(canvas, div);
  $('results').prepend(li);
}

function renderFailure(message) {
  const li = document.createElement('li');
  li.className = 'failed';
  li.textContent = message;
  $('results').prepend(li);
  state.errors.push(message);
}

/** Classifies the files one after the other (after any batch already running). */
function classifyFiles(files) {
  state.busy = state.busy.then(async () => {
    for (const file of files) {
      $('status').textContent = `Classifying ${file.name}…`;
      try {
        await classifyFile(file);
      } catch (e) {
        renderFailure(e.message);
      }
    }
    $('status').textContent = 'Ready: take or choose a photo.';
  });
  return state.busy;
}

/** Times `runs` classifications of the last view (or a grey one): milliseconds each. */
state.bench = (runs = 50) => {
  const times = [];
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    state.classifier.classify(state.lastView);
    times.push(performance.now() - start);
  }
  return times;
};

async function loadFrom(load, fileName) {
  setPickers(false);
  $('error').hidden = true;
  $('status').textContent = `Loading ${fileName}…`;
  try {
    await load();
    $('status').textContent = 'Ready: take or choose a photo.';
    setPickers(true);
  } catch (e) {
    $('status').textContent = state.classifier ? 'Ready (previous model).' : 'No model loaded.';
    setPickers(Boolean(state.classifier));
    showError(e instanceof ModelError ? e.message : `${fileName}: ${e.message || e}`);
  }
}

async function start() {
  for (const id of ['camera', 'photos']) {
    $(id).addEventListener('change', (e) => {
      classifyFiles([...e.target.files]);
      e.target.value = '';
    });
  }
  $('model-file').addEventListener('change', (e) => {
    const file = e.target.files[0];
    if (!file) return;
    state.ready = loadFrom(async () => loadModel(new Uint8Array(await file.arrayBuffer()),
                                                 file.name), file.name);
    e.target.value = '';
  });
  state.ready = loadFrom(async () => {
    const about = await (await fetch('model.json')).json();
    const response = await fetch(about.file);
    if (!response.ok) throw new ModelError(`${about.file}: HTTP ${response.status}`);
    await loadModel(new Uint8Array(await response.arrayBuffer()), about.file, about);
  }, 'model.json');
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('sw.js').then(() => navigator.serviceWorker.ready)
        .then(() => { $('offline').textContent = 'Available offline.'; })
        .catch(() => {});
  }
}

start();
