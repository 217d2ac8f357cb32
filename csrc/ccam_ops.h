// The ops' argument checks and bodies, shared by the GPU build (ccam_attention.cpp) and the CPU
// emulation build (emu/ccam_attention_emu.cpp), so both check the same things with the same
// messages. Each includes this once, inside namespace ccam { namespace { ... } }, after
// ATen, ccam/params.h, ccam_dispatch.h and its `struct Device`:
//   Device::kName                "CUDA" or "CPU": where the tensors must be;
//   Device::holds(x)             x is on such a device;
//   Device::launch(q, head_dim, {buffers}, launch)
//                                run launch(T{}, integral_constant<DP>{}, stream) for q's dtype and
//                                padded head dim; the buffers name every tensor the kernel touches
//                                (the emulator bounds-checks against them, outputs marked).

// 16-byte cp.async loads: rows must start on 16-byte boundaries.
void check_rows_aligned(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.stride(-1) == 1, "ccam_kernels cuda: ", name, " must have unit stride in the head dim, got strides ",
                    x.strides());
  for (int i = 0; i + 1 < x.dim(); ++i) {
    TORCH_CHECK_VALUE(x.size(i) == 1 || x.stride(i) % 8 == 0, "ccam_kernels cuda: ", name,
                      " strides must be multiples of 8 elements (16-byte aligned rows), got strides ", x.strides());
  }
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "ccam_kernels cuda: ", name,
                    " must start on a 16-byte boundary");
}

void check_on(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(x.device() == q.device(), "ccam_kernels cuda: ", name, " must be on ", q.device(), " like q, got ",
                    x.device());
}

// The per-sample plan the kernels read: frame counts, key offsets and the frame window
// [first_frame, end_frame) whose keys k/v hold (tiling.window_plan; [0, T) for a whole video).
struct Plan {
  const at::Tensor &frames, &key_start, &first_frame, &end_frame;
};

