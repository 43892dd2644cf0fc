// The first decode pass over 8-bit codes for one query head a key head: quantized_decode.py's Triton
// pass, written for a thread layout that Triton's language cannot ask for.
//
// A block takes one (sequence, key head) and one chunk of slots. LANES = DIM / 16 threads share a
// slot, each owning 16 channels: one 16-byte load of key codes, one of value codes, 32 bytes of key
// scales and of zeros from the slot's key group, a value scale and zero. A slot's score is summed
// over its lanes with shuffles, and every group of lanes keeps its own running softmax over the
// slots it visits (ROWS groups side by side, slot after slot), so that no score leaves its lanes
// until the block merges its rows' states, once, into the chunk's partial state that decode.py's
// combine reads.
//
// A code becomes float16 without a conversion instruction: one byte permute makes the halves
// 1024 + c of two codes, a subtraction leaves c exactly. Keys are decoded in float16 pairs (code *
// scale + zero) and multiplied by the query in two float16 chains a lane, summed in float32 over the
// lanes; a value's scale goes into the slot's weight and its zero is summed once, in float32.
//
// Compiled at run time by NVRTC with these macros defined: THREADS; DIM (64 or 128); the C types
// POSITION, KEY_GROUP, COLUMN and RESIDUAL_START; BF16 (1 when the query and the residual window
// are bfloat16, 0 for float16); HAS_WINDOW; WITH_MASS.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define LANES (DIM / 16)
// THREADS a block (128, set by quantized_decode.py, which launches it), at most 80 registers a
// thread so that 6 blocks fit a multiprocessor: on an H200 faster than 64 or 256 threads, than 5, 7
// or 8 blocks, and than two slots in flight a row; the loop is not unrolled (unrolled, it spills
// more registers at this bound)
#define MIN_BLOCKS 6
#define ROWS (THREADS / LANES)
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// a 16-bit float as float32: the model's dtype (bfloat16 when BF16) or, for scales, float16
__device__ __forceinline__ float state_to_float(u16 x, bool model_dtype = true) {
    if (BF16 && model_dtype) return __uint_as_float(((u32)x) << 16);
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

struct Chunk {  // one (sequence, key head): where each of its slots' parts starts, for this lane
    const u8 *keys, *values;
    const u16 *key_scale, *key_zero, *value_scale, *value_zero, *window_keys, *window_values;
    const KEY_GROUP *group;
    const POSITION *positions;
    const signed char *valid;
    float *scores;
    int key_group_stride, window_key_stride, window_value_stride, window;
    long long column, residual_start;
    float scale;
};

struct State {  // one row of slots' running softmax: max, sum, weighted values (and value zeros)
    float best, total, zero, acc[16];
};

struct Slot {  // what a slot's lanes load before they can score it (its key scales wait for its group)
    long long position;
    bool held;
    uint4 key_word, value_word;
    u16 value_scale, value_zero;
    unsigned group;
};

// the loads of slot `kept` (a slot inside the buffer) whose address is arithmetic, all issued together
__device__ __forceinline__ Slot fetch(const Chunk &c, unsigned kept) {
    Slot f;
    f.position = c.positions[kept];
    f.held = c.valid[kept] != 0;
    f.key_word = load16(c.keys + kept * DIM);
    f.value_word = load16(c.values + kept * DIM);
    f.value_scale = c.value_scale[kept * (DIM / 64)];
    f.value_zero = c.value_zero[kept * (DIM / 64)];
    f.group = (unsigned)c.group[kept] * c.key_group_stride;
    return f;
}

// a fetched slot folded into its row's state; `inside`: the slot belongs to this chunk
__device__ __forceinline__ void fold(const Chunk &c, State &s, const u32 *q, const Slot &f, bool inside, int slot,
                                     int lane) {
    const long long position = f.position;
    const uint4 scale_a = load16(c.key_scale + f.group), scale_b = load16(c.key_scale + f.group + 8);
    const uint4 zero_a = load16(c.key_zero + f.group), zero_b = load16(c.key_zero + f.group + 8);

    bool seen = f.held && inside;
#if HAS_WINDOW
    seen = seen && position > c.column - c.window;
#endif
    seen = seen || (inside && position == c.column);
    const bool fresh = seen && position >= c.residual_start;

    u32 k[8], v[8];
    key_pairs(f.key_word, scale_a, scale_b, zero_a, zero_b, k);
    const u32 value_words[4] = {f.value_word.x, f.value_word.y, f.value_word.z, f.value_word.w};
#pragma unroll
    for (int i = 0; i < 4; i++) code_pairs(value_words[i], v[2 * i], v[2 * i + 1]);
    if (fresh) {  // the newest columns wait unquantized in the residual window
        const unsigned at = (unsigned)(position - c.residual_start);
        state_pairs(c.window_keys + at * c.window_key_stride, k);
        state_pairs(c.window_values + at * c.window_value_stride, v);
    }
    u32 even = 0, odd = 0;  // two float16 chains of products
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
        even = fma_pair(q[i], k[i], even);
        odd = fma_pair(q[i + 1], k[i + 1], odd);
    }
    float score = (low_half(even) + high_half(even)) + (low_half(odd) + high_half(odd));
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) score += __shfl_xor_sync(0xffffffffu, score, offset);
    score = seen ? score * c.scale : NEG_INF;
