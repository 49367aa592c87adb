/* Exercises the C API of the compiled attention_block example: one good run (outputs written to
 * a file for the Rust test to compare) and every refusal the header promises, each printed as
 * "<case>: <code> <message>". Usage: api_contract X.bin MASK.bin OUT.bin WRONG_WEIGHTS_FILE */
#include "attention_block.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BATCH = 2, SEQ = 5, HIDDEN = 16 };

static float x[BATCH * SEQ * HIDDEN];
static int64_t mask[BATCH * SEQ];
static float out[BATCH * SEQ * HIDDEN];

static int read_file(const char *path, void *buffer, size_t bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t got = fread(buffer, 1, bytes, f);
    fclose(f);
    return got == bytes;
}

static void report(const char *what, int32_t code, const attention_block_ctx *ctx) {
    printf("%s: %d %s\n", what, code, attention_block_last_error(ctx));
}

int main(int argc, char **argv) {
    if (argc != 5 || !read_file(argv[1], x, sizeof x) || !read_file(argv[2], mask, sizeof mask)) {
        fprintf(stderr, "usage: api_contract X.bin MASK.bin OUT.bin WRONG_WEIGHTS_FILE\n");
        return 2;
    }
    attention_block_ctx *ctx = NULL;
    int32_t code = attention_block_create(NULL, &ctx);
    report("create", code, ctx);
    if (code != KILN_OK) return 1;

    int64_t x_dims[3] = {BATCH, SEQ, HIDDEN};
    int64_t mask_dims[2] = {BATCH, SEQ};
    int64_t out_dims[3] = {0, 0, 0};
    kiln_tensor inputs[2] = {
        {KILN_F32, 3, x_dims, x, sizeof x},
        {KILN_I64, 2, mask_dims, mask, sizeof mask},
    };
    kiln_tensor outputs[1] = {{KILN_F32, 3, out_dims, out, sizeof out}};

    code = attention_block_run(ctx, inputs, ATTENTION_BLOCK_NUM_INPUTS, outputs, ATTENTION_BLOCK_NUM_OUTPUTS);
    report("run", code, ctx);
    printf("out dims: %lld %lld %lld\n", (long long)out_dims[0], (long long)out_dims[1], (long long)out_dims[2]);
    FILE *f = fopen(argv[3], "wb");
    if (!f || fwrite(out, 1, sizeof out, f) != sizeof out) return 1;
    fclose(f);

    report("null context", attention_block_run(NULL, inputs, 2, outputs, 1), NULL);
    report("one input", attention_block_run(ctx, inputs, 1, outputs, 1), ctx);
    report("null inputs", attention_block_run(ctx, NULL, 2, outputs, 1), ctx);

    inputs[0].dtype = KILN_I64;
    report("wrong dtype", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    inputs[0].dtype = KILN_F32;

    inputs[0].rank = 2;
    report("wrong rank", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    inputs[0].rank = 3;

    x_dims[0] = 5;
    mask_dims[0] = 5;
    report("batch above its maximum", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    x_dims[0] = BATCH;

    mask_dims[0] = 1;
    report("inconsistent batch", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    mask_dims[0] = BATCH;

    x_dims[2] = 8;
    report("fixed dim differs", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    x_dims[2] = HIDDEN;

    inputs[0].bytes = sizeof x - 4;
    report("input too small", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    inputs[0].bytes = sizeof x;

    inputs[1].data = NULL;
    report("null input data", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    inputs[1].data = mask;

    inputs[0].data = (char *)x + 1;
    inputs[0].bytes = sizeof x - 4;
    x_dims[1] = SEQ - 1;
    mask_dims[1] = SEQ - 1;
    report("misaligned input", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    inputs[0].data = x;
    inputs[0].bytes = sizeof x;
    x_dims[1] = SEQ;
    mask_dims[1] = SEQ;

    outputs[0].bytes = sizeof out - 4;
    report("output too small", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    outputs[0].bytes = sizeof out;

    outputs[0].dtype = KILN_I32;
    report("wrong output dtype", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    outputs[0].dtype = KILN_F32;

    report("no outputs", attention_block_run(ctx, inputs, 2, outputs, 0), ctx);

    report("run again", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);

    report("zero threads", attention_block_set_threads(ctx, 0), ctx);
    static float single[BATCH * SEQ * HIDDEN];
    report("one thread", attention_block_set_threads(ctx, 1), ctx);
    report("run on one thread", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    memcpy(single, out, sizeof out);
    report("three threads", attention_block_set_threads(ctx, 3), ctx);
    report("run on three threads", attention_block_run(ctx, inputs, 2, outputs, 1), ctx);
    printf("threads agree: %d\n", memcmp(single, out, sizeof out) == 0);
    attention_block_destroy(ctx);

    attention_block_ctx *missing = NULL;
    code = attention_block_create("/nonexistent/attention_block.weights", &missing);
    report("missing weight file", code, missing);
    report("run without weights", attention_block_run(missing, inputs, 2, outputs, 1), missing);
    attention_block_destroy(missing);

    attention_block_ctx *wrong = NULL;
    code = attention_block_create(argv[4], &wrong);
    report("foreign weight file", code, wrong);
    attention_block_destroy(wrong);

    report("null out pointer", attention_block_create(NULL, NULL), NULL);
    attention_block_destroy(NULL);
    return 0;
}
