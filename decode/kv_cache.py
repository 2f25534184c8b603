"""The paged KV cache: keys and values of every cached token, in fixed-size pages that rows take as their
tokens arrive and give back when their request ends.

Layout (one tensor for keys, one for values): ``[layers, pages + 1, kv_heads, page_size, head_dim]``, or
``[layers, pages + 1, page_size, kv_heads, head_dim]`` for flash-attn's paged ``flash_attn_with_kvcache``.
Page 0 is the trash page: it belongs to no row, and every page-table entry a row has not filled points to it,
so the writes of padding (a prefill chunk past a short prompt, an edit padded to the batch's longest) and of
a step whose token the host then discards land there instead of in another row's keys. Position ``t`` of cache
row ``r`` is slot ``t % page_size`` of page ``table[r, t // page_size]``; ``table`` is ``[rows, width]`` int32 on
the device and only ever updated in place (a CUDA graph captured once reads the current entries on replay).
The host keeps its own copy (``row_pages``) and the free list, so deciding what to allocate never reads
the device.

How many pages exist is the memory budget's business (``pages``); without one, every run gets
``rows x width`` pages, as many positions as a dense cache of that run would hold, so no request ever
waits for pages. Pages in use follow the tokens actually held; ``peak`` is the most in use since the run began.
"""

from __future__ import annotations

import torch

TRASH = 0  # the page of every unfilled table entry


class KVCache:
    """Paged keys and values of ``layers`` layers (see the module docstring).

    Args:
        page_size: positions per page.
        flash: flash-attn's page layout (``[.., page_size, kv_heads, head_dim]`` per page).
    """

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, page_size: int,
                 flash: bool = False):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device, self.page_size, self.flash = dtype, torch.device(device), page_size, flash
        self.budget_pages: int | None = None  # the page budget, set by the owner (None: sized by ``ensure`` per run)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.free_pages: list[int] = []
        self.row_pages: list[list[int]] = []
        self.peak = 0

    # --- sizes ---------------------------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        return self.bytes_per_token * self.page_size

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    @property
    def total_pages(self) -> int:
        """Pages rows can take (the trash page not counted)."""
        return 0 if self.k is None else self.k.shape[1] - 1

    @property
    def pages_free(self) -> int:
        return len(self.free_pages)

    @property
    def pages_in_use(self) -> int:
        return self.total_pages - self.pages_free

    @property
    def positions(self) -> int:
        """Positions a row can address (the page table's width in positions)."""
        return 0 if self.table is None else self.table.shape[1] * self.page_size

    def memory(self) -> dict:
        P = self.page_bytes
        return {
            "kv_cache_bytes": 0 if self.k is None else 2 * self.k.numel() * self.k.element_size(),
            "kv_bytes_in_use": self.pages_in_use * P, "kv_bytes_peak": self.peak * P, "page_size": self.page_size,
            "kv_pages_total": self.total_pages, "kv_pages_in_use": self.pages_in_use,
            "kv_pages_free": self.pages_free, "kv_pages_peak": self.peak,
            "cache_rows": 0 if self.table is None else self.table.shape[0], "cache_positions": self.positions,
        }

    # --- allocation ------------------------------------------------------------------------------------------

    def ensure(self, rows: int, positions: int) -> bool:
        """Make room for ``rows`` rows of up to ``positions`` positions, every row empty (a new run). Tensors that
        are large enough are kept; returns whether any was allocated anew (CUDA graphs must then be captured
        again)."""
        width = self.pages_for(positions)
        pages = rows * width if self.budget_pages is None else self.budget_pages
        new = self.k is None or self.total_pages < pages
        if new:
            self.k = self.v = None  # free the old pool before allocating the new one
            L, H, D, P = self.layers, self.kv_heads, self.head_dim, self.page_size
            shape = (L, pages + 1, P, H, D) if self.flash else (L, pages + 1, H, P, D)
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.table is None or self.table.shape[0] < rows or self.table.shape[1] < width:
            self.table = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
            new = True
        else:
            self.table.zero_()
        self.free_pages = list(range(self.total_pages, TRASH, -1))  # pop() hands out 1, 2, 3, ...
        self.row_pages = [[] for _ in range(self.table.shape[0])]
        self.peak = 0
        return new

    def release(self) -> None:
        self.k = self.v = self.table = None
        self.free_pages, self.row_pages, self.peak = [], [], 0

    def missing(self, needs: list[tuple[int, int]]) -> int:
        """Pages that rows lack to hold ``(row, positions)`` each (positions past the table are never needed)."""
        width = self.table.shape[1]
        return sum(max(0, min(self.pages_for(n), width) - len(self.row_pages[row])) for row, n in needs)

    def reserve(self, needs: list[tuple[int, int]]) -> None:
        """Give each ``(row, positions)`` the pages it lacks (``missing(needs)`` must not exceed ``pages_free``);
        one in-place update of the device table."""
        width = self.table.shape[1]
        update = []
        for row, n in needs:
            have = self.row_pages[row]
            while len(have) < min(self.pages_for(n), width):
                if not self.free_pages:
                    raise RuntimeError("KVCache.reserve: no free page left (the caller must check missing() first)")
                update.append((row, len(have), self.free_pages.pop()))
                have.append(update[-1][2])
        if update:
            rows, cols, pages = self._upload(list(zip(*update)))
            self.table[rows, cols] = pages.to(torch.int32)
            self.peak = max(self.peak, self.pages_in_use)

    def free(self, row: int) -> None:
        """Row ``row``'s pages go back to the free list; its table entries to the trash page."""
        self.free_pages += self.row_pages[row]
        self.row_pages[row] = []
        self.table[row].fill_(TRASH)

    def move(self, src: int, dst: int) -> None:
        """Row ``src``'s pages become row ``dst``'s (an empty row): one table row is copied, no key moves."""
        self.row_pages[dst], self.row_pages[src] = self.row_pages[src], []
        self.table[dst].copy_(self.table[src])
        self.table[src].fill_(TRASH)

    def _upload(self, values: list) -> torch.Tensor:
        """``values`` as an int64 tensor on the device without waiting for it (pinned memory on CUDA: the caching
        host allocator keeps the buffer until the copy is done)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    # --- reads -------------------------------------------------------------------------------------------------

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``pages`` [n, m] (int64 table entries) as dense ``[n, kv_heads, m * page_size,
        head_dim]`` copies, for SDPA."""
        n, m = pages.shape
        shape = (n, self.kv_heads, m * self.page_size, self.head_dim)
        return tuple(c[layer][pages].transpose(1, 2).reshape(shape) for c in (self.k, self.v))
