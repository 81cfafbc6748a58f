// HAVOC's int4 and int8 products (x int8 activations) on x86 CPUs (see quant_kernel.py for why and the layouts).
// Built twice from this one file: with AVX-512 VNNI (-DHAVOC_AVX512) and with AVX2 + FMA. Both
// compute every output with the same float operations in the same order (the integer parts are
// exact), so a model's logits are bit-identical on either kind of CPU, and a row's result does
// not depend on the rows computed beside it.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TILE = 4, CODE_BYTES = TILE * 64, BLOCK_BYTES = CODE_BYTES + 64, BLOCK8_BYTES = TILE * 128, ROWS_PER_PASS = 4 };
// Bytes ahead of the block being read that are prefetched (into L2): streaming 0.66 GB of havoc-2b's
// matrices went from 14.8 to 17-18 GB/s (AVX2 build: 14.5 to 16; docs/LOG.md). 2-10 KB ahead
// measured alike, into L1 less well. (__builtin_prefetch: GCC dropped _mm_prefetch in a helper.)
enum { PREFETCH_AHEAD = 5120 };

static inline void prefetch_lines(const uint8_t* wb, int bytes) {
  for (int l = 0; l < bytes; l += 64) __builtin_prefetch(wb + PREFETCH_AHEAD + l, 0, 2);
}

// One block (4 groups of 32 inputs) of one row of activations, rounded to int8 per group:
// xq: the 4 groups' inputs 0..15, then their inputs 16..31; sx, c, sum: per output lane
// 4 i + r (group i, tile row r): the group's scale, scale x sum of its codes, the sum.
typedef struct {
  int8_t xq[128];
  float sx[16];
  float c[16];
  int32_t sum[16];
} xblock;

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// finite values: rounded to nearest even without to_bf16's NaN test, so that loops of it vectorize
static inline uint16_t finite_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void quantize_row(const void* x, int x_bf16, int64_t K, int64_t B, xblock* out) {
  for (int64_t g = 0; g < 4 * B; ++g) {
    float v[32], amax = 0.f;
    for (int j = 0; j < 32; ++j) {
      const int64_t k = 32 * g + j;
      v[j] = k >= K ? 0.f : x_bf16 ? from_bf16(((const uint16_t*)x)[k]) : ((const float*)x)[k];
      amax = fmaxf(amax, fabsf(v[j]));
    }
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    xblock* xb = out + g / 4;
    const int i = (int)(g % 4);
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      float r = nearbyintf(v[j] * inv);
      r = r > 127.f ? 127.f : r < -127.f ? -127.f : r;
      sum += (int)r;
      xb->xq[(j < 16 ? 0 : 64) + 16 * i + j % 16] = (int8_t)r;
    }
    for (int r = 0; r < TILE; ++r) {
      xb->sx[4 * i + r] = scale;
      xb->c[4 * i + r] = scale * (float)sum;
      xb->sum[4 * i + r] = sum;
    }
  }
}

#ifdef HAVOC_AVX512
static inline __m512 bf16x16(const uint8_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

// lane 4 i + r: the sum of the 4 lanes of group i in d_r
static inline __m512i transpose_add(__m512i d0, __m512i d1, __m512i d2, __m512i d3) {
  const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(d0, d1), _mm512_unpackhi_epi32(d0, d1));
  const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d2, d3), _mm512_unpackhi_epi32(d2, d3));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

