// One-token Llama decoding on the CPU, fp32: the whole step (embedding to logits) in plain loops.
//
// Built and loaded by llamalit/kernels/__init__.py (g++ -O3 -march=native -fopenmp, called through
// ctypes). Every matrix W (rows x n) arrives "packed" by pack_rows() there: panels of PANEL rows,
// each stored input-major, (rows / PANEL, n, PANEL) zero-padded. A product then reads the weights in
// one contiguous stream and needs no horizontal sums; MKL's gemv on the same cold matrices reaches
// about half the bandwidth (docs/bench_generate.md). The packed matrices sit in one arena on 2 MiB
// pages (llk_advise_huge), in the order the step reads them; softmax and SiLU use a vector exp.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" {
// Shapes and pointers of one model; mirrored by _Model in kernels/__init__.py.
struct LlkModel {
  int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, max_seq_len;
  float eps;
  const float* embedding;       // (vocab, dim), plain rows
  const float* const* layers;   // 6 per layer: attention_norm, wqkv, wo, ffn_norm, w13, w2 (packed)
  const float* norm;            // (dim,)
  const float* output;          // packed (vocab x dim)
  const float* cos;             // (max_seq_len, head_dim / 2)
  const float* sin;
  int64_t stream_output;        // 1: read the output head with non-temporal prefetches
  const int8_t* output_q;       // the head's int8 copy, packed like `output` (greedy screen); or null
  const float* output_scale;    // (vocab,): its per-row scales
};

}  // extern "C"