// Checks shared by every op; fills the shape part of the parameters.
AttentionShape check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Plan& plan,
                             int64_t tokens_per_frame, double scale) {
  const at::Tensor& frames = plan.frames;
  TORCH_CHECK_VALUE(Device::holds(q), "ccam_kernels cuda: q must be a ", Device::kName, " tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, "ccam_kernels cuda: q must be (B, N, H, D) or (N, H, D), got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(),
                    "ccam_kernels cuda: k and v must both be (L, Hkv, D), got shapes ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "ccam_kernels cuda: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  TORCH_CHECK_VALUE(frames.scalar_type() == at::kLong && frames.dim() == 1, "ccam_kernels cuda: frames must be int64 (B,), got ",
                    frames.scalar_type(), frames.sizes());
  for (auto* t : {&plan.key_start, &plan.first_frame, &plan.end_frame}) {
    const char* name = t == &plan.key_start ? "key_start" : t == &plan.first_frame ? "first_frame" : "end_frame";
    TORCH_CHECK_VALUE(t->scalar_type() == at::kLong && t->sizes() == frames.sizes(), "ccam_kernels cuda: ", name,
                      " must be int64 shaped like frames ", frames.sizes(), ", got ", t->scalar_type(), t->sizes());
    check_on(*t, name, q);
  }
  check_on(k, "k", q);
  check_on(v, "v", q);
  check_on(frames, "frames", q);
  const int64_t B = frames.size(0), N = q.size(-3), H = q.size(-2), D = q.size(-1), Hkv = k.size(1);
  TORCH_CHECK_VALUE(B >= 1, "ccam_kernels cuda: frame_counts must not be empty");
  TORCH_CHECK_VALUE(N >= 1, "ccam_kernels cuda: q must have at least one query, got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.dim() == 3 || q.size(0) == B, "ccam_kernels cuda: q has batch ", q.size(0), " but frame_counts has ",
                    B, " samples");
  TORCH_CHECK_VALUE(k.size(2) == D, "ccam_kernels cuda: k and v head dim must equal q's (", D, "), got ", k.size(2));
  TORCH_CHECK_VALUE(D % 8 == 0 && D >= 16 && D <= 128,
                    "ccam_kernels cuda: head dim must be a multiple of 8 from 16 to 128, got ", D);
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "ccam_kernels cuda: H (", H, ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK_VALUE(tokens_per_frame >= 1, "ccam_kernels cuda: tokens_per_frame must be >= 1, got ", tokens_per_frame);
  TORCH_CHECK_VALUE(B * H <= INT32_MAX && N <= 65535 * 64, "ccam_kernels cuda: too many samples x heads or queries");
  check_rows_aligned(q, "q");
  check_rows_aligned(k, "k");
  check_rows_aligned(v, "v");

  AttentionShape s{};
  s.frames = frames.data_ptr<int64_t>();
  s.key_start = plan.key_start.data_ptr<int64_t>();
  s.first_frame = plan.first_frame.data_ptr<int64_t>();
  s.end_frame = plan.end_frame.data_ptr<int64_t>();
  s.batch = static_cast<int>(B);
  s.num_query = static_cast<int>(N);
  s.heads = static_cast<int>(H);
  s.group = static_cast<int>(H / Hkv);
  s.tokens_per_frame = static_cast<int>(tokens_per_frame);
  s.head_dim = static_cast<int>(D);
  s.q_stride_b = q.dim() == 4 ? q.stride(0) : 0;  // a shared q is read in place by every sample
  s.q_stride_n = q.stride(-3);
  s.q_stride_h = q.stride(-2);
  s.k_stride_l = k.stride(0);
  s.k_stride_h = k.stride(1);
  s.v_stride_l = v.stride(0);
  s.v_stride_h = v.stride(1);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return s;
}

// The dropout part of the parameters; returns the seed tensor the kernels may read (a dummy
// one when dropout is off: the launch names every buffer, and the kernels then never read it).
at::Tensor set_dropout(AttentionShape& s, const std::optional<at::Tensor>& seed, int64_t threshold, double scale,
                       const at::Tensor& q) {
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= 65536, "ccam_kernels cuda: dropout_threshold must be in 0..65536, got ",
                    threshold);
  if (threshold == 0) {
    s.dropout_seed = nullptr;
    s.dropout_threshold = 0;
    s.dropout_scale = 1.f;
    return at::zeros({1}, q.options().dtype(at::kLong));
  }
  TORCH_CHECK_VALUE(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->is_contiguous(),
                    "ccam_kernels cuda: dropout needs dropout_seed, an int64 tensor of one element");
  check_on(*seed, "dropout_seed", q);
  s.dropout_seed = seed->data_ptr<int64_t>();
  s.dropout_threshold = static_cast<uint32_t>(threshold);
  s.dropout_scale = static_cast<float>(scale);
  return *seed;
}

void check_output(const at::Tensor& x, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                  const at::Tensor& q) {
  TORCH_CHECK_VALUE(x.sizes() == shape && x.scalar_type() == dtype, "ccam_kernels cuda: ", name, " must be ", dtype,
                    shape, ", got ", x.scalar_type(), x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "ccam_kernels cuda: ", name, " must be contiguous");
  check_on(x, name, q);
}

