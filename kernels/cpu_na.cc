// Neighborhood attention for XLA:CPU: forward and backward as XLA FFI custom calls.
//
// Built on first use by kernels/cpu.py (g++ -O3 -march=native against the installed jaxlib's
// FFI headers). Every call is the gather formulation of NA: each query reads exactly the keys
// of its own window, so no logit outside a window is computed (the tiled XLA path computes
// ~3.4x the needed logits for K=7) and a non-finite key or value reaches only the queries whose
// windows hold it (the reference's semantics, with no containment pass).
//
// Canonical layout (kernels/cpu.py reshapes every rank to it): three spatial axes
// (unused ones have length 1 and kernel 1), tokens row-major over them.
//   q [B, N, H, D], k [B, N, HK, D], v [B, N, HK, DV], N = L0 * L1 * L2, H = HK * G.
// Window tables, one per axis a (numpy, from kernels/windows.py):
//   nb_a  [L_a, K_a] int32  key coordinate of window slot i of query coordinate x (-1: the slot
//                           is past a causal window's end),
//   rel_a [L_a, K_a] int32  the RPB column of that slot (read only with RPB).
//   inv_a [L_a, M_a, 2] int32 (backward) the (query coordinate, slot) pairs whose slot holds
//                           key coordinate y (-1 padded): the inverse window, so dk/dv are
//                           gathers over the queries that see a key, never a scatter.
// Window slots are flattened row-major: j = (i0 * K1 + i1) * K2 + i2 (as the reference's).
// All math in fp32; the lse is natural-log, of the scaled and biased logits.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// exp(x) for x <= ~0 (arguments are logits minus their maximum or their logsumexp), written so
// GCC vectorizes loops over it: Cephes' expf polynomial (relative error ~1e-7), exact 0 below
// -87.3 (so a masked -inf logit gives exactly 0). Callers never pass NaN (rows with a non-finite
// maximum or logsumexp take the NaN path before exponentiating).
inline float exp_nonpos(float x) {
  const float underflow = -87.33654f;
  float xc = x < underflow ? underflow : x;
  float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < underflow ? 0.0f : y * scale;
}

// Sixteen dot products at a time (the window's logits, and do . v in the backward): each key
// row is multiplied by q lane-wise into one vector per slot, then the sixteen vectors are
// summed across their lanes together by a four-level shuffle tree (about three operations
// per dot instead of a horizontal sum each). GCC/Clang vector extensions: 512-bit registers
// where the CPU has them, pairs of 256-bit ones (or narrower) elsewhere.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t m16 __attribute__((vector_size(64)));

#if defined(__clang__)
#define NAT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define NAT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (m16){__VA_ARGS__})
#endif

inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }

