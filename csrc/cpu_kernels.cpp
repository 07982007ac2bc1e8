// LightGPT's compiled CPU kernels, built on the user's machine by cpu_kernels.py (torch.utils.cpp_extension)
// and registered as torch ops. Training on the CPU eagerly in fp32 uses them; every other path keeps torch's.
//
// lightgpt::rms_norm(x, weight, eps) -> y = x / sqrt(mean(x^2, -1) + eps) * weight, as torch.nn.RMSNorm computes
// it, with its backward in C++ as well. torch 2.13 has no fused RMSNorm for the CPU (rms_norm decomposes into
// about a dozen kernels), and model.py's fallback, a Python autograd.Function, crosses into Python in the forward
// and again in the backward of each of the model's norms. Here the forward is two passes over each row and the
// backward two over each row of x and the gradient.
//
// lightgpt::adafactor_step_(...) -> one step of adafactor.Adafactor (torch.optim.Adafactor's algorithm, with
// momentum when beta1 > 0) over a group of whole fp32 CPU parameters, in place. adafactor.py's eager step is
// about fifteen passes over each matrix, in foreach kernels, with Python between them; here it is three row loops
// per parameter: (1) the row and column means of grad^2 and the weight's sum of squares, (2) the sum of squares
// of the update grad x row factor x column factor, never stored, (3) momentum and the weights, in one pass.
//
// Each row loop is compiled for AVX-512, AVX2 and the baseline (GCC's target_clones, chosen when the library
// loads), so a build cached in a shared home folder runs on any x86-64 machine that reads it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LIGHTGPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LIGHTGPT_CLONES
#endif

namespace {

constexpr int64_t kRows = 64;  // rows per chunk: the weight's gradient is summed in float within a chunk,
                               // in double across chunks, in chunk order (the same on any thread count)

// fn(chunk, begin, end) for each chunk of `grain` rows out of `rows`, the chunks spread over torch's threads. A
// chunk's partial sums land in its own slot and are added in chunk order: the same bits on any thread count.
template <typename F>
void for_each_chunk(int64_t rows, int64_t grain, const F& fn) {
  const int64_t chunks = (rows + grain - 1) / grain;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) fn(k, k * grain, std::min(rows, (k + 1) * grain));
  });
}

// ----------------------------------------------------------------------------- RMSNorm, row loops

LIGHTGPT_CLONES void norm_forward_rows(const float* X, const float* W, float* Y, float* R, int64_t C, float eps,
                                       int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const float* x = X + n * C;
    float* y = Y + n * C;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) squares += x[c] * x[c];
    const float r = 1.f / std::sqrt(squares / C + eps);  // 1 / rms
    R[n] = r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = x[c] * r * W[c];
  }
}

// dx = r * w * g - r^3 / C * sum(w * g * x) * x, and dw = sum over rows of g * x * r (one chunk's, in Wsum).
LIGHTGPT_CLONES void norm_backward_rows(const float* G, const float* X, const float* W, const float* R, float* DX,
                                        float* Wsum, int64_t C, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const float* g = G + n * C;
    const float* x = X + n * C;
    const float r = R[n];
    if (DX != nullptr) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < C; ++c) dot += W[c] * g[c] * x[c];
      const float k = r * r * r * dot / C;
      float* dx = DX + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dx[c] = r * W[c] * g[c] - k * x[c];
    }
    if (Wsum != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) Wsum[c] += g[c] * x[c] * r;
    }
  }
}

void check_norm_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "lightgpt::rms_norm runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "lightgpt::rms_norm takes float32 tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "lightgpt::rms_norm: the weight must have the size of x's last dimension");
}

