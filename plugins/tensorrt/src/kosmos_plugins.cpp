// TensorRT IPluginV3 plugins for the ai.kosmos ops (specs: plugins/src/lib.rs), namespace
// "ai.kosmos", version "1". The ONNX parser builds them from nodes carrying
// plugin_namespace = "ai.kosmos"; `trtexec --dynamicPlugins=libkosmos_trt_plugins.so` loads
// them through getCreators(). Written against the TensorRT 10 plugin API (NvInferRuntime.h).
#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

#include "kosmos_kernels.h"

using namespace nvinfer1;

namespace {

constexpr char const* kNamespace = "ai.kosmos";
constexpr char const* kVersion = "1";

// A float or int attribute from the parser (ONNX ints may arrive as INT32 or INT64).
bool read_float(PluginField const& f, float& out) {
  if (f.type == PluginFieldType::kFLOAT32 && f.length >= 1) {
    out = *static_cast<float const*>(f.data);
    return true;
  }
  if (f.type == PluginFieldType::kFLOAT64 && f.length >= 1) {
    out = static_cast<float>(*static_cast<double const*>(f.data));
    return true;
  }
  return false;
}

bool read_int(PluginField const& f, int64_t& out) {
  if (f.type == PluginFieldType::kINT32 && f.length >= 1) {
    out = *static_cast<int32_t const*>(f.data);
    return true;
  }
  if (f.type == PluginFieldType::kINT64 && f.length >= 1) {
    out = *static_cast<int64_t const*>(f.data);
    return true;
  }
  return false;
}

int64_t volume(Dims const& d, int32_t from, int32_t to) {
  int64_t v = 1;
  for (int32_t i = from; i < to; ++i) v *= d.d[i];
  return v;
}

// What both plugins share: the capability dispatch, version and namespace, no workspace, no
// per-shape state, and a context copy by clone().
class KosmosPlugin : public IPluginV3,
                     public IPluginV3OneCore,
                     public IPluginV3OneBuild,
                     public IPluginV3OneRuntime {
 public:
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }
  int32_t getNbOutputs() const noexcept override { return 1; }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    return 0;
  }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*,
                        int32_t) noexcept override {
    return 0;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
};

// ---- XPos ------------------------------------------------------------------------------------

struct XposParams {
  float theta = 10000.0f;
  float scale_base = 512.0f;
  float centre = 0.0f;
  int32_t downscale = 0;
};

class XposPlugin : public KosmosPlugin {
 public:
  explicit XposPlugin(XposParams p) : p_(p) { sync_fields(); }

  IPluginV3* clone() noexcept override { return new XposPlugin(p_); }

  AsciiChar const* getPluginName() const noexcept override { return "XPos"; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs,
                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override {
    return nbInputs == 2 && nbOutputs == 1 ? 0 : -1;
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != 2) return -1;
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != 2 || nbOutputs != 1 || inputs[0].nbDims != 4) return -1;
    outputs[0] = inputs[0];
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t,
                                 int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
      case 0: return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
      case 1: return d.type == DataType::kINT64 || d.type == DataType::kINT32;
      case 2: return d.type == io[0].desc.type;
    }
    return false;
  }
  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Dims const& d = in[0].dims;
    int const b = d.d[0], h = d.d[1], s = d.d[2], hd = d.d[3];
    bool const half = in[0].type == DataType::kHALF;
    bool const i32 = in[1].type == DataType::kINT32;
    if (half && i32)
      return kosmos_xpos_f16_i32(static_cast<__half const*>(inputs[0]),
                                 static_cast<int32_t const*>(inputs[1]),
                                 static_cast<__half*>(outputs[0]), b, h, s, hd, p_.theta,
                                 p_.scale_base, p_.centre, p_.downscale, stream);
    if (half)
      return kosmos_xpos_f16(static_cast<__half const*>(inputs[0]),
                             static_cast<int64_t const*>(inputs[1]),
                             static_cast<__half*>(outputs[0]), b, h, s, hd, p_.theta,
                             p_.scale_base, p_.centre, p_.downscale, stream);
    if (i32)
      return kosmos_xpos_f32_i32(static_cast<float const*>(inputs[0]),
                                 static_cast<int32_t const*>(inputs[1]),
                                 static_cast<float*>(outputs[0]), b, h, s, hd, p_.theta,
                                 p_.scale_base, p_.centre, p_.downscale, stream);
    return kosmos_xpos_f32(static_cast<float const*>(inputs[0]),
                           static_cast<int64_t const*>(inputs[1]), static_cast<float*>(outputs[0]),
                           b, h, s, hd, p_.theta, p_.scale_base, p_.centre, p_.downscale, stream);
  }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

 private:
  void sync_fields() {
    fields_ = {
        PluginField("theta", &p_.theta, PluginFieldType::kFLOAT32, 1),
        PluginField("scale_base", &p_.scale_base, PluginFieldType::kFLOAT32, 1),
        PluginField("centre", &p_.centre, PluginFieldType::kFLOAT32, 1),
        PluginField("downscale", &p_.downscale, PluginFieldType::kINT32, 1),
    };
    fc_.nbFields = static_cast<int32_t>(fields_.size());
    fc_.fields = fields_.data();
  }

  XposParams p_;
  std::vector<PluginField> fields_;
  PluginFieldCollection fc_{};
};

