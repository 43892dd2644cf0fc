// The first decode pass over 8-bit codes for one query head a key head: quantized_decode.py's Triton
// pass, written for a thread layout that Triton's language cannot ask for.
//
// A block takes one (sequence, key head) and one chunk of slots. LANES = DIM / 16 threads share a
// slot, each owning 16 channels: 16 bytes of key codes and 16 of value codes, 32 bytes of key scales
// and 32 of zeros from the slot's key group, a value scale and zero. A slot's score is summed over its
// lanes with shuffles, and every group of lanes keeps its own running softmax over the slots it
// visits (ROWS groups side by side, SLOTS slots a step), so that no score leaves its lanes until the
// block merges its rows' states, once, into the chunk's partial state that decode.py's combine reads.
//
// Codes travel to shared memory by asynchronous copies (cp.async), STAGES - 1 steps ahead of the
// arithmetic; each thread reads back only what it copied, so the loop needs no barrier and holds no
// registers for loads in flight. A prologue reads the chunk's positions, validity, key groups and
// value scales once into shared memory, so that a step's only global loads are its key scales.
//
// A code becomes float16 without a conversion instruction: one byte permute makes the halves
// 1024 + c of two codes, a subtraction leaves c exactly. Keys are decoded in float16 pairs (code *
// scale + zero) and multiplied by the query in two float16 chains a lane, summed in float32 over the
// lanes; a value's scale goes into the slot's weight and its zero is summed once, in float32.
//
// Compiled at run time by NVRTC with these macros defined: THREADS; CHUNK (slots a block); DIM (64
// or 128); the C types POSITION, KEY_GROUP, COLUMN and RESIDUAL_START; BF16 (1 when the query and
// the residual window are bfloat16, 0 for float16); HAS_WINDOW; WITH_MASS.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Measured on an H200 (docs/quantization.md): two slots a step (two independent chains in flight),
// copies two steps deep, and registers bounded so that 5 blocks of THREADS fit a multiprocessor (94
// used). THREADS is 128, set by quantized_decode.py, which launches it: 64 and 256 were slower. The
// loop is not unrolled.
#define SLOTS 2
#define STAGES 2
#define MIN_BLOCKS 5
#define LANES (DIM / 16)
#define ROWS (THREADS / LANES)
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// a 16-bit float of the model's dtype (the query's, the residual window's) as float32
__device__ __forceinline__ float state_to_float(u16 x) {
    if (BF16) return __uint_as_float(((u32)x) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}

// two floats as a float16 pair, `low` in the low half
__device__ __forceinline__ u32 half_pair(float low, float high) {
    u32 pair;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(high), "f"(low));
    return pair;
}

// one half of a float16 pair as float32
__device__ __forceinline__ float low_half(u32 pair) {
    float f;
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(pair));
    return f;
}

__device__ __forceinline__ float high_half(u32 pair) {
    float f;
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(pair));
    return f;
}