// out: (B, N, H, D) in q's dtype, or (S, B, N, H, D) float32 partials, always when
// num_splits > 1 and also with S = 1 (the backend keeps the float32 accumulator for the
// backward); lse: (B, H, N), or (S, B, H, N), float32.
void cuda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& frames,
              const at::Tensor& key_start, const at::Tensor& first_frame, const at::Tensor& end_frame,
              int64_t tokens_per_frame, double scale, int64_t num_splits, at::Tensor& out, at::Tensor& lse,
              const std::optional<at::Tensor>& dropout_seed, int64_t dropout_threshold, double dropout_scale) {
  FwdParams p{};
  static_cast<AttentionShape&>(p) =
      check_problem(q, k, v, {frames, key_start, first_frame, end_frame}, tokens_per_frame, scale);
  const at::Tensor seed = set_dropout(p, dropout_seed, dropout_threshold, dropout_scale, q);
  TORCH_CHECK_VALUE(num_splits >= 1 && num_splits <= 64, "ccam_kernels cuda: num_splits must be in 1..64, got ",
                    num_splits);
  const int64_t B = p.batch, N = p.num_query, H = p.heads, D = p.head_dim;
  if (num_splits == 1 && out.dim() != 5) {
    check_output(out, "out", {B, N, H, D}, q.scalar_type(), q);
    check_output(lse, "lse", {B, H, N}, at::kFloat, q);
    p.out = out.data_ptr();
  } else {
    check_output(out, "out", {num_splits, B, N, H, D}, at::kFloat, q);
    check_output(lse, "lse", {num_splits, B, H, N}, at::kFloat, q);
    p.out_partial = out.data_ptr<float>();
  }
  p.o_stride_b = N * H * D;
  p.o_stride_n = H * D;
  p.o_stride_h = D;
  p.lse = lse.data_ptr<float>();
  p.num_splits = static_cast<int>(num_splits);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  Device::launch(q, p.head_dim, {{"q", q}, {"k", k}, {"v", v}, {"frames", frames}, {"key_start", key_start},
                                 {"first_frame", first_frame}, {"end_frame", end_frame}, {"out", out, true}, {"lse", lse, true},
                                 {"dropout_seed", seed}},
                 [&](auto dtype, auto width, cudaStream_t stream) {
    using T = decltype(dtype);
    constexpr int DP = decltype(width)::value;
    if (Device::sm90(q) && sm90_fwd_supported(p)) {  // Hopper: the wgmma + TMA kernel (fwd_sm90.cuh)
      const cudaError_t err = launch_fwd_sm90<T, DP <= 64 ? 64 : 128>(p, k.size(0), static_cast<int>(k.size(1)), stream);
      if (err != cudaErrorNotSupported) return err;
    }
    return launch_fwd<T, DP>(p, stream);
  });
}

BwdParams bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lse, const at::Tensor& delta, const Plan& plan, int64_t tokens_per_frame,
                     double scale) {
  BwdParams p{};
  static_cast<AttentionShape&>(p) = check_problem(q, k, v, plan, tokens_per_frame, scale);
  const int64_t B = p.batch, N = p.num_query, H = p.heads, D = p.head_dim;
  TORCH_CHECK_VALUE(dout.dim() == 4 && dout.sizes() == at::IntArrayRef({B, N, H, D}) &&
                        dout.scalar_type() == q.scalar_type(),
                    "ccam_kernels cuda: dout must be ", q.scalar_type(), " (B, N, H, D) = ", at::IntArrayRef({B, N, H, D}),
                    ", got ", dout.scalar_type(), dout.sizes());
  check_on(dout, "dout", q);
  check_rows_aligned(dout, "dout");
  check_output(lse, "lse", {B, H, N}, at::kFloat, q);
  check_output(delta, "delta", {B, H, N}, at::kFloat, q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.do_stride_b = dout.stride(0);
  p.do_stride_n = dout.stride(1);
  p.do_stride_h = dout.stride(2);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  return p;
}

// dq_rows: (B, N, H, D) float32, each sample's contribution (the caller sums them for a shared
// q); or (S, B, N, H, D): each key split's contribution (S splits of every query tile's keys,
// summed by the caller).
void cuda_bwd_dq(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& frames, const at::Tensor& key_start,
                 const at::Tensor& first_frame, const at::Tensor& end_frame, int64_t tokens_per_frame, double scale,
                 at::Tensor& dq_rows, const std::optional<at::Tensor>& dropout_seed, int64_t dropout_threshold,
                 double dropout_scale) {
  BwdParams p =
      bwd_params(dout, q, k, v, lse, delta, {frames, key_start, first_frame, end_frame}, tokens_per_frame, scale);
  const at::Tensor seed = set_dropout(p, dropout_seed, dropout_threshold, dropout_scale, q);
  p.dq_splits = dq_rows.dim() == 5 ? static_cast<int>(dq_rows.size(0)) : 1;
  TORCH_CHECK_VALUE(p.dq_splits >= 1 && p.dq_splits <= 64, "ccam_kernels cuda: num_splits must be in 1..64, got ",
                    p.dq_splits);
  if (dq_rows.dim() == 5)
    check_output(dq_rows, "dq_rows", {p.dq_splits, p.batch, p.num_query, p.heads, p.head_dim}, at::kFloat, q);
  else
    check_output(dq_rows, "dq_rows", {p.batch, p.num_query, p.heads, p.head_dim}, at::kFloat, q);
  p.dq_rows = dq_rows.data_ptr<float>();
  Device::launch(q, p.head_dim, {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"lse", lse}, {"delta", delta},
                                 {"frames", frames}, {"key_start", key_start}, {"first_frame", first_frame},
                                 {"end_frame", end_frame}, {"dq_rows", dq_rows, true}, {"dropout_seed", seed}},
                 [&](auto dtype, auto width, cudaStream_t stream) {
    return launch_bwd_dq<decltype(dtype), decltype(width)::value>(p, stream);
  });
}

