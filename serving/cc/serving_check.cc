// serving_check: a SavedModel served through TensorFlow's C++ loader, the loading path that
// TF Serving's SavedModel servables wrap: tensorflow::LoadSavedModel(..., {"serve"}, &bundle),
// the SignatureDefs of bundle.meta_graph_def, and bundle.session->Run on the signature's tensors.
//
//   serving_check MODEL_PATH [--warmup] [--warmup_file=FILE ...] [--model_name=NAME]
//                 [REQUEST ...]
//
// MODEL_PATH    a SavedModel directory, or a model's base path: its highest all-digit
//               subdirectory is loaded, as TF Serving's default version policy serves it.
// --warmup      replays MODEL/assets.extra/tf_serving_warmup_requests as TF Serving does at
//               load time: a TFRecord of PredictionLog, every record run, the first failure fatal.
// --warmup_file replays FILE as well (repeatable; each file is replayed and reported alone).
// --model_name  the name the model is served under (default "simsiam", as serving/models.config
//               names it): a request for another name, or for another version than the one
//               loaded, is answered NOT_FOUND with TF Serving's words ("Servable not found for
//               request: Latest(NAME)" / "Specific(NAME, VERSION)").
// REQUEST       a file holding a serialized tensorflow.serving.PredictRequest (what a gRPC client
//               sends); the PredictResponse is written to REQUEST.response.
//
// stdout, one JSON object per line:
//   {"model": DIR, "version": N or null, "signatures": {NAME: {"method_name": ..., "inputs":
//       {KEY: {"name": TENSOR, "dtype": "DT_UINT8", "shape": null or [d, ...]}}, "outputs": ...}}}
//   {"warmup_file": F, "record": I, "signature": S, "ok": true, "outputs": {KEY: [d, ...]}}
//   {"warmup_file": F, "records": N, "ok": true}            (or "ok": false, "code", "error")
//   {"request": F, "signature": S, "ok": true, "response": F.response, "outputs": {KEY: shape},
//    "max_rss_mb": PEAK}   (the process's peak resident memory so far)
//   {"request": F, "ok": false, "code": "INVALID_ARGUMENT", "error": MESSAGE, "max_rss_mb": PEAK}
// Exit status: 0 when the model loaded and every warm-up file replayed (a refused request is
// reported, as TF Serving answers it with an error, and is not fatal); 1 when a warm-up file
// failed; 2 for a bad command line or a model that does not load.
//
// The tensorflow_serving protos are not part of the TensorFlow wheel, so PredictionLog,
// PredictRequest and PredictResponse are read and written here by their wire format (field
// numbers from tensorflow_serving/apis/*.proto); the tensors inside are real TensorProtos.

#include <sys/resource.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "tensorflow/cc/saved_model/constants.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor.pb.h"
#include "tensorflow/core/framework/types.pb.h"
#include "tensorflow/core/lib/io/record_reader.h"
#include "tensorflow/core/platform/env.h"
#include "tensorflow/core/platform/path.h"
#include "tensorflow/core/protobuf/meta_graph.pb.h"

