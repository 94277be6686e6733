// Weight-only GEMV / small-M GEMM for decoding on x86 CPUs with AVX-512 BF16 (glmkit.kernels).
//
// Decoding multiplies 1..~32 activation rows by each weight matrix once per token, so it is bound by how fast the
// weights stream from memory. The stock CPU kernels reach a fraction of that (benchmarks/RESULTS.md); these read
// every weight byte once, in row order, and keep the arithmetic cheap enough that two cores keep up with DRAM:
//   bf16: vdpbf16ps on the plain nn.Linear weight [N, K] (no repacking);
//   int8: sign-extend to fp32 and FMA with fp32 activations (exact weight-only math), one scale per output row;
//   int4: nibbles become bf16 (128 + u) by OR-ing an exponent in, then vdpbf16ps; the 128 + 8 offset is removed
//         per group with the group sums of the activations: y = sum_g s_g * (dot(128 + u, x)_g - 136 * sum(x)_g).
// int4 layout (see glmkit/kernels/reference.py): per row, chunks of 64 elements, byte j = e[j] | e[j + 32] << 4;
// a final chunk of 32 elements (K % 64 == 32) packs byte j = e[j] | e[j + 16] << 4. Stored value u = q + 8.
// Work is split over output rows with at::parallel_for; each task handles R rows against up to 4 activation rows
// at a time, so a weight block is read from memory once and reused from L1/L2 for further activation rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma")))

namespace {

constexpr int R = 4;   // weight rows per tile
constexpr int MT = 4;  // activation rows per tile

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

// ---- activation conversion -----------------------------------------------------------------------------------

KERNEL void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; i++) dst[i] = c10::BFloat16(src[i]).x;
}

KERNEL void to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  for (; i < n; i++) dst[i] = c10::BFloat16(src[i], c10::BFloat16::from_bits()).operator float();
}

// x [M, K] as contiguous bf16 bits (a view of x when it already is bf16)
at::Tensor bf16_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kBFloat16));
  to_bf16(xc.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), xc.numel());
  return out;
}

at::Tensor f32_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  to_f32(reinterpret_cast<const uint16_t*>(xc.data_ptr()), out.data_ptr<float>(), xc.numel());
  return out;
}

// rows of x [M, K] (fp32) as int16 fixed point: x[m] ~ q[m] * step[m], step = max|x[m]| / 32767
KERNEL void to_i16_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* step) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (; k < K; k++) amax = std::max(amax, std::abs(xr[k]));
    step[m] = amax > 0.f ? amax / 32767.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / step[m]);
    for (k = 0; k + 16 <= K; k += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv));  // round to nearest even
      _mm256_storeu_si256((__m256i*)(q + m * K + k), _mm512_cvtsepi32_epi16(v));
    }
    for (; k < K; k++) q[m * K + k] = static_cast<int16_t>(std::nearbyint(std::clamp(xr[k] / step[m], -32767.f, 32767.f)));
  }
}

// ---- tiles: acc[m][r] = dot(w row r, x row m), reduced to out[m * R + r] --------------------------------------

