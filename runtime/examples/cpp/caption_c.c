/* The caption example in plain C99, to show the header is C: caption an image, print the text
 * and how many tokens it is.
 *
 *   caption_c <package dir> <image> [max tokens]
 *
 * Prints the generated text on the first line of stdout and its token count on the second. */
#include <stdio.h>
#include <stdlib.h>

#include "kosmos_rt.h"

static int fail(const char* what, enum kosmos_status status) {
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)status, kosmos_last_error());
    return 1;
}

int main(int argc, char** argv) {
    struct kosmos_model* model = NULL;
    struct kosmos_tokenizer* tokenizer = NULL;
    struct kosmos_params params;
    struct kosmos_image image;
    enum kosmos_status st;
    char* text = NULL;
    uint32_t* ids = NULL;
    size_t n_ids = 0;
    int code = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: %s <package dir> <image> [max tokens]\n", argv[0]);
        return 2;
    }
    st = kosmos_model_open(argv[1], "cpu", &model);
    if (st != KOSMOS_OK) return fail("kosmos_model_open", st);
    /* Defaults for this header's struct size (safe if the library is newer than the header). */
    st = KOSMOS_PARAMS_INIT(&params);
    if (st != KOSMOS_OK) return fail("kosmos_params_init", st);
    if (argc > 3) params.max_tokens = (uint32_t)strtoul(argv[3], NULL, 10);
    image.path = argv[2];
    image.data = NULL;
    image.size = 0;
    st = kosmos_generate(model, "", &image, 1, &params, NULL, NULL, &text);
    if (st != KOSMOS_OK) {
        code = fail("kosmos_generate", st);
        goto done;
    }
    st = kosmos_tokenizer_open(argv[1], &tokenizer);
    if (st != KOSMOS_OK) {
        code = fail("kosmos_tokenizer_open", st);
        goto done;
    }
    st = kosmos_tokenize(tokenizer, text, false, &ids, &n_ids);
    if (st != KOSMOS_OK) {
        code = fail("kosmos_tokenize", st);
        goto done;
    }
    printf("%s\n%zu\n", text, n_ids);

done:
    kosmos_tokens_free(ids, n_ids);
    kosmos_string_free(text);
    kosmos_tokenizer_free(tokenizer);
    kosmos_model_free(model);
    kosmos_shutdown();
    return code;
}
