"""Tile sizes, warps and pipeline stages per GPU, head dim and dtype.

Each kernel's choice is the first candidate, largest first, whose shared memory and
register estimates fit the card: Triton keeps `num_stages` K/V (forward, dQ) or Q/dO
(dK/dV) tiles in flight in shared memory, and the score tile and accumulators in
registers. A choice that does not fit the card fails to compile ("out of
resource"), so the backend declines instead, with the numbers.
"""

from __future__ import annotations

import math

from ._kernels import Tiles


# Shared memory a block may use (bytes) per compute capability (major, minor).
SHARED_MEMORY = {
    (8, 0): 163 * 1024,  # A100
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40
    (8, 7): 163 * 1024,  # Jetson Orin
    (8, 9): 99 * 1024,  # RTX 40xx, L4, L40
    (9, 0): 227 * 1024,  # H100, H200
    (10, 0): 227 * 1024,  # B200
    (12, 0): 99 * 1024,  # RTX 50xx
}
DEFAULT_SHARED_MEMORY = 99 * 1024  # unknown cards: the smallest of the above
REGISTERS_PER_THREAD = 255
# The estimates leave this share of the shared memory to what they do not count
# (Triton's layout conversions, alignment).
SHARED_MEMORY_MARGIN = 0.9
# Device kinds (as `jax.Device.device_kind` names them) of the cards we name in
# tests and docs, for lowering on a host without them.
DEVICE_KINDS = {
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA A10": (8, 6),
    "NVIDIA GeForce RTX 3090": (8, 6),
    "NVIDIA GeForce RTX 4090": (8, 9),
    "NVIDIA L4": (8, 9),
    "NVIDIA H100 80GB HBM3": (9, 0),
}

# (block_q, block_kv, num_warps, num_stages), preferred first. Measured on an H100
# (`benchmarks/notes/triton_kernel.md`): for 2-byte inputs 64x64 tiles, 4 warps and
# 3 stages were the fastest of five forward tiles at D=64 and D=128 and, where the
# estimate lets them (D <= 64), of the backward tiles; float32 keeps 128x64 forward
# tiles (faster than 128x32; 64x64 not measured).
HALF_PRECISION_FORWARD = Tiles(64, 64, 4, 3)
FORWARD_CANDIDATES = (
    Tiles(128, 128, 8, 3),
    Tiles(128, 64, 4, 3),
    Tiles(128, 64, 8, 2),
    Tiles(64, 64, 4, 3),
    Tiles(64, 64, 4, 2),
    Tiles(64, 32, 4, 2),
    Tiles(32, 32, 4, 2),
    Tiles(32, 16, 4, 1),
    Tiles(16, 16, 4, 1),
)
BACKWARD_CANDIDATES = (
    Tiles(64, 64, 4, 3),
    Tiles(64, 128, 8, 3),
    Tiles(64, 64, 4, 2),
    Tiles(32, 64, 4, 2),
    Tiles(32, 32, 4, 2),
    Tiles(16, 32, 4, 1),
    Tiles(16, 16, 4, 1),
)


def pow2_at_least(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def shared_bytes(kind: str, t: Tiles, d: int, dv: int, itemsize: int) -> int:
    """Estimated shared memory of a kernel: operands of its matmuls that Triton
    stages through shared memory, `num_stages` deep for the streamed ones."""
    stages = max(t.num_stages, 1)
    if kind == "forward":
        fixed = t.block_q * d  # Q
        streamed = t.block_kv * (d + dv)  # K, V
        extra = t.block_q * t.block_kv  # P, re-laid out as an operand
    elif kind == "dq":
        fixed = t.block_q * (d + dv)  # Q, dO
        streamed = t.block_kv * (d + dv)  # K, V
        extra = t.block_q * t.block_kv  # dS
    else:  # "dkv"
        fixed = t.block_kv * (d + dv)  # K, V
        streamed = t.block_q * (d + dv)  # Q, dO
        extra = 2 * t.block_q * t.block_kv  # P, dS (transposed operands)
    return itemsize * (fixed + stages * streamed + extra) + 8 * stages * t.block_q


def registers_per_thread(kind: str, t: Tiles, d: int, dv: int) -> int:
    """Estimated float32 registers per thread: accumulators and live score tiles,
    spread over the program's threads, plus a fixed allowance for addresses,
    indices and softmax statistics."""
    threads = 32 * t.num_warps
    tile = t.block_q * t.block_kv
    if kind == "forward":
        live = t.block_q * dv + 2 * tile
    elif kind == "dq":
        live = t.block_q * d + 3 * tile
    else:
        live = t.block_kv * (d + dv) + 3 * tile
    return math.ceil(live / threads) + 40


def fits(kind, t, d, dv, itemsize, cc) -> tuple[bool, str]:
    smem = shared_bytes(kind, t, d, dv, itemsize)
    limit = SHARED_MEMORY.get(cc, DEFAULT_SHARED_MEMORY) if cc else 1 << 30
    regs = registers_per_thread(kind, t, d, dv)
    ok = smem <= SHARED_MEMORY_MARGIN * limit and regs <= REGISTERS_PER_THREAD
    why = (
        f"{kind} tiles {t.block_q}x{t.block_kv}, {t.num_warps} warps, "
        f"{t.num_stages} stages need ~{smem // 1024} KiB of shared memory "
        f"(the card has {limit // 1024} KiB) and ~{regs} registers per thread "
        f"(at most {REGISTERS_PER_THREAD})"
    )
    return ok, why


def choose(
    kind: str,
    cc,
    d: int,
    dv: int,
    itemsize: int,
    lq: int,
    lkv: int,
    mask_block: tuple[int, int],
    override: dict,
) -> Tiles:
    """The tiles of kernel `kind` ("forward", "dq", "dkv"; "backward": one tile that
    fits both "dq" and "dkv") on a card of compute
    capability `cc` ((major, minor); None: interpreted, no limits), for padded head
    dims `d`, `dv` and inputs of `itemsize` bytes. Tiles are no longer than the
    sequences (rounded up to powers of two, at least 16) and compatible with the
    BlockMask's `mask_block` (one size a multiple of the other). `override` holds
    the options the user set (`block_q`, `block_kv`, `num_warps`, `num_stages`).

    **Raises:** `NotImplementedError` with a sentence when nothing fits.
    """
    candidates = BACKWARD_CANDIDATES
    if kind == "forward":
        candidates = FORWARD_CANDIDATES
        if itemsize == 2:
            candidates = (HALF_PRECISION_FORWARD, *candidates)
    kinds = ("dq", "dkv") if kind == "backward" else (kind,)
    max_q, max_kv = pow2_at_least(lq), pow2_at_least(lkv)
    why = ""
    seen = set()
    for t in candidates:
        t = Tiles(
            override.get("block_q") or min(t.block_q, max_q),
            override.get("block_kv") or min(t.block_kv, max_kv),
            override.get("num_warps") or t.num_warps,
            override.get("num_stages") or t.num_stages,
        )
        if t in seen:
            continue
        seen.add(t)
        for size, block in zip((t.block_q, t.block_kv), mask_block):
            if size % block and block % size:
                raise NotImplementedError(
                    f"its tiles ({t.block_q}, {t.block_kv}) and the BlockMask's "
                    f"block size {mask_block} do not divide one another."
                )
        checks = [fits(k, t, d, dv, itemsize, cc) for k in kinds]
        if all(ok for ok, _ in checks):
            return t
        why = next(why for ok, why in checks if not ok)
    raise NotImplementedError(f"no configuration fits the GPU: {why}.")