// dk, dv: like k and v. tile_sample / tile_start: the (sample, first key) of every key tile of
// kBwdKeyTile keys of each window, counted from its first key (ccam_kernels.backends.tiling.window_plan).
void cuda_bwd_dkdv(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& frames,
                   const at::Tensor& key_start, const at::Tensor& first_frame, const at::Tensor& end_frame,
                   const at::Tensor& tile_sample, const at::Tensor& tile_start, int64_t tokens_per_frame, double scale,
                   at::Tensor& dk, at::Tensor& dv, const std::optional<at::Tensor>& dropout_seed,
                   int64_t dropout_threshold, double dropout_scale) {
  BwdParams p =
      bwd_params(dout, q, k, v, lse, delta, {frames, key_start, first_frame, end_frame}, tokens_per_frame, scale);
  const at::Tensor seed = set_dropout(p, dropout_seed, dropout_threshold, dropout_scale, q);
  TORCH_CHECK_VALUE(tile_sample.scalar_type() == at::kLong && tile_start.scalar_type() == at::kLong &&
                        tile_sample.dim() == 1 && tile_start.sizes() == tile_sample.sizes(),
                    "ccam_kernels cuda: tile_sample and tile_start must be int64 (tiles,), got ",
                    tile_sample.scalar_type(), tile_sample.sizes(), " and ", tile_start.scalar_type(),
                    tile_start.sizes());
  check_on(tile_sample, "tile_sample", q);
  check_on(tile_start, "tile_start", q);
  for (auto* g : {&dk, &dv}) {
    const char* name = g == &dk ? "dk" : "dv";
    TORCH_CHECK_VALUE(g->sizes() == k.sizes() && g->scalar_type() == k.scalar_type(), "ccam_kernels cuda: ", name,
                      " must be shaped like k ", k.sizes(), ", got ", g->sizes());
    check_on(*g, name, q);
    // Stored as pairs of elements (32-bit stores).
    TORCH_CHECK_VALUE(g->stride(-1) == 1 && g->stride(0) % 2 == 0 && g->stride(1) % 2 == 0 &&
                          reinterpret_cast<uintptr_t>(g->data_ptr()) % 4 == 0,
                      "ccam_kernels cuda: ", name, " must have unit stride in the head dim, even strides and a 4-byte "
                      "aligned start, got strides ", g->strides());
  }
  p.tile_sample = tile_sample.data_ptr<int64_t>();
  p.tile_start = tile_start.data_ptr<int64_t>();
  p.num_key_tiles = static_cast<int>(tile_sample.size(0));
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dk_stride_l = dk.stride(0);
  p.dk_stride_h = dk.stride(1);
  p.dv_stride_l = dv.stride(0);
  p.dv_stride_h = dv.stride(1);
  if (p.num_key_tiles == 0) return;
  Device::launch(q, p.head_dim, {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"lse", lse}, {"delta", delta},
                                 {"frames", frames}, {"key_start", key_start}, {"first_frame", first_frame},
                                 {"end_frame", end_frame}, {"tile_sample", tile_sample},
                                 {"tile_start", tile_start}, {"dk", dk, true}, {"dv", dv, true},
                                 {"dropout_seed", seed}},
                 [&](auto dtype, auto width, cudaStream_t stream) {
    return launch_bwd_dkdv<decltype(dtype), decltype(width)::value>(p, stream);
  });
}