namespace {

constexpr int64_t PANEL = 64;
// 16 floats: one zmm with AVX-512, two ymm with AVX2, four xmm with SSE; unaligned loads allowed.
typedef float vec __attribute__((vector_size(64), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }

// Non-temporal prefetch distance (floats) for a matrix read once per token and larger than the
// cache (the output head): its lines then bypass most of the cache hierarchy and the ~25 MB of
// layer weights stay in L3 between tokens.
constexpr int64_t NTA_AHEAD = 512;

constexpr int64_t STRIP = 16;  // rows of one vector: the unit the threads split a product into

// Accumulator vectors a product keeps in registers: 16 of the 32 zmm with AVX-512; with AVX2 (two ymm a
// vec, 16 ymm in all) 4.
#if defined(__AVX512F__)
constexpr int ACC_VECS = 16;
#else
constexpr int ACC_VECS = 4;
#endif

// The output head's int8 copy (greedy decoding): the same panel layout as the fp32 head, one byte a
// weight, and one scale per row (w ~ scale * q, |q| <= 127). y[b, r] = scale[r] * sum_i q[r, i] x[b, i],
// accumulated in fp32: a screen for the argmax (llk_step's greedy mode) reading a quarter of the bytes.
// 16 int8 -> 16 floats (GCC scalarises __builtin_convertvector across sizes, so by intrinsics where present)
inline vec load_q(const int8_t* p) {
#if defined(__AVX512F__)
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
  vec out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  float f[16];
  for (int k = 0; k < 16; ++k) f[k] = p[k];
  return load(f);
#endif
}

inline vec load_w(const float* p) { return load(p); }
inline vec load_w(const int8_t* p) { return load_q(p); }

// Rows [row0, row0 + 16 C) of one packed panel `w` (n x PANEL) times the RB batch rows b0..b0 + RB of x, each
// weight vector loaded once for all RB of them. fp32 W: y[b, r] (+)= sum_i W[r, i] x[b, i]; int8 Q (`scale`
// non-null): y[b, r] = scale[r] * sum_i Q[r, i] x[b, i]. Every batch row sums in the same order whatever RB
// is, so a row's result does not depend on the batch around it.
template <typename W, bool NTA, int C, int RB>
void product_rows(const float* x, int64_t n, const W* w0, const float* scale, int64_t rows, float* y,
                  bool accumulate, int64_t row0, int64_t b0) {
  const float* xb[RB];
  for (int r = 0; r < RB; ++r) xb[r] = x + (b0 + r) * n;
  vec a[RB][C] = {}, c[RB][C] = {};
  const W* w = w0;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2, w += 2 * PANEL) {  // two inputs a step: 2 C independent sums a row
    if (NTA && b0 == 0)  // each 64-byte line of the next two inputs' weights, NTA_AHEAD floats' bytes ahead
      for (int64_t off = 0; off < 2 * PANEL * static_cast<int64_t>(sizeof(W)); off += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(w) + NTA_AHEAD * sizeof(float) + off, 0, 0);
    for (int k = 0; k < C; ++k) {
      const vec wk = load_w(w + 16 * k);
      for (int r = 0; r < RB; ++r) a[r][k] += wk * xb[r][i];
    }
    for (int k = 0; k < C; ++k) {
      const vec wk = load_w(w + PANEL + 16 * k);
      for (int r = 0; r < RB; ++r) c[r][k] += wk * xb[r][i + 1];
    }
  }
  if (i < n)
    for (int k = 0; k < C; ++k) {
      const vec wk = load_w(w + 16 * k);
      for (int r = 0; r < RB; ++r) a[r][k] += wk * xb[r][i];
    }
  const int64_t m = std::min<int64_t>(16 * C, rows - row0);
  for (int r = 0; r < RB; ++r) {
    vec sums[C];
    for (int k = 0; k < C; ++k) sums[k] = a[r][k] + c[r][k];
    const float* s = reinterpret_cast<const float*>(sums);
    float* yb = y + (b0 + r) * rows + row0;
    if (scale != nullptr)
      for (int64_t k = 0; k < m; ++k) yb[k] = s[k] * scale[row0 + k];
    else
      for (int64_t k = 0; k < m; ++k) yb[k] = accumulate ? yb[k] + s[k] : s[k];
  }
}

// One strip of C vectors (16 C rows) for every batch row, in blocks that fill ACC_VECS accumulators.
template <typename W, bool NTA, int C>
void product_strip(const float* x, int64_t batch, int64_t n, const W* w0, const float* scale, int64_t rows,
                   float* y, bool accumulate, int64_t row0) {
  constexpr int RB = ACC_VECS / (2 * C) > 1 ? ACC_VECS / (2 * C) : 1;
  int64_t b = 0;
  for (; b + RB <= batch; b += RB) product_rows<W, NTA, C, RB>(x, n, w0, scale, rows, y, accumulate, row0, b);
  for (; b < batch; ++b) product_rows<W, NTA, C, 1>(x, n, w0, scale, rows, y, accumulate, row0, b);
}

// The strips s0..s1 (16 rows each) of a packed W: whole panels at full width, partial ones narrower.
template <typename W, bool NTA>
void product_strips(const float* x, int64_t batch, int64_t n, const W* wp, const float* scale, int64_t rows,
                    float* y, bool accumulate, int64_t s0, int64_t s1) {
  constexpr int64_t per = PANEL / STRIP;
  for (int64_t s = s0; s < s1;) {
    const int64_t p = s / per, c0 = s - p * per, c1 = std::min(s1 - p * per, per);
    const W* w = wp + p * n * PANEL + c0 * STRIP;
    const int64_t row0 = p * PANEL + c0 * STRIP;
    switch (c1 - c0) {
      case 4: product_strip<W, NTA, 4>(x, batch, n, w, scale, rows, y, accumulate, row0); break;
      case 3: product_strip<W, NTA, 3>(x, batch, n, w, scale, rows, y, accumulate, row0); break;
      case 2: product_strip<W, NTA, 2>(x, batch, n, w, scale, rows, y, accumulate, row0); break;
      default: product_strip<W, NTA, 1>(x, batch, n, w, scale, rows, y, accumulate, row0); break;
    }
    s = p * per + c1;
  }
}

// This thread's share (t of nt) of y (+)= W x: called by every thread of a team, no barrier.
void gemv_part(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
               bool accumulate, int t, int nt, bool nta = false) {
  const int64_t strips = (rows + STRIP - 1) / STRIP;
  const int64_t s0 = strips * t / nt, s1 = strips * (t + 1) / nt;
  (nta ? product_strips<float, true> : product_strips<float, false>)(x, batch, n, wp, nullptr, rows, y,
                                                                      accumulate, s0, s1);
}

// This thread's share (t of nt) of the screen y = scale * (Q x), split in 16-row strips like gemv_part.
template <bool NTA>
void screen_part(const float* x, int64_t batch, int64_t n, const int8_t* wq, const float* scale, int64_t rows,
                 float* y, int t, int nt) {
  const int64_t strips = (rows + STRIP - 1) / STRIP;
  product_strips<int8_t, NTA>(x, batch, n, wq, scale, rows, y, false, strips * t / nt, strips * (t + 1) / nt);
}

// Team size for `threads` asked: OpenMP's dynamic adjustment gives fewer while the machine is busy
// (libgomp: cores minus the load average), since a thread waiting for a core stalls every barrier.
int team_size(int threads) {
#ifdef _OPENMP
  return threads > 1 ? threads : 1;
#else
  (void)threads;
  return 1;
#endif
}

void gemv(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
          bool accumulate, int threads) {
#ifdef _OPENMP
  const int dynamic = omp_get_dynamic();
  omp_set_dynamic(1);
#pragma omp parallel num_threads(team_size(threads)) if (threads > 1)
  gemv_part(x, batch, n, wp, rows, y, accumulate, omp_get_thread_num(), omp_get_num_threads());
  omp_set_dynamic(dynamic);
#else
  gemv_part(x, batch, n, wp, rows, y, accumulate, 0, 1);
#endif
}

// torch.argmax's answer on y[0..n): the first NaN if any, else the first maximum.
int64_t argmax(const float* y, int64_t n) {
  int64_t best = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (y[r] != y[r]) return r;
    if (y[r] > y[best]) best = r;
  }
  return best;
}

