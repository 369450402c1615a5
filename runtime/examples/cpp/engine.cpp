// Several requests at once from C++: one thread per prompt submits to a kosmos_engine, which
// decodes them together (continuous batching) and reports to each request's callback.
//
//   engine <package dir (buffer KV layout)> <image> <max tokens> <prompt>...
//
// A prompt with <image> gets the image; the others are text only. Prints one line per prompt,
// in order: "<index>\t<finish reason>\t<generated tokens>\t<text>". Then checks cancellation
// (by the callback, by kosmos_engine_cancel), kosmos_engine_free with requests in flight, and
// the failure paths, and prints "all engine checks passed".
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kosmos_rt.h"

namespace {

// What one request has received so far.
struct Request {
    std::string streamed;  // TEXT events, concatenated
    std::string text;      // the DONE event's whole text
    kosmos_finish_reason finish = KOSMOS_FINISH_STOP;
    uint32_t generated = 0;
    int finals = 0;  // DONE or FAILED events: must end at exactly 1
    size_t logprobs = 0;     // entries received in TEXT events
    bool logprobs_ok = true;  // each has its alternatives, most likely first
    std::vector<uint32_t> tokens;  // the DONE event's token ids
    bool failed = false;
    // Cancel at the first TEXT event: 1 by returning false, 2 with kosmos_engine_cancel.
    int cancel_how = 0;
    kosmos_engine* engine = nullptr;
    kosmos_status free_from_callback = KOSMOS_OK;
};

std::mutex mu;
std::condition_variable cv;

bool on_event(const kosmos_event* ev, void* user_data) {
    auto* r = static_cast<Request*>(user_data);
    std::lock_guard<std::mutex> lock(mu);
    switch (ev->kind) {
        case KOSMOS_EVENT_TEXT:
            r->streamed += ev->text;
            for (size_t i = 0; i < ev->n_logprobs; ++i) {
                const kosmos_token_logprob& lp = ev->logprobs[i];
                r->logprobs_ok = r->logprobs_ok && lp.n_top == 2 && lp.logprob <= 0.0f &&
                                 lp.top[0].logprob >= lp.top[1].logprob &&
                                 lp.top[0].logprob >= lp.logprob;
            }
            r->logprobs += ev->n_logprobs;
            if (r->cancel_how == 1) return false;
            if (r->cancel_how == 2) {
                kosmos_engine_cancel(r->engine, ev->request);
                // Freeing from a callback would join the engine thread from itself: refused.
                r->free_from_callback = kosmos_engine_free(r->engine);
            }
            return true;
        case KOSMOS_EVENT_DONE:
            r->text = ev->text;
            r->finish = ev->finish_reason;
            r->generated = ev->generated_tokens;
            r->tokens.assign(ev->tokens, ev->tokens + ev->generated_tokens);
            break;
        case KOSMOS_EVENT_FAILED:
            r->text = ev->text;
            r->failed = true;
            break;
    }
    ++r->finals;
    cv.notify_all();
    return true;
}

void wait_final(const std::vector<Request*>& rs) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] {
        for (auto* r : rs)
            if (r->finals == 0) return false;
        return true;
    });
}

const char* finish_name(kosmos_finish_reason f) {
    switch (f) {
        case KOSMOS_FINISH_STOP: return "stop";
        case KOSMOS_FINISH_LENGTH: return "length";
        case KOSMOS_FINISH_CANCELLED: return "cancelled";
    }
    return "?";
}

int failures = 0;

void expect(bool ok, const char* what) {
    if (!ok) {
        ++failures;
        std::printf("FAIL %s (last error: %s)\n", what, kosmos_last_error());
    }
}

