// The per-image crop and colour jitter of the augmentation recipe, each in one or two passes over
// a view's pixels (simsiam_tf/augment.py computes the same with stock TensorFlow ops in about
// 25; docs/PERFORMANCE.md). These are the kernels tf.data runs on the host CPU, one example per
// call on one of its threads: single-threaded by design, as the pipeline parallelises across
// examples. On an accelerator the batched kernels of augment.py run instead.
//
// Arithmetic follows augment.py's per-image kernels operation for operation in float32, built
// with -ffp-contract=off so that a*b + c rounds as TensorFlow's separate ops do; the results
// agree to float rounding (tests/test_native.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

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

// ------------------------------------------------------------------------------------------------
// SimsiamResizeCrop: antialiased bilinear resize of a window of a uint8 HxWx3 image.

REGISTER_OP("SimsiamResizeCrop")
    .Input("image: uint8")   // HxWx3
    .Input("window: int32")  // [4]: y, x, h, w
    .Output("view: float")   // size x size x 3, times gain
    .Attr("size: int >= 1")
    .Attr("gain: float = 1.0")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle image, window;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &window));
      int size;
      TF_RETURN_IF_ERROR(c->GetAttr("size", &size));
      c->set_output(0, c->MakeShape({size, size, c->Dim(image, 2)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Crops window (y, x, h, w) out of an HxWx3 uint8 image and resizes it to size x size with
antialiased bilinear resampling (a triangle of half-width max(1, h / size) input pixels,
normalised over the pixels inside the window): what PIL's BILINEAR resize and
tf.image.resize(antialias=True) compute. float32 out, times gain.
)doc");

// Taps of one axis: output k reads input first[k] .. first[k] + count[k] - 1 with weights[k][.].
struct Taps {
  std::vector<int> first, count;
  std::vector<float> weights;  // size x max_count
  int max_count = 0;
};

// augment.py's _resize_taps: centre (k + 0.5) * scale, triangle of half-width
// support = max(scale, 1), weights w(p) = max(0, 1 - |p + 0.5 - centre| / support) over the
// inputs p in [0, length), divided by their sum, times gain.
Taps ResizeTaps(int length, int size, float gain) {
  Taps t;
  const float scale = static_cast<float>(length) / size;
  const float support = std::max(scale, 1.0f);
  t.max_count = std::min(length, static_cast<int>(std::ceil(2.0f * support)) + 2);
  t.first.resize(size);
  t.count.resize(size);
  t.weights.assign(static_cast<size_t>(size) * t.max_count, 0.0f);
  for (int k = 0; k < size; ++k) {
    const float centre = (static_cast<float>(k) + 0.5f) * scale;
    int lo = std::max(0, static_cast<int>(std::floor(centre - support)));
    int hi = std::min(length, static_cast<int>(std::ceil(centre + support)) + 1);
    // Keep only the taps with a positive weight, at most max_count of them.
    float* w = &t.weights[static_cast<size_t>(k) * t.max_count];
    float sum = 0.0f;
    int first = -1, n = 0;
    for (int p = lo; p < hi; ++p) {
      const float d = std::fabs(static_cast<float>(p) + 0.5f - centre) / support;
      const float v = 1.0f - d;
      if (v <= 0.0f) continue;
      if (first < 0) first = p;
      w[p - first] = v;
      n = p - first + 1;
      sum += v;
    }
    if (first < 0) {  // cannot happen for length >= 1: the nearest input always has v > 0
      first = std::min(length - 1, static_cast<int>(centre));
      w[0] = 1.0f;
      n = 1;
      sum = 1.0f;
    }
    for (int i = 0; i < n; ++i) w[i] = w[i] / sum * gain;
    t.first[k] = first;
    t.count[k] = n;
  }
  return t;
}

class ResizeCropOp : public OpKernel {
 public:
  explicit ResizeCropOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("size", &size_));
    OP_REQUIRES_OK(context, context->GetAttr("gain", &gain_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& window = context->input(1);
    OP_REQUIRES(context, image.dims() == 3 && image.dim_size(2) == 3,
                InvalidArgument("SimsiamResizeCrop: image must be HxWx3, got ",
                                image.shape().DebugString()));
    OP_REQUIRES(context, window.NumElements() == 4,
                InvalidArgument("SimsiamResizeCrop: window must be [y, x, h, w], got ",
                                window.shape().DebugString()));
    const int height = static_cast<int>(image.dim_size(0));
    const int width = static_cast<int>(image.dim_size(1));
    const auto win = window.flat<int32_t>();
    const int y = win(0), x = win(1), h = win(2), w = win(3);
    OP_REQUIRES(context,
                h >= 1 && w >= 1 && y >= 0 && x >= 0 && y + h <= height && x + w <= width,
                InvalidArgument("SimsiamResizeCrop: window (y=", y, ", x=", x, ", h=", h,
                                ", w=", w, ") is not inside the ", height, "x", width,
                                " image"));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({size_, size_, 3}), &output));

    const Taps rows = ResizeTaps(h, size_, gain_);
    const Taps cols = ResizeTaps(w, size_, 1.0f);
    const uint8_t* src = image.flat<uint8_t>().data();
    float* dst = output->flat<float>().data();
    const int stride = width * 3;
    std::vector<float> line(static_cast<size_t>(w) * 3);  // one output row, window width
    for (int r = 0; r < size_; ++r) {
      // Vertical pass (as augment.py: rows first): line = sum_i wy[i] * crop row first + i.
      const float* wy = &rows.weights[static_cast<size_t>(r) * rows.max_count];
      const uint8_t* in = src + static_cast<size_t>(y + rows.first[r]) * stride + x * 3;
      std::fill(line.begin(), line.end(), 0.0f);
      for (int i = 0; i < rows.count[r]; ++i) {
        const float weight = wy[i];
        const uint8_t* row = in + static_cast<size_t>(i) * stride;
        for (int j = 0; j < w * 3; ++j) line[j] += weight * static_cast<float>(row[j]);
      }
      // Horizontal pass: out[r, k, c] = sum_i wx[i] * line[first + i, c].
      float* out = dst + static_cast<size_t>(r) * size_ * 3;
      for (int k = 0; k < size_; ++k) {
        const float* wx = &cols.weights[static_cast<size_t>(k) * cols.max_count];
        const float* px = &line[static_cast<size_t>(cols.first[k]) * 3];
        float a = 0.0f, b = 0.0f, c = 0.0f;
        for (int i = 0; i < cols.count[k]; ++i) {
          a += wx[i] * px[3 * i];
          b += wx[i] * px[3 * i + 1];
          c += wx[i] * px[3 * i + 2];
        }
        out[3 * k] = a;
        out[3 * k + 1] = b;
        out[3 * k + 2] = c;
      }
    }
  }

 private:
  int size_;
  float gain_;
};