std::tuple<at::Tensor, at::Tensor> norm_forward(const at::Tensor& input, const at::Tensor& weight_in, double eps) {
  check_norm_inputs(input, weight_in);
  const at::Tensor x = input.contiguous(), weight = weight_in.contiguous();
  const int64_t C = x.size(-1), N = C ? x.numel() / C : 0;
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty({N}, x.options());
  const float* X = x.const_data_ptr<float>();
  const float* W = weight.const_data_ptr<float>();
  float* Y = y.mutable_data_ptr<float>();
  float* R = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    norm_forward_rows(X, W, Y, R, C, static_cast<float>(eps), begin, end);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> norm_backward(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& rstd, bool input_grad, bool weight_grad) {
  const at::Tensor grad = grad_in.contiguous();
  const int64_t C = x.size(-1), N = C ? x.numel() / C : 0;
  const int64_t chunks = (N + kRows - 1) / kRows;
  at::Tensor grad_x = input_grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor partial = weight_grad ? at::empty({chunks, C}, x.options()) : at::Tensor();
  const float* G = grad.const_data_ptr<float>();
  const float* X = x.const_data_ptr<float>();
  const float* W = weight.const_data_ptr<float>();
  const float* R = rstd.const_data_ptr<float>();
  float* DX = input_grad ? grad_x.mutable_data_ptr<float>() : nullptr;
  float* P = weight_grad ? partial.mutable_data_ptr<float>() : nullptr;
  for_each_chunk(N, kRows, [&](int64_t chunk, int64_t begin, int64_t end) {
    if (P != nullptr) std::fill(P + chunk * C, P + (chunk + 1) * C, 0.f);
    norm_backward_rows(G, X, W, R, DX, P ? P + chunk * C : nullptr, C, begin, end);
  });
  at::Tensor grad_w;
  if (weight_grad) {  // the chunks' sums in chunk order, in double
    grad_w = at::empty({C}, x.options());
    std::vector<double> total(C, 0.0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < C; ++c) total[c] += P[chunk * C + c];
    float* GW = grad_w.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) GW[c] = static_cast<float>(total[c]);
  }
  return {grad_x, grad_w};
}

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = norm_forward(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor x = saved[0].contiguous(), weight = saved[1].contiguous();
    auto [grad_x, grad_w] = norm_backward(grads[0], x, weight, saved[2], ctx->needs_input_grad(0),
                                          ctx->needs_input_grad(1));
    return {grad_x, grad_w, at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RMSNormFunction::apply(x, weight, eps);
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm_forward(x, weight, eps));
}

// ----------------------------------------------------------------------------- Adafactor, row loops

// Phase 1 for rows [begin, end) of a (R, C) matrix: row_var[r] moves toward mean(g[r]^2) by beta; the chunk's column
// sums of g^2 go to col (zeroed by the caller); returns the chunk's sums of p^2 and of the new row_var.
LIGHTGPT_CLONES void matrix_statistics(const float* P, const float* G, float* row_var, float* col, int64_t C, float beta,
                                       int64_t begin, int64_t end, double* p_squares, double* row_total) {
  double ps = 0, rt = 0;
  for (int64_t r = begin; r < end; ++r) {
    const float* g = G + r * C;
    const float* p = P + r * C;
    float gs = 0.f, pq = 0.f;
#pragma omp simd reduction(+ : gs, pq)
    for (int64_t c = 0; c < C; ++c) {
      const float square = g[c] * g[c];
      gs += square;
      pq += p[c] * p[c];
      col[c] += square;
    }
    row_var[r] += beta * (gs / C - row_var[r]);
    ps += pq;
    rt += row_var[r];
  }
  *p_squares = ps;
  *row_total = rt;
}

// Phase 2: the sum of squares of the update g[r, c] x rows[r] x cols[c] over rows [begin, end).
LIGHTGPT_CLONES double matrix_update_squares(const float* G, const float* rows, const float* cols, int64_t C,
                                             int64_t begin, int64_t end) {
  double total = 0;
  for (int64_t r = begin; r < end; ++r) {
    const float* g = G + r * C;
    const float f = rows[r];
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) {
      const float u = g[c] * f * cols[c];
      s += u * u;
    }
    total += s;
  }
  return total;
}