kosmos_status submit(kosmos_engine* e, const std::string& prompt, const kosmos_image* image,
                     uint32_t max_tokens, Request* r, uint64_t* id = nullptr) {
    kosmos_params params = kosmos_default_params();
    params.max_tokens = max_tokens;
    bool with_image = prompt.find("<image>") != std::string::npos;
    return kosmos_engine_submit(e, prompt.c_str(), with_image ? image : nullptr, with_image ? 1 : 0,
                                &params, on_event, r, id);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s <package dir> <image> <max tokens> <prompt>...\n", argv[0]);
        return 2;
    }
    const char* pkg = argv[1];
    kosmos_image image{argv[2], nullptr, 0};
    uint32_t max_tokens = static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10));
    std::vector<std::string> prompts(argv + 4, argv + argc);

    kosmos_engine_config config;
    if (KOSMOS_ENGINE_CONFIG_INIT(&config) != KOSMOS_OK) {
        std::fprintf(stderr, "kosmos_engine_config_init: %s\n", kosmos_last_error());
        return 1;
    }
    config.max_batch = 3;       // fewer rows than prompts: some wait for a free row
    config.prefill_chunk = 16;  // long prompts are prefilled in chunks between decode steps
    kosmos_engine* engine = nullptr;
    kosmos_status st = kosmos_engine_open(pkg, "cpu", &config, &engine);
    if (st != KOSMOS_OK) {
        std::fprintf(stderr, "kosmos_engine_open failed (%d): %s\n", st, kosmos_last_error());
        return 1;
    }

    // One submitting thread per prompt, all at once.
    std::vector<Request> requests(prompts.size());
    std::vector<std::thread> threads;
    std::vector<kosmos_status> submitted(prompts.size(), KOSMOS_OK);
    for (size_t i = 0; i < prompts.size(); ++i)
        threads.emplace_back([&, i] {
            submitted[i] = submit(engine, prompts[i], &image, max_tokens, &requests[i]);
        });
    for (auto& t : threads) t.join();
    std::vector<Request*> all;
    for (size_t i = 0; i < prompts.size(); ++i) {
        expect(submitted[i] == KOSMOS_OK, "kosmos_engine_submit");
        if (submitted[i] == KOSMOS_OK) all.push_back(&requests[i]);
    }
    wait_final(all);
    for (size_t i = 0; i < prompts.size(); ++i) {
        const Request& r = requests[i];
        std::printf("%zu\t%s\t%u\t%s\n", i, finish_name(r.finish), r.generated, r.text.c_str());
        expect(!r.failed, "a request failed");
        if (r.streamed != r.text)
            std::printf("  streamed: %s\n  final:    %s\n", r.streamed.c_str(), r.text.c_str());
        expect(r.streamed == r.text, "the streamed text equals the final text");
    }

    // Cancelled by its callback returning false, and by kosmos_engine_cancel from a callback.
    Request by_return, by_cancel;
    by_return.cancel_how = 1;
    by_cancel.cancel_how = 2;
    by_cancel.engine = engine;
    uint64_t id1 = 0, id2 = 0;
    expect(submit(engine, prompts[0], &image, max_tokens, &by_return, &id1) == KOSMOS_OK, "submit");
    expect(submit(engine, prompts[0], &image, max_tokens, &by_cancel, &id2) == KOSMOS_OK, "submit");
    expect(id1 != 0 && id2 != 0 && id1 != id2, "request ids are distinct and non-zero");
    wait_final({&by_return, &by_cancel});
    expect(by_return.finish == KOSMOS_FINISH_CANCELLED, "callback returning false cancels");
    expect(by_cancel.finish == KOSMOS_FINISH_CANCELLED, "kosmos_engine_cancel cancels");
    expect(by_return.generated <= 2 && by_cancel.generated <= 2, "cancelled within a step");
    expect(by_cancel.free_from_callback == KOSMOS_ERR_INVALID_ARGUMENT,
           "kosmos_engine_free from a callback is refused");
    expect(kosmos_engine_cancel(engine, id1) == KOSMOS_OK, "cancelling a finished request is a no-op");

    // Log-probabilities (2 alternatives) and a stop string that never matches: one entry per
    // generated token, in the TEXT events, and the DONE event's token ids.
    Request scored;
    kosmos_params with_logprobs = kosmos_default_params();
    with_logprobs.max_tokens = max_tokens;
    with_logprobs.logprobs = 2;
    const char* stops[] = {"never generated"};
    with_logprobs.stop = stops;
    with_logprobs.n_stop = 1;
    bool first_has_image = prompts[0].find("<image>") != std::string::npos;
    expect(kosmos_engine_submit(engine, prompts[0].c_str(), first_has_image ? &image : nullptr,
                                first_has_image ? 1 : 0, &with_logprobs, on_event, &scored,
                                nullptr) == KOSMOS_OK,
           "submit with logprobs");
    wait_final({&scored});
    expect(scored.text == requests[0].text, "the stop string that never matches changes nothing");
    expect(scored.logprobs == scored.generated && scored.tokens.size() == scored.generated,
           "one log-probability and one token id per generated token");
    expect(scored.logprobs_ok, "log-probabilities with 2 alternatives, most likely first");
    // The DONE event's token ids read back as its text through the package's tokenizer.
    kosmos_tokenizer* tokenizer = nullptr;
    expect(kosmos_tokenizer_open(pkg, &tokenizer) == KOSMOS_OK, "kosmos_tokenizer_open");
    char* decoded = nullptr;
    expect(kosmos_detokenize(tokenizer, scored.tokens.data(), scored.tokens.size(), &decoded) ==
               KOSMOS_OK,
           "kosmos_detokenize");
    expect(decoded != nullptr && scored.text == decoded, "the DONE token ids decode to its text");
    kosmos_string_free(decoded);
    uint32_t* ids = nullptr;
    size_t n_ids = 0;
    expect(kosmos_tokenize(tokenizer, "a red circle", true, &ids, &n_ids) == KOSMOS_OK && n_ids > 1,
           "kosmos_tokenize");
    kosmos_tokens_free(ids, n_ids);
    expect(kosmos_tokenizer_free(tokenizer) == KOSMOS_OK, "kosmos_tokenizer_free");

    // The failure paths: each a status code and a message, the engine unharmed.
    Request unused;
    kosmos_params params = kosmos_default_params();
    params.beams = 2;
    expect(kosmos_engine_submit(engine, "a", nullptr, 0, &params, on_event, &unused, nullptr) ==
               KOSMOS_ERR_INVALID_ARGUMENT,
           "beams > 1 refused");
    expect(std::strstr(kosmos_last_error(), "beam") != nullptr, "the message names beams");
    expect(kosmos_engine_submit(engine, "a", nullptr, 0, nullptr, nullptr, nullptr, nullptr) ==
               KOSMOS_ERR_INVALID_ARGUMENT,
           "NULL callback refused");
    std::string long_prompt;
    for (int i = 0; i < 400; ++i) long_prompt += "a red circle ";
    expect(submit(engine, long_prompt, &image, max_tokens, &unused) == KOSMOS_ERR_CONTEXT,
           "over the context refused");
    kosmos_image not_image{argv[0], nullptr, 0};  // this program's binary
    expect(submit(engine, "<image> a", &not_image, max_tokens, &unused) == KOSMOS_ERR_IMAGE,
           "bad image refused");
    expect(kosmos_engine_submit(nullptr, "a", nullptr, 0, nullptr, on_event, &unused, nullptr) ==
               KOSMOS_ERR_INVALID_HANDLE,
           "NULL engine refused");
    expect(unused.finals == 0, "refused requests get no events");

    // Freeing with requests queued and running: each still gets exactly one final event,
    // before kosmos_engine_free returns.
    std::vector<Request> inflight(5);
    for (auto& r : inflight) submit(engine, prompts[0], &image, max_tokens, &r);
    expect(kosmos_engine_free(engine) == KOSMOS_OK, "kosmos_engine_free");
    for (auto& r : inflight) expect(r.finals == 1, "one final event each, before free returns");
    expect(kosmos_engine_free(engine) == KOSMOS_ERR_INVALID_HANDLE, "freeing twice refused");
    expect(kosmos_engine_submit(engine, "a", nullptr, 0, nullptr, on_event, &unused, nullptr) ==
               KOSMOS_ERR_INVALID_HANDLE,
           "a freed engine refused");
    for (auto* r : all) expect(r->finals == 1, "exactly one final event");

    kosmos_shutdown();
    if (failures) return 1;
    std::printf("all engine checks passed\n");
    return 0;
}
