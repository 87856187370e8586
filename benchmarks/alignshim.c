/* A diagnostic for benchmarks/plan_allocator.py, preloaded (LD_PRELOAD) into a training process; not part of
   tunelab. posix_memalign with an alignment of 64 bytes or less (torch's CPU allocator asks for 64) is served by
   plain malloc, over-allocated by 80 bytes, the aligned pointer behind a tagged header; free recognises the tag.

   Why: glibc before 2.39 serves posix_memalign(64, n) by asking its heap for n + 16 + 64 + 32 bytes and cutting
   the aligned block out; the remainders it cuts off go to the per-thread cache, where the heap cannot merge them
   back (glibc bug 30723), so a freed block of exactly that size cannot serve the same request again (the
   pattern of sourceware bug 14581). With small transients interleaved with kept tensors, freed blocks stay in
   the heap as holes and the heap grows instead. Plain malloc reuses a freed block of the same size. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#define TAG 0x5eedfacecafef00dULL  /* in the word two below the aligned pointer; cleared when freed */

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

int posix_memalign(void **out, size_t align, size_t n) {
    if (align > 64) {  /* not torch's: glibc's own path */
        void *p = __libc_memalign(align, n);
        if (!p) return ENOMEM;
        *out = p;
        return 0;
    }
    char *raw = __libc_malloc(n + 64 + 16);  /* room to align up by < 64 after a 16-byte header */
    if (!raw) return ENOMEM;
    uintptr_t aligned = ((uintptr_t)raw + 16 + 63) & ~(uintptr_t)63;
    ((uint64_t *)aligned)[-2] = TAG;
    ((void **)aligned)[-1] = raw;
    *out = (void *)aligned;
    return 0;
}

void free(void *p) {
    if (p && ((uintptr_t)p & 63) == 0 && ((uint64_t *)p)[-2] == TAG) {
        ((uint64_t *)p)[-2] = 0;
        __libc_free(((void **)p)[-1]);
        return;
    }
    __libc_free(p);
}