// Phase 3 over elements [begin, end) of a parameter seen as rows of C (a vector: one row, cols the whole factor):
// with momentum, m = beta1 m + (1 - beta1) / clip x u and p = decay x p - alpha x m; without, p = decay x p - alpha / clip x u.
LIGHTGPT_CLONES void apply_rows(float* P, const float* G, float* M, const float* rows, const float* cols, int64_t C,
                                float decay, float alpha, float inverse_clip, float beta1, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* p = P + r * C;
    const float* g = G + r * C;
    const float f = rows ? rows[r] : 1.f;
    if (M != nullptr) {
      float* m = M + r * C;
      const float k = (1.f - beta1) * inverse_clip * f;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        m[c] = beta1 * m[c] + k * g[c] * cols[c];
        p[c] = decay * p[c] - alpha * m[c];
      }
    } else {
      const float k = alpha * inverse_clip * f;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) p[c] = decay * p[c] - k * g[c] * cols[c];
    }
  }
}

// A tensor the step reads or writes in place: contiguous fp32 on the CPU, with `numel` elements (a state loaded
// from a checkpoint of another shape must fail here, not write past its end).
void check_parameter(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "lightgpt::adafactor_step_: ", what, " must be contiguous float32 CPU tensors");
  TORCH_CHECK(t.numel() == numel, "lightgpt::adafactor_step_: ", what, " has ", t.numel(), " elements where ",
              numel, " are expected");
}

// One parameter's step. rho is min(lr, 1 / sqrt(step)) and beta is step^beta2_decay (1 - beta2), as adafactor.py's
// host numbers; eps1 floors each factor of the second moment, eps2 the weight's RMS in the step size.
void adafactor_parameter(at::Tensor& param, const at::Tensor& grad_in, const std::optional<at::Tensor>& row_var_opt,
                         const std::optional<at::Tensor>& col_var_opt, const std::optional<at::Tensor>& variance_opt,
                         const std::optional<at::Tensor>& exp_avg_opt, double beta, double rho, double eps1,
                         double eps2, double d, double lr, double weight_decay, double beta1, bool maximize) {
  TORCH_CHECK(param.dim() == 1 || param.dim() == 2, "lightgpt::adafactor_step_ handles vectors and matrices");
  const int64_t numel = param.numel();
  check_parameter(param, numel, "the parameters");
  at::Tensor grad = grad_in.contiguous();
  if (maximize) grad = grad.neg();
  check_parameter(grad, numel, "the gradients");
  const bool matrix = param.dim() == 2;
  if (numel == 0) return;
  const int64_t R = matrix ? param.size(0) : 1, C = matrix ? param.size(1) : numel;
  float* P = param.mutable_data_ptr<float>();
  const float* G = grad.const_data_ptr<float>();
  float* M = nullptr;
  if (exp_avg_opt.has_value() && exp_avg_opt->defined()) {
    check_parameter(*exp_avg_opt, numel, "the exp_avg states");
    M = exp_avg_opt->mutable_data_ptr<float>();
  }
  const float b = static_cast<float>(beta);
  // at most 64 chunks of rows, whatever the thread count: each chunk's column sums stay small and the sums
  // come out the same on any number of threads
  const int64_t grain = std::max<int64_t>({1, 16384 / C, (R + 63) / 64}), chunks = (R + grain - 1) / grain;
  at::Tensor rows_t, cols_t;
  double p_squares = 0, update_squares = 0;
  if (matrix) {
    TORCH_CHECK(row_var_opt.has_value() && col_var_opt.has_value(), "lightgpt::adafactor_step_: a matrix needs row_var and col_var");
    at::Tensor row_var = *row_var_opt, col_var = *col_var_opt;
    check_parameter(row_var, R, "the row_var states");
    check_parameter(col_var, C, "the col_var states");
    float* RV = row_var.mutable_data_ptr<float>();
    at::Tensor col_partial = at::zeros({chunks, C}, param.options());
    std::vector<double> p_part(chunks), row_part(chunks);
    float* CP = col_partial.mutable_data_ptr<float>();
    for_each_chunk(R, grain, [&](int64_t k, int64_t begin, int64_t end) {
      matrix_statistics(P, G, RV, CP + k * C, C, b, begin, end, &p_part[k], &row_part[k]);
    });
    double row_total = 0;
    for (int64_t k = 0; k < chunks; ++k) { p_squares += p_part[k]; row_total += row_part[k]; }
    // column second moments toward this step's column means, then the two factors of 1 / sqrt(moment)
    at::Tensor col_mean = col_partial.sum(0, false, at::kDouble).div_(static_cast<double>(R)).to(at::kFloat);
    col_var.view({C}).lerp_(col_mean, b);
    const double row_mean = std::max(row_total / R, eps1);
    rows_t = row_var.view({R}).div(row_mean).clamp_min_(eps1).rsqrt_();
    cols_t = col_var.view({C}).clamp_min(eps1).rsqrt_();
    const float* rows = rows_t.const_data_ptr<float>();
    const float* cols = cols_t.const_data_ptr<float>();
    std::vector<double> u_part(chunks);
    for_each_chunk(R, grain, [&](int64_t k, int64_t begin, int64_t end) {
      u_part[k] = matrix_update_squares(G, rows, cols, C, begin, end);
    });
    for (int64_t k = 0; k < chunks; ++k) update_squares += u_part[k];
  } else {
    TORCH_CHECK(variance_opt.has_value(), "lightgpt::adafactor_step_: a vector needs its variance");
    at::Tensor variance = *variance_opt;
    check_parameter(variance, numel, "the variance states");
    at::Tensor g = grad.view({numel});
    variance.lerp_(g * g, b);
    p_squares = param.to(at::kDouble).square().sum().item<double>();
    cols_t = variance.clamp_min(eps1 * eps1).rsqrt_();  // a vector's update is g x this
    update_squares = (g.to(at::kDouble) * cols_t.to(at::kDouble)).square().sum().item<double>();
  }
  const double alpha = std::max(std::sqrt(p_squares / numel), eps2) * rho;
  const double clip = std::max(std::sqrt(update_squares / numel) / d, 1.0);
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float* rows = matrix ? rows_t.const_data_ptr<float>() : nullptr;
  const float* cols = cols_t.const_data_ptr<float>();
  for_each_chunk(R, grain, [&](int64_t, int64_t begin, int64_t end) {
    apply_rows(P, G, M, rows, cols, C, decay, static_cast<float>(alpha), static_cast<float>(1.0 / clip),
               static_cast<float>(beta1), begin, end);
  });
}

