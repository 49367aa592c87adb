/* Sentence embeddings from C with a kiln-compiled all-MiniLM-L6-v2.
 *
 * Reads the token ids of the fixture's sentences (cases single0..single5 of
 * ../shared/fixtures/minilm-l6/reference.safetensors), embeds each through the generated
 * `minilm_run`, and prints the cosine between kiln's embedding and the reference computed with
 * transformers. Build and run with examples/c/run.sh.
 *
 * Usage: embed REFERENCE.safetensors */
#include "minilm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A safetensors file held in memory: an 8-byte little-endian header length, a JSON header
 * mapping each tensor name to its dtype, shape and byte range, then the data. */
typedef struct {
    unsigned char *bytes;
    size_t size;
    const char *header; /* NUL-terminated copy of the JSON header */
    size_t data_start;
} safetensors;

static int load_safetensors(const char *path, safetensors *file) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    file->bytes = malloc((size_t)size);
    if (!file->bytes || fread(file->bytes, 1, (size_t)size, f) != (size_t)size || size < 8) {
        fclose(f);
        return 0;
    }
    fclose(f);
    file->size = (size_t)size;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | file->bytes[i];
    if (header_len > file->size - 8) return 0;
    char *header = malloc(header_len + 1);
    if (!header) return 0;
    memcpy(header, file->bytes + 8, header_len);
    header[header_len] = '\0';
    file->header = header;
    file->data_start = 8 + header_len;
    return 1;
}

/* The bytes of tensor `name`, or NULL; sets *len. Shapes are implied by the caller's case. */
static const void *tensor_data(const safetensors *file, const char *name, size_t *len) {
    char key[128];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *entry = strstr(file->header, key);
    if (!entry) return NULL;
    const char *offsets = strstr(entry, "\"data_offsets\":[");
    if (!offsets) return NULL;
    unsigned long long begin = 0, end = 0;
    if (sscanf(offsets, "\"data_offsets\":[%llu,%llu]", &begin, &end) != 2) return NULL;
    if (end < begin || file->data_start + end > file->size) return NULL;
    *len = (size_t)(end - begin);
    return file->bytes + file->data_start + begin;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s REFERENCE.safetensors\n", argv[0]);
        return 2;
    }
    safetensors file;
    if (!load_safetensors(argv[1], &file)) {
        fprintf(stderr, "%s: cannot read a safetensors file\n", argv[1]);
        return 1;
    }
    minilm_ctx *ctx = NULL;
    if (minilm_create(NULL, &ctx) != KILN_OK) {
        fprintf(stderr, "minilm_create: %s\n", minilm_last_error(ctx));
        return 1;
    }
    static const char *names[MINILM_NUM_INPUTS] = {"input_ids", "attention_mask", "token_type_ids"};
    static float hidden[MINILM_OUTPUT_0_MAX_BYTES / sizeof(float)];
    static float embedding[MINILM_OUTPUT_1_MAX_BYTES / sizeof(float)];
    int status = 0;
    for (int c = 0; c < 6; c++) {
        kiln_tensor inputs[MINILM_NUM_INPUTS];
        int64_t dims[MINILM_NUM_INPUTS][2];
        /* Copies keep each input 8-byte aligned, as the API requires. */
        int64_t *ids[MINILM_NUM_INPUTS] = {NULL, NULL, NULL};
        for (int i = 0; i < MINILM_NUM_INPUTS; i++) {
            char name[64];
            snprintf(name, sizeof name, "single%d.%s", c, names[i]);
            size_t len = 0;
            const void *data = tensor_data(&file, name, &len);
            if (!data) {
                fprintf(stderr, "%s: no tensor %s\n", argv[1], name);
                return 1;
            }
            ids[i] = malloc(len);
            memcpy(ids[i], data, len);
            dims[i][0] = 1;
            dims[i][1] = (int64_t)(len / sizeof(int64_t));
            inputs[i] = (kiln_tensor){KILN_I64, 2, dims[i], ids[i], len};
        }
        int64_t hidden_dims[3], embedding_dims[2];
        kiln_tensor outputs[MINILM_NUM_OUTPUTS] = {
            {KILN_F32, 3, hidden_dims, hidden, sizeof hidden},
            {KILN_F32, 2, embedding_dims, embedding, sizeof embedding},
        };
        if (minilm_run(ctx, inputs, MINILM_NUM_INPUTS, outputs, MINILM_NUM_OUTPUTS) != KILN_OK) {
            fprintf(stderr, "minilm_run: %s\n", minilm_last_error(ctx));
            return 1;
        }
        char name[64];
        snprintf(name, sizeof name, "single%d.sentence_embedding", c);
        size_t len = 0;
        const float *reference = tensor_data(&file, name, &len);
        if (!reference || len != (size_t)embedding_dims[1] * sizeof(float)) {
            fprintf(stderr, "%s: no tensor %s of %lld floats\n", argv[1], name, (long long)embedding_dims[1]);
            return 1;
        }
        double dot = 0, norm_kiln = 0, norm_reference = 0;
        for (int64_t j = 0; j < embedding_dims[1]; j++) {
            float r;
            memcpy(&r, reference + j, sizeof r);
            dot += (double)embedding[j] * r;
            norm_kiln += (double)embedding[j] * embedding[j];
            norm_reference += (double)r * r;
        }
        double cosine = dot / sqrt(norm_kiln * norm_reference);
        printf("single%d: %lld tokens, cosine with the reference %.9f\n", c, (long long)dims[0][1], cosine);
        if (!(cosine > 0.99999)) status = 1;
        for (int i = 0; i < MINILM_NUM_INPUTS; i++) free(ids[i]);
    }
    minilm_destroy(ctx);
    return status;
}
