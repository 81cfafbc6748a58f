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
// Only matrices of PREFETCH_MIN_BYTES or more: havoc-small's (at most 2 MB, read from L3) took
// 1.35 ms a step without, 1.6 ms with; 1 GB of havoc-2b's from DRAM 18.8 GB/s without, 20.3 with.
enum { PREFETCH_AHEAD = 5120, PREFETCH_MIN_BYTES = 4 << 20 };

static inline void prefetch_lines(const uint8_t* wb, int bytes) {
  for (int l = 0; l < bytes; l += 64) __builtin_prefetch(wb + PREFETCH_AHEAD + l, 0, 2);
}

// One block (4 groups of 32 inputs) of one row of activations, rounded to int8 per group, laid out
// for the tile's lanes: lane 4 i + r stands for group i of tile row r, so xq holds, per 4 inputs
// 4 j .. 4 j + 3 (j = 0..7), each group's 4 values once per row (64 bytes), and sx, c, base the
// group's scale, scale x sum of its codes, and minus the offset (8 for int4 codes, 128 for int8
// ones) x that sum, per lane.
typedef struct {
  int8_t xq[8 * 64];
  float sx[16];
  float c[16];
  int32_t base4[16];
  int32_t base8[16];
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

#ifdef HAVOC_AVX512
// int4 (bits 4), 320 bytes a tile and block: 4 registers of codes 0..15, lane 4 i + r holding group i
// of row r, byte b of register j: input 4 j + b in the low nibble, input 16 + 4 j + b in the high one;
// then per lane the bf16 scale (low half) and zero (high half). int8 (bits 8), 512 bytes: 8
// registers, byte b of register j: input 4 j + b, stored as code + 128 (VNNI multiplies unsigned
// by signed bytes). Each lane's dot products accumulate a whole group: no transposes. The high
// nibbles are multiplied in place (16 x their value) and their sum divided by 16 (exactly).
// ``bits`` is a constant at every call.
static inline __attribute__((always_inline)) void tile(int bits, const uint8_t* w, const xblock* xb, int64_t B,
                                                       int rows, int prefetch, float out[ROWS_PER_PASS][16]) {
  const int block = bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES;
  __m512 acc[ROWS_PER_PASS];
  for (int m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8((char)0xf0);
  const __m512i upper = _mm512_set1_epi32((int)0xffff0000u);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * block;
    if (prefetch) prefetch_lines(wb, block);
    __m512i c[8];
    __m512 s = _mm512_setzero_ps(), z = _mm512_setzero_ps();
    if (bits == 8) {
      for (int j = 0; j < 8; ++j) c[j] = _mm512_loadu_si512(wb + 64 * j);
    } else {
      for (int j = 0; j < 4; ++j) {
        const __m512i codes = _mm512_loadu_si512(wb + 64 * j);
        c[j] = _mm512_and_si512(codes, low);
        c[4 + j] = _mm512_and_si512(codes, high);
      }
      const __m512i sz = _mm512_loadu_si512(wb + CODE_BYTES);
      s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
      z = _mm512_castsi512_ps(_mm512_and_si512(sz, upper));
    }
    for (int m = 0; m < rows; ++m) {
      const xblock* x = xb + m * B + b;
      __m512i d0 = _mm512_loadu_si512(bits == 8 ? x->base8 : x->base4), d1 = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {  // two chains, for latency
        d0 = _mm512_dpbusd_epi32(d0, c[j], _mm512_loadu_si512(x->xq + 64 * j));
        d1 = _mm512_dpbusd_epi32(d1, c[4 + j], _mm512_loadu_si512(x->xq + 256 + 64 * j));
      }
      const __m512i dot = _mm512_add_epi32(d0, bits == 8 ? d1 : _mm512_srai_epi32(d1, 4));
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
// As the AVX-512 tile, in two halves of 8 lanes (bytes 32 h .. 32 h + 31 of each register), with
// AVX2's pair sums instead of VNNI; exact integer sums, then the same float operations.
// int4: unsigned codes x signed activations, pairs in 16 bits; all 8 products of a lane's pair
// stay below 2^15 (8 x 2 x 15 x 127), so they are summed in 16 bits before widening.
// int8: |w| x (x with w's sign) (pairs at most 2 x 127 x 127: no saturation), summed in 32 bits.
static inline __attribute__((always_inline)) void tile(int bits, const uint8_t* w, const xblock* xb, int64_t B,
                                                       int rows, int prefetch, float out[ROWS_PER_PASS][16]) {
  const int block = bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES;
  const __m256i low = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80), one = _mm256_set1_epi16(1);
  const __m256i upper = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[ROWS_PER_PASS][2];
  for (int m = 0; m < rows; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * block;
    if (prefetch) prefetch_lines(wb, block);
    for (int h = 0; h < 2; ++h) {
      __m256i c[8];  // int4: codes of inputs 4 j + b (c[j]) and 16 + 4 j + b (c[4 + j]); int8: signed codes
      __m256 s = _mm256_setzero_ps(), z = _mm256_setzero_ps();
      if (bits == 8) {
        for (int j = 0; j < 8; ++j)
          c[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wb + 64 * j + 32 * h)), flip);
      } else {
        for (int j = 0; j < 4; ++j) {
          const __m256i codes = _mm256_loadu_si256((const __m256i*)(wb + 64 * j + 32 * h));
          c[j] = _mm256_and_si256(codes, low);
          c[4 + j] = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
        }
        const __m256i sz = _mm256_loadu_si256((const __m256i*)(wb + CODE_BYTES + 32 * h));
        s = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
        z = _mm256_castsi256_ps(_mm256_and_si256(sz, upper));
      }
      for (int m = 0; m < rows; ++m) {
        const xblock* x = xb + m * B + b;
        __m256i dot;
        if (bits == 8) {
          dot = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) {
            const __m256i xj = _mm256_loadu_si256((const __m256i*)(x->xq + 64 * j + 32 * h));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(c[j], c[j]), _mm256_sign_epi8(xj, c[j]));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, one));
          }
        } else {
          __m256i pairs = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) {
            const __m256i xj = _mm256_loadu_si256((const __m256i*)(x->xq + 64 * j + 32 * h));
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(c[j], xj));
          }
          dot = _mm256_add_epi32(_mm256_madd_epi16(pairs, one),
                                 _mm256_loadu_si256((const __m256i*)(x->base4 + 8 * h)));
        }
        const __m256 sx = _mm256_loadu_ps(x->sx + 8 * h);
        if (bits == 8) {
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sx, acc[m][h]);
        } else {
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

// Group i of a block: 32 activations rounded to int8 with the group's scale (amax / 127, to
// nearest even, as nearbyintf does), written into the block's lanes (4 copies, one per tile row).
// Vectorized: a scalar loop took 2.5 us of a 768-wide product's ~15 (docs/LOG.md). Both builds
// round with the same float operations, so their codes are the same.
static inline void quantize_group(const float v[32], xblock* xb, int i) {
  int32_t quads[8], sum;
  float amax;
#ifdef HAVOC_AVX512
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f), lim = _mm512_set1_ps(127.f);
  const __m512 neg = _mm512_set1_ps(-127.f);
  const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 ra = _mm512_roundscale_ps(_mm512_mul_ps(a, inv), round);
  const __m512 rb = _mm512_roundscale_ps(_mm512_mul_ps(b, inv), round);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(ra, neg), lim));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(rb, neg), lim));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  _mm_storeu_si128((__m128i*)quads, _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128((__m128i*)(quads + 4), _mm512_cvtepi32_epi8(qb));
#else
  __m256 p[4];
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int j = 0; j < 4; ++j) p[j] = _mm256_loadu_ps(v + 8 * j);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, p[0]), _mm256_andnot_ps(sign, p[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, p[2]), _mm256_andnot_ps(sign, p[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f), lim = _mm256_set1_ps(127.f);
  const __m256 neg = _mm256_set1_ps(-127.f);
  __m256i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(
        _mm256_round_ps(_mm256_mul_ps(p[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), neg), lim));
  const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
  // packs work within 128-bit halves: quads come out as 0, 2, 4, 6, 1, 3, 5, 7
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256((__m256i*)quads, _mm256_permutevar8x32_epi32(bytes, order));
#endif
  for (int j = 0; j < 8; ++j) _mm_storeu_si128((__m128i*)(xb->xq + 64 * j + 16 * i), _mm_set1_epi32(quads[j]));
  const float scale = amax / 127.f;
  for (int r = 0; r < TILE; ++r) {
    xb->sx[4 * i + r] = scale;
    xb->c[4 * i + r] = scale * (float)sum;
    xb->base4[4 * i + r] = -8 * sum;
    xb->base8[4 * i + r] = -128 * sum;
  }
}

static void quantize_row(const void* x, int x_bf16, int64_t K, int64_t B, xblock* out) {
  for (int64_t g = 0; g < 4 * B; ++g) {
    const int64_t k0 = 32 * g, n = K - k0 >= 32 ? 32 : K - k0 > 0 ? K - k0 : 0;
    float v[32];
    if (!x_bf16 && n == 32) {
      memcpy(v, (const float*)x + k0, sizeof v);
    } else {
      for (int j = 0; j < 32; ++j)
        v[j] = j >= n ? 0.f : x_bf16 ? from_bf16(((const uint16_t*)x)[k0 + j]) : ((const float*)x)[k0 + j];
    }
    quantize_group(v, out + g / 4, (int)(g % 4));
  }
}

static void tile_rows(int bits, const uint8_t* w, const xblock* xb, int64_t B, int rows, int prefetch,
                      float out[ROWS_PER_PASS][16]) {
  switch (rows * (bits == 8 ? -1 : 1)) {  // a constant count each: the accumulators stay in registers
    case 1: tile(4, w, xb, B, 1, prefetch, out); break;
    case 2: tile(4, w, xb, B, 2, prefetch, out); break;
    case 3: tile(4, w, xb, B, 3, prefetch, out); break;
    case 4: tile(4, w, xb, B, 4, prefetch, out); break;
    case -1: tile(8, w, xb, B, 1, prefetch, out); break;
    case -2: tile(8, w, xb, B, 2, prefetch, out); break;
    case -3: tile(8, w, xb, B, 3, prefetch, out); break;
    default: tile(8, w, xb, B, 4, prefetch, out); break;
  }
}

// y [M, N] = x [M, K] times the matrix w [N, K] in the tiled layout of ``bits`` (fp32 or bf16 x and y),
// each output times scale[n] where scale is given (int8's one scale per row).
static int linear(int bits, const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                  int64_t N, void* y, int y_bf16, int threads) {
  const int64_t B = (K + 127) / 128, tiles = (N + TILE - 1) / TILE;
  const int64_t tile_bytes = B * (bits == 8 ? BLOCK8_BYTES : BLOCK_BYTES);
  const int prefetch = tiles * tile_bytes >= PREFETCH_MIN_BYTES;
  xblock* xb = (xblock*)aligned_alloc(64, (size_t)(M * B) * sizeof(xblock));  // whole cache lines: 64-byte loads
  if (!xb) return -1;
  for (int64_t m = 0; m < M; ++m)
    quantize_row((const uint8_t*)x + m * K * (x_bf16 ? 2 : 4), x_bf16, K, B, xb + m * B);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
      const int rows = (int)(M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS);
      float out[ROWS_PER_PASS][16];
      tile_rows(bits, w + t * tile_bytes, xb + m0 * B, B, rows, prefetch, out);
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
      const int lane = 4 * (int)(g % 4) + r;
      const float s = from_bf16(((const uint16_t*)(wb + CODE_BYTES))[2 * lane]);
      const float z = from_bf16(((const uint16_t*)(wb + CODE_BYTES))[2 * lane + 1]);
      float v[32];
      for (int j = 0; j < 16; ++j) {
        const uint8_t code = wb[64 * (j / 4) + 4 * lane + j % 4];
        v[j] = s * (float)((int)(code & 15) - 8) + z;
        v[16 + j] = s * (float)((int)(code >> 4) - 8) + z;
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
      const uint8_t* wb = w + ((n / TILE) * B + g / 4) * BLOCK8_BYTES + 4 * (4 * (g % 4) + r);
      for (int j = 0; j < 32; ++j) v[j] = s * (float)(int8_t)(wb[64 * (j / 4) + j % 4] ^ 0x80);
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
