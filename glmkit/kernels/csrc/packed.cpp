// bf16 GEMM on a weight packed once into panels (glmkit serve --pack-weights), for any number of rows: as fast as
// the GEMV kernels for one decode row, faster than they and oneDNN for batches, on par with oneDNN for long prefills.
//
// At 32 rows a GLM-Large matrix is compute-bound: oneDNN's prepacked GEMM reaches ~850 GFLOP/s on this CPU when the
// weight is already in cache but ~640 when it streams from memory, as every matrix of a decode step does (each is read
// once per step; benchmarks/RESULTS.md) - the loads of a new block wait on memory between bursts of arithmetic. Here
// the weight is laid out as panels of 32 output rows, [N / 32, K / 2, 32, 2]: a panel's k-pair is one 128-byte run
// that vdpbf16ps multiplies by a broadcast pair of one activation row, so 8 rows x 32 outputs live in 16 registers and
// no horizontal sums are needed. While a thread computes one panel against every block of 8 rows it requests the next
// panel into cache, spread over those passes, so the stream from memory overlaps the arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemv.h"
#include "linear.h"
#include "simd.h"

namespace {

using glmkit::gemv::bf16_activations;

constexpr int64_t PANEL = GLMKIT_PANEL_ROWS;
static_assert(PANEL == 32, "panel_rows holds a panel's outputs as two vectors of 16 fp32 sums (AVX2: four of 8)");
#if defined(GLMKIT_ISA_AVX512)
constexpr int MR = 8;  // activation rows per pass: 8 x 2 accumulators
#else
constexpr int MR = 2;  // AVX2: 2 x 4 accumulators, the widened weights and 4 broadcasts fill its 16 registers
#endif
constexpr int64_t CHUNK_BYTES = 512 * 1024;  // bf16 activations per chunk of rows: half of a core's L2

// Requests `lines` 64-byte lines of the next panel per two k-pairs, so that the passes over one panel together fetch
// the whole next one (a panel is K lines).
struct PanelPrefetch {
  const char* p;
  int lines;
};

#if defined(GLMKIT_ISA_AVX512)

// acc[m][0..1] += x[m][2 k2 : 2 k2 + 2] . the panel's k-pair k2 (32 outputs)
template <int NM>
inline void panel_step(__m512 (&acc)[NM][2], const uint16_t* w, const uint16_t* x, int64_t K, int64_t k2) {
  const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k2 * 64);
  const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k2 * 64 + 32);
#pragma GCC unroll 8
  for (int m = 0; m < NM; m++) {
    int32_t pair;
    std::memcpy(&pair, x + m * K + 2 * k2, 4);
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
    acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
    acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
  }
}

// y[m][0..n) = x[m] . W[panel rows] (+ bias) for NM rows and the panel's first n <= 32 outputs; w: the panel
// [K / 2, 64]; x: NM rows of stride K
template <int NM>
void panel_rows(const uint16_t* w, const uint16_t* x, int64_t K, PanelPrefetch pf, float* y, int64_t ldy,
                       int64_t n, const float* bias, bool bf16_out) {
  __m512 acc[NM][2];
#pragma GCC unroll 8
  for (int m = 0; m < NM; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  int64_t k2 = 0;
  for (; k2 + 2 <= K2; k2 += 2) {
    for (int i = 0; i < pf.lines; i++) _mm_prefetch(pf.p + 64 * i, _MM_HINT_T0);
    pf.p += 64 * pf.lines;
    panel_step<NM>(acc, w, x, K, k2);
    panel_step<NM>(acc, w, x, K, k2 + 1);
  }
  if (k2 < K2) panel_step<NM>(acc, w, x, K, k2);
  const __mmask16 m0 = glmkit::tail(n, 0), m1 = n > 16 ? glmkit::tail(n, 16) : __mmask16(0);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < NM; m++) {
    const __m512 v0 = _mm512_add_ps(acc[m][0], b0), v1 = _mm512_add_ps(acc[m][1], b1);
    if (bf16_out) {
      auto* o = reinterpret_cast<c10::BFloat16*>(y) + m * ldy;
      glmkit::store_bf16(o, v0, m0);
      glmkit::store_bf16(o + 16, v1, m1);
    } else {
      _mm512_mask_storeu_ps(y + m * ldy, m0, v0);
      _mm512_mask_storeu_ps(y + m * ldy + 16, m1, v1);
    }
  }
}

#else  // AVX2: each k-pair's 128 bytes widen to fp32 as 4 x (8 rows' even inputs, 8 rows' odd inputs), and FMA
       // against broadcast fp32 activations (x rounded to bf16 first, as on AVX-512)

template <int NM>
inline void panel_step(__m256 (&acc)[NM][4], const uint16_t* w, const float* x, int64_t K, int64_t k2) {
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + k2 * 64 + 16 * r));
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000))));
#pragma GCC unroll 2
    for (int m = 0; m < NM; m++)
      acc[m][r] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(x + m * K + 2 * k2 + 1),
                                  _mm256_fmadd_ps(even, _mm256_broadcast_ss(x + m * K + 2 * k2), acc[m][r]));
  }
}

