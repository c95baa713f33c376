// The training step of simsiam_tf.model.BatchNorm on the CPU: torch's BN formulas with every
// batch sum added in double, in one pass over the activations for the statistics, one for the
// output, and two for the gradient. model._normalize computes the same with stock TensorFlow
// ops in about fifteen passes, its float64 sums from float32 partial sums along the width; the
// results agree to float32 rounding (tests/test_native.py).
//
// x is channels-last with C channels; every axis but the last is reduced (R = size / C rows).
// The rows are cut into blocks of a fixed size that depends on C only, each block's sums are
// computed by one thread, and the blocks are added in order: the result is the same bits
// whatever the number of threads, so exact resume holds.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"
#include "tensorflow/core/util/work_sharder.h"

namespace simsiam {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
namespace shape_inference = ::tensorflow::shape_inference;

// Rows per block: about 16k values, so that a block's work outweighs its dispatch.
int64_t BlockRows(int64_t channels) { return std::max<int64_t>(1, 16384 / channels); }

// Runs fn(block) for every block on TensorFlow's intra-op pool.
template <typename Fn>
void ForEachBlock(OpKernelContext* context, int64_t blocks, int64_t cost_per_block, Fn fn) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(pool->num_threads, pool->workers, blocks, cost_per_block,
                      [&](int64_t begin, int64_t end) {
                        for (int64_t b = begin; b < end; ++b) fn(b);
                      });
}

// Adds the per-block sums [blocks, k * C] into out[k * C], block after block.
void AddBlocks(const std::vector<double>& partial, int64_t blocks, int64_t width, double* out) {
  std::fill(out, out + width, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const double* p = &partial[b * width];
    for (int64_t i = 0; i < width; ++i) out[i] += p[i];
  }
}

Tensor* Allocate(OpKernelContext* context, int index, const TensorShape& shape) {
  Tensor* t = nullptr;
  auto status = context->allocate_output(index, shape, &t);
  if (!status.ok()) {
    context->SetStatus(status);
    return nullptr;
  }
  return t;
}

// ------------------------------------------------------------------------------------------------
// SimsiamBatchNormTrain: y = (x - mean) / sqrt(var + epsilon) * gamma + beta over the batch.