// Lane l of the result is the lane sum of v[kBitrev4[l]]: callers feed slot j's vector at
// v[kBitrev4[j]] (the permutation is its own inverse), so lane j is slot j.
inline v16 reduce16(const v16* v) {
  v16 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)
    c[i] = NAT_SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                       22, 23) +
           NAT_SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                       28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    d[i] = NAT_SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24,
                       25, 26, 27) +
           NAT_SHUFFLE(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28,
                       29, 30, 31);
  for (int i = 0; i < 2; ++i)
    e[i] = NAT_SHUFFLE(d[2 * i], d[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12,
                       13, 28, 29) +
           NAT_SHUFFLE(d[2 * i], d[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14,
                       15, 30, 31);
  return NAT_SHUFFLE(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         NAT_SHUFFLE(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// out[j] = a . rows[j] for j < count (count <= 16; rows[j] may be null: out[j] = 0), rows of
// n = 16 * NV floats.
template <int NV>
inline void dots16(const float* __restrict a, const float* const* rows, int count, float* out) {
  v16 q[NV];
  for (int u = 0; u < NV; ++u) q[u] = load16(a + 16 * u);
  v16 acc[16];
  for (int i = 0; i < 16; ++i) {
    const int j = kBitrev4[i];
    v16 x = {};
    if (j < count && rows[j] != nullptr) {
      for (int u = 0; u < NV; ++u) x += q[u] * load16(rows[j] + 16 * u);
    }
    acc[i] = x;
  }
  const v16 r = reduce16(acc);
  for (int j = 0; j < count; ++j) out[j] = r[j];
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Runs fn(chunk, begin, end) over [0, items) in fixed chunks on up to `threads` threads (the
// calling one included) that take chunks from an atomic counter. The chunks depend on `items`
// alone, not on the scheduling or the thread count, so per-chunk partial sums added in chunk
// order give the same bits on any machine.
inline int64_t chunk_size(int64_t items) { return std::max<int64_t>(1, (items + 63) / 64); }

template <typename Fn>
void parallel_for(int64_t items, int64_t threads, Fn fn) {
  const int64_t chunk = chunk_size(items);
  const int64_t chunks = (items + chunk - 1) / chunk;
  threads = std::max<int64_t>(1, std::min(threads, chunks));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      fn(c, c * chunk, std::min(items, (c + 1) * chunk));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

// out[j] = a . rows[j] (0 for a null row), rows of n floats.
inline void row_dots(const float* a, const float* const* rows, int64_t count, int64_t n,
                     float* out) {
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int c = static_cast<int>(std::min<int64_t>(16, count - j0));
    // A short remainder (49 = 3 * 16 + 1) is cheaper as plain dots than a reduction tree.
    const int tree = c > 4 ? n : 0;
    switch (tree) {
      case 16: dots16<1>(a, rows + j0, c, out + j0); continue;
      case 32: dots16<2>(a, rows + j0, c, out + j0); continue;
      case 64: dots16<4>(a, rows + j0, c, out + j0); continue;
      case 128: dots16<8>(a, rows + j0, c, out + j0); continue;
      default:
        for (int j = 0; j < c; ++j)
          out[j0 + j] = rows[j0 + j] == nullptr ? 0.0f : dot(a, rows[j0 + j], n);
    }
  }
}

// out = sum_j w[j] * rows[j] over the non-null rows, in j order, rows of n floats: the
// accumulator stays in registers for the usual head dims (a store and reload of `out` per row
// was the forward's bottleneck).
template <int NV>
inline void weighted_sum16(const float* w, const float* const* rows, int64_t count,
                           float* out) {
  v16 acc[NV] = {};
  for (int64_t j = 0; j < count; ++j) {
    if (rows[j] == nullptr) continue;
    const v16 x = v16{} + w[j];
    for (int u = 0; u < NV; ++u) acc[u] += x * load16(rows[j] + 16 * u);
  }
  for (int u = 0; u < NV; ++u) *reinterpret_cast<v16u*>(out + 16 * u) = acc[u];
}

inline void weighted_sum(const float* w, const float* const* rows, int64_t count, int64_t n,
                         float* out) {
  switch (n) {
    case 16: return weighted_sum16<1>(w, rows, count, out);
    case 32: return weighted_sum16<2>(w, rows, count, out);
    case 64: return weighted_sum16<4>(w, rows, count, out);
    case 128: return weighted_sum16<8>(w, rows, count, out);
    default:
      std::fill(out, out + n, 0.0f);
      for (int64_t j = 0; j < count; ++j)
        if (rows[j] != nullptr) axpy(w[j], rows[j], out, n);
  }
}

struct Axis {
  int64_t length, kernel, inv_width;
  const int32_t* nb;
  const int32_t* rel;
  const int32_t* inv;
};

struct Geometry {
  int64_t batch, heads, heads_kv, head_dim, head_dim_v, tokens, window;
  Axis axis[3];
  int64_t rpb_dims[3];
  float scale;
  int64_t threads;
};

// The window of one query: key token index and RPB offset of every slot (-1: masked). The part
// that depends on the first two axes is kept per row of tokens (consecutive tokens share it).
struct Window {
  explicit Window(const Geometry& g)
      : key(g.window), bias(g.window), row_key(g.axis[0].kernel * g.axis[1].kernel),
        row_bias(row_key.size()) {}
  std::vector<int64_t> key, bias, row_key, row_bias;
  int64_t row = -1;
};

void query_window(const Geometry& g, int64_t token, bool with_rpb, Window& w) {
  const Axis& a0 = g.axis[0];
  const Axis& a1 = g.axis[1];
  const Axis& a2 = g.axis[2];
  const int64_t x2 = token % a2.length;
  const int64_t row = token / a2.length;
  if (row != w.row) {
    const int64_t x1 = row % a1.length, x0 = row / a1.length;
    int64_t r = 0;
    for (int64_t i0 = 0; i0 < a0.kernel; ++i0) {
      const int32_t c0 = a0.nb[x0 * a0.kernel + i0];
      for (int64_t i1 = 0; i1 < a1.kernel; ++i1, ++r) {
        const int32_t c1 = a1.nb[x1 * a1.kernel + i1];
        w.row_key[r] = c0 < 0 || c1 < 0 ? -1 : (int64_t{c0} * a1.length + c1) * a2.length;
        if (with_rpb)
          w.row_bias[r] = (int64_t{a0.rel[x0 * a0.kernel + i0]} * g.rpb_dims[1] +
                           a1.rel[x1 * a1.kernel + i1]) * g.rpb_dims[2];
      }
    }
    w.row = row;
  }
  const int32_t* nb2 = a2.nb + x2 * a2.kernel;
  const int32_t* rel2 = with_rpb ? a2.rel + x2 * a2.kernel : nullptr;
  int64_t j = 0;
  for (size_t r = 0; r < w.row_key.size(); ++r) {
    const int64_t base = w.row_key[r];
    for (int64_t i2 = 0; i2 < a2.kernel; ++i2, ++j) {
      w.key[j] = base < 0 || nb2[i2] < 0 ? -1 : base + nb2[i2];
      if (with_rpb) w.bias[j] = w.row_bias[r] + rel2[i2];
    }
  }
}

// rows[j]: the row of window slot j in one head's keys or values (`head`, rows `stride` floats
// apart), null for a masked slot.
inline void window_rows(const Window& w, const float* head, int64_t stride, const float** rows) {
  for (size_t j = 0; j < w.key.size(); ++j)
    rows[j] = w.key[j] < 0 ? nullptr : head + w.key[j] * stride;
}

// Scaled, biased logits of one (query, head) over its window; masked slots are -inf. Returns
// the maximum (NaN if any logit is NaN). Fills `rows` with the window's key rows.
float logits(const Geometry& g, const Window& w, const float* q, const float* k_head,
             const float* rpb_head, float* s, const float** rows) {
  window_rows(w, k_head, g.heads_kv * g.head_dim, rows);
  row_dots(q, rows, g.window, g.head_dim, s);
  // Separate simple loops so each vectorizes (one scalar loop with the mask, bias gather, max
  // and NaN test in it was a third of the forward).
  if (rpb_head != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < g.window; ++j) s[j] = g.scale * s[j] + rpb_head[w.bias[j]];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < g.window; ++j) s[j] *= g.scale;
  }
  float m = kNegInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < g.window; ++j) {
    const float x = w.key[j] < 0 ? kNegInf : s[j];
    s[j] = x;
    nan |= x != x;
    m = x > m ? x : m;
  }
  return nan ? kNaN : m;
}

Geometry make_geometry(ffi::Span<const int64_t> qd, int64_t heads_kv, int64_t head_dim_v,
                       const ffi::Buffer<ffi::S32>* nb, const ffi::Buffer<ffi::S32>* rel,
                       const ffi::Buffer<ffi::S32>* inv, const ffi::Span<const int64_t>* rpb_dims,
                       float scale, int64_t threads) {
  Geometry g;
  g.batch = qd[0];
  g.tokens = qd[1];
  g.heads = qd[2];
  g.head_dim = qd[3];
  g.heads_kv = heads_kv;
  g.head_dim_v = head_dim_v;
  g.window = 1;
  for (int a = 0; a < 3; ++a) {
    auto d = nb[a].dimensions();
    g.axis[a].length = d[0];
    g.axis[a].kernel = d[1];
    g.axis[a].nb = nb[a].typed_data();
    g.axis[a].rel = rel == nullptr ? nullptr : rel[a].typed_data();
    g.axis[a].inv = inv == nullptr ? nullptr : inv[a].typed_data();
    g.axis[a].inv_width = inv == nullptr ? 0 : inv[a].dimensions()[1];
    g.window *= d[1];
    g.rpb_dims[a] = rpb_dims != nullptr && rpb_dims->size() == 4 ? (*rpb_dims)[1 + a] : 1;
  }
  g.scale = scale;
  g.threads = threads > 0 ? threads : std::max<int64_t>(1, std::thread::hardware_concurrency());
  return g;
}

ffi::Error check_geometry(const Geometry& g) {
  if (g.axis[0].length * g.axis[1].length * g.axis[2].length != g.tokens)
    return ffi::Error::InvalidArgument("nat_jax cpu NA: window tables do not match the tokens");
  if (g.heads_kv <= 0 || g.heads % g.heads_kv != 0)
    return ffi::Error::InvalidArgument("nat_jax cpu NA: heads must be a multiple of heads_kv");
  return ffi::Error::Success();
}

ffi::Error NaForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> rpb, ffi::Buffer<ffi::S32> nb0,
                     ffi::Buffer<ffi::S32> nb1, ffi::Buffer<ffi::S32> nb2,
                     ffi::Buffer<ffi::S32> rel0, ffi::Buffer<ffi::S32> rel1,
                     ffi::Buffer<ffi::S32> rel2, ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<ffi::F32> lse, float scale, bool with_rpb,
                     int64_t threads) {
  const ffi::Buffer<ffi::S32> nb[3] = {nb0, nb1, nb2};
  const ffi::Buffer<ffi::S32> rel[3] = {rel0, rel1, rel2};
  const auto rpb_dims = rpb.dimensions();
  const Geometry g = make_geometry(q.dimensions(), k.dimensions()[2], v.dimensions()[3], nb, rel,
                                   nullptr, &rpb_dims, scale, threads);
  if (auto e = check_geometry(g); e.failure()) return e;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* rp = rpb.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int64_t group = g.heads / g.heads_kv;
  const int64_t rpb_head = g.rpb_dims[0] * g.rpb_dims[1] * g.rpb_dims[2];
  // One item = one (image, token): every head of it, so the window is looked up once.
  parallel_for(g.batch * g.tokens, g.threads, [&](int64_t, int64_t begin, int64_t end) {
    Window w(g);
    std::vector<float> s(g.window);
    std::vector<const float*> rows(g.window);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.tokens, n = item % g.tokens;
      query_window(g, n, with_rpb, w);
      for (int64_t h = 0; h < g.heads; ++h) {
        const int64_t hk = h / group;
        const int64_t row = (b * g.tokens + n) * g.heads + h;
        const float* k_head = kp + b * g.tokens * g.heads_kv * g.head_dim + hk * g.head_dim;
        const float* v_head = vp + b * g.tokens * g.heads_kv * g.head_dim_v + hk * g.head_dim_v;
        float* o = op + row * g.head_dim_v;
        const float m = logits(g, w, qp + row * g.head_dim, k_head,
                               with_rpb ? rp + h * rpb_head : nullptr, s.data(), rows.data());
        if (!std::isfinite(m)) {
          // As the reference: a non-finite maximum makes the whole row non-finite.
          std::fill(o, o + g.head_dim_v, kNaN);
          lp[row] = kNaN;
          continue;
        }
        float l = 0.0f;
#pragma omp simd reduction(+ : l)
        for (int64_t j = 0; j < g.window; ++j) {
          s[j] = exp_nonpos(s[j] - m);
          l += s[j];
        }
        const float inv_l = 1.0f / l;
        for (int64_t j = 0; j < g.window; ++j) s[j] *= inv_l;
        window_rows(w, v_head, g.heads_kv * g.head_dim_v, rows.data());
        weighted_sum(s.data(), rows.data(), g.window, g.head_dim_v, o);
        lp[row] = m + std::log(l);
      }
    }
  });
  return ffi::Error::Success();
}

// Backward, pass 1 (per query): probabilities and logit gradients of every window slot, dq,
// and with RPB its gradient drpb [H, R0 * R1 * R2] (each slot's ds added to its column):
//   p  = exp(s - lse),  dp_j = do . v_j,  delta = do . o - dlse,  ds_j = p_j (dp_j - delta),
//   dq = scale * sum_j ds_j k_j.  Masked slots hold p = ds = 0 and add nothing.
ffi::Error NaBackwardQuery(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> rpb,
                           ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                           ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> dlse,
                           ffi::Buffer<ffi::S32> nb0, ffi::Buffer<ffi::S32> nb1,
                           ffi::Buffer<ffi::S32> nb2, ffi::Buffer<ffi::S32> rel0,
                           ffi::Buffer<ffi::S32> rel1, ffi::Buffer<ffi::S32> rel2,
                           ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> probs,
                           ffi::ResultBuffer<ffi::F32> dlogits,
                           ffi::ResultBuffer<ffi::F32> drpb, float scale, bool with_rpb,
                           int64_t threads) {
  const ffi::Buffer<ffi::S32> nb[3] = {nb0, nb1, nb2};
  const ffi::Buffer<ffi::S32> rel[3] = {rel0, rel1, rel2};
  const auto rpb_dims = rpb.dimensions();
  const Geometry g = make_geometry(q.dimensions(), k.dimensions()[2], v.dimensions()[3], nb, rel,
                                   nullptr, &rpb_dims, scale, threads);
  if (auto e = check_geometry(g); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *rp = rpb.typed_data(), *opp = out.typed_data(), *lp = lse.typed_data();
  const float *dop = dout.typed_data(), *dlp = dlse.typed_data();
  float *dqp = dq->typed_data(), *pp = probs->typed_data(), *dsp = dlogits->typed_data();
  const int64_t group = g.heads / g.heads_kv;
  const int64_t rpb_head = g.rpb_dims[0] * g.rpb_dims[1] * g.rpb_dims[2];
  const int64_t items = g.batch * g.tokens;
  const int64_t chunk = chunk_size(items);
  // Per-chunk partial RPB gradients, summed in chunk order below (deterministic).
  std::vector<float> partial(with_rpb ? ((items + chunk - 1) / chunk) * g.heads * rpb_head : 0);
  parallel_for(items, g.threads, [&](int64_t c, int64_t begin, int64_t end) {
    Window w(g);
    std::vector<float> s(g.window), dp(g.window);
    std::vector<const float*> rows(g.window), vrows(g.window);
    float* bias_grad = with_rpb ? partial.data() + c * g.heads * rpb_head : nullptr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.tokens, n = item % g.tokens;
      query_window(g, n, with_rpb, w);
      for (int64_t h = 0; h < g.heads; ++h) {
        const int64_t hk = h / group;
        const int64_t row = (b * g.tokens + n) * g.heads + h;
        const float* k_head = kp + b * g.tokens * g.heads_kv * g.head_dim + hk * g.head_dim;
        const float* v_head = vp + b * g.tokens * g.heads_kv * g.head_dim_v + hk * g.head_dim_v;
        float* db = with_rpb ? bias_grad + h * rpb_head : nullptr;
        const float* d_o = dop + row * g.head_dim_v;
        float* p = pp + row * g.window;
        float* ds = dsp + row * g.window;
        float* dq_row = dqp + row * g.head_dim;
        logits(g, w, qp + row * g.head_dim, k_head, with_rpb ? rp + h * rpb_head : nullptr,
               s.data(), rows.data());
        const float l = lp[row];
        if (!std::isfinite(l)) {
          // The forward's row was non-finite: so is every gradient it touches.
          for (int64_t j = 0; j < g.window; ++j) {
            p[j] = w.key[j] < 0 ? 0.0f : kNaN;
            ds[j] = p[j];
            if (db != nullptr && w.key[j] >= 0) db[w.bias[j]] += ds[j];
          }
          std::fill(dq_row, dq_row + g.head_dim, kNaN);
          continue;
        }
        const float delta = dot(d_o, opp + row * g.head_dim_v, g.head_dim_v) - dlp[row];
        window_rows(w, v_head, g.heads_kv * g.head_dim_v, vrows.data());
        row_dots(d_o, vrows.data(), g.window, g.head_dim_v, dp.data());
        for (int64_t j = 0; j < g.window; ++j) {
          if (w.key[j] < 0) {
            p[j] = ds[j] = 0.0f;
            continue;
          }
          // s - lse <= 0 up to rounding; NaN only for a NaN logit, which made lse NaN (above).
          p[j] = exp_nonpos(s[j] - l);
          ds[j] = p[j] * (dp[j] - delta);
          if (db != nullptr) db[w.bias[j]] += ds[j];
          dp[j] = g.scale * ds[j];  // dq's weights (dp is spent)
        }
        // `rows` still holds the key rows logits() gathered.
        weighted_sum(dp.data(), rows.data(), g.window, g.head_dim, dq_row);
      }
    }
  });
  float* dr = drpb->typed_data();
  const int64_t table = with_rpb ? g.heads * rpb_head : 0;
  std::fill(dr, dr + drpb->element_count(), 0.0f);
  for (size_t c = 0; c < partial.size(); c += table) {
    for (int64_t i = 0; i < table; ++i) dr[i] += partial[c + i];
  }
  return ffi::Error::Success();
}

// Backward, pass 2 (per key): dk = scale * sum ds q, dv = sum p do over the (query, slot) pairs
// whose slot holds the key (the inverse windows), summed over the query heads of its group.
ffi::Error NaBackwardKey(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> dout,
                         ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dlogits,
                         ffi::Buffer<ffi::S32> nb0, ffi::Buffer<ffi::S32> nb1,
                         ffi::Buffer<ffi::S32> nb2, ffi::Buffer<ffi::S32> inv0,
                         ffi::Buffer<ffi::S32> inv1, ffi::Buffer<ffi::S32> inv2,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                         float scale, int64_t threads) {
  const ffi::Buffer<ffi::S32> nb[3] = {nb0, nb1, nb2};
  const ffi::Buffer<ffi::S32> inv[3] = {inv0, inv1, inv2};
  const Geometry g = make_geometry(q.dimensions(), dk->dimensions()[2], dout.dimensions()[3], nb,
                                   nullptr, inv, nullptr, scale, threads);
  if (auto e = check_geometry(g); e.failure()) return e;
  const float *qp = q.typed_data(), *dop = dout.typed_data();
  const float *pp = probs.typed_data(), *dsp = dlogits.typed_data();
  float *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t group = g.heads / g.heads_kv;
  const Axis& a0 = g.axis[0];
  const Axis& a1 = g.axis[1];
  const Axis& a2 = g.axis[2];
  const int64_t pairs = a0.inv_width * a1.inv_width * a2.inv_width;
  parallel_for(g.batch * g.tokens, g.threads, [&](int64_t, int64_t begin, int64_t end) {
    // The (query token, slot) pairs whose slot holds the key; the part from the first two axes
    // is kept per row of keys (consecutive keys share it).
    std::vector<int64_t> row_n, row_j, qn(pairs), sj(pairs);
    int64_t cached_row = -1;
    // The (weight, row) pairs of one key head: ds with q rows for dk, p with do rows for dv.
    std::vector<float> wk(pairs * group), wv(pairs * group);
    std::vector<const float*> rq(pairs * group), rd(pairs * group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.tokens, m = item % g.tokens;
      const int64_t y2 = m % a2.length;
      const int64_t row = m / a2.length;
      if (row != cached_row) {
        const int64_t y1 = row % a1.length, y0 = row / a1.length;
        row_n.clear();
        row_j.clear();
        const int32_t* e0 = a0.inv + y0 * a0.inv_width * 2;
        for (int64_t u0 = 0; u0 < a0.inv_width && e0[2 * u0] >= 0; ++u0) {
          const int32_t* e1 = a1.inv + y1 * a1.inv_width * 2;
          for (int64_t u1 = 0; u1 < a1.inv_width && e1[2 * u1] >= 0; ++u1) {
            row_n.push_back((int64_t{e0[2 * u0]} * a1.length + e1[2 * u1]) * a2.length);
            row_j.push_back((int64_t{e0[2 * u0 + 1]} * a1.kernel + e1[2 * u1 + 1]) * a2.kernel);
          }
        }
        cached_row = row;
      }
      int64_t count = 0;
      const int32_t* e2 = a2.inv + y2 * a2.inv_width * 2;
      for (size_t r = 0; r < row_n.size(); ++r) {
        for (int64_t u2 = 0; u2 < a2.inv_width && e2[2 * u2] >= 0; ++u2, ++count) {
          qn[count] = row_n[r] + e2[2 * u2];
          sj[count] = row_j[r] + e2[2 * u2 + 1];
        }
      }
      for (int64_t hk = 0; hk < g.heads_kv; ++hk) {
        int64_t c = 0;
        for (int64_t u = 0; u < count; ++u) {
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h, ++c) {
            const int64_t qrow = (b * g.tokens + qn[u]) * g.heads + h;
            wk[c] = g.scale * dsp[qrow * g.window + sj[u]];
            wv[c] = pp[qrow * g.window + sj[u]];
            rq[c] = qp + qrow * g.head_dim;
            rd[c] = dop + qrow * g.head_dim_v;
          }
        }
        const int64_t krow = (b * g.tokens + m) * g.heads_kv + hk;
        weighted_sum(wk.data(), rq.data(), c, g.head_dim, dkp + krow * g.head_dim);
        weighted_sum(wv.data(), rd.data(), c, g.head_dim_v, dvp + krow * g.head_dim_v);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NatJaxNaForward, NaForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rpb
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb2
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<bool>("with_rpb")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NatJaxNaBackwardQuery, NaBackwardQuery,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rpb
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dlse
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb2
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rel2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // probs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dlogits
                                  .Ret<ffi::Buffer<ffi::F32>>()  // drpb
                                  .Attr<float>("scale")
                                  .Attr<bool>("with_rpb")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NatJaxNaBackwardKey, NaBackwardKey,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dlogits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // nb2
                                  .Arg<ffi::Buffer<ffi::S32>>()  // inv0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // inv1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // inv2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));