// int4 (bits 4): codes 0..15 in nibbles, the low ones inputs 0..15 of each group, the high ones
// 16..31; a bf16 scale and zero per group and row. int8 (bits 8): signed codes, 128 bytes a row and
// block (inputs 0..15 of the 4 groups, then 16..31). VNNI multiplies unsigned by signed bytes: int4
// codes are offset by 8, int8 ones by 128 (a flipped sign bit), and that times the group's
// activation sum is taken off the exact integer sum. ``bits`` is a constant at every call.
static inline __attribute__((always_inline)) void tile(int bits, const uint8_t* w, const xblock* xb, int64_t B,
                                                       int rows, float out[ROWS_PER_PASS][16]) {
  const int block = bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES, offset_shift = bits == 8 ? 7 : 3;
  __m512 acc[ROWS_PER_PASS];
  for (int m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8((char)0x80);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * block;
    prefetch_lines(wb, block);
    __m512i lo[TILE], hi[TILE];  // per row: unsigned codes of inputs 0..15, 16..31 of the 4 groups
    for (int r = 0; r < TILE; ++r) {
      if (bits == 8) {
        lo[r] = _mm512_xor_si512(_mm512_loadu_si512(wb + 128 * r), flip);
        hi[r] = _mm512_xor_si512(_mm512_loadu_si512(wb + 128 * r + 64), flip);
      } else {
        const __m512i codes = _mm512_loadu_si512(wb + 64 * r);
        lo[r] = _mm512_and_si512(codes, low);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
      }
    }
    const __m512 s = bits == 8 ? _mm512_setzero_ps() : bf16x16(wb + CODE_BYTES);  // int4's scales, zeros
    const __m512 z = bits == 8 ? _mm512_setzero_ps() : bf16x16(wb + CODE_BYTES + 32);
    for (int m = 0; m < rows; ++m) {
      const xblock* x = xb + m * B + b;
      const __m512i xl = _mm512_loadu_si512(x->xq), xh = _mm512_loadu_si512(x->xq + 64);
      __m512i d[TILE];
      for (int r = 0; r < TILE; ++r)
        d[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xl), hi[r], xh);
      const __m512i dot = _mm512_sub_epi32(transpose_add(d[0], d[1], d[2], d[3]),
                                           _mm512_slli_epi32(_mm512_loadu_si512(x->sum), offset_shift));
      const __m512 sx = _mm512_loadu_ps(x->sx);
      if (bits == 8) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sx, acc[m]);
      } else {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, sx), acc[m]);
        acc[m] = _mm512_fmadd_ps(z, _mm512_loadu_ps(x->c), acc[m]);
      }
    }
  }
  for (int m = 0; m < rows; ++m) _mm512_storeu_ps(out[m], acc[m]);
}
#else
static inline __m256 bf16x8(const uint8_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

static inline __m256i transpose_add(__m256i d0, __m256i d1, __m256i d2, __m256i d3) {
  const __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(d0, d1), _mm256_unpackhi_epi32(d0, d1));
  const __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(d2, d3), _mm256_unpackhi_epi32(d2, d3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

// int4 codes (unsigned, 0..15) x activations (signed) in 4-byte lanes: pairs in 16 bits (at most
// 2 x 15 x 127 each, 4 x 15 x 127 both nibbles: no saturation), then 32-bit sums
static inline __m256i dot4(__m256i codes, __m256i xl, __m256i xh) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i a = _mm256_maddubs_epi16(_mm256_and_si256(codes, low), xl);
  const __m256i b = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(codes, 4), low), xh);
  return _mm256_madd_epi16(_mm256_add_epi16(a, b), _mm256_set1_epi16(1));
}

// int8 codes x activations, both signed, AVX2's way: |w| x (x with w's sign), pairs in 16 bits (at
// most 2 x 127 x 127: no saturation), then 32-bit sums
static inline __m256i dot8(__m256i cl, __m256i ch, __m256i xl, __m256i xh) {
  const __m256i one = _mm256_set1_epi16(1);
  const __m256i a = _mm256_maddubs_epi16(_mm256_sign_epi8(cl, cl), _mm256_sign_epi8(xl, cl));
  const __m256i b = _mm256_maddubs_epi16(_mm256_sign_epi8(ch, ch), _mm256_sign_epi8(xh, ch));
  return _mm256_add_epi32(_mm256_madd_epi16(a, one), _mm256_madd_epi16(b, one));
}

