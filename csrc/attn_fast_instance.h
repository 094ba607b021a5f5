/*
 * attn_fast_instance.h -- one instantiation of attn_fast.inc.
 * Before including it, define ISA, MR and VLEN, and ATTN_F64 (0: float32,
 * 1: float64); it defines the element type and its integer twin, includes
 * the kernels, and undefines all of it again. Included by attn_fast.c only.
 */
#if ATTN_F64
#define T double
#define SFX f64
#define ATTN_INT int64_t
#define ATTN_UINT uint64_t
#else
#define T float
#define SFX f32
#define ATTN_INT int32_t
#define ATTN_UINT uint32_t
#endif

#include "attn_fast.inc"

#undef T
#undef SFX
#undef ATTN_INT
#undef ATTN_UINT
#undef ATTN_F64
#undef VLEN