// The greedy token of one row, given its screen `approx` (vocab,; overwritten): exactly the argmax of the
// fp32 logits (bit for bit those of llk_step's logits mode), with fp32 weights read only for the rows the
// screen cannot rule out. For each row r, |logit_r - approx_r| <= B_r = scale_r |x|_1 c: rounding w to
// scale_r q costs at most scale_r / 2 per unit of |x|_1 (checked for every weight when the copy is made,
// with |w| <= 127 scale_r), and fp32 rounding in either sum at most n u 127 scale_r |x|_1 (u = 2^-24),
// folded into c twice over; the factor 1 + 2^-10 covers the float arithmetic of the test itself. The true argmax r* then has
// approx_r* + B_r* >= max_j (approx_j - B_j) =: floor, so only the rows passing that test are recomputed, in
// their 16-row strips with the full head's own code. Anything unusual (x not finite, a NaN, more candidate
// strips than `limit`) computes the whole head in fp32 instead. Returns the id; *exact_rows the rows read.
int64_t greedy_row(const LlkModel& m, const float* xb, float* approx, int64_t* exact_rows) {
  const int64_t n = m.dim, vocab = m.vocab, per = PANEL / STRIP;
  double l1 = 0.0;
  for (int64_t i = 0; i < n; ++i) l1 += std::fabs(static_cast<double>(xb[i]));
  const double c = 0.5 + 512.0 * static_cast<double>(n + 4) / 16777216.0;
  const float lc = static_cast<float>(l1 * c * (1.0 + 1.0 / 1024));  // the slack covers the float ops below
  if (std::isfinite(lc)) {
    float floor = -INFINITY;
    bool finite = true;  // an overflow in the screen voids its bound
    for (int64_t r = 0; r < vocab; ++r) {
      floor = std::max(floor, approx[r] - m.output_scale[r] * lc);
      finite &= std::fabs(approx[r]) <= FLT_MAX;
    }
    const int64_t limit = vocab / STRIP / 16 + 4;  // past this, the whole head is about as cheap
    std::vector<int64_t> strips;
    for (int64_t r = 0; r < vocab && static_cast<int64_t>(strips.size()) <= limit; ++r)
      if (approx[r] + m.output_scale[r] * lc >= floor && (strips.empty() || strips.back() != r / STRIP))
        strips.push_back(r / STRIP);
    int64_t best = -1;
    float top = -INFINITY;
    if (finite && std::isfinite(floor) && static_cast<int64_t>(strips.size()) <= limit) {
      for (int64_t s : strips) {
        const int64_t p = s / per, row0 = s * STRIP, m16 = std::min<int64_t>(STRIP, vocab - row0);
        bool pass[STRIP];
        for (int64_t k = 0; k < m16; ++k) pass[k] = approx[row0 + k] + m.output_scale[row0 + k] * lc >= floor;
        product_strip<float, false, 1>(xb, 1, n, m.output + p * n * PANEL + (s - p * per) * STRIP, nullptr,
                                       vocab, approx, false, row0);
        for (int64_t k = 0; k < m16 && best != -2; ++k) {
          const float v = approx[row0 + k];
          if (v != v) best = -2;
          else if (pass[k] && (best < 0 || v > top)) best = row0 + k, top = v;
        }
        if (best == -2) break;
      }
      *exact_rows += static_cast<int64_t>(strips.size()) * STRIP;
      if (best >= 0) return best;
    }
  }
  product_strips<float, false>(xb, 1, n, m.output, nullptr, vocab, approx, false, 0,
                               (vocab + STRIP - 1) / STRIP);
  *exact_rows += vocab;
  return argmax(approx, vocab);
}

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float scale = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