namespace {

using tensorflow::SavedModelBundle;
using tensorflow::SignatureDef;
using tensorflow::Tensor;

constexpr char kServeTag[] = "serve";                          // tag_constants.SERVING
constexpr char kDefaultSignature[] = "serving_default";        // what an empty name means
constexpr char kDefaultModelName[] = "simsiam";               // serving/models.config
constexpr char kPredictMethod[] = "tensorflow/serving/predict";  // signature_constants
constexpr char kWarmupFile[] = "tf_serving_warmup_requests";
constexpr char kInitOpSignature[] = "__saved_model_init_op";  // not a signature TF Serving lists
constexpr int kMaxWarmupRecords = 1000;  // TF Serving's limit (saved_model_warmup_util.cc)

// ---------------------------------------------------------------------------------------------
// JSON output.

std::string Json(absl::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7f) {  // control bytes, and bytes of non-ASCII text
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string JsonShape(const tensorflow::TensorShapeProto& shape) {
  if (shape.unknown_rank()) return "null";
  std::vector<std::string> dims;
  for (const auto& d : shape.dim()) dims.push_back(absl::StrCat(d.size()));
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::string JsonShape(const Tensor& t) {
  std::vector<std::string> dims;
  for (int i = 0; i < t.dims(); ++i) dims.push_back(absl::StrCat(t.dim_size(i)));
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::string JsonError(const absl::Status& status) {
  return absl::StrCat("\"ok\": false, \"code\": ", Json(absl::StatusCodeToString(status.code())),
                      ", \"error\": ", Json(status.message()));
}

void Emit(const std::string& line) {
  std::fputs((line + "\n").c_str(), stdout);
  std::fflush(stdout);  // a line per event, complete even if the process dies after it
}

template <typename Map>
std::vector<std::string> SortedKeys(const Map& map) {
  std::vector<std::string> keys;
  for (const auto& kv : map) keys.push_back(kv.first);
  std::sort(keys.begin(), keys.end());
  return keys;
}

std::string JsonTensorInfos(const google::protobuf::Map<std::string, tensorflow::TensorInfo>& m) {
  std::vector<std::string> items;
  for (const std::string& key : SortedKeys(m)) {
    const tensorflow::TensorInfo& info = m.at(key);
    items.push_back(absl::StrCat(Json(key), ": {\"name\": ", Json(info.name()),
                                 ", \"dtype\": ", Json(tensorflow::DataType_Name(info.dtype())),
                                 ", \"shape\": ", JsonShape(info.tensor_shape()), "}"));
  }
  return absl::StrCat("{", absl::StrJoin(items, ", "), "}");
}

std::string JsonSignatures(const tensorflow::MetaGraphDef& meta_graph) {
  std::vector<std::string> items;
  for (const std::string& name : SortedKeys(meta_graph.signature_def())) {
    if (name == kInitOpSignature) continue;
    const SignatureDef& sig = meta_graph.signature_def().at(name);
    items.push_back(absl::StrCat(Json(name), ": {\"method_name\": ", Json(sig.method_name()),
                                 ", \"inputs\": ", JsonTensorInfos(sig.inputs()),
                                 ", \"outputs\": ", JsonTensorInfos(sig.outputs()), "}"));
  }
  return absl::StrCat("{", absl::StrJoin(items, ", "), "}");
}

std::string JsonOutputShapes(const std::vector<std::pair<std::string, Tensor>>& outputs) {
  std::vector<std::string> items;
  for (const auto& [key, tensor] : outputs) {
    items.push_back(absl::StrCat(Json(key), ": ", JsonShape(tensor)));
  }
  return absl::StrCat("{", absl::StrJoin(items, ", "), "}");
}

// ---------------------------------------------------------------------------------------------
// Protobuf wire format, for the tensorflow_serving messages.

struct Field {
  int number;
  int wire_type;
  absl::string_view bytes;  // the payload of a length-delimited field (wire type 2)
  uint64_t varint = 0;      // the value of a varint field (wire type 0)
};

bool ReadVarint(absl::string_view* in, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && !in->empty(); shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(in->front());
    in->remove_prefix(1);
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// The fields of one message, in order; InvalidArgument when the bytes are not a message.
absl::Status ParseFields(absl::string_view in, absl::string_view what, std::vector<Field>* out) {
  const auto malformed = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("malformed ", what, ": ", why));
  };
  while (!in.empty()) {
    uint64_t tag, length;
    if (!ReadVarint(&in, &tag)) return malformed("truncated field tag");
    const int number = static_cast<int>(tag >> 3), wire_type = static_cast<int>(tag & 7);
    if (number == 0) return malformed("field number 0");
    Field field{number, wire_type, {}};
    switch (wire_type) {
      case 0:  // varint
        if (!ReadVarint(&in, &field.varint)) return malformed("truncated varint");
        break;
      case 1:  // 64-bit
      case 5:  // 32-bit
        length = wire_type == 1 ? 8 : 4;
        if (in.size() < length) return malformed("truncated fixed-size field");
        in.remove_prefix(length);
        break;
      case 2:  // length-delimited
        if (!ReadVarint(&in, &length)) return malformed("truncated length");
        if (length > in.size()) return malformed("field longer than the message");
        field.bytes = in.substr(0, length);
        in.remove_prefix(length);
        break;
      default:
        return malformed(absl::StrCat("wire type ", wire_type, " of field ", number));
    }
    out->push_back(field);
  }
  return absl::OkStatus();
}

// A singular message field: every occurrence merged, as protobuf parsers merge them.
std::string MessageField(const std::vector<Field>& fields, int number) {
  std::string merged;
  for (const Field& f : fields) {
    if (f.number == number && f.wire_type == 2) merged.append(f.bytes.data(), f.bytes.size());
  }
  return merged;
}

// A singular string field: the last occurrence.
std::string StringField(const std::vector<Field>& fields, int number) {
  std::string value;
  for (const Field& f : fields) {
    if (f.number == number && f.wire_type == 2) value.assign(f.bytes.data(), f.bytes.size());
  }
  return value;
}

bool HasField(const std::vector<Field>& fields, int number) {
  return std::any_of(fields.begin(), fields.end(),
                     [number](const Field& f) { return f.number == number; });
}

struct PredictRequest {
  std::string model_name;
  bool has_version = false;  // version and version_label: ModelSpec's oneof version_choice
  int64_t version = 0;
  bool has_version_label = false;
  std::string version_label;
  std::string signature_name;
  std::map<std::string, std::string> inputs;  // alias -> serialized TensorProto
  std::vector<std::string> output_filter;
};

// tensorflow.serving.PredictRequest: model_spec = 1 (ModelSpec: name = 1, version = 2
// (Int64Value: value = 1), version_label = 4, signature_name = 3), inputs = 2
// (map<string, TensorProto>), output_filter = 3.
absl::Status ParsePredictRequest(absl::string_view bytes, PredictRequest* request) {
  std::vector<Field> fields, spec;
  TF_RETURN_IF_ERROR(ParseFields(bytes, "PredictRequest", &fields));
  const std::string spec_bytes = MessageField(fields, 1);
  TF_RETURN_IF_ERROR(ParseFields(spec_bytes, "PredictRequest.model_spec", &spec));
  request->model_name = StringField(spec, 1);
  request->signature_name = StringField(spec, 3);
  for (const Field& f : spec) {  // the oneof: the last of version and version_label wins
    if (f.number == 2 && f.wire_type == 2) {
      std::vector<Field> value;
      TF_RETURN_IF_ERROR(ParseFields(f.bytes, "ModelSpec.version", &value));
      request->has_version = true, request->has_version_label = false;
      request->version = 0;
      for (const Field& v : value) {
        if (v.number == 1 && v.wire_type == 0) request->version = static_cast<int64_t>(v.varint);
      }
    } else if (f.number == 4 && f.wire_type == 2) {
      request->has_version_label = true, request->has_version = false;
      request->version_label.assign(f.bytes.data(), f.bytes.size());
    }
  }
  for (const Field& f : fields) {
    if (f.wire_type != 2) continue;
    if (f.number == 2) {
      std::vector<Field> entry;
      TF_RETURN_IF_ERROR(ParseFields(f.bytes, "PredictRequest.inputs entry", &entry));
      request->inputs[StringField(entry, 1)] = MessageField(entry, 2);  // later keys win
    } else if (f.number == 3) {
      request->output_filter.emplace_back(f.bytes);
    }
  }
  return absl::OkStatus();
}

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void AppendBytesField(int number, absl::string_view bytes, std::string* out) {
  AppendVarint((static_cast<uint64_t>(number) << 3) | 2, out);
  AppendVarint(bytes.size(), out);
  out->append(bytes.data(), bytes.size());
}

// tensorflow.serving.PredictResponse: outputs = 1 (map<string, TensorProto>), model_spec = 2
// (ModelSpec: name = 1, version = 2 (Int64Value: value = 1), signature_name = 3).
std::string SerializePredictResponse(const std::vector<std::pair<std::string, Tensor>>& outputs,
                                     const std::string& signature, int64_t version) {
  std::string response;
  for (const auto& [key, tensor] : outputs) {
    tensorflow::TensorProto proto;
    tensor.AsProtoField(&proto);  // TF Serving's default encoding of a response tensor
    std::string entry;
    AppendBytesField(1, key, &entry);
    AppendBytesField(2, proto.SerializeAsString(), &entry);
    AppendBytesField(1, entry, &response);
  }
  std::string spec, version_value;
  if (version >= 0) {
    AppendVarint(1 << 3, &version_value);
    AppendVarint(static_cast<uint64_t>(version), &version_value);
    AppendBytesField(2, version_value, &spec);
  }
  AppendBytesField(3, signature, &spec);
  AppendBytesField(2, spec, &response);
  return response;
}

// ---------------------------------------------------------------------------------------------
// Finding the servable, as TF Serving's ServerCore does for the ModelSpec of a request
// (ServableRequestFromModelSpec, then the manager's lookup): this process serves one version
// of one model, as a models.config entry with the default (latest) version policy would.

absl::Status FindServable(const PredictRequest& request, const std::string& model_name,
                          int64_t served_version) {
  if (request.model_name.empty()) {
    return absl::InvalidArgumentError("ModelSpec has no name specified.");
  }
  if (request.has_version_label) {  // no labels are configured
    return absl::InvalidArgumentError(
        absl::StrCat("Unrecognized servable version label: ", request.version_label));
  }
  const bool found = request.model_name == model_name &&
                     (!request.has_version || request.version == served_version);
  if (found) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat(
      "Servable not found for request: ",
      request.has_version ? absl::StrCat("Specific(", request.model_name, ", ", request.version, ")")
                          : absl::StrCat("Latest(", request.model_name, ")")));
}

// ---------------------------------------------------------------------------------------------
// Predict, as TF Serving's predict_util runs a PredictRequest on a SavedModelBundle.

absl::Status Predict(const SavedModelBundle& bundle, const PredictRequest& request,
                     std::string* signature_name,
                     std::vector<std::pair<std::string, Tensor>>* outputs) {
  *signature_name = request.signature_name.empty() ? kDefaultSignature : request.signature_name;
  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find(*signature_name);
  if (found == signatures.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Serving signature key \"", *signature_name, "\" not found."));
  }
  const SignatureDef& sig = found->second;
  if (sig.method_name() != kPredictMethod) {
    return absl::InvalidArgumentError(absl::StrCat("signature ", *signature_name, " has method ",
                                                   sig.method_name(), ", not ", kPredictMethod));
  }
  const std::string expected_inputs = absl::StrJoin(SortedKeys(sig.inputs()), ", ");
  std::vector<std::pair<std::string, Tensor>> feeds;
  for (const auto& [alias, proto_bytes] : request.inputs) {
    const auto info = sig.inputs().find(alias);
    if (info == sig.inputs().end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("input tensor alias not found in signature: ", alias,
                       ". Inputs expected to be in the set {", expected_inputs, "}."));
    }
    tensorflow::TensorProto proto;
    Tensor tensor;
    if (!proto.ParseFromString(proto_bytes) || !tensor.FromProto(proto)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor parsing error: ", alias));
    }
    feeds.emplace_back(info->second.name(), std::move(tensor));
  }
  if (feeds.size() != static_cast<size_t>(sig.inputs().size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("input size does not match signature: ", feeds.size(), "!=",
                     sig.inputs().size(), " len({", expected_inputs, "})"));
  }
  std::vector<std::string> aliases = request.output_filter;
  if (aliases.empty()) aliases = SortedKeys(sig.outputs());
  std::vector<std::string> fetches;
  std::set<std::string> seen;
  for (const std::string& alias : aliases) {
    const auto info = sig.outputs().find(alias);
    if (info == sig.outputs().end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "output tensor alias not found in signature: ", alias, " Outputs expected to be in the "
          "set {", absl::StrJoin(SortedKeys(sig.outputs()), ", "), "}."));
    }
    if (!seen.insert(alias).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate output tensor alias: ", alias));
    }
    fetches.push_back(info->second.name());
  }
  std::vector<Tensor> tensors;
  tensorflow::RunOptions run_options;
  TF_RETURN_IF_ERROR(
      bundle.session->Run(run_options, feeds, fetches, {}, &tensors, /*run_metadata=*/nullptr));
  outputs->clear();
  for (size_t i = 0; i < aliases.size(); ++i) outputs->emplace_back(aliases[i], tensors[i]);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Warm-up, as TF Serving replays assets.extra/tf_serving_warmup_requests before serving.

