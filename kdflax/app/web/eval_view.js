// The evaluation view in the browser: the same pixels kdflax.data.eval_view.eval_view computes
// (and `kdflax predict` feeds the model), from the same decoded photo.
//
//   const view = evalView(rgba, width, height, size);   // RGBA Uint8ClampedArray -> S*S*4 RGBA
//
// The centre square of side `short * S / max(S, floor(S / 0.875))`, resampled to S x S:
// output pixel (x, y) samples the photo at (left + x * side / S, top + y * side / S), positions
// rounded to 1/32 pixel (ties to even), bilinear in OpenCV's integer arithmetic (weights in
// 1/32, exact sums, rounded half up), border pixels repeated. Alpha is set to 255.

export const CROP_FRACTION = 0.875;
const SUBPIXEL = 32;

/** (height, width, size) -> {left, top, side} in pixels of the photo. */
export function evalBox(height, width, size, cropFraction = CROP_FRACTION) {
  if (height < 1 || width < 1) throw new Error(`empty image (${height} x ${width})`);
  const short = Math.max(size, Math.floor(size / cropFraction));
  const side = Math.min(height, width) * size / short;
  return {left: (width - side) / 2, top: (height - side) / 2, side};
}

/** Round half to even, as NumPy's np.round (lrint). */
function roundHalfEven(v) {
  const r = Math.round(v);
  return (r - v === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

/** Source indices i0, i1 (clamped to 0..n-1) and the weight of i1 in 1/32, per sample. */
function axis(start, side, size, n) {
  const i0 = new Int32Array(size), i1 = new Int32Array(size), frac = new Int32Array(size);
  for (let i = 0; i < size; i++) {
    const q = roundHalfEven((start + i * (side / size)) * SUBPIXEL);
    const lo = Math.floor(q / SUBPIXEL);
    frac[i] = q - lo * SUBPIXEL;
    i0[i] = Math.min(Math.max(lo, 0), n - 1);
    i1[i] = Math.min(Math.max(lo + 1, 0), n - 1);
  }
  return {i0, i1, frac};
}

/** RGBA pixels of a width x height photo -> the size x size RGBA view (Uint8ClampedArray). */
export function evalView(rgba, width, height, size, cropFraction = CROP_FRACTION) {
  const {left, top, side} = evalBox(height, width, size, cropFraction);
  const ys = axis(top, side, size, height), xs = axis(left, side, size, width);
  const out = new Uint8ClampedArray(size * size * 4);
  const full = SUBPIXEL * SUBPIXEL;
  for (let y = 0; y < size; y++) {
    const r0 = ys.i0[y] * width * 4, r1 = ys.i1[y] * width * 4, fy = ys.frac[y];
    for (let x = 0; x < size; x++) {
      const a = xs.i0[x] * 4, b = xs.i1[x] * 4, fx = xs.frac[x];
      const o = (y * size + x) * 4;
      for (let c = 0; c < 3; c++) {
        const upper = rgba[r0 + a + c] * (SUBPIXEL - fx) + rgba[r0 + b + c] * fx;
        const lower = rgba[r1 + a + c] * (SUBPIXEL - fx) + rgba[r1 + b + c] * fx;
        out[o + c] = Math.floor((upper * (SUBPIXEL - fy) + lower * fy + full / 2) / full);
      }
      out[o + 3] = 255;
    }
  }
  return out;
}