// ---- SubLnGelu -------------------------------------------------------------------------------

class SubLnGeluPlugin : public KosmosPlugin {
 public:
  explicit SubLnGeluPlugin(float epsilon) : epsilon_(epsilon) {
    field_ = PluginField("epsilon", &epsilon_, PluginFieldType::kFLOAT32, 1);
    fc_.nbFields = 1;
    fc_.fields = &field_;
  }

  IPluginV3* clone() noexcept override { return new SubLnGeluPlugin(epsilon_); }

  AsciiChar const* getPluginName() const noexcept override { return "SubLnGelu"; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs,
                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override {
    return nbInputs == 3 && nbOutputs == 1 ? 0 : -1;
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != 3) return -1;
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1) return -1;
    outputs[0] = inputs[0];
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t,
                                 int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
    return d.type == io[0].desc.type;
  }
  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Dims const& d = in[0].dims;
    int const f = d.d[d.nbDims - 1];
    int const rows = static_cast<int>(volume(d, 0, d.nbDims - 1));
    if (in[0].type == DataType::kHALF)
      return kosmos_subln_gelu_f16(
          static_cast<__half const*>(inputs[0]), static_cast<__half const*>(inputs[1]),
          static_cast<__half const*>(inputs[2]), static_cast<__half*>(outputs[0]), rows, f,
          epsilon_, stream);
    return kosmos_subln_gelu_f32(static_cast<float const*>(inputs[0]),
                                 static_cast<float const*>(inputs[1]),
                                 static_cast<float const*>(inputs[2]),
                                 static_cast<float*>(outputs[0]), rows, f, epsilon_, stream);
  }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

 private:
  float epsilon_;
  PluginField field_;
  PluginFieldCollection fc_{};
};

// ---- creators --------------------------------------------------------------------------------

class XposCreator : public IPluginCreatorV3One {
 public:
  XposCreator() {
    names_ = {
        PluginField("theta", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("scale_base", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("centre", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("downscale", nullptr, PluginFieldType::kINT32, 1),
    };
    fc_.nbFields = static_cast<int32_t>(names_.size());
    fc_.fields = names_.data();
  }
  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc,
                          TensorRTPhase) noexcept override {
    XposParams p;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      int64_t v = 0;
      if (std::strcmp(f.name, "theta") == 0) read_float(f, p.theta);
      else if (std::strcmp(f.name, "scale_base") == 0) read_float(f, p.scale_base);
      else if (std::strcmp(f.name, "centre") == 0) read_float(f, p.centre);
      else if (std::strcmp(f.name, "downscale") == 0 && read_int(f, v)) p.downscale = v != 0;
      // plugin_namespace / plugin_version and unknown fields are not parameters.
    }
    return new XposPlugin(p);
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  AsciiChar const* getPluginName() const noexcept override { return "XPos"; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  std::vector<PluginField> names_;
  PluginFieldCollection fc_{};
};

class SubLnGeluCreator : public IPluginCreatorV3One {
 public:
  SubLnGeluCreator() {
    name_ = PluginField("epsilon", nullptr, PluginFieldType::kFLOAT32, 1);
    fc_.nbFields = 1;
    fc_.fields = &name_;
  }
  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc,
                          TensorRTPhase) noexcept override {
    float epsilon = 1e-5f;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
      if (std::strcmp(fc->fields[i].name, "epsilon") == 0) read_float(fc->fields[i], epsilon);
    return new SubLnGeluPlugin(epsilon);
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  AsciiChar const* getPluginName() const noexcept override { return "SubLnGelu"; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  PluginField name_;
  PluginFieldCollection fc_{};
};

}  // namespace

// The entry point `trtexec --dynamicPlugins` and IPluginRegistry::loadLibrary look for.
extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static XposCreator xpos;
  static SubLnGeluCreator subln;
  static IPluginCreatorInterface* const creators[] = {&xpos, &subln};
  nbCreators = 2;
  return creators;
}