// a * b + c on float16 pairs
__device__ __forceinline__ u32 fma_pair(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// the four codes of `word` as two exact float16 pairs: a byte permute makes 1024 + c, a subtraction c
__device__ __forceinline__ void code_pairs(u32 word, u32 &low, u32 &high) {
    asm("{.reg .b32 a, b;\n"
        " prmt.b32 a, %2, 0x64646464, 0x4140;\n"
        " prmt.b32 b, %2, 0x64646464, 0x4342;\n"
        " sub.f16x2 %0, a, %3;\n"
        " sub.f16x2 %1, b, %3;}"
        : "=r"(low), "=r"(high)
        : "r"(word), "r"(0x64006400u));
}

// key codes * scale + zero, per channel, in float16 pairs
__device__ __forceinline__ void key_pairs(uint4 codes, uint4 scale_a, uint4 scale_b, uint4 zero_a, uint4 zero_b,
                                          u32 *pairs) {
    const u32 words[4] = {codes.x, codes.y, codes.z, codes.w};
    const u32 scales[8] = {scale_a.x, scale_a.y, scale_a.z, scale_a.w, scale_b.x, scale_b.y, scale_b.z, scale_b.w};
    const u32 zeros[8] = {zero_a.x, zero_a.y, zero_a.z, zero_a.w, zero_b.x, zero_b.y, zero_b.z, zero_b.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 low, high;
        code_pairs(words[i], low, high);
        pairs[2 * i] = fma_pair(low, scales[2 * i], zeros[2 * i]);
        pairs[2 * i + 1] = fma_pair(high, scales[2 * i + 1], zeros[2 * i + 1]);
    }
}

// 2^x, flushing what would be subnormal to 0 (exp2f's range checks cost the loop 4 instructions)
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint4 load16(const void *at) {
    return __ldg(reinterpret_cast<const uint4 *>(at));
}

// 16 channels in the model's dtype (the query's, the residual window's) as 8 float16 pairs
__device__ __forceinline__ void state_pairs(const u16 *at, u32 *pairs) {
    uint4 a = load16(at), b = load16(at + 8);
    u32 words[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; i++)
        pairs[i] = half_pair(state_to_float(words[i] & 0xffff), state_to_float(words[i] >> 16));
}

struct State {  // one row of slots' running softmax: max, sum, weighted values (and value zeros)
    float best, total, zero, acc[16];
};

// what the prologue says of a slot: unseen, its column in the residual window, or where its key
// group's scales start
#define UNSEEN 0xffffffffu
#define FRESH 0x80000000u

__device__ __forceinline__ u32 shared_address(const void *at) {
    u32 address;
    asm("{.reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s;}" : "=r"(address) : "l"(at));
    return address;
}

// 16 bytes from global to shared memory, not waiting: only the thread that copies reads them
__device__ __forceinline__ void copy16(u32 shared, const void *global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared), "l"(global) : "memory");
}

__device__ __forceinline__ uint4 shared16(u32 shared) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(shared));
    return v;
}

