/* fuzz_encode.c — BPE encode of arbitrary bytes with a real tokenizer
 * (SmolLM2's 49152-token byte-level BPE, $SJ_FUZZ_TOKENIZER): the GPT-2
 * pre-tokeniser on invalid UTF-8, special-token matching, the merge loop and
 * the pre-token cache. Every input must round-trip (fuzz.h). */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_single_thread();
    fuzz_check_roundtrip(fuzz_tokenizer(), data, size);
    return 0;
}
