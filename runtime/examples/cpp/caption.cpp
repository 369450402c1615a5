// Caption an image (or answer a prompt about it) with an exported KOSMOS package.
//
//   caption <package dir> <image> [prompt] [max tokens]
//
// Streams text to stderr as it is generated and prints the whole result on stdout.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "kosmos_rt.h"

namespace {

struct ModelFree {
    void operator()(kosmos_model* m) const { kosmos_model_free(m); }
};
struct StringFree {
    void operator()(char* s) const { kosmos_string_free(s); }
};
using Model = std::unique_ptr<kosmos_model, ModelFree>;
using Text = std::unique_ptr<char, StringFree>;

bool stream(const char* piece, void* user_data) {
    auto* pieces = static_cast<int*>(user_data);
    ++*pieces;
    std::fputs(piece, stderr);
    return true;  // keep going
}

int fail(const char* what, kosmos_status status) {
    std::fprintf(stderr, "%s failed (%d): %s\n", what, static_cast<int>(status), kosmos_last_error());
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s <package dir> <image> [prompt] [max tokens]\n", argv[0]);
        return 2;
    }
    const char* prompt = argc > 3 ? argv[3] : "";

    kosmos_model* raw = nullptr;
    kosmos_status st = kosmos_model_open(argv[1], "cpu", &raw);
    if (st != KOSMOS_OK) return fail("kosmos_model_open", st);
    Model model(raw);

    kosmos_params params = kosmos_default_params();
    if (argc > 4) params.max_tokens = static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 10));

    kosmos_image image{argv[2], nullptr, 0};
    int pieces = 0;
    char* out = nullptr;
    st = kosmos_generate(model.get(), prompt, &image, 1, &params, stream, &pieces, &out);
    if (st != KOSMOS_OK) return fail("kosmos_generate", st);
    Text text(out);
    std::fprintf(stderr, "\n[%d pieces streamed]\n", pieces);
    std::printf("%s\n", text.get());
    text.reset();
    model.reset();
    kosmos_shutdown();
    return 0;
}
