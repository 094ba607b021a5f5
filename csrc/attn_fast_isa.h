/*
 * attn_fast_isa.h -- one instruction set's two copies of the fast kernels,
 * float32 and float64. Before including it, define ISA (the name in the
 * functions' names), MR (rows per microkernel tile) and VLEN_F32 (float32
 * lanes per vector; float64 gets half as many). Included by attn_fast.c only.
 */
#define ATTN_F64 0
#define VLEN VLEN_F32
#include "attn_fast_instance.h"
#define ATTN_F64 1
#define VLEN (VLEN_F32 / 2)
#include "attn_fast_instance.h"
#undef ISA
#undef MR
#undef VLEN_F32