// tensorflow.serving.PredictionLog: predict_log = 6 (PredictLog: request = 1); its other log
// types (classify, regress, multi_inference, session_run) have no signature in this model.
absl::Status RunWarmupRecord(const SavedModelBundle& bundle, absl::string_view record,
                             std::string* signature,
                             std::vector<std::pair<std::string, Tensor>>* outputs) {
  std::vector<Field> log, predict_log;
  absl::Status parsed = ParseFields(record, "PredictionLog", &log);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Failed to parse warmup record: ", parsed.message()));
  }
  if (!HasField(log, 6)) {
    return absl::UnimplementedError(
        "Unsupported log_type for warmup: the record carries no predict_log");
  }
  const std::string predict_bytes = MessageField(log, 6);
  TF_RETURN_IF_ERROR(ParseFields(predict_bytes, "PredictLog", &predict_log));
  PredictRequest request;
  TF_RETURN_IF_ERROR(ParsePredictRequest(MessageField(predict_log, 1), &request));
  return Predict(bundle, request, signature, outputs);
}

// Replays one warm-up file, a line per record; false at the first failure, as TF Serving then
// refuses to serve the version.
bool ReplayWarmup(const SavedModelBundle& bundle, const std::string& path) {
  const std::string head = absl::StrCat("{\"warmup_file\": ", Json(path), ", ");
  std::unique_ptr<tensorflow::RandomAccessFile> file;
  absl::Status status = tensorflow::Env::Default()->NewRandomAccessFile(path, &file);
  if (!status.ok()) {
    Emit(absl::StrCat(head, "\"records\": 0, ", JsonError(status), "}"));
    return false;
  }
  tensorflow::io::RecordReader reader(
      file.get(), tensorflow::io::RecordReaderOptions::CreateRecordReaderOptions(""));
  uint64_t offset = 0;
  int records = 0;
  for (;; ++records) {
    tensorflow::tstring record;
    status = reader.ReadRecord(&offset, &record);
    if (absl::IsOutOfRange(status)) break;  // the end of the file
    if (status.ok() && records >= kMaxWarmupRecords) {
      status = absl::InvalidArgumentError(absl::StrCat(
          "Number of warmup records exceeds the maximum (", kMaxWarmupRecords, ") at ", path));
    }
    std::string signature;
    std::vector<std::pair<std::string, Tensor>> outputs;
    if (status.ok()) status = RunWarmupRecord(bundle, record, &signature, &outputs);
    if (!status.ok()) {
      Emit(absl::StrCat(head, "\"record\": ", records, ", ", JsonError(status), "}"));
      Emit(absl::StrCat(head, "\"records\": ", records, ", ", JsonError(status), "}"));
      return false;
    }
    Emit(absl::StrCat(head, "\"record\": ", records, ", \"signature\": ", Json(signature),
                      ", \"ok\": true, \"outputs\": ", JsonOutputShapes(outputs), "}"));
  }
  Emit(absl::StrCat(head, "\"records\": ", records, ", \"ok\": true}"));
  return true;
}