// As the AVX-512 tile, in two halves of 8 lanes; exact integer sums, then the same float operations.
static inline __attribute__((always_inline)) void tile(int bits, const uint8_t* w, const xblock* xb, int64_t B,
                                                       int rows, float out[ROWS_PER_PASS][16]) {
  const int block = bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES;
  __m256 acc[ROWS_PER_PASS][2];
  for (int m = 0; m < rows; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * block;
    prefetch_lines(wb, block);
    for (int h = 0; h < 2; ++h) {  // groups 2h and 2h + 1: lanes 8h .. 8h + 7
      __m256i cl[TILE], ch[TILE];  // int8: codes of inputs 0..15 and 16..31; int4: both, in nibbles (cl)
      for (int r = 0; r < TILE; ++r) {
        cl[r] = _mm256_loadu_si256((const __m256i*)(wb + (bits == 8 ? 128 : 64) * r + 32 * h));
        if (bits == 8) ch[r] = _mm256_loadu_si256((const __m256i*)(wb + 128 * r + 64 + 32 * h));
      }
      const __m256 s = bits == 8 ? _mm256_setzero_ps() : bf16x8(wb + CODE_BYTES + 16 * h);  // int4's scales, zeros
      const __m256 z = bits == 8 ? _mm256_setzero_ps() : bf16x8(wb + CODE_BYTES + 32 + 16 * h);
      for (int m = 0; m < rows; ++m) {
        const xblock* x = xb + m * B + b;
        const __m256i xl = _mm256_loadu_si256((const __m256i*)(x->xq + 32 * h));
        const __m256i xh = _mm256_loadu_si256((const __m256i*)(x->xq + 64 + 32 * h));
        const __m256 sx = _mm256_loadu_ps(x->sx + 8 * h);
        if (bits == 8) {
          const __m256i dot = transpose_add(dot8(cl[0], ch[0], xl, xh), dot8(cl[1], ch[1], xl, xh),
                                            dot8(cl[2], ch[2], xl, xh), dot8(cl[3], ch[3], xl, xh));
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sx, acc[m][h]);
        } else {
          const __m256i sums = transpose_add(dot4(cl[0], xl, xh), dot4(cl[1], xl, xh), dot4(cl[2], xl, xh),
                                             dot4(cl[3], xl, xh));
          const __m256i sum8 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(x->sum + 8 * h)), 3);
          const __m256i dot = _mm256_sub_epi32(sums, sum8);
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, sx), acc[m][h]);
          acc[m][h] = _mm256_fmadd_ps(z, _mm256_loadu_ps(x->c + 8 * h), acc[m][h]);
        }
      }
    }
  }
  for (int m = 0; m < rows; ++m) {
    _mm256_storeu_ps(out[m], acc[m][0]);
    _mm256_storeu_ps(out[m] + 8, acc[m][1]);
  }
}
#endif

static void tile_rows(int bits, const uint8_t* w, const xblock* xb, int64_t B, int rows,
                      float out[ROWS_PER_PASS][16]) {
  switch (rows * (bits == 8 ? -1 : 1)) {  // a constant count each: the accumulators stay in registers
    case 1: tile(4, w, xb, B, 1, out); break;
    case 2: tile(4, w, xb, B, 2, out); break;
    case 3: tile(4, w, xb, B, 3, out); break;
    case 4: tile(4, w, xb, B, 4, out); break;
    case -1: tile(8, w, xb, B, 1, out); break;
    case -2: tile(8, w, xb, B, 2, out); break;
    case -3: tile(8, w, xb, B, 3, out); break;
    default: tile(8, w, xb, B, 4, out); break;
  }
}

// y [M, N] = x [M, K] times the matrix w [N, K] in the tiled layout of ``bits`` (fp32 or bf16 x and y),
// each output times scale[n] where scale is given (int8's one scale per row).
static int linear(int bits, const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                  int64_t N, void* y, int y_bf16, int threads) {
  const int64_t B = (K + 127) / 128, tiles = (N + TILE - 1) / TILE;
  const int64_t tile_bytes = B * (bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES);
  xblock* xb = (xblock*)malloc((size_t)(M * B) * sizeof(xblock));
  if (!xb) return -1;
  for (int64_t m = 0; m < M; ++m)
    quantize_row((const uint8_t*)x + m * K * (x_bf16 ? 2 : 4), x_bf16, K, B, xb + m * B);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
      const int rows = (int)(M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS);
      float out[ROWS_PER_PASS][16];
      tile_rows(bits, w + t * tile_bytes, xb + m0 * B, B, rows, out);
      for (int m = 0; m < rows; ++m) {
        for (int r = 0; r < TILE && t * TILE + r < N; ++r) {
          float v = (out[m][r] + out[m][4 + r]) + (out[m][8 + r] + out[m][12 + r]);
          if (scale) v *= scale[t * TILE + r];
          const int64_t at = (m0 + m) * N + t * TILE + r;
          if (y_bf16) ((uint16_t*)y)[at] = to_bf16(v);
          else ((float*)y)[at] = v;
        }
      }
    }
  }
  free(xb);
  return 0;
}