typedef int32_t ivec __attribute__((vector_size(64)));

// exp of 16 floats (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1-2 ulp, like
// the SLEEF exp PyTorch uses). Results below FLT_MIN are flushed to 0 (so -inf gives 0), past
// FLT_MAX give inf, NaN stays NaN. The scalar std::exp does not vectorise without -ffast-math
// (SiLU and the attention weights use it every token).
inline vec vexp(vec x) {
  constexpr float lo = -87.336544f, hi = 88.722839f;  // ln FLT_MIN, ln FLT_MAX
  vec xc = x < lo ? vec{} + lo : x;  // vec{} + c: a splat of c
  xc = xc > hi ? vec{} + hi : xc;
  const vec magic = vec{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const vec n = (xc * 1.44269504f + magic) - magic;
  const vec r = xc - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 split in two parts
  vec y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const ivec ni = __builtin_convertvector(n, ivec), half = ni >> 1;  // 2^n = 2^half 2^(n - half):
  const vec e = y * (vec)((half + 127) << 23) * (vec)((ni - half + 127) << 23);  // both normal
  const vec inf = vec{} + INFINITY;
  return x < lo ? vec{} : x > hi ? inf : x != x ? x : e;
}

inline float hsum(vec s) {
  float t[16];
  std::memcpy(t, &s, sizeof t);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// In place: scores[0..n) -> exp(scores - max); returns their sum. scores has room for n rounded
// up to 16 (the tail is padded with -inf, whose exp is 0).
float softmax_numerators(float* scores, int64_t n, float top) {
  const int64_t padded = (n + 15) / 16 * 16;
  std::fill(scores + n, scores + padded, -INFINITY);
  vec total = {};
  for (int64_t t = 0; t < padded; t += 16) {
    const vec e = vexp(load(scores + t) - top);
    std::memcpy(scores + t, &e, sizeof e);
    total += e;
  }
  return hsum(total);
}

// One query head over keys/values k, v (n, 16 * C) contiguous: out = softmax(q k^T * scale) v.
template <int C>
void attend_head(const float* q, const float* k, const float* v, int64_t n, float scale, float* scores,
                 float* out) {
  constexpr int64_t hd = 16 * C;
  vec qv[C], acc[C];
  for (int c = 0; c < C; ++c) qv[c] = load(q + 16 * c) * scale, acc[c] = vec{};
  float top = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    vec s = qv[0] * load(k + t * hd);
    for (int c = 1; c < C; ++c) s += qv[c] * load(k + t * hd + 16 * c);
    scores[t] = hsum(s);
    top = std::max(top, scores[t]);
  }
  const float inv = 1.f / softmax_numerators(scores, n, top);
  for (int64_t t = 0; t < n; ++t)
    for (int c = 0; c < C; ++c) acc[c] += load(v + t * hd + 16 * c) * scores[t];
  for (int c = 0; c < C; ++c) {
    const vec o = acc[c] * inv;
    std::memcpy(out + 16 * c, &o, sizeof o);
  }
}

// Any head size: the same with plain loops.
void attend_head_any(const float* q, const float* k, const float* v, int64_t n, int64_t hd, float scale,
                     float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < hd; ++i) s += q[i] * k[t * hd + i];
    scores[t] = s * scale;
    top = std::max(top, scores[t]);
  }
  const float inv = 1.f / softmax_numerators(scores, n, top);
  std::fill_n(out, hd, 0.f);
  for (int64_t t = 0; t < n; ++t)
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += scores[t] * v[t * hd + i];
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