REGISTER_KERNEL_BUILDER(Name("SimsiamResizeCrop").Device(DEVICE_CPU), ResizeCropOp);

// ------------------------------------------------------------------------------------------------
// SimsiamColorJitter: torchvision ColorJitter on one float HxWx3 image in [0, 1].

REGISTER_OP("SimsiamColorJitter")
    .Input("image: float")  // HxWx3 in [0, 1]
    .Input("order: int32")  // [4]: a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
    .Input("factors: float")  // [4]: brightness, contrast, saturation factors; hue shift
    .Output("jittered: float")
    .Attr("hue: bool = true")  // false: the hue op is the identity (ColorJitter(hue=0))
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle image;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      c->set_output(0, image);
      return absl::OkStatus();
    })
    .Doc(R"doc(
torchvision ColorJitter on one HxWx3 float image with its factors applied in `order`, each
result clipped to [0, 1]: brightness x * f; contrast a blend with the mean of the image's
ITU-R 601 gray; saturation a blend with its gray; hue a shift of H in HSV by factors[3]
(a fraction of the circle). The ops are fused per pixel: one pass over the image, two when
contrast (which needs the mean of the image before it) is not the first op.
)doc");

constexpr float kLuma[3] = {0.299f, 0.587f, 0.114f};

// Pixels are processed in blocks of kBlock, de-interleaved into three planes that stay in the
// L1 cache; each op is then one loop over a block that the compiler vectorises.
constexpr int kBlock = 512;

struct Planes {
  float r[kBlock], g[kBlock], b[kBlock];
};

inline float Clip01(float v) { return std::min(std::max(v, 0.0f), 1.0f); }

// floor(x) for |x| < 2^31 without libm (so that the loop vectorises without SSE4.1's roundps).
inline float Floor(float x) {
  const float t = static_cast<float>(static_cast<int32_t>(x));
  return t > x ? t - 1.0f : t;
}

void Scale(Planes& p, int n, float f) {  // brightness
  for (int i = 0; i < n; ++i) {
    p.r[i] = Clip01(p.r[i] * f);
    p.g[i] = Clip01(p.g[i] * f);
    p.b[i] = Clip01(p.b[i] * f);
  }
}

void BlendConstant(Planes& p, int n, float f, float ref) {  // contrast: ref = mean * (1 - f)
  for (int i = 0; i < n; ++i) {
    p.r[i] = Clip01(p.r[i] * f + ref);
    p.g[i] = Clip01(p.g[i] * f + ref);
    p.b[i] = Clip01(p.b[i] * f + ref);
  }
}

void BlendGray(Planes& p, int n, float f) {  // saturation
  const float rest = 1.0f - f;
  for (int i = 0; i < n; ++i) {
    const float ref = (p.r[i] * kLuma[0] + p.g[i] * kLuma[1] + p.b[i] * kLuma[2]) * rest;
    p.r[i] = Clip01(p.r[i] * f + ref);
    p.g[i] = Clip01(p.g[i] * f + ref);
    p.b[i] = Clip01(p.b[i] * f + ref);
  }
}