template <int NM>
void panel_rows(const uint16_t* w, const float* x, int64_t K, PanelPrefetch pf, float* y, int64_t ldy, int64_t n,
                const float* bias, bool bf16_out) {
  __m256 acc[NM][4];
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();
  const int64_t K2 = K / 2;
  int64_t k2 = 0;
  for (; k2 + 2 <= K2; k2 += 2) {
    for (int i = 0; i < pf.lines; i++) _mm_prefetch(pf.p + 64 * i, _MM_HINT_T0);
    pf.p += 64 * pf.lines;
    panel_step<NM>(acc, w, x, K, k2);
    panel_step<NM>(acc, w, x, K, k2 + 1);
  }
  if (k2 < K2) panel_step<NM>(acc, w, x, K, k2);
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < 4; r++) {
      const int64_t left = n - 8 * r;
      if (left <= 0) break;
      const __m256 v = bias ? _mm256_add_ps(acc[m][r], glmkit::load8(bias + 8 * r, left)) : acc[m][r];
      if (bf16_out)
        glmkit::store8(reinterpret_cast<c10::BFloat16*>(y) + m * ldy + 8 * r, v, left);
      else
        glmkit::store8(y + m * ldy + 8 * r, v, left);
    }
}

#endif

// the last panel's rows past N are zeros
void pack_panels(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
  at::parallel_for(0, (N + PANEL - 1) / PANEL, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++)
      for (int64_t k2 = 0; k2 < K / 2; k2++)
        for (int64_t j = 0; j < PANEL; j++) {
          uint16_t* o = out + (p * (K / 2) + k2) * 2 * PANEL + 2 * j;
          const bool row = p * PANEL + j < N;
          o[0] = row ? w[(p * PANEL + j) * K + 2 * k2] : 0;
          o[1] = row ? w[(p * PANEL + j) * K + 2 * k2 + 1] : 0;
        }
  });
}

}  // namespace

namespace glmkit {

at::Tensor pack_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "pack_bf16: weight must be a bf16 CPU tensor [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 2 == 0, "pack_bf16: needs an even K, got [", N, ", ", K, "]");
  const at::Tensor wc = w.contiguous();
  auto out = at::empty({(N + PANEL - 1) / PANEL, K / 2, 2 * PANEL}, w.options());
  pack_panels(reinterpret_cast<const uint16_t*>(wc.data_ptr()), N, K, reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

at::Tensor linear_packed_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == 2 * PANEL && packed.is_contiguous() && N > (packed.size(0) - 1) * PANEL &&
                  N <= packed.size(0) * PANEL,
              "linear_packed_bf16: packed must come from pack_bf16 of a weight with ", N, " rows");
  const int64_t K = packed.size(1) * 2;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_packed_bf16: x must be a float32 or bf16 CPU tensor [M, ", K, "]");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "linear_packed_bf16: bias must be [", N, "]");
  const int64_t M = x.size(0);
  const at::Tensor xb = bf16_activations(x);
#if defined(GLMKIT_ISA_AVX512)
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
#else
  const at::Tensor xf = glmkit::gemv::f32_activations(xb);
  const float* xp = xf.data_ptr<float>();
#endif
  const at::Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const float* bp = bias ? b32.data_ptr<float>() : nullptr;
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  auto* yp = static_cast<char*>(y.data_ptr());
  const int64_t panel_elems = K * PANEL, out_bytes = bf16_out ? 2 : 4;
  // Rows go in chunks whose activations stay in L2 while every panel passes over them: with all of a long prefill's
  // rows at once, each panel re-read them from memory (4,096 rows x K 4,096: ~650 GFLOP/s, against ~880 for
  // oneDNN). Decode batches are one chunk.
  const int64_t chunk = std::max<int64_t>(64, (CHUNK_BYTES / (2 * K)) / MR * MR);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t rows = std::min(chunk, M - c0), passes = (rows + MR - 1) / MR;
    // per two k-pairs a pass reads 4 lines of its panel; the passes together request the next panel's K lines
    const int lines = static_cast<int>((4 + passes - 1) / passes);
    at::parallel_for(0, packed.size(0), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; p++) {
        const uint16_t* w = wp + p * panel_elems;
        const char* next = reinterpret_cast<const char*>(w + panel_elems);
        for (int64_t i = 0; i < passes; i++) {
          const int64_t m0 = c0 + i * MR;
          const PanelPrefetch pf{next + i * lines * 64 * (K / 4), lines};
          auto* out = reinterpret_cast<float*>(yp + (m0 * N + p * PANEL) * out_bytes);
          glmkit::gemv::dispatch_upto<MR>(static_cast<int>(std::min<int64_t>(MR, M - m0)), [&]<int NM>() {
            panel_rows<NM>(w, xp + m0 * K, K, pf, out, N, std::min(PANEL, N - p * PANEL),
                           bp ? bp + p * PANEL : nullptr, bf16_out);
          });
        }
      }
    });
  }
  return y;
}

}  // namespace glmkit