void attend(const float* q, const float* k, const float* v, int64_t n, int64_t hd, float scale, float* scores,
            float* out) {
  switch (hd) {
    case 16: return attend_head<1>(q, k, v, n, scale, scores, out);
    case 32: return attend_head<2>(q, k, v, n, scale, scores, out);
    case 48: return attend_head<3>(q, k, v, n, scale, scores, out);
    case 64: return attend_head<4>(q, k, v, n, scale, scores, out);
    case 96: return attend_head<6>(q, k, v, n, scale, scores, out);
    case 128: return attend_head<8>(q, k, v, n, scale, scores, out);
    default: return attend_head_any(q, k, v, n, hd, scale, scores, out);
  }
}

constexpr int QB = 4;  // queries a block in llk_attention: each key and value load serves four of them
typedef float vec8 __attribute__((vector_size(32), aligned(4)));  // 8 floats: one head of 8 dims

// Scores of QB queries q[r] (hd floats each) against keys [0, n) held transposed in kt (hd rows of lp floats, lp
// a multiple of 16 >= n, zero past the keys): s[r * lp + j] = scale * q_r . k_j, 16 keys a vector product.
void block_scores(const float* const* q, const float* kt, int64_t lp, int64_t hd, int64_t n, float scale,
                  float* s) {
  for (int64_t j = 0; j < n; j += 16) {
    vec a[QB] = {};
    for (int64_t d = 0; d < hd; ++d) {
      const vec kv = load(kt + d * lp + j);
      for (int r = 0; r < QB; ++r) a[r] += kv * q[r][d];
    }
    for (int r = 0; r < QB; ++r) {
      const vec o = a[r] * scale;
      std::memcpy(s + r * lp + j, &o, sizeof o);
    }
  }
}

// out[r] (hd,) = inv[r] * sum_j p[r * lp + j] v_j for r < nq, values v (n rows, `stride` floats apart): the
// head held in C vectors of W floats (L), QB x C sums in registers.
template <typename L, int64_t W, int64_t C>
void block_values_t(const float* p, int64_t lp, const float* v, int64_t stride, int64_t n, const float* inv,
                    float* const* out, int nq) {
  L acc[QB][C] = {};
  for (int64_t j = 0; j < n; ++j) {
    L vv[C];
    for (int64_t c = 0; c < C; ++c) std::memcpy(&vv[c], v + j * stride + c * W, sizeof(L));
    for (int r = 0; r < QB; ++r) {
      const float pj = p[r * lp + j];
      for (int64_t c = 0; c < C; ++c) acc[r][c] += vv[c] * pj;
    }
  }
  for (int r = 0; r < nq; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const L o = acc[r][c] * inv[r];
      std::memcpy(out[r] + c * W, &o, sizeof o);
    }
}

void block_values(const float* p, int64_t lp, const float* v, int64_t stride, int64_t n, int64_t hd,
                  const float* inv, float* const* out, int nq) {
  switch (hd) {
    case 8: return block_values_t<vec8, 8, 1>(p, lp, v, stride, n, inv, out, nq);
    case 16: return block_values_t<vec, 16, 1>(p, lp, v, stride, n, inv, out, nq);
    case 32: return block_values_t<vec, 16, 2>(p, lp, v, stride, n, inv, out, nq);
    case 48: return block_values_t<vec, 16, 3>(p, lp, v, stride, n, inv, out, nq);
    case 64: return block_values_t<vec, 16, 4>(p, lp, v, stride, n, inv, out, nq);
    default:  // any other head size: plain loops
      for (int r = 0; r < nq; ++r) {
        float* o = out[r];
        std::fill_n(o, hd, 0.f);
        for (int64_t j = 0; j < n; ++j)
#pragma omp simd
          for (int64_t i = 0; i < hd; ++i) o[i] += p[r * lp + j] * v[j * stride + i];
        for (int64_t i = 0; i < hd; ++i) o[i] *= inv[r];
      }
  }
}

// g = silu(h1) * h3 = h1 / (1 + exp(-h1)) * h3
void swiglu(const float* h1, const float* h3, int64_t n, float* g) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec a = load(h1 + i);
    const vec o = a / (1.f + vexp(-a)) * load(h3 + i);
    std::memcpy(g + i, &o, sizeof o);
  }
  for (; i < n; ++i) g[i] = h1[i] / (1.f + std::exp(-h1[i])) * h3[i];
}

}  // namespace