// The split forward's merge (merge.cuh): o_parts (S, B, N, H, D) and lse_parts (S, B, H, N)
// float32 -> out (B, N, H, D) in the inputs' dtype (float16 or bfloat16; empty: not written),
// acc (B, N, H, D) float32 (empty: not written) and lse (B, H, N) float32. All contiguous.
void cuda_merge(const at::Tensor& o_parts, const at::Tensor& lse_parts, at::Tensor& out, at::Tensor& acc,
                at::Tensor& lse) {
  TORCH_CHECK_VALUE(Device::holds(o_parts), "ccam_kernels cuda: o_parts must be a ", Device::kName, " tensor, got ",
                    o_parts.device());
  TORCH_CHECK_VALUE(o_parts.dim() == 5 && o_parts.scalar_type() == at::kFloat && o_parts.is_contiguous(),
                    "ccam_kernels cuda: o_parts must be contiguous float32 (S, B, N, H, D), got ", o_parts.scalar_type(),
                    o_parts.sizes());
  const int64_t S = o_parts.size(0), B = o_parts.size(1), N = o_parts.size(2), H = o_parts.size(3), D = o_parts.size(4);
  TORCH_CHECK_VALUE(S >= 1 && S <= 64, "ccam_kernels cuda: num_splits must be in 1..64, got ", S);
  TORCH_CHECK_VALUE(D % 8 == 0 && D >= 16 && D <= 128,
                    "ccam_kernels cuda: head dim must be a multiple of 8 from 16 to 128, got ", D);
  TORCH_CHECK_VALUE(B * H <= INT32_MAX && N <= 65535 * 16, "ccam_kernels cuda: too many samples x heads or queries");
  check_output(lse_parts, "lse_parts", {S, B, H, N}, at::kFloat, o_parts);
  check_output(lse, "lse", {B, H, N}, at::kFloat, o_parts);
  TORCH_CHECK_VALUE(out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16,
                    "ccam_kernels cuda: out must be float16 or bfloat16, got ", out.scalar_type());
  check_on(out, "out", o_parts);
  check_on(acc, "acc", o_parts);
  MergeParams p{};
  if (out.numel()) {
    check_output(out, "out", {B, N, H, D}, out.scalar_type(), o_parts);
    p.out = out.data_ptr();
  }
  if (acc.numel()) {
    check_output(acc, "acc", {B, N, H, D}, at::kFloat, o_parts);
    p.acc = acc.data_ptr<float>();
  }
  p.o_parts = o_parts.data_ptr<float>();
  p.lse_parts = lse_parts.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.splits = static_cast<int>(S);
  p.batch = static_cast<int>(B);
  p.num_query = static_cast<int>(N);
  p.heads = static_cast<int>(H);
  p.head_dim = static_cast<int>(D);
  Device::launch(out, p.head_dim, {{"o_parts", o_parts}, {"lse_parts", lse_parts}, {"out", out, true},
                                   {"acc", acc, true}, {"lse", lse, true}},
                 [&](auto dtype, auto width, cudaStream_t stream) {
    return launch_merge<decltype(dtype), decltype(width)::value>(p, stream);
  });
}