REGISTER_OP("SimsiamBatchNormTrain")
    .Input("x: float")       // [..., C]
    .Input("gamma: float")   // [C]
    .Input("beta: float")    // [C]
    .Output("y: float")      // x's shape
    .Output("mean: double")  // [C]
    .Output("variance: double")  // [C], biased
    .Output("inv: double")   // [C], 1 / sqrt(variance + epsilon)
    .Attr("epsilon: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &x));
      auto channels = c->Dim(x, -1);
      c->set_output(0, x);
      for (int i = 1; i < 4; ++i) c->set_output(i, c->MakeShape({channels}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Training-mode batch normalisation of channels-last x over all of its axes but the last, as
torch's CPU kernel computes it: the sums in double, the variance from x - mean, not from
E[x^2] - E[x]^2. x - x[0] is what is added (a shift by the first row, which keeps the one-pass
sums of squares accurate in double); the output is rounded to float once.
)doc");

class BatchNormTrainOp : public OpKernel {
 public:
  explicit BatchNormTrainOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x_in = context->input(0);
    const Tensor& gamma_in = context->input(1);
    const Tensor& beta_in = context->input(2);
    OP_REQUIRES(context, x_in.dims() >= 2,
                InvalidArgument("SimsiamBatchNormTrain: x must have a batch axis and a channel "
                                "axis, got ", x_in.shape().DebugString()));
    const int64_t channels = x_in.dim_size(x_in.dims() - 1);
    const int64_t rows = channels == 0 ? 0 : x_in.NumElements() / channels;
    OP_REQUIRES(context, gamma_in.NumElements() == channels && beta_in.NumElements() == channels,
                InvalidArgument("SimsiamBatchNormTrain: gamma and beta must have ", channels,
                                " values, got ", gamma_in.NumElements(), " and ",
                                beta_in.NumElements()));
    OP_REQUIRES(context, rows > 0,
                InvalidArgument("SimsiamBatchNormTrain: an empty batch has no statistics"));
    Tensor* y_out = Allocate(context, 0, x_in.shape());
    Tensor* mean_out = Allocate(context, 1, TensorShape({channels}));
    Tensor* var_out = Allocate(context, 2, TensorShape({channels}));
    Tensor* inv_out = Allocate(context, 3, TensorShape({channels}));
    if (!context->status().ok()) return;

    const float* x = x_in.flat<float>().data();
    const float* gamma = gamma_in.flat<float>().data();
    const float* beta = beta_in.flat<float>().data();
    float* y = y_out->flat<float>().data();
    double* mean = mean_out->flat<double>().data();
    double* var = var_out->flat<double>().data();
    double* inv = inv_out->flat<double>().data();
    const int64_t C = channels;

    std::vector<double> shift(x, x + C);
    const int64_t block_rows = BlockRows(C);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    std::vector<double> partial(blocks * 2 * C);
    ForEachBlock(context, blocks, block_rows * C * 4, [&](int64_t b) {
      double* s1 = &partial[b * 2 * C];
      double* s2 = s1 + C;
      std::fill(s1, s1 + 2 * C, 0.0);
      const double* k = shift.data();
      const int64_t end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* row = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(row[c]) - k[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
    });
    std::vector<double> sums(2 * C);
    AddBlocks(partial, blocks, 2 * C, sums.data());
    std::vector<double> scale(C), offset(C);
    const double n = static_cast<double>(rows);
    for (int64_t c = 0; c < C; ++c) {
      const double m1 = sums[c] / n;
      mean[c] = shift[c] + m1;
      var[c] = std::max(0.0, sums[C + c] / n - m1 * m1);
      inv[c] = 1.0 / std::sqrt(var[c] + static_cast<double>(epsilon_));
      scale[c] = inv[c] * gamma[c];
      offset[c] = beta[c];
    }
    ForEachBlock(context, blocks, block_rows * C * 3, [&](int64_t b) {
      const int64_t end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* in = x + r * C;
        float* out = y + r * C;
        for (int64_t c = 0; c < C; ++c) {
          out[c] = static_cast<float>((static_cast<double>(in[c]) - mean[c]) * scale[c] +
                                      offset[c]);
        }
      }
    });
  }

 private:
  float epsilon_;
};

REGISTER_KERNEL_BUILDER(Name("SimsiamBatchNormTrain").Device(DEVICE_CPU), BatchNormTrainOp);

// ------------------------------------------------------------------------------------------------
// SimsiamBatchNormGrad: torch's gradient of the training step above.

REGISTER_OP("SimsiamBatchNormGrad")
    .Input("dy: float")     // [..., C]
    .Input("x: float")      // [..., C]
    .Input("mean: double")  // [C]
    .Input("inv: double")   // [C]
    .Input("gamma: float")  // [C]
    .Output("dx: float")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 2, &x));
      c->set_output(0, x);
      c->set_output(1, c->MakeShape({c->Dim(x, -1)}));
      c->set_output(2, c->MakeShape({c->Dim(x, -1)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
With x_hat = (x - mean) * inv: dbeta = sum(dy), dgamma = sum(dy * x_hat), and
dx = gamma * inv * (dy - dbeta / n - x_hat * dgamma / n), n the values per channel; the sums
and products in double.
)doc");

class BatchNormGradOp : public OpKernel {
 public:
  explicit BatchNormGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& dy_in = context->input(0);
    const Tensor& x_in = context->input(1);
    OP_REQUIRES(context, dy_in.shape() == x_in.shape() && x_in.dims() >= 2,
                InvalidArgument("SimsiamBatchNormGrad: dy ", dy_in.shape().DebugString(),
                                " and x ", x_in.shape().DebugString(),
                                " must have one shape with a channel axis"));
    const int64_t C = x_in.dim_size(x_in.dims() - 1);
    for (int i = 2; i < 5; ++i) {
      OP_REQUIRES(context, context->input(i).NumElements() == C,
                  InvalidArgument("SimsiamBatchNormGrad: input ", i, " must have ", C,
                                  " values, got ", context->input(i).NumElements()));
    }
    const int64_t rows = C == 0 ? 0 : x_in.NumElements() / C;
    OP_REQUIRES(context, rows > 0, InvalidArgument("SimsiamBatchNormGrad: an empty batch"));
    Tensor* dx_out = Allocate(context, 0, x_in.shape());
    Tensor* dgamma_out = Allocate(context, 1, TensorShape({C}));
    Tensor* dbeta_out = Allocate(context, 2, TensorShape({C}));
    if (!context->status().ok()) return;

    const float* dy = dy_in.flat<float>().data();
    const float* x = x_in.flat<float>().data();
    const double* mean = context->input(2).flat<double>().data();
    const double* inv = context->input(3).flat<double>().data();
    const float* gamma = context->input(4).flat<float>().data();
    float* dx = dx_out->flat<float>().data();

    const int64_t block_rows = BlockRows(C);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    std::vector<double> partial(blocks * 2 * C);
    ForEachBlock(context, blocks, block_rows * C * 5, [&](int64_t b) {
      double* s_dy = &partial[b * 2 * C];
      double* s_dyx = s_dy + C;
      std::fill(s_dy, s_dy + 2 * C, 0.0);
      const int64_t end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* g = dy + r * C;
        const float* in = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(g[c]);
          s_dy[c] += d;
          s_dyx[c] += d * ((static_cast<double>(in[c]) - mean[c]) * inv[c]);
        }
      }
    });
    std::vector<double> sums(2 * C);
    AddBlocks(partial, blocks, 2 * C, sums.data());
    const double n = static_cast<double>(rows);
    std::vector<double> mean_dy(C), mean_dyx(C), scale(C);
    for (int64_t c = 0; c < C; ++c) {
      dbeta_out->flat<float>()(c) = static_cast<float>(sums[c]);
      dgamma_out->flat<float>()(c) = static_cast<float>(sums[C + c]);
      mean_dy[c] = sums[c] / n;
      mean_dyx[c] = sums[C + c] / n;
      scale[c] = static_cast<double>(gamma[c]) * inv[c];
    }
    ForEachBlock(context, blocks, block_rows * C * 5, [&](int64_t b) {
      const int64_t end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < end; ++r) {
        const float* g = dy + r * C;
        const float* in = x + r * C;
        float* out = dx + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const double x_hat = (static_cast<double>(in[c]) - mean[c]) * inv[c];
          out[c] = static_cast<float>(
              scale[c] * (static_cast<double>(g[c]) - mean_dy[c] - x_hat * mean_dyx[c]));
        }
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("SimsiamBatchNormGrad").Device(DEVICE_CPU), BatchNormGradOp);

}  // namespace
}  // namespace simsiam