template <int NR, int NM>
KERNEL void tile_bf16(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[NM][NR];
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < NM; m++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  if (k < K) {
    __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[NR];
    for (int r = 0; r < NR; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int m = 0; m < NM; m++) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// x holds the activations as int16 fixed point; products are exact and summed in int32 over blocks of 4096
// inputs (|q| <= 128, |x| <= 32767: no overflow), then in fp32.
template <int NR, int NM>
KERNEL void tile_int8(const int8_t* w, int64_t K, const int16_t* x, float* out) {
  __m512 acc[NM][NR];
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 4096) {
    const int64_t k1 = std::min<int64_t>(K, k0 + 4096);
    __m512i iacc[NM][NR];
    for (int m = 0; m < NM; m++)
      for (int r = 0; r < NR; r++) iacc[m][r] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      __m512i wv[NR];
      for (int r = 0; r < NR; r++) wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * K + k)));
      for (int m = 0; m < NM; m++) {
        __m512i xv = _mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < NR; r++) iacc[m][r] = _mm512_dpwssd_epi32(iacc[m][r], wv[r], xv);
      }
    }
    if (k < k1) {
      __mmask32 mask = (__mmask32)((1ull << (k1 - k)) - 1);
      __m512i wv[NR];
      for (int r = 0; r < NR; r++) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + r * K + k));
      for (int m = 0; m < NM; m++) {
        __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        for (int r = 0; r < NR; r++) iacc[m][r] = _mm512_dpwssd_epi32(iacc[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < NM; m++)
      for (int r = 0; r < NR; r++) acc[m][r] = _mm512_add_ps(acc[m][r], _mm512_cvtepi32_ps(iacc[m][r]));
  }
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// acc[m][r] += part[m][r] * (scale of row r, group g)
template <int NR, int NM>
KERNEL inline void apply_scale(__m512 (&acc)[NM][NR], const __m512 (&part)[NM][NR], const float* s, int64_t ng,
                               int64_t g) {
  for (int r = 0; r < NR; r++) {
    __m512 sv = _mm512_set1_ps(s[r * ng + g]);
    for (int m = 0; m < NM; m++) acc[m][r] = _mm512_fmadd_ps(part[m][r], sv, acc[m][r]);
  }
}

// a group's accumulator starts at off[m * ng + g] in every lane (-136/16 of the group's activation sum), so its
// 16 lanes end up summing to dot(u - 8, x): the offset costs no instruction in the loop
template <int NR, int NM>
KERNEL inline void start_groups(__m512 (&part)[NM][NR], const float* off, int64_t ng, int64_t g) {
  for (int m = 0; m < NM; m++) {
    __m512 o = _mm512_set1_ps(off[m * ng + g]);
    for (int r = 0; r < NR; r++) part[m][r] = o;
  }
}

// s: the NR rows' group scales as fp32, [NR][K / G]
template <int NR, int NM, int G>
KERNEL void tile_int4(const uint8_t* w, int64_t K, const uint16_t* x, const float* off, const float* s, float* out) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);  // bf16 0x4300 | u = 128 + u
  const int64_t KB = K / 2, ng = K / G, K64 = K / 64 * 64;
  constexpr int64_t STEP = G < 64 ? 64 : G;
  __m512 acc[NM][NR];
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K64; k0 += STEP) {
    __m512 part[NM][NR], part2[NM][NR];
    if (G == 32) {
      start_groups<NR, NM>(part, off, ng, k0 / 32);
      start_groups<NR, NM>(part2, off, ng, k0 / 32 + 1);
    } else {
      start_groups<NR, NM>(part, off, ng, k0 / G);
      for (int m = 0; m < NM; m++)
        for (int r = 0; r < NR; r++) part2[m][r] = _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k0 + STEP; k += 64) {
      __m512bh lo[NR], hi[NR];
      for (int r = 0; r < NR; r++) {
        __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * KB + k / 2)));
        lo[r] = (__m512bh)_mm512_ternarylogic_epi32(b, low, magic, 0xEA);  // (b & 0xF) | magic
        hi[r] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), magic);
      }
      for (int m = 0; m < NM; m++) {
        __m512bh xl = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        __m512bh xh = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
        for (int r = 0; r < NR; r++) {
          part[m][r] = _mm512_dpbf16_ps(part[m][r], lo[r], xl);
          part2[m][r] = _mm512_dpbf16_ps(part2[m][r], hi[r], xh);
        }
      }
    }
    if (G == 32) {
      apply_scale<NR, NM>(acc, part, s, ng, k0 / 32);
      apply_scale<NR, NM>(acc, part2, s, ng, k0 / 32 + 1);
    } else {
      for (int m = 0; m < NM; m++)
        for (int r = 0; r < NR; r++) part[m][r] = _mm512_add_ps(part[m][r], part2[m][r]);
      apply_scale<NR, NM>(acc, part, s, ng, k0 / G);
    }
  }
  if (K64 < K) {  // a last chunk of 32 elements (then G == 32): byte j = e[j] | e[j + 16] << 4
    __m512 part[NM][NR];
    __m512bh wv[NR];
    start_groups<NR, NM>(part, off, ng, K64 / 32);
    for (int r = 0; r < NR; r++) {
      __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + r * KB + K64 / 2)));
      __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x000F)), hi = _mm256_srli_epi16(b, 4);
      wv[r] = (__m512bh)_mm512_or_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), magic);
    }
    for (int m = 0; m < NM; m++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + K64);
      for (int r = 0; r < NR; r++) part[m][r] = _mm512_dpbf16_ps(part[m][r], wv[r], xv);
    }
    apply_scale<NR, NM>(acc, part, s, ng, K64 / 32);
  }
  for (int m = 0; m < NM; m++)
    for (int r = 0; r < NR; r++) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// off[m * ng + g] = -136 / 16 * (sum of the bf16 activations x[m] over group g)