// ---------------------------------------------------------------------------------------------
// Versions and main.

bool AllDigits(absl::string_view s) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
}

// MODEL_PATH itself when it is a SavedModel, else its highest all-digit subdirectory (TF
// Serving's default version policy: the latest version); version -1 when the name has none.
absl::Status ResolveModel(const std::string& model_path, std::string* dir, int64_t* version) {
  tensorflow::Env* env = tensorflow::Env::Default();
  *dir = model_path;
  if (!tensorflow::MaybeSavedModelDirectory(model_path)) {
    std::vector<std::string> children;
    TF_RETURN_IF_ERROR(env->GetChildren(model_path, &children));
    int64_t best = -1;
    for (const std::string& name : children) {
      const std::string path = tensorflow::io::JoinPath(model_path, name);
      if (!AllDigits(name) || name.size() > 18 || !env->IsDirectory(path).ok()) continue;
      if (std::stoll(name) > best) {
        best = std::stoll(name);
        *dir = path;
      }
    }
    if (best < 0) {
      return absl::NotFoundError(absl::StrCat(model_path, " is neither a SavedModel nor a base ",
                                              "path with an all-digit version subdirectory"));
    }
  }
  const std::string base = std::string(tensorflow::io::Basename(*dir));
  *version = AllDigits(base) && base.size() <= 18 ? std::stoll(base) : -1;
  return absl::OkStatus();
}