extern "C" {

int llk_abi_version() { return 9; }

// Ask for transparent huge pages over [p, p + bytes) (p 2 MiB aligned, not yet touched): 4 KiB pages
// cost a TLB miss and a restart of the hardware prefetcher every 4 KiB of a weight stream. 0 on success; -1 where
// not supported or refused (THP "never"): the weights then stay on small pages.
int llk_advise_huge(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return madvise(p, static_cast<size_t>(bytes), MADV_HUGEPAGE) == 0 ? 0 : -1;
#else
  (void)p; (void)bytes;
  return -1;
#endif
}

// Attention of many queries, fp32: out (batch, t, n_heads, hd) contiguous = softmax(q k^T * scale + mask) v
// for q (batch, t, n_heads, hd) and k, v (batch, n_kv_heads, len, hd), each given by its strides in floats
// (head dims contiguous); query head h reads kv head h / (n_heads / n_kv_heads). Query i of row b sees the
// keys j with mask[b * msb + i * mst + j] != 0 when `mask` is given (msb 0: one mask for all rows), else
// j <= i + causal_offset. A query that sees no key gets zeros. Made for small heads (SDPA's CPU kernel spends
// most of its time per (row, head) block there): the keys of a (row, kv head) are transposed once, so a
// query's scores take hd vector products per 16 keys.
void llk_attention(const float* q, int64_t qsb, int64_t qst, int64_t qsh, const float* k, int64_t ksb,
                   int64_t ksh, int64_t kst, const float* v, int64_t vsb, int64_t vsh, int64_t vst,
                   const uint8_t* mask, int64_t msb, int64_t mst, int64_t causal_offset, float* out,
                   int64_t batch, int64_t t, int64_t n_heads, int64_t n_kv_heads, int64_t len, int64_t hd,
                   float scale, int threads) {
  const int64_t group = n_heads / n_kv_heads, lp = (len + 15) / 16 * 16;
#ifdef _OPENMP
#pragma omp parallel num_threads(team_size(threads)) if (threads > 1)
#endif
  {
    std::vector<float> kt(hd * lp, 0.f), s(QB * lp);
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
    for (int64_t job = 0; job < batch * n_kv_heads; ++job) {
      const int64_t b = job / n_kv_heads, kh = job % n_kv_heads;
      const float* kb = k + b * ksb + kh * ksh;
      const float* vb = v + b * vsb + kh * vsh;
      for (int64_t j = 0; j < len; ++j)
        for (int64_t i = 0; i < hd; ++i) kt[i * lp + j] = kb[j * kst + i];
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
        for (int64_t i0 = 0; i0 < t; i0 += QB) {  // QB queries at once; past t the last one again, unwritten
          const int nq = static_cast<int>(std::min<int64_t>(QB, t - i0));
          const float* qs[QB];
          float* os[QB];
          const uint8_t* ms[QB];
          int64_t ns[QB], n = 0;
          for (int r = 0; r < QB; ++r) {
            const int64_t i = i0 + std::min(r, nq - 1);
            qs[r] = q + b * qsb + i * qst + h * qsh;
            os[r] = out + ((b * t + i) * n_heads + h) * hd;
            ms[r] = mask != nullptr ? mask + b * msb + i * mst : nullptr;
            ns[r] = std::min(len, std::max<int64_t>(0, i + causal_offset + 1));
            if (ms[r] != nullptr)  // keys up to the last visible one
              for (ns[r] = len; ns[r] > 0 && ms[r][ns[r] - 1] == 0;) --ns[r];
            n = std::max(n, ns[r]);
          }
          float inv[QB] = {};
          if (n > 0) {
            block_scores(qs, kt.data(), lp, hd, n, scale, s.data());
            for (int r = 0; r < nq; ++r) {
              float* sc = s.data() + r * lp;
              const uint8_t* m = ms[r];
              const int64_t nr = ns[r];
              if (m != nullptr) {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) sc[j] = j < nr && m[j] != 0 ? sc[j] : -INFINITY;
              } else {
                std::fill(sc + nr, sc + n, -INFINITY);
              }
              float top = -INFINITY;
#pragma omp simd reduction(max : top)
              for (int64_t j = 0; j < n; ++j) top = std::max(top, sc[j]);
              if (top == -INFINITY) {  // no visible key: zeros
                std::fill_n(sc, n, 0.f);
                continue;
              }
              inv[r] = 1.f / softmax_numerators(sc, n, top);
            }
            block_values(s.data(), lp, vb, vst, n, hd, inv, os, nq);
          } else {
            for (int r = 0; r < nq; ++r) std::fill_n(os[r], hd, 0.f);
          }
        }
    }
  }
}