KERNEL void group_offsets(const uint16_t* x, int64_t M, int64_t K, int64_t G, float* off) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < K / G; g++) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x + m * K + k), ones);
      off[m * (K / G) + g] = -136.f / 16.f * _mm512_reduce_add_ps(a);
    }
}

// ---- driver: rows in blocks of R over threads, activation rows in tiles of MT --------------------------------

// tile(nr, nm, row0, m0, out[MT * R]) computes rows row0..row0+nr against activation rows m0..m0+nm;
// finish(m, n, dot) turns a raw dot product into the output value.
template <typename Tile, typename Finish, typename Out>
void run_rows(int64_t M, int64_t N, Out* y, const Tile& tile, const Finish& finish) {
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float out[MT * R];
    for (int64_t b = b0; b < b1; b++) {
      const int64_t row0 = b * R;
      const int nr = static_cast<int>(std::min<int64_t>(R, N - row0));
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int nm = static_cast<int>(std::min<int64_t>(MT, M - m0));
        if (nr == R) {
          tile(R, nm, row0, m0, out);
        } else {  // the last rows one at a time
          float one[MT * R];
          for (int r = 0; r < nr; r++) {
            tile(1, nm, row0 + r, m0, one);
            for (int m = 0; m < nm; m++) out[m * R + r] = one[m * R];
          }
        }
        for (int m = 0; m < nm; m++)
          for (int r = 0; r < nr; r++) y[(m0 + m) * N + row0 + r] = Out(finish(m0 + m, row0 + r, out[m * R + r]));
      }
    }
  });
}

// calls f.template operator()<NR, NM>() with the compile-time tile shape
template <typename F>
void dispatch_tile(int nr, int nm, const F& f) {
#define GLMKIT_NM(NR)                      \
  switch (nm) {                            \
    case 1: f.template operator()<NR, 1>(); break; \
    case 2: f.template operator()<NR, 2>(); break; \
    case 3: f.template operator()<NR, 3>(); break; \
    default: f.template operator()<NR, 4>(); break; \
  }
  if (nr == R) {
    GLMKIT_NM(R)
  } else {
    GLMKIT_NM(1)
  }
#undef GLMKIT_NM
}

void check_common(const at::Tensor& x, const at::Tensor& w, int64_t K, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "glmkit kernels: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x: expected [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous(), "bias: expected [N]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias: f32/bf16");
  }
}

void check_scales(const at::Tensor& scales) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16, "scales: f32/bf16");
}

// y = finish(dot) [+ bias], written in x's dtype
template <typename Tile, typename Finish>
at::Tensor launch(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, const Tile& tile,
                  const Finish& finish) {
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  auto with_bias = [&](auto* yp) {
    using Out = std::remove_pointer_t<decltype(yp)>;
    if (!bias) return run_rows(M, N, yp, tile, finish);
    if (bias->scalar_type() == at::kFloat) {
      const float* b = bias->data_ptr<float>();
      return run_rows(M, N, yp, tile, [&](int64_t m, int64_t n, float d) { return finish(m, n, d) + b[n]; });
    }
    const c10::BFloat16* b = bias->data_ptr<c10::BFloat16>();
    run_rows(M, N, yp, tile, [&](int64_t m, int64_t n, float d) { return finish(m, n, d) + to_f(b[n]); });
  };
  if (x.scalar_type() == at::kFloat)
    with_bias(y.data_ptr<float>());
  else
    with_bias(y.data_ptr<c10::BFloat16>());
  return y;
}

