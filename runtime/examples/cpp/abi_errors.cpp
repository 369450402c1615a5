// Exercises the C ABI's failure paths: every bad input must return its status code with a
// message, never crash. Exit status 0 when all behave.
//
//   abi_errors <package dir> <non-image file> [package dir whose decoder.onnx is another model's]
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kosmos_rt.h"

namespace {

int failures = 0;

void expect(const char* what, kosmos_status got, kosmos_status want) {
    const char* msg = kosmos_last_error();
    bool ok = got == want && (want == KOSMOS_OK || std::strlen(msg) > 0);
    std::printf("%-40s status %d (want %d) %s: %s\n", what, static_cast<int>(got), static_cast<int>(want),
                ok ? "ok" : "WRONG", msg);
    if (!ok) ++failures;
}

// A PNG header claiming 20000 x 20000 pixels (a decompression bomb's shape).
std::vector<uint8_t> huge_png() {
    std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    auto crc = [](const std::vector<uint8_t>& d) {
        uint32_t c = 0xFFFFFFFFu;
        for (uint8_t b : d) {
            c ^= b;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        return ~c;
    };
    auto be32 = [](std::vector<uint8_t>& v, uint32_t x) {
        for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<uint8_t>(x >> s));
    };
    auto chunk = [&](const char* type, std::vector<uint8_t> data) {
        be32(png, static_cast<uint32_t>(data.size()));
        std::vector<uint8_t> c(type, type + 4);
        c.insert(c.end(), data.begin(), data.end());
        png.insert(png.end(), c.begin(), c.end());
        be32(png, crc(c));
    };
    std::vector<uint8_t> ihdr;
    be32(ihdr, 20000);
    be32(ihdr, 20000);
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});
    chunk("IHDR", ihdr);
    chunk("IDAT", {0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01});
    chunk("IEND", {});
    return png;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s <package dir> <non-image file>\n", argv[0]);
        return 2;
    }
    kosmos_model* model = nullptr;
    char* out = nullptr;
    kosmos_params params = kosmos_default_params();
    if (kosmos_abi_version() != KOSMOS_ABI_VERSION) {
        std::fprintf(stderr, "library ABI %u, header ABI %u\n", kosmos_abi_version(), KOSMOS_ABI_VERSION);
        return 1;
    }

    expect("open: NULL out", kosmos_model_open(argv[1], nullptr, nullptr), KOSMOS_ERR_INVALID_ARGUMENT);
    expect("open: missing package", kosmos_model_open("/nonexistent/pkg", nullptr, &model), KOSMOS_ERR_PACKAGE);
    expect("open: unknown device", kosmos_model_open(argv[1], "abacus", &model), KOSMOS_ERR_INVALID_ARGUMENT);
    if (argc > 3) {
        expect("open: ONNX file of another model", kosmos_model_open(argv[3], nullptr, &model), KOSMOS_ERR_PACKAGE);
    }
    expect("generate: NULL model", kosmos_generate(nullptr, "", nullptr, 0, nullptr, nullptr, nullptr, &out),
           KOSMOS_ERR_INVALID_HANDLE);

    expect("open", kosmos_model_open(argv[1], "cpu", &model), KOSMOS_OK);
    kosmos_image not_image{argv[2], nullptr, 0};
    expect("generate: non-image file", kosmos_generate(model, "", &not_image, 1, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_IMAGE);
    std::vector<uint8_t> bomb = huge_png();
    kosmos_image huge{nullptr, bomb.data(), bomb.size()};
    expect("generate: 20000x20000 image", kosmos_generate(model, "", &huge, 1, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_IMAGE);
    kosmos_image missing{"/nonexistent.png", nullptr, 0};
    expect("generate: missing image", kosmos_generate(model, "", &missing, 1, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_IMAGE);
    std::string long_prompt;
    for (int i = 0; i < 3000; ++i) long_prompt += "a red circle ";
    expect("generate: prompt over context",
           kosmos_generate(model, long_prompt.c_str(), nullptr, 0, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_CONTEXT);
    kosmos_params bad = params;
    bad.struct_size = 0;  // not started from kosmos_default_params()
    expect("generate: struct_size 0", kosmos_generate(model, "a", nullptr, 0, &bad, nullptr, nullptr, &out),
           KOSMOS_ERR_INVALID_ARGUMENT);
    expect("params_init: NULL", kosmos_params_init(nullptr, sizeof(kosmos_params)), KOSMOS_ERR_INVALID_ARGUMENT);
    expect("params_init: a size no header had", kosmos_params_init(&bad, 8), KOSMOS_ERR_INVALID_ARGUMENT);
    expect("params_init: a newer header's size",
           kosmos_params_init(&bad, sizeof(kosmos_params) + 8), KOSMOS_ERR_INVALID_ARGUMENT);
    expect("params_init: ok", KOSMOS_PARAMS_INIT(&bad), KOSMOS_OK);
    expect("generate: params from KOSMOS_PARAMS_INIT",
           kosmos_generate(model, "a red", nullptr, 0, &bad, nullptr, nullptr, &out), KOSMOS_OK);
    kosmos_string_free(out);
    out = nullptr;
    bad = params;
    bad.max_tokens = 0;
    expect("generate: max_tokens 0", kosmos_generate(model, "a", nullptr, 0, &bad, nullptr, nullptr, &out),
           KOSMOS_ERR_INVALID_ARGUMENT);
    expect("generate: NULL images with count", kosmos_generate(model, "a", nullptr, 2, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_INVALID_ARGUMENT);
    expect("generate: ok", kosmos_generate(model, "a red", nullptr, 0, &params, nullptr, nullptr, &out), KOSMOS_OK);
    kosmos_string_free(out);
    out = nullptr;

    expect("free", kosmos_model_free(model), KOSMOS_OK);
    expect("free: twice", kosmos_model_free(model), KOSMOS_ERR_INVALID_HANDLE);
    expect("generate: freed model", kosmos_generate(model, "a", nullptr, 0, &params, nullptr, nullptr, &out),
           KOSMOS_ERR_INVALID_HANDLE);
    expect("free: NULL", kosmos_model_free(nullptr), KOSMOS_OK);

    expect("shutdown", kosmos_shutdown(), KOSMOS_OK);
    std::printf("%s\n", failures == 0 ? "all failure paths behave" : "SOME FAILURE PATHS ARE WRONG");
    return failures == 0 ? 0 : 1;
}