// Scoring's last step, fp32, one row of logits (rows, vocab) at a time: logp[r] = logits[r, target[r]] -
// logsumexp(logits[r]) and hit[r] = 1 when target[r] is the row's first maximum (torch.argmax's pick), without
// writing log-softmax's (rows, vocab) output. A row holding NaN gets NaN and hit 0.
void llk_pick_logprobs(const float* logits, int64_t rows, int64_t vocab, const int64_t* target, float* logp,
                       uint8_t* hit, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(team_size(threads)) if (threads > 1 && rows > 64) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits + r * vocab;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < vocab; ++j) top = std::max(top, x[j]);
    int64_t first = 0;
    while (first < vocab && !(x[first] == top)) ++first;
    vec total = {};
    int64_t j = 0;
    for (; j + 16 <= vocab; j += 16) total += vexp(load(x + j) - top);
    float sum = hsum(total);
    for (; j < vocab; ++j) sum += std::exp(x[j] - top);
    const float lse = top + std::log(sum);
    logp[r] = x[target[r]] - lse;
    hit[r] = lse == lse && first == target[r] ? 1 : 0;
  }
}

// out = exp(x) elementwise with the kernel's vector exp (for tests).
void llk_exp(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec e = vexp(load(x + i));
    std::memcpy(out + i, &e, sizeof e);
  }
  if (i < n) {
    float t[16] = {};
    std::copy(x + i, x + n, t);
    const vec e = vexp(load(t));
    std::memcpy(out + i, &e, (n - i) * sizeof(float));
  }
}

// y = W x (or y += W x) for x (batch, n) and a packed W with `rows` rows.
void llk_gemv(const float* x, int64_t batch, int64_t n, const float* wp, int64_t rows, float* y,
              int accumulate, int threads) {
  gemv(x, batch, n, wp, rows, y, accumulate != 0, threads);
}