// the ring of copies: STAGES steps, each SLOTS 16-byte runs of keys, then of values, a thread
#define RUN_BYTES (THREADS * 16)
#define STAGE_BYTES (2 * SLOTS * RUN_BYTES)
#define RING_BYTES (STAGES * STAGE_BYTES)
#define MERGE_BYTES (ROWS * DIM * 4)
#define POOL_BYTES (RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES)

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) packed8_decode_chunk(
    const u16 *query, const u8 *key_codes, const u16 *key_scale, const u16 *key_zero,
    const KEY_GROUP *key_group, const u8 *value_codes, const u16 *value_scale, const u16 *value_zero,
    const u16 *residual_keys, const u16 *residual_values, const POSITION *positions, const signed char *valid,
    float *scores, float *part_max, float *part_sum, float *part_acc,
    int sqb, int sqh, int skb, int skh, int sksb, int sksh, int sksg, int sgb, int sgh,
    int svb, int svh, int svsb, int svsh, int srkb, int srkh, int srkn, int srvb, int srvh, int srvn,
    int spb, int sph, int keys, int kv_heads, int splits, const COLUMN *column_at,
    const RESIDUAL_START *residual_start_at, int window, double scale) {
    __shared__ u32 slot_meta[CHUNK];
    __shared__ u32 value_scale_zero[CHUNK][DIM / 64];
    __shared__ __align__(16) unsigned char pool[POOL_BYTES];  // the ring, then the rows' values
    __shared__ float row_best[ROWS], row_total[ROWS];
    const int split = blockIdx.x, batch_head = blockIdx.y;
    const long long batch = batch_head / kv_heads, head = batch_head % kv_heads;
    const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
    const int channel = lane * 16;
    const int first = split * CHUNK, count = min(CHUNK, keys - first);
    const u8 *keys_at = key_codes + batch * skb + head * skh + channel;
    const u8 *values_at = value_codes + batch * svb + head * svh + channel;
    const u16 *key_scale_at = key_scale + batch * sksb + head * sksh + channel;
    const u16 *key_zero_at = key_zero + batch * sksb + head * sksh + channel;
    const u16 *window_keys = residual_keys + batch * srkb + head * srkh + channel;
    const u16 *window_values = residual_values + batch * srvb + head * srvh + channel;
    const u32 ring = shared_address(pool) + threadIdx.x * 16;

    static_assert(CHUNK % (ROWS * SLOTS) == 0, "a chunk is whole steps");
    // the slot of step `step` that is this thread's `j`-th (SLOTS a step, ROWS apart)
    const auto slot_of = [&](int step, int j) { return (step * SLOTS + j) * ROWS + row; };
    // this thread's codes of step `step` into its ring stage (a slot past the chunk copies nothing)
    const auto copy_step = [&](int step) {
        const u32 stage = ring + (step % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {
            const int at = slot_of(step, j);
            if (at < count) {
                const u32 offset = (u32)(first + at) * DIM;
                copy16(stage + j * RUN_BYTES, keys_at + offset);
                copy16(stage + (SLOTS + j) * RUN_BYTES, values_at + offset);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
#pragma unroll
    for (int step = 0; step < STAGES - 1; step++) copy_step(step);

    {  // the prologue: each slot of the chunk seen or not, in the residual window or not, its key group
        const long long column = *column_at, residual_start = *residual_start_at;
        const long long slots = batch * spb + head * sph, value_at = batch * svsb + head * svsh;
        for (int i = threadIdx.x; i < CHUNK; i += THREADS) {
            u32 meta = UNSEEN;
#pragma unroll
            for (int g = 0; g < DIM / 64; g++) value_scale_zero[i][g] = 0u;  // past the keys: weighs nothing
            if (i < count) {
                const unsigned kept = first + i;
                const long long position = positions[slots + kept];
                bool seen = valid[slots + kept] != 0;
#if HAS_WINDOW
                seen = seen && position > column - window;
#endif
                seen = seen || position == column;
                if (seen)
                    meta = position >= residual_start
                               ? FRESH | (u32)(position - residual_start)
                               : (u32)key_group[batch * sgb + head * sgh + kept] * (u32)sksg;
#pragma unroll
                for (int g = 0; g < DIM / 64; g++)
                    value_scale_zero[i][g] = (u32)value_scale[value_at + kept * (DIM / 64) + g] |
                                             ((u32)value_zero[value_at + kept * (DIM / 64) + g] << 16);
            }
            slot_meta[i] = meta;
        }
    }
    u32 q[8];  // this lane's 16 query channels as float16 pairs
    state_pairs(query + batch * sqb + head * sqh + channel, q);
    __syncthreads();

    State s;
    s.best = NEG_INF;
    s.total = s.zero = 0.f;
#pragma unroll
    for (int i = 0; i < 16; i++) s.acc[i] = 0.f;
    const int steps = (count + ROWS * SLOTS - 1) / (ROWS * SLOTS);
    const float score_scale = (float)scale;
#pragma unroll 1
    for (int step = 0; step < steps; step++) {
        copy_step(step + STAGES - 1);
        asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1) : "memory");  // this step's copies landed
        const u32 stage = ring + (step % STAGES) * STAGE_BYTES;
        float score[SLOTS];
        u32 v[SLOTS][8], meta[SLOTS];
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {  // the slots' scores and decoded values, side by side
            meta[j] = slot_meta[slot_of(step, j)];
            const u32 group_at = meta[j] & FRESH ? 0u : meta[j];  // unseen or fresh: group 0's, unused
            const u16 *scales = key_scale_at + group_at, *zeros = key_zero_at + group_at;
            u32 k[8];
            key_pairs(shared16(stage + j * RUN_BYTES), load16(scales), load16(scales + 8), load16(zeros),
                      load16(zeros + 8), k);
            const uint4 value_word = shared16(stage + (SLOTS + j) * RUN_BYTES);
            const u32 value_words[4] = {value_word.x, value_word.y, value_word.z, value_word.w};
#pragma unroll
            for (int i = 0; i < 4; i++) code_pairs(value_words[i], v[j][2 * i], v[j][2 * i + 1]);
            if (meta[j] != UNSEEN && (meta[j] & FRESH)) {  // the newest columns wait unquantized
                const u32 at = meta[j] & ~FRESH;
                state_pairs(window_keys + at * srkn, k);
                state_pairs(window_values + at * srvn, v[j]);
            }
            u32 even = 0, odd = 0;  // two float16 chains of products
#pragma unroll
            for (int i = 0; i < 8; i += 2) {
                even = fma_pair(q[i], k[i], even);
                odd = fma_pair(q[i + 1], k[i + 1], odd);
            }
            score[j] = (low_half(even) + high_half(even)) + (low_half(odd) + high_half(odd));
        }
        float best = s.best;
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {
#pragma unroll
            for (int offset = LANES / 2; offset > 0; offset /= 2)
                score[j] += __shfl_xor_sync(0xffffffffu, score[j], offset);
            score[j] = meta[j] != UNSEEN ? score[j] * score_scale : NEG_INF;
#if WITH_MASS
            const int local = slot_of(step, j);
            if (lane == 0 && local < count) scores[(long long)batch_head * keys + first + local] = score[j];
#endif
            best = fmaxf(best, score[j]);
        }
        const float safe = best == NEG_INF ? 0.f : best;
        if (best != s.best) {  // the running max grew: what was weighted before shrinks
            const float rescale = exp2_fast((s.best - safe) * LOG2E);
            s.total *= rescale;
            s.zero *= rescale;
#pragma unroll
            for (int i = 0; i < 16; i++) s.acc[i] *= rescale;
            s.best = best;
        }
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {
            const float weight_p = exp2_fast((score[j] - safe) * LOG2E);
            s.total += weight_p;
            // a code's value is code * scale + zero: the scale goes into the weight, the zero is summed
            // once (a fresh slot's value is itself)
            const bool fresh = meta[j] != UNSEEN && (meta[j] & FRESH);
            const u32 value_scales = value_scale_zero[slot_of(step, j)][channel / 64];
            const float weight = fresh ? weight_p : weight_p * low_half(value_scales);
            s.zero += fresh ? 0.f : weight_p * high_half(value_scales);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                s.acc[2 * i] = fmaf(weight, low_half(v[j][i]), s.acc[2 * i]);
                s.acc[2 * i + 1] = fmaf(weight, high_half(v[j][i]), s.acc[2 * i + 1]);
            }
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();  // every thread is done with the ring, which now holds the rows' values

    // the block's rows merged into the chunk's state
    float(*row_acc)[DIM] = reinterpret_cast<float(*)[DIM]>(pool);
    if (lane == 0) {
        row_best[row] = s.best;
        row_total[row] = s.total;
    }
#pragma unroll
    for (int i = 0; i < 16; i++) row_acc[row][channel + i] = s.acc[i] + s.zero;
    __syncthreads();
    float merged_best = NEG_INF;
    for (int r = 0; r < ROWS; r++) merged_best = fmaxf(merged_best, row_best[r]);
    const float safe = merged_best == NEG_INF ? 0.f : merged_best;
    const long long part = (long long)batch_head * splits + split;
    for (int ch = threadIdx.x; ch < DIM; ch += THREADS) {
        float merged_total = 0.f, merged_acc = 0.f;
        for (int r = 0; r < ROWS; r++) {
            const float weight = exp2_fast((row_best[r] - safe) * LOG2E);
            merged_total += row_total[r] * weight;
            merged_acc += row_acc[r][ch] * weight;
        }
        part_acc[part * DIM + ch] = merged_acc;
        if (ch == 0) {
            part_max[part] = merged_best;
            part_sum[part] = merged_total;
        }
    }
}