void adafactor_step_(at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& row_vars,
                     const c10::List<std::optional<at::Tensor>>& col_vars,
                     const c10::List<std::optional<at::Tensor>>& variances,
                     const c10::List<std::optional<at::Tensor>>& exp_avgs, at::ArrayRef<double> betas,
                     at::ArrayRef<double> rhos, at::ArrayRef<double> eps1s, double eps2, double d, double lr,
                     double weight_decay, double beta1, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && row_vars.size() == n && col_vars.size() == n && variances.size() == n &&
                  exp_avgs.size() == n && betas.size() == n && rhos.size() == n && eps1s.size() == n,
              "lightgpt::adafactor_step_: every list must have one entry per parameter");
  for (size_t i = 0; i < n; ++i) {
    at::Tensor param = params[i];
    adafactor_parameter(param, grads[i], row_vars.get(i), col_vars.get(i), variances.get(i), exp_avgs.get(i), betas[i],
                        rhos[i], eps1s[i], eps2, d, lr, weight_decay, beta1, maximize);
  }
}

}  // namespace

TORCH_LIBRARY(lightgpt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("adafactor_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)?[] row_vars, Tensor(c!)?[] col_vars, "
        "Tensor(d!)?[] variances, Tensor(e!)?[] exp_avgs, float[] betas, float[] rhos, float[] eps1s, float eps2, "
        "float d, float lr, float weight_decay, float beta1, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(lightgpt, CPU, m) {
  m.impl("rms_norm", rms_norm_cpu);
  m.impl("adafactor_step_", adafactor_step_);
}

TORCH_LIBRARY_IMPL(lightgpt, Autograd, m) {
  m.impl("rms_norm", rms_norm_autograd);
}
