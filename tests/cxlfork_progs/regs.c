/* Registers: callee-saved GPRs, all 16 ymm registers (SSE + AVX upper halves), fs_base/TLS
 * across a raw read(2) that is interrupted by the checkpoint and restarted. */
#include "conform.h"
#include <stdint.h>

static __thread uint64_t tls_word = 0x1122334455667788ULL;

int main(void)
{
    static char buf[16];
    static uint64_t ymm_in[16][4] __attribute__((aligned(32)));
    static uint64_t ymm_out[16][4] __attribute__((aligned(32)));
    static uint64_t gpr_out[6];
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 4; k++)
            ymm_in[r][k] = 0xA5A5000000000000ULL + r * 16 + k;
    ready();
    long ret;
    __asm__ volatile(
        "push %%rbx\n push %%rbp\n push %%r12\n push %%r13\n push %%r14\n push %%r15\n"
        "push %[out]\n push %[gout]\n mov %[buf], %%rsi\n"
        "vmovdqa 0(%[in]), %%ymm0\n vmovdqa 32(%[in]), %%ymm1\n vmovdqa 64(%[in]), %%ymm2\n"
        "vmovdqa 96(%[in]), %%ymm3\n vmovdqa 128(%[in]), %%ymm4\n vmovdqa 160(%[in]), %%ymm5\n"
        "vmovdqa 192(%[in]), %%ymm6\n vmovdqa 224(%[in]), %%ymm7\n vmovdqa 256(%[in]), %%ymm8\n"
        "vmovdqa 288(%[in]), %%ymm9\n vmovdqa 320(%[in]), %%ymm10\n vmovdqa 352(%[in]), %%ymm11\n"
        "vmovdqa 384(%[in]), %%ymm12\n vmovdqa 416(%[in]), %%ymm13\n vmovdqa 448(%[in]), %%ymm14\n"
        "vmovdqa 480(%[in]), %%ymm15\n"
        "mov $0x1111111111111111, %%rbx\n mov $0x2222222222222222, %%rbp\n"
        "mov $0x3333333333333333, %%r12\n mov $0x4444444444444444, %%r13\n"
        "mov $0x5555555555555555, %%r14\n mov $0x6666666666666666, %%r15\n"
        "xor %%eax, %%eax\n xor %%edi, %%edi\n mov $16, %%edx\n syscall\n"
        "pop %%rcx\n"                      /* gpr_out */
        "mov %%rbx, 0(%%rcx)\n mov %%rbp, 8(%%rcx)\n mov %%r12, 16(%%rcx)\n"
        "mov %%r13, 24(%%rcx)\n mov %%r14, 32(%%rcx)\n mov %%r15, 40(%%rcx)\n"
        "pop %%rcx\n"                      /* ymm_out */
        "vmovdqa %%ymm0, 0(%%rcx)\n vmovdqa %%ymm1, 32(%%rcx)\n vmovdqa %%ymm2, 64(%%rcx)\n"
        "vmovdqa %%ymm3, 96(%%rcx)\n vmovdqa %%ymm4, 128(%%rcx)\n vmovdqa %%ymm5, 160(%%rcx)\n"
        "vmovdqa %%ymm6, 192(%%rcx)\n vmovdqa %%ymm7, 224(%%rcx)\n vmovdqa %%ymm8, 256(%%rcx)\n"
        "vmovdqa %%ymm9, 288(%%rcx)\n vmovdqa %%ymm10, 320(%%rcx)\n vmovdqa %%ymm11, 352(%%rcx)\n"
        "vmovdqa %%ymm12, 384(%%rcx)\n vmovdqa %%ymm13, 416(%%rcx)\n vmovdqa %%ymm14, 448(%%rcx)\n"
        "vmovdqa %%ymm15, 480(%%rcx)\n vzeroupper\n"
        "pop %%r15\n pop %%r14\n pop %%r13\n pop %%r12\n pop %%rbp\n pop %%rbx\n"
        : "=&a"(ret)
        : [in] "r"(ymm_in), [out] "r"(ymm_out), [gout] "r"(gpr_out), [buf] "r"(buf)
        : "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    CHECK(ret == 3 && memcmp(buf, "go\n", 3) == 0, "raw read returned %ld", ret);
    static const uint64_t want[6] = { 0x1111111111111111ULL, 0x2222222222222222ULL,
        0x3333333333333333ULL, 0x4444444444444444ULL, 0x5555555555555555ULL,
        0x6666666666666666ULL };
    for (int i = 0; i < 6; i++)
        CHECK(gpr_out[i] == want[i], "gpr %d = %#lx", i, (unsigned long)gpr_out[i]);
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 4; k++)
            CHECK(ymm_out[r][k] == ymm_in[r][k], "ymm%d word %d = %#lx", r, k,
                  (unsigned long)ymm_out[r][k]);
    CHECK(tls_word == 0x1122334455667788ULL, "TLS through fs_base");
    return finish();
}
