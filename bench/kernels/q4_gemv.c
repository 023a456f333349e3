/* Decode-shaped product y = x W^T for mlx-lm's affine 4-bit layout, group size 64: W is
 * (out, in/8) uint32 words, each holding 8 4-bit values, lowest bits first; per group of 64
 * weights a float scale s and bias b give w = s*q + b. x is (rows, in) float32, y (rows, out).
 *
 * A measurement probe for docs/inference.md (bench/kernel_probe.py builds and times it), not a
 * serving path. AVX2 + FMA: one 256-bit load is one group (8 words); nibble j of the 8 words
 * pairs with x[8*word + j], so x is first permuted per group into xp[j][word]. Output rows are
 * split over OpenMP threads; each group is unpacked once for all rows (at most 64).
 */
#include <immintrin.h>
#include <stdint.h>

void q4_gemv(const float *x, int rows, int in, const uint32_t *w, const float *scales,
             const float *biases, int out, float *y, float *work) {
    const int groups = in / 64;
    /* work: rows * in permuted x, then rows * groups sums of x per group */
    float *xp = work;
    float *xsum = work + (long)rows * in;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            const float *src = x + (long)r * in + g * 64;
            float *dst = xp + (long)r * in + g * 64;
            float total = 0.0f;
            for (int word = 0; word < 8; word++)
                for (int j = 0; j < 8; j++) {
                    dst[j * 8 + word] = src[word * 8 + j];
                    total += src[word * 8 + j];
                }
            xsum[r * groups + g] = total;
        }
    }
    const __m256i low4 = _mm256_set1_epi32(0xF);
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const uint32_t *row = w + (long)o * (in / 8);
        float result[64] = {0};
        for (int g = 0; g < groups; g++) {
            __m256i words = _mm256_loadu_si256((const __m256i *)(row + g * 8));
            __m256 q[8];
            for (int j = 0; j < 8; j++)
                q[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 4 * j), low4));
            const float s = scales[(long)o * groups + g], b = biases[(long)o * groups + g];
            for (int r = 0; r < rows; r++) {
                const float *xg = xp + (long)r * in + g * 64;
                __m256 acc = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
                for (int j = 1; j < 8; j++)
                    acc = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(xg + 8 * j), acc);
                __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                half = _mm_hadd_ps(half, half);
                half = _mm_hadd_ps(half, half);
                result[r] += s * _mm_cvtss_f32(half) + b * xsum[r * groups + g];
            }
        }
        for (int r = 0; r < rows; r++)
            y[(long)r * out + o] = result[r];
    }
}