// Logits (batch, vocab) of tokens `tok` (batch,) at position `pos`; writes k and v of `pos` into
// the caches k[l], v[l], each (batch, n_kv_heads, max_seq_len, head_dim) contiguous.
// Left-padded rows: `rope_pos` (batch,) gives each row's RoPE position (null: `pos` for all) and
// `first_key` (batch,) the first cache column a row attends to (null: 0), so row b sees columns
// first_key[b]..pos.
// Rows at positions of their own (continuous batching): `row_pos` (batch,) non-null gives row b's cache
// column, which is also its RoPE position unless `rope_pos` is given; row b then sees first_key[b]..row_pos[b],
// and `pos` must be at least every row_pos[b] (it sizes the score buffer).
// With `greedy` (batch,) non-null: writes there the argmax of each row's logits instead (exactly those of
// the logits mode; screened by the int8 head when the model has one: greedy_row), `logits` is scratch,
// and the return value is the number of fp32 head rows read (0 in logits mode). `greedy` may be `tok`.
//
// One team of threads runs the whole token: each product is split by rows (16-row strips) over the
// team, attention by (row, kv head); norms and SwiGLU are recomputed by every thread into its own
// buffer (a few hundred floats) instead of a barrier. Five barriers a layer.
int64_t llk_step(const LlkModel* m, const int64_t* tok, int64_t batch, int64_t pos, float* const* k_cache,
                 float* const* v_cache, float* logits, int threads, int64_t* greedy, const int64_t* rope_pos,
                 const int64_t* first_key, const int64_t* row_pos) {
  const int64_t dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads;
  const int64_t n_qkv = (nh + 2 * nkv) * hd, half = hd / 2, seq = m->max_seq_len, hidden = m->hidden;
  const int64_t group = nh / nkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  std::vector<float> x(batch * dim), qkv(batch * n_qkv), att(batch * nh * hd), h13(batch * 2 * hidden),
      xfin(batch * dim);
  const bool screen = greedy != nullptr && m->output_q != nullptr;
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(m->embedding + tok[b] * dim, dim, x.data() + b * dim);
#ifdef _OPENMP
  const int dynamic = omp_get_dynamic();
  omp_set_dynamic(1);
#pragma omp parallel num_threads(team_size(threads)) if (threads > 1)
#endif
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#define LLK_BARRIER _Pragma("omp barrier")
#else
    const int t = 0, nt = 1;
#define LLK_BARRIER
#endif
    std::vector<float> xn(batch * dim), g(batch * hidden), scores((pos + 16) / 16 * 16);
    for (int64_t l = 0; l < m->n_layers; ++l) {
      const float* const* w = m->layers + 6 * l;
      for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], w[0], dim, m->eps, &xn[b * dim]);
      gemv_part(xn.data(), batch, dim, w[1], n_qkv, qkv.data(), false, t, nt);
      LLK_BARRIER
      for (int64_t job = t; job < batch * nkv; job += nt) {  // one kv head and its query heads
        const int64_t b = job / nkv, kh = job % nkv;
        float* q = &qkv[b * n_qkv];
        const int64_t col = row_pos != nullptr ? row_pos[b] : pos;
        const int64_t rp = rope_pos != nullptr ? rope_pos[b] : col, first = first_key != nullptr ? first_key[b] : 0;
        const float* cos = m->cos + rp * half;
        const float* sin = m->sin + rp * half;
        for (int64_t h = -1; h < group; ++h) {  // RoPE on adjacent pairs: the k head, then its q heads
          float* v = h < 0 ? q + (nh + kh) * hd : q + (kh * group + h) * hd;
          for (int64_t j = 0; j < half; ++j) {
            const float re = v[2 * j], im = v[2 * j + 1];
            v[2 * j] = re * cos[j] - im * sin[j];
            v[2 * j + 1] = re * sin[j] + im * cos[j];
          }
        }
        float* kc = k_cache[l] + (b * nkv + kh) * seq * hd;
        float* vc = v_cache[l] + (b * nkv + kh) * seq * hd;
        std::copy_n(q + (nh + kh) * hd, hd, kc + col * hd);
        std::copy_n(q + (nh + nkv + kh) * hd, hd, vc + col * hd);
        for (int64_t h = kh * group; h < (kh + 1) * group; ++h)  // softmax(q k^T / sqrt(hd)) v, first..col
          attend(q + h * hd, kc + first * hd, vc + first * hd, col + 1 - first, hd, scale, scores.data(),
                 &att[(b * nh + h) * hd]);
      }
      LLK_BARRIER
      gemv_part(att.data(), batch, nh * hd, w[2], dim, x.data(), true, t, nt);
      LLK_BARRIER
      for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], w[3], dim, m->eps, &xn[b * dim]);
      gemv_part(xn.data(), batch, dim, w[4], 2 * hidden, h13.data(), false, t, nt);
      LLK_BARRIER
      for (int64_t b = 0; b < batch; ++b)
        swiglu(&h13[b * 2 * hidden], &h13[b * 2 * hidden + hidden], hidden, &g[b * hidden]);
      gemv_part(g.data(), batch, hidden, w[5], dim, x.data(), true, t, nt);
      LLK_BARRIER
    }
    for (int64_t b = 0; b < batch; ++b) rms_norm(&x[b * dim], m->norm, dim, m->eps, &xn[b * dim]);
    if (t == 0) std::copy(xn.begin(), xn.end(), xfin.begin());
    if (!screen)
      gemv_part(xn.data(), batch, dim, m->output, m->vocab, logits, false, t, nt, m->stream_output != 0);
    else if (m->stream_output != 0)
      screen_part<true>(xn.data(), batch, dim, m->output_q, m->output_scale, m->vocab, logits, t, nt);
    else
      screen_part<false>(xn.data(), batch, dim, m->output_q, m->output_scale, m->vocab, logits, t, nt);
#undef LLK_BARRIER
  }
#ifdef _OPENMP
  omp_set_dynamic(dynamic);
#endif
  int64_t exact_rows = 0;
  for (int64_t b = 0; greedy != nullptr && b < batch; ++b) {
    float* row = logits + b * m->vocab;
    if (screen) {
      greedy[b] = greedy_row(*m, &xfin[b * dim], row, &exact_rows);
    } else {
      greedy[b] = argmax(row, m->vocab);
      exact_rows += m->vocab;
    }
  }
  return exact_rows;
}

}  // extern "C"