#if WITH_MASS
    if (lane == 0 && inside) c.scores[slot] = score;
#endif
    const float new_best = fmaxf(s.best, score);
    const float safe = new_best == NEG_INF ? 0.f : new_best;
    const float p = exp2f((score - safe) * LOG2E);
    if (new_best != s.best) {  // the running max grew: what was weighted before shrinks
        const float rescale = exp2f((s.best - safe) * LOG2E);
        s.total *= rescale;
        s.zero *= rescale;
#pragma unroll
        for (int i = 0; i < 16; i++) s.acc[i] *= rescale;
        s.best = new_best;
    }
    s.total += p;
    // a code's value is code * scale + zero: the scale goes into the weight, the zero is summed once
    const float weight = fresh ? p : p * state_to_float(f.value_scale, false);
    s.zero += fresh ? 0.f : p * state_to_float(f.value_zero, false);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        s.acc[2 * i] = fmaf(weight, low_half(v[i]), s.acc[2 * i]);
        s.acc[2 * i + 1] = fmaf(weight, high_half(v[i]), s.acc[2 * i + 1]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) packed8_decode_chunk(
    const u16 *query, const u8 *key_codes, const u16 *key_scale, const u16 *key_zero,
    const KEY_GROUP *key_group, const u8 *value_codes, const u16 *value_scale, const u16 *value_zero,
    const u16 *residual_keys, const u16 *residual_values, const POSITION *positions, const signed char *valid,
    float *scores, float *part_max, float *part_sum, float *part_acc,
    int sqb, int sqh, int skb, int skh, int sksb, int sksh, int sksg, int sgb, int sgh,
    int svb, int svh, int svsb, int svsh, int srkb, int srkh, int srkn, int srvb, int srvh, int srvn,
    int spb, int sph, int keys, int kv_heads, int splits, int chunk, const COLUMN *column_at,
    const RESIDUAL_START *residual_start_at, int window, double scale) {
    __shared__ float row_best[ROWS], row_total[ROWS];
    __shared__ float row_acc[ROWS][DIM];
    const int split = blockIdx.x, batch_head = blockIdx.y;
    const long long batch = batch_head / kv_heads, head = batch_head % kv_heads;
    const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
    const int channel = lane * 16;

    Chunk c;
    c.keys = key_codes + batch * skb + head * skh + channel;
    c.values = value_codes + batch * svb + head * svh + channel;
    c.key_scale = key_scale + batch * sksb + head * sksh + channel;
    c.key_zero = key_zero + batch * sksb + head * sksh + channel;
    c.value_scale = value_scale + batch * svsb + head * svsh + channel / 64;
    c.value_zero = value_zero + batch * svsb + head * svsh + channel / 64;
    c.window_keys = residual_keys + batch * srkb + head * srkh + channel;
    c.window_values = residual_values + batch * srvb + head * srvh + channel;
    c.group = key_group + batch * sgb + head * sgh;
    c.positions = positions + batch * spb + head * sph;
    c.valid = valid + batch * spb + head * sph;
    c.scores = scores + (long long)batch_head * keys;
    c.key_group_stride = sksg;
    c.window_key_stride = srkn;
    c.window_value_stride = srvn;
    c.window = window;
    c.column = *column_at;
    c.residual_start = *residual_start_at;
    c.scale = (float)scale;

    u32 q[8];  // this lane's 16 query channels as float16 pairs
    state_pairs(query + batch * sqb + head * sqh + channel, q);

    State s;
    s.best = NEG_INF;
    s.total = s.zero = 0.f;
#pragma unroll
    for (int i = 0; i < 16; i++) s.acc[i] = 0.f;
    const int first = split * chunk, end = first + chunk < keys ? first + chunk : keys;
    // each slot's loads go out one slot ahead of its arithmetic (a slot past the keys reads the
    // last one again, unseen)
    Slot next = fetch(c, first + row < keys ? first + row : keys - 1);
#pragma unroll 1
    for (int start = first; start < end; start += ROWS) {
        const Slot current = next;
        const int ahead = start + ROWS + row;
        if (start + ROWS < end) next = fetch(c, ahead < keys ? ahead : keys - 1);
        fold(c, s, q, current, start + row < end, start + row, lane);
    }

    // the block's rows merged into the chunk's state
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
            const float weight = exp2f((row_best[r] - safe) * LOG2E);
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