// ---- ops -----------------------------------------------------------------------------------------------------

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "weight: expected bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
  auto xb = bf16_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto tile = [&](int nr, int nm, int64_t row0, int64_t m0, float* out) {
    dispatch_tile(nr, nm, [&]<int NR, int NM>() { tile_bf16<NR, NM>(wp + row0 * K, K, xp + m0 * K, out); });
  };
  return launch(x, N, bias, tile, [](int64_t, int64_t, float d) { return d; });
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "weight: expected int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && scales.is_contiguous(), "scales: expected [N]");
  check_scales(scales);
  auto xf = f32_activations(x);
  const int64_t M = x.size(0);
  std::vector<int16_t> xq(M * K);
  std::vector<float> step(M);
  to_i16_rows(xf.data_ptr<float>(), M, K, xq.data(), step.data());
  const int16_t* xp = xq.data();
  const int8_t* wp = w.data_ptr<int8_t>();
  auto tile = [&](int nr, int nm, int64_t row0, int64_t m0, float* out) {
    dispatch_tile(nr, nm, [&]<int NR, int NM>() { tile_int8<NR, NM>(wp + row0 * K, K, xp + m0 * K, out); });
  };
  if (scales.scalar_type() == at::kFloat) {
    const float* sp = scales.data_ptr<float>();
    return launch(x, N, bias, tile, [&](int64_t m, int64_t n, float d) { return d * sp[n] * step[m]; });
  }
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
  return launch(x, N, bias, tile, [&](int64_t m, int64_t n, float d) { return d * to_f(sp[n]) * step[m]; });
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "weight: expected uint8 [N, K / 2]");
  const int64_t N = w.size(0), K = w.size(1) * 2, G = group_size;
  TORCH_CHECK(G == 32 || G == 64 || G == 128, "group_size: 32, 64 or 128, got ", G);
  TORCH_CHECK(K % G == 0, "group_size ", G, " does not divide in_features ", K);
  check_common(x, w, K, bias);
  const int64_t ng = K / G, M = x.size(0);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng && scales.is_contiguous(),
              "scales: expected [N, K / group_size]");
  check_scales(scales);
  auto xb = bf16_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  std::vector<float> off(M * ng);
  group_offsets(xp, M, K, G, off.data());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool f32_scales = scales.scalar_type() == at::kFloat;
  const void* sp = scales.data_ptr();
  auto tile = [&](int nr, int nm, int64_t row0, int64_t m0, float* out) {
    thread_local std::vector<float> buf;
    const float* sf = static_cast<const float*>(sp) + row0 * ng;
    if (!f32_scales) {  // this block's rows of bf16 scales as fp32
      buf.resize(R * ng);
      to_f32(static_cast<const uint16_t*>(sp) + row0 * ng, buf.data(), nr * ng);
      sf = buf.data();
    }
    dispatch_tile(nr, nm, [&]<int NR, int NM>() {
      const uint8_t* wr = wp + row0 * (K / 2);
      const uint16_t* xr = xp + m0 * K;
      const float* o = off.data() + m0 * ng;
      if (G == 32)
        tile_int4<NR, NM, 32>(wr, K, xr, o, sf, out);
      else if (G == 64)
        tile_int4<NR, NM, 64>(wr, K, xr, o, sf, out);
      else
        tile_int4<NR, NM, 128>(wr, K, xr, o, sf, out);
    });
  };
  return launch(x, N, bias, tile, [](int64_t, int64_t, float d) { return d; });
}

}  // namespace

TORCH_LIBRARY(glmkit_kernels, m) {
  m.def("supported() -> bool");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.impl("supported", &cpu_supported);
}

TORCH_LIBRARY_IMPL(glmkit_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
}
