// Depthwise k x k convolution for XLA:CPU through the XLA FFI: forward, input gradient and
// kernel gradient, float32, NHWC, kernel (k, k, 1, C), stride s, padding k / 2 on every side
// (PyTorch/timm style). Built and registered by `kdflax/models/depthwise_cpu.py`.
//
// XLA:CPU lowers a grouped convolution (feature_group_count = C) through a generic path
// that is several times slower than a channel-vectorised loop, and the shifted-slices form
// in plain JAX turns the kernel gradient into k*k separate full-size reductions. Here every
// loop keeps the channel axis innermost and contiguous (the compiler vectorises it), reads
// each input row once per pass, and splits the work over output rows between the caller and
// XLA's intra-op thread pool.
//
// Shapes: x (N, H, W, C); w (k, k, 1, C); y and dy (N, Ho, Wo, C) with
// Ho = (H + 2p - k) / s + 1, p = k / 2. Results do not depend on the number of threads: the
// kernel gradient sums per-chunk partials in a fixed chunk order.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, k, s, p, ho, wo;
};

// Runs body(chunk) for chunk in [0, chunks): the calling thread and up to
// pool.num_threads() pool tasks claim chunks from one counter. The caller returns once every
// chunk is done; it never waits on a task that has not started (a late task finds no chunk
// left and returns), so a busy pool cannot deadlock it.
template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t chunks, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto shared_body = std::make_shared<Body>(std::move(body));
  auto work = [state, shared_body, chunks]() {
    for (int64_t i = state->next.fetch_add(1); i < chunks; i = state->next.fetch_add(1)) {
      (*shared_body)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// The geometry of x's dims (N, H, W, C) and a k x k kernel at `stride`: the output (and dy)
// spatial size is derived, as the Python side derives the result shapes.
template <typename Dims>
Geometry Shape(const Dims& xd, int64_t k, int64_t stride) {
  Geometry g;
  g.n = xd[0]; g.h = xd[1]; g.w = xd[2]; g.c = xd[3];
  g.k = k; g.s = stride; g.p = k / 2;
  g.ho = (g.h + 2 * g.p - g.k) / g.s + 1;
  g.wo = (g.w + 2 * g.p - g.k) / g.s + 1;
  return g;
}

// y[n, a, b, :] = sum_{i, j} x[n, a*s + i - p, b*s + j - p, :] * w[i, j, :]
void ForwardRows(const Geometry& g, const float* x, const float* w, float* y,
                 int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.ho, a = row % g.ho;
    float* yrow = y + row * g.wo * c;
    std::memset(yrow, 0, sizeof(float) * g.wo * c);
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t hi = a * g.s + i - g.p;
      if (hi < 0 || hi >= g.h) continue;
      const float* xrow = x + (n * g.h + hi) * g.w * c;
      for (int64_t b = 0; b < g.wo; ++b) {
        float* __restrict out = yrow + b * c;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t wi = b * g.s + j - g.p;
          if (wi < 0 || wi >= g.w) continue;
          const float* __restrict xv = xrow + wi * c;
          const float* __restrict wv = w + (i * g.k + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) out[ch] += xv[ch] * wv[ch];
        }
      }
    }
  }
}

// dx[n, r, q, :] = sum over taps (i, j) with r = a*s + i - p, q = b*s + j - p of
// dy[n, a, b, :] * w[i, j, :]
void InputGradRows(const Geometry& g, const float* dy, const float* w, float* dx,
                   int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.h, r = row % g.h;
    float* dxrow = dx + row * g.w * c;
    std::memset(dxrow, 0, sizeof(float) * g.w * c);
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t t = r + g.p - i;
      if (t < 0 || t % g.s != 0) continue;
      const int64_t a = t / g.s;
      if (a >= g.ho) continue;
      const float* dyrow = dy + (n * g.ho + a) * g.wo * c;
      for (int64_t b = 0; b < g.wo; ++b) {
        const float* __restrict dv = dyrow + b * c;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t q = b * g.s + j - g.p;
          if (q < 0 || q >= g.w) continue;
          float* __restrict out = dxrow + q * c;
          const float* __restrict wv = w + (i * g.k + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) out[ch] += dv[ch] * wv[ch];
        }
      }
    }
  }
}

// partial[i, j, :] += sum over the rows of x[n, a*s + i - p, b*s + j - p, :] * dy[n, a, b, :]
void KernelGradRows(const Geometry& g, const float* x, const float* dy, float* partial,
                    int64_t row_begin, int64_t row_end) {
  const int64_t c = g.c;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.ho, a = row % g.ho;
    const float* dyrow = dy + row * g.wo * c;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t hi = a * g.s + i - g.p;
      if (hi < 0 || hi >= g.h) continue;
      const float* xrow = x + (n * g.h + hi) * g.w * c;
      for (int64_t b = 0; b < g.wo; ++b) {
        const float* __restrict dv = dyrow + b * c;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t wi = b * g.s + j - g.p;
          if (wi < 0 || wi >= g.w) continue;
          const float* __restrict xv = xrow + wi * c;
          float* __restrict acc = partial + (i * g.k + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += xv[ch] * dv[ch];
        }
      }
    }
  }
}

// Splits `rows` into at most `max_chunks` contiguous ranges of whole rows.
struct Rows {
  int64_t rows, chunks;
  int64_t begin(int64_t chunk) const { return rows * chunk / chunks; }
  int64_t end(int64_t chunk) const { return rows * (chunk + 1) / chunks; }
};

Rows SplitRows(int64_t rows, int64_t max_chunks) {
  return Rows{rows, std::max<int64_t>(1, std::min(rows, max_chunks))};
}

constexpr int64_t kRowChunks = 64;      // forward / input gradient: cheap per chunk
constexpr int64_t kKernelChunks = 16;   // kernel gradient: one partial per chunk

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  const Geometry g = Shape(x.dimensions(), w.dimensions()[0], stride);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const Rows rows = SplitRows(g.n * g.ho, kRowChunks);
  ParallelChunks(pool, rows.chunks, [&g, xp, wp, yp, rows](int64_t chunk) {
    ForwardRows(g, xp, wp, yp, rows.begin(chunk), rows.end(chunk));
  });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride) {
  const Geometry g = Shape(dx->dimensions(), w.dimensions()[0], stride);
  const float* dyp = dy.typed_data();
  const float* wp = w.typed_data();
  float* dxp = dx->typed_data();
  const Rows rows = SplitRows(g.n * g.h, kRowChunks);
  ParallelChunks(pool, rows.chunks, [&g, dyp, wp, dxp, rows](int64_t chunk) {
    InputGradRows(g, dyp, wp, dxp, rows.begin(chunk), rows.end(chunk));
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t stride) {
  const Geometry g = Shape(x.dimensions(), dw->dimensions()[0], stride);
  const int64_t taps = g.k * g.k * g.c;
  const Rows rows = SplitRows(g.n * g.ho, kKernelChunks);
  std::vector<float> partials(rows.chunks * taps, 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  float* pp = partials.data();
  ParallelChunks(pool, rows.chunks, [&g, xp, dyp, pp, taps, rows](int64_t chunk) {
    KernelGradRows(g, xp, dyp, pp + chunk * taps, rows.begin(chunk), rows.end(chunk));
  });
  float* out = dw->typed_data();
  std::memcpy(out, pp, sizeof(float) * taps);
  for (int64_t chunk = 1; chunk < rows.chunks; ++chunk) {
    const float* part = pp + chunk * taps;
    for (int64_t t = 0; t < taps; ++t) out[t] += part[t];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdflaxDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdflaxDepthwiseInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdflaxDepthwiseKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));