// Returns 0, or -1 when out of memory.
int havoc_int4_linear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w, int64_t N, void* y,
                      int y_bf16, int threads) {
  return linear(4, x, x_bf16, M, K, w, NULL, N, y, y_bf16, threads);
}

int havoc_int8_linear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                      int64_t N, void* y, int y_bf16, int threads) {
  return linear(8, x, x_bf16, M, K, w, scale, N, y, y_bf16, threads);
}

// out = the matrix w stands for, value = scale x (code - 8) + zero (fp32 or bf16), for products
// over many rows, which a float matmul does faster than any int4 kernel. Plain loops of 16 that
// the compiler vectorizes.
// Rows n0 .. n1 - 1 only, into out [n1 - n0, K]: a slice that stays in cache for its matmul.
void havoc_int4_dequantize(const uint8_t* w, int64_t K, int64_t n0, int64_t n1, void* out, int out_bf16,
                           int threads) {
  const int64_t B = (K / 32 + 3) / 4, G = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = n0; n < n1; ++n) {
    const int r = (int)(n % TILE);
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wb = w + ((n / TILE) * B + g / 4) * BLOCK_BYTES;
      const uint8_t* codes = wb + 64 * r + 16 * (g % 4);
      const float s = from_bf16(((const uint16_t*)(wb + CODE_BYTES))[4 * (g % 4) + r]);
      const float z = from_bf16(((const uint16_t*)(wb + CODE_BYTES + 32))[4 * (g % 4) + r]);
      float v[32];
      for (int j = 0; j < 16; ++j) {
        v[j] = s * (float)((int)(codes[j] & 15) - 8) + z;
        v[16 + j] = s * (float)((int)(codes[j] >> 4) - 8) + z;
      }
      if (out_bf16) {
        uint16_t* o = (uint16_t*)out + (n - n0) * K + 32 * g;
        for (int j = 0; j < 32; ++j) o[j] = finite_to_bf16(v[j]);
      } else {
        memcpy((float*)out + (n - n0) * K + 32 * g, v, sizeof v);
      }
    }
  }
}

// The int8 matrix's rows n0 .. n1 - 1 as floats (code x the row's scale), into out [n1 - n0, K].
void havoc_int8_dequantize(const uint8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1, void* out,
                           int out_bf16, int threads) {
  const int64_t B = (K + 127) / 128, G = (K + 31) / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = n0; n < n1; ++n) {
    const int r = (int)(n % TILE);
    const float s = scale[n];
    float v[32];
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* codes = (const int8_t*)w + ((n / TILE) * B + g / 4) * BLOCK8_BYTES + 128 * r + 16 * (g % 4);
      for (int j = 0; j < 16; ++j) v[j] = s * (float)codes[j];
      for (int j = 0; j < 16; ++j) v[16 + j] = s * (float)codes[64 + j];
      if (32 * g + 32 <= K && out_bf16) {
        uint16_t* o = (uint16_t*)out + (n - n0) * K + 32 * g;
        for (int j = 0; j < 32; ++j) o[j] = finite_to_bf16(v[j]);
      } else if (32 * g + 32 <= K) {
        memcpy((float*)out + (n - n0) * K + 32 * g, v, sizeof v);
      } else {  // a last partial group
        for (int64_t j = 0; j < K - 32 * g; ++j) {
          if (out_bf16) ((uint16_t*)out)[(n - n0) * K + 32 * g + j] = finite_to_bf16(v[j]);
          else ((float*)out)[(n - n0) * K + 32 * g + j] = v[j];
        }
      }
    }
  }
}