// The process's peak resident memory so far: a request that made it allocate in proportion to a
// size it merely declares shows as a jump.
int64_t MaxRssMb() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;  // Linux: kilobytes
}

int Usage(const char* message) {
  std::fprintf(stderr,
               "error: %s\nusage: serving_check MODEL_PATH [--warmup] [--warmup_file=FILE ...] "
               "[REQUEST ...]\n",
               message);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') return Usage("the first argument must be MODEL_PATH");
  std::vector<std::string> warmup_files, requests;
  bool own_warmup = false;
  std::string model_name = kDefaultModelName;
  const std::string warmup_flag = "--warmup_file=", name_flag = "--model_name=";
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--warmup") {
      own_warmup = true;
    } else if (arg.rfind(warmup_flag, 0) == 0) {
      warmup_files.push_back(arg.substr(warmup_flag.size()));
    } else if (arg.rfind(name_flag, 0) == 0) {
      model_name = arg.substr(name_flag.size());
    } else if (arg[0] == '-') {
      return Usage(("unknown flag " + arg).c_str());
    } else {
      requests.push_back(arg);
    }
  }

  std::string dir;
  int64_t version;
  absl::Status status = ResolveModel(argv[1], &dir, &version);
  SavedModelBundle bundle;
  if (status.ok()) {
    status = tensorflow::LoadSavedModel(tensorflow::SessionOptions(), tensorflow::RunOptions(),
                                        dir, {kServeTag}, &bundle);
  }
  if (!status.ok()) {
    Emit(absl::StrCat("{\"model\": ", Json(argv[1]), ", ", JsonError(status), "}"));
    return 2;
  }
  Emit(absl::StrCat("{\"model\": ", Json(dir), ", \"version\": ",
                    version < 0 ? "null" : absl::StrCat(version),
                    ", \"signatures\": ", JsonSignatures(bundle.meta_graph_def), "}"));

  if (own_warmup) {
    warmup_files.insert(warmup_files.begin(),
                        tensorflow::io::JoinPath(dir, tensorflow::kSavedModelAssetsExtraDirectory,
                                                 kWarmupFile));
  }
  bool warmed_up = true;
  for (const std::string& path : warmup_files) warmed_up &= ReplayWarmup(bundle, path);

  for (const std::string& path : requests) {
    const std::string head = absl::StrCat("{\"request\": ", Json(path), ", ");
    std::string bytes, signature;
    PredictRequest request;
    std::vector<std::pair<std::string, Tensor>> outputs;
    status = tensorflow::ReadFileToString(tensorflow::Env::Default(), path, &bytes);
    if (status.ok()) status = ParsePredictRequest(bytes, &request);
    if (status.ok()) status = FindServable(request, model_name, version);
    if (status.ok()) status = Predict(bundle, request, &signature, &outputs);
    const std::string response_path = path + ".response";
    if (status.ok()) {
      status = tensorflow::WriteStringToFile(
          tensorflow::Env::Default(), response_path,
          SerializePredictResponse(outputs, signature, version));
    }
    if (!status.ok()) {
      Emit(absl::StrCat(head, JsonError(status), ", \"max_rss_mb\": ", MaxRssMb(), "}"));
      continue;
    }
    Emit(absl::StrCat(head, "\"signature\": ", Json(signature), ", \"ok\": true, \"response\": ",
                      Json(response_path), ", \"outputs\": ", JsonOutputShapes(outputs),
                      ", \"max_rss_mb\": ", MaxRssMb(), "}"));
  }
  return warmed_up ? 0 : 1;
}