// augment.py's _hue_planar: V and chroma C are kept, H (in sixths of the circle) moves by
// six_delta; HSV -> RGB in its closed form f(n) = V - C * clamp(min(k, 4 - k), 0, 1),
// k = (n + H) mod 6, (R, G, B) = f(5, 3, 1). Selects, no branches: the loop vectorises.
void ShiftHue(Planes& p, int n, float six_delta) {
  for (int i = 0; i < n; ++i) {
    const float r = p.r[i], g = p.g[i], b = p.b[i];
    const float v = std::max(std::max(r, g), b);
    const float c = v - std::min(std::min(r, g), b);
    const bool is_r = v == r, is_g = v == g;
    const float num = is_r ? g - b : (is_g ? b - r : r - g);
    const float offset = is_r ? 0.0f : (is_g ? 2.0f : 4.0f);
    const float ratio = num / (c == 0.0f ? 1.0f : c);  // never a division by zero: it vectorises
    const float h = (offset + (c == 0.0f ? 0.0f : ratio)) + six_delta;
    float k5 = h + 5.0f, k3 = h + 3.0f, k1 = h + 1.0f;
    k5 = k5 - 6.0f * Floor(k5 * (1.0f / 6.0f));
    k3 = k3 - 6.0f * Floor(k3 * (1.0f / 6.0f));
    k1 = k1 - 6.0f * Floor(k1 * (1.0f / 6.0f));
    p.r[i] = v - c * Clip01(std::min(k5, 4.0f - k5));
    p.g[i] = v - c * Clip01(std::min(k3, 4.0f - k3));
    p.b[i] = v - c * Clip01(std::min(k1, 4.0f - k1));
  }
}

class ColorJitterOp : public OpKernel {
 public:
  explicit ColorJitterOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("hue", &hue_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& order_t = context->input(1);
    const Tensor& factors_t = context->input(2);
    OP_REQUIRES(context, image.dims() == 3 && image.dim_size(2) == 3,
                InvalidArgument("SimsiamColorJitter: image must be HxWx3, got ",
                                image.shape().DebugString()));
    OP_REQUIRES(context, order_t.NumElements() == 4 && factors_t.NumElements() == 4,
                InvalidArgument("SimsiamColorJitter: order and factors must have 4 values"));
    int order[4];
    bool seen[4] = {false, false, false, false};
    for (int i = 0; i < 4; ++i) {
      order[i] = order_t.flat<int32_t>()(i);
      OP_REQUIRES(context, order[i] >= 0 && order[i] < 4 && !seen[order[i]],
                  InvalidArgument("SimsiamColorJitter: order must be a permutation of 0-3"));
      seen[order[i]] = true;
    }
    const auto f = factors_t.flat<float>();
    const float brightness = f(0), contrast = f(1), saturation = f(2);
    const float six_delta = 6.0f * f(3);

    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, image.shape(), &output));
    const int64_t n = image.dim_size(0) * image.dim_size(1);
    const float* in = image.flat<float>().data();
    float* out = output->flat<float>().data();

    // Ops [begin, end) of the order on one block; contrast blends with `mean`.
    const auto apply = [&](Planes& p, int m, int begin, int end, float mean) {
      for (int i = begin; i < end; ++i) {
        switch (order[i]) {
          case 0:
            Scale(p, m, brightness);
            break;
          case 1:
            BlendConstant(p, m, contrast, mean * (1.0f - contrast));
            break;
          case 2:
            BlendGray(p, m, saturation);
            break;
          default:
            if (hue_) ShiftHue(p, m, six_delta);
        }
      }
    };
    // Pass 1: the ops before contrast, and the sum of the gray image they leave; pass 2:
    // contrast with that mean, then the ops after it.
    const int at = static_cast<int>(std::find(order, order + 4, 1) - order);
    Planes p;
    double gray_sum = 0.0;
    for (int pass = 0; pass < 2; ++pass) {
      const float* src = pass == 0 ? in : out;
      const float mean = static_cast<float>(gray_sum / static_cast<double>(std::max<int64_t>(n, 1)));
      for (int64_t start = 0; start < n; start += kBlock) {
        const int m = static_cast<int>(std::min<int64_t>(kBlock, n - start));
        const float* s = src + 3 * start;
        for (int i = 0; i < m; ++i) {
          p.r[i] = s[3 * i];
          p.g[i] = s[3 * i + 1];
          p.b[i] = s[3 * i + 2];
        }
        if (pass == 0) {
          apply(p, m, 0, at, 0.0f);
          float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int i = 0; i < m; ++i) {
            partial[i % 8] += p.r[i] * kLuma[0] + p.g[i] * kLuma[1] + p.b[i] * kLuma[2];
          }
          for (float v : partial) gray_sum += v;
        } else {
          apply(p, m, at, 4, mean);
        }
        float* d = out + 3 * start;
        for (int i = 0; i < m; ++i) {
          d[3 * i] = p.r[i];
          d[3 * i + 1] = p.g[i];
          d[3 * i + 2] = p.b[i];
        }
      }
    }
  }

 private:
  bool hue_;
};

REGISTER_KERNEL_BUILDER(Name("SimsiamColorJitter").Device(DEVICE_CPU), ColorJitterOp);

}  // namespace
}  // namespace simsiam
