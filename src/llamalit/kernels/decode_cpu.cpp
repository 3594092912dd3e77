// One-token Llama decoding on the CPU, fp32: the whole step (embedding to logits) in plain loops.
//
// Built and loaded by llamalit/kernels/__init__.py (g++ -O3 -march=native -fopenmp, called through
// ctypes). Every matrix W (rows x n) arrives "packed" by pack_rows() there: panels of PANEL rows,
// each stored input-major, (rows / PANEL, n, PANEL) zero-padded. A product then reads the weights in
// one contiguous stream and needs no horizontal sums; MKL's gemv on the same cold matrices reaches
// about half the bandwidth (docs/bench_generate.md).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t PANEL = 64;
// 16 floats: one zmm with AVX-512, two ymm with AVX2, four xmm with SSE; unaligned loads allowed.
typedef float vec __attribute__((vector_size(64), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }

// y[b, r] (+)= sum_i W[r, i] x[b, i] for the panels p0..p1 of the packed W.
void gemv_panels(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
                 bool accumulate, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t b = 0; b < batch; ++b) {  // rows after the first re-read the panel from L1/L2
      const float* w = wp + p * n * PANEL;
      const float* xb = x + b * n;
      vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, c0 = {}, c1 = {}, c2 = {}, c3 = {};
      int64_t i = 0;
      for (; i + 2 <= n; i += 2, w += 2 * PANEL) {  // two inputs a step: 8 independent sums
        const float x0 = xb[i], x1 = xb[i + 1];
        a0 += load(w) * x0; a1 += load(w + 16) * x0; a2 += load(w + 32) * x0; a3 += load(w + 48) * x0;
        c0 += load(w + 64) * x1; c1 += load(w + 80) * x1; c2 += load(w + 96) * x1; c3 += load(w + 112) * x1;
      }
      if (i < n) {
        const float x0 = xb[i];
        a0 += load(w) * x0; a1 += load(w + 16) * x0; a2 += load(w + 32) * x0; a3 += load(w + 48) * x0;
      }
      const vec sums[4] = {a0 + c0, a1 + c1, a2 + c2, a3 + c3};
      const float* s = reinterpret_cast<const float*>(sums);
      float* yb = y + b * rows + p * PANEL;
      const int64_t m = std::min(PANEL, rows - p * PANEL);
      for (int64_t k = 0; k < m; ++k) yb[k] = accumulate ? yb[k] + s[k] : s[k];
    }
  }
}

void gemv(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
          bool accumulate, int threads) {
  const int64_t panels = (rows + PANEL - 1) / PANEL;
  // Only large products (the output head of the small models) are split: a fork per layer product
  // costs more than it saves once another process holds a core.
  if (threads <= 1 || panels < 2 || n * rows < (1 << 20)) {
    gemv_panels(x, batch, n, wp, rows, y, accumulate, 0, panels);
    return;
  }
#ifdef _OPENMP
  // Dynamic teams: the runtime gives fewer threads while the machine is busy (libgomp: cores minus
  // the load average), since a thread waiting for a core costs a whole time slice per product.
  const int dynamic = omp_get_dynamic();
  omp_set_dynamic(1);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    gemv_panels(x, batch, n, wp, rows, y, accumulate, panels * t / nt, panels * (t + 1) / nt);
  }
  omp_set_dynamic(dynamic);
#else
  gemv_panels(x, batch, n, wp, rows, y, accumulate, 0, panels);
#endif
}

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float scale = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

}  // namespace

