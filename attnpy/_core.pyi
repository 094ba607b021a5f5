# Types of the C extension (csrc/attnpy_module.c). Private: the public API is
# attnpy's functions, which convert and check arguments before calling these.
from typing import Literal, Optional, Sequence, Tuple

import numpy as np

MAX_DIMS: int
MAX_EXTENT: int
MAX_THREADS: int

_Mask = Tuple[np.ndarray, Literal["attend", "ignore", "add"], str]

def sdpa(query: np.ndarray, key: np.ndarray, value: np.ndarray, *, scale: float,
         masks: Sequence[_Mask] = ..., extra_keys: int = ..., is_causal: bool = ...,
         enable_gqa: bool = ..., query_offset: int = ...,
         window: Optional[Tuple[int, int]] = ..., alibi_slopes: Optional[np.ndarray] = ...,
         dropout_p: float = ..., seed: int = ...,
         need_weights: bool = ..., trace: bool = ...,
         out: Optional[np.ndarray] = ...) -> tuple: ...
def ran_name(code: int) -> Tuple[str, str]: ...
def sdpa_backward(grad_output: np.ndarray, query: np.ndarray, key: np.ndarray,
                  value: np.ndarray, *, scale: float, masks: Sequence[_Mask] = ...,
                  extra_keys: int = ..., is_causal: bool = ..., enable_gqa: bool = ...,
                  query_offset: int = ..., window: Optional[Tuple[int, int]] = ...,
                  alibi_slopes: Optional[np.ndarray] = ...,
                  dropout_p: float = ..., seed: int = ...,
                  weights: Optional[np.ndarray] = ..., trace: bool = ...,
                  grads: Optional[Tuple[Optional[np.ndarray], ...]] = ...) -> tuple: ...
def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = ..., *,
           out: Optional[np.ndarray] = ..., accumulate: bool = ...) -> np.ndarray: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...
def set_kernel(name: str, /) -> None: ...
def get_kernel() -> str: ...
def supported_kernels() -> list[str]: ...
def fma_peak(threads: int, iters: int, /) -> float: ...