extern "C" {

// Shapes and pointers of one model; mirrored by _Model in llamalit/kernels/__init__.py.
struct LlkModel {
  int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, max_seq_len;
  float eps;
  const float* embedding;       // (vocab, dim), plain rows
  const float* const* layers;   // 6 per layer: attention_norm, wqkv, wo, ffn_norm, w13, w2 (packed)
  const float* norm;            // (dim,)
  const float* output;          // packed (vocab x dim)
  const float* cos;             // (max_seq_len, head_dim / 2)
  const float* sin;
};

int llk_abi_version() { return 1; }

// y = W x (or y += W x) for x (batch, n) and a packed W with `rows` rows.
void llk_gemv(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
              int accumulate, int threads) {
  gemv(x, batch, n, wp, rows, y, accumulate != 0, threads);
}

// Logits (batch, vocab) of tokens `tok` (batch,) at position `pos`; writes k and v of `pos` into
// the caches k[l], v[l], each (batch, n_kv_heads, max_seq_len, head_dim) contiguous.
void llk_step(const LlkModel* m, const int64_t* tok, int64_t batch, int64_t pos, float* const* k_cache,
              float* const* v_cache, float* logits, int threads) {
  const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads;
  const int64_t n_qkv = (nh + 2 * nkv) * hd, half = hd / 2, seq = m->max_seq_len;
  const int64_t group = nh / nkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  std::vector<float> x(batch * dim), xn(batch * dim), qkv(batch * n_qkv), att(batch * nh * hd),
      h13(batch * 2 * m->hidden), g(batch * m->hidden), scores(pos + 1);
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(m->embedding + tok[b] * dim, dim, x.data() + b * dim);
  const float* cos = m->cos + pos * half;
  const float* sin = m->sin + pos * half;
  for (int64_t l = 0; l < m->n_layers; ++l) {
    const float* const* w = m->layers + 6 * l;
    for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], w[0], dim, m->eps, &xn[b * dim]);
    gemv(xn.data(), batch, dim, w[1], n_qkv, qkv.data(), false, threads);
    for (int64_t b = 0; b < batch; ++b) {
      float* q = &qkv[b * n_qkv];
      for (int64_t h = 0; h < nh + nkv; ++h) {  // RoPE on adjacent pairs of q and k heads
        float* v = q + h * hd;
        for (int64_t j = 0; j < half; ++j) {
          const float re = v[2 * j], im = v[2 * j + 1];
          v[2 * j] = re * cos[j] - im * sin[j];
          v[2 * j + 1] = re * sin[j] + im * cos[j];
        }
      }
      float* kc = k_cache[l] + b * nkv * seq * hd;
      float* vc = v_cache[l] + b * nkv * seq * hd;
      for (int64_t h = 0; h < nkv; ++h) {
        std::copy_n(q + (nh + h) * hd, hd, kc + (h * seq + pos) * hd);
        std::copy_n(q + (nh + nkv + h) * hd, hd, vc + (h * seq + pos) * hd);
      }
      for (int64_t h = 0; h < nh; ++h) {  // softmax(q k^T / sqrt(hd)) v over positions 0..pos
        const float* qh = q + h * hd;
        const float* kh = kc + (h / group) * seq * hd;
        const float* vh = vc + (h / group) * seq * hd;
        float top = -INFINITY;
        for (int64_t t = 0; t <= pos; ++t) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < hd; ++i) s += qh[i] * kh[t * hd + i];
          scores[t] = s * scale;
          top = std::max(top, scores[t]);
        }
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t <= pos; ++t) total += (scores[t] = std::exp(scores[t] - top));
        float* out = &att[(b * nh + h) * hd];
        std::fill_n(out, hd, 0.f);
        for (int64_t t = 0; t <= pos; ++t) {
          const float p = scores[t] / total;
          for (int64_t i = 0; i < hd; ++i) out[i] += p * vh[t * hd + i];
        }
      }
    }
    gemv(att.data(), batch, nh * hd, w[2], dim, x.data(), true, threads);
    for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], w[3], dim, m->eps, &xn[b * dim]);
    const int64_t hidden = m->hidden;
    gemv(xn.data(), batch, dim, w[4], 2 * hidden, h13.data(), false, threads);
    for (int64_t b = 0; b < batch; ++b)
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        const float h1 = h13[b * 2 * hidden + i], h3 = h13[b * 2 * hidden + hidden + i];
        g[b * hidden + i] = h1 / (1.f + std::exp(-h1)) * h3;  // silu(w1 x) * w3 x
      }
    gemv(g.data(), batch, hidden, w[5], dim, x.data(), true, threads);
  }
  for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], m->norm, dim, m->eps, &xn[b * dim]);
  gemv(xn.data(), batch, dim, m->output, m->vocab, logits, false, threads);
}

}  // extern "C"
